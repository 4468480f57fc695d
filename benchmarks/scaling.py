"""Training throughput of the tiny UNet stage: 1 worker vs N DDP workers, measured in the same run.

    .venv/bin/python benchmarks/scaling.py [--workers 2] [--steps 150] [--batch-size 32]

Prints images/s for each (median of the logged intervals after warm-up, taken from metrics.jsonl) and
the ratio. These machines are noisy, so only the ratio within one run means much. Each figure, with the
machine it came from, goes into benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
from pathlib import Path

import torch

from sdray.data.digits import import_digits
from sdray.spec import parse_job
from sdray.train.launch import run_job


def job(name: str, data: Path, out: Path, workers: int, steps: int, batch: int, gpu: bool) -> dict:
    return {
        "apiVersion": "sdray.io/v1alpha1", "kind": "DiffusionJob", "metadata": {"name": name},
        "spec": {
            "model": {"preset": "tiny"},
            "data": {"uri": str(data)},
            "train": {"max_steps": steps, "batch_size": batch, "learning_rate": 1e-3, "log_every_n_steps": 10},
            "distributed": {"num_workers": workers, "use_gpu": gpu,
                            "resources_per_worker": {"CPU": 1, **({"GPU": 1} if gpu else {})}},
            "checkpoint": {"every_n_steps": steps, "resume": "never"},
            "output": {"uri": str(out)},
        },
    }


def images_per_s(out: Path) -> float:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [r["images_per_s"] for r in rows if "images_per_s" in r]
    return statistics.median(rates[len(rates) // 3:])  # skip the warm-up intervals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--gpu", action="store_true")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="sdray-bench-"))
    import_digits(str(root / "digits"))
    results = {}
    for workers in (1, args.workers):
        out = root / f"w{workers}"
        run_job(parse_job(job(f"bench-w{workers}", root / "digits", out, workers, args.steps, args.batch_size,
                              args.gpu)), worker_logs=False)
        results[workers] = images_per_s(out)
        print(f"workers={workers} images_per_s={results[workers]:.1f}", flush=True)
    device = torch.cuda.get_device_name(0) if args.gpu else f"{platform.processor() or 'cpu'} (CPU)"
    print(f"device={device} batch_per_worker={args.batch_size}")
    print(f"scaling_ratio={results[args.workers] / results[1]:.2f} ({args.workers} workers vs 1)")


if __name__ == "__main__":
    main()
