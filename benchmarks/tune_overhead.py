"""A 4-trial search against the same 4 trial configurations run one after another with `sdray train`.

    .venv/bin/python benchmarks/tune_overhead.py [--steps 60] [--images 400]

Both sides run here, in this order, on an embedded Ray each (as the commands start them):
1. `sdray tune` of a document whose `spec.tune` is a 2 × 2 grid (learning rate × batch size), FIFO
   scheduler (every trial runs to the end: the same work as the other side), trials as many at once as
   the cluster fits;
2. `sdray train` of each of the 4 trial documents (`sdray.tuning.apply_params`), one after another.
Prints both wall times and ``ratio`` = search / sequential (below 1: the search is faster).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from sdray.data.digits import import_digits
from sdray.spec import parse_job
from sdray.tuning import apply_params

GRID = {"train.learning_rate": [1e-3, 3e-3], "train.batch_size": [16, 32]}


def document(root: Path, steps: int) -> dict:
    return {
        "apiVersion": "sdray.io/v1alpha1", "kind": "DiffusionJob", "metadata": {"name": "tune-bench"},
        "spec": {
            "model": {"preset": "tiny"},
            "data": {"uri": str(root / "digits"), "validation_fraction": 0.1},
            "train": {"max_steps": steps, "batch_size": 16, "learning_rate": 1e-3, "log_every_n_steps": 10},
            "distributed": {"num_workers": 1, "resources_per_worker": {"CPU": 1}},
            "checkpoint": {"every_n_steps": steps // 3, "keep_last": 1, "resume": "never"},
            "validation": {"max_batches": 2},
            "output": {"uri": str(root / "search")},
            "tune": {"search_space": {k: {"grid": v} for k, v in GRID.items()}, "scheduler": {"name": "fifo"}},
        },
    }


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--images", type=int, default=400)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="sdray-tune-bench-"))
    import_digits(str(root / "digits"), "imagefolder", 16, limit=args.images)
    doc = document(root, args.steps)
    (root / "search.yaml").write_text(yaml.safe_dump(doc))
    sdray = [sys.executable, "-m", "sdray.cli"]
    search = timed([*sdray, "tune", str(root / "search.yaml")])
    print(f"search: 4 trials in {search:.1f} s", flush=True)

    job = parse_job(doc)
    sequential = 0.0
    for i, (lr, batch) in enumerate((lr, b) for lr in GRID["train.learning_rate"] for b in GRID["train.batch_size"]):
        trial = apply_params(job, {"train.learning_rate": lr, "train.batch_size": batch})
        trial["metadata"]["name"] = f"tune-bench-{i}"
        trial["spec"]["output"] = {"uri": str(root / f"train-{i}")}
        path = root / f"train-{i}.yaml"
        path.write_text(yaml.safe_dump(trial))
        sequential += timed([*sdray, "train", str(path)])
    print(f"sequential: 4 x sdray train in {sequential:.1f} s", flush=True)
    print(f"steps={args.steps} images={args.images} trials=4 (lr x batch grid), 1 worker per trial")
    print(f"ratio={search / sequential:.2f} (search wall time / sequential sdray train wall time)")


if __name__ == "__main__":
    main()
