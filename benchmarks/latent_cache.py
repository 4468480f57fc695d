"""Training on a latent cache against encoding online: same model, data, batch, measured in the same run.

    .venv/bin/python benchmarks/latent_cache.py [--steps 200] [--batch-size 32] [--threads 1] [--repeats 2]
                                                [--resolution 16]

The cache is made by the real ``sdray data precompute`` pipeline (Ray Data on a local Ray) from the digits
at ``--resolution``, then held in memory; the online side's pixels come from the same ``Preprocess`` step,
also in memory, so reading from storage is outside the measurement on both sides and what differs is the
VAE and text-encoder work of each step. Both sides are the real ``Trainer`` behind a plain-process
``LocalContext``, run alternately ``--repeats`` times; the best of each counts, and each figure is the
median images/s of its own logged intervals after the first. Prints ``latent_cache_ratio`` = cache /
online (the anchor, MosaicML's Stable Diffusion 2 runs on GPUs, is about 1.4).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import ray.data

from sdray import storage
from sdray.data.augment import Preprocess
from sdray.data.digits import CAPTION, digit_images, import_digits
from sdray.data.precompute import precompute
from sdray.models.build import build_components
from sdray.spec import ModelSpec, parse_job
from sdray.train.context import LocalContext
from sdray.train.launch import ray_cluster
from sdray.train.loop import Trainer
from train_overhead import InMemory


def job(uri: str, fmt: str, out: Path, *, steps: int, batch: int, resolution: int):
    return parse_job({
        "apiVersion": "sdray.io/v1alpha1", "kind": "DiffusionJob", "metadata": {"name": "latent-cache"},
        "spec": {"model": {"preset": "tiny", "resolution": resolution},
                 "data": {"uri": uri, "format": fmt, "shuffle": False},
                 "train": {"max_steps": steps, "batch_size": batch, "learning_rate": 1e-4, "log_every_n_steps": 25},
                 "checkpoint": {"every_n_steps": steps}, "output": {"uri": str(out)}},
    })


def pixel_rows(resolution: int) -> dict[str, np.ndarray]:
    pngs, labels = digit_images(resolution)
    tokenizer = build_components(ModelSpec(preset="tiny"), denoiser=False).tokenizer
    batch = {"key": np.array([str(i) for i in range(len(pngs))], dtype=object), "image": np.array(pngs, dtype=object),
             "caption": np.array([CAPTION.format(t) for t in labels], dtype=object)}
    return Preprocess(resolution=resolution, resize=None, crop="center", random_flip=False,
                      tokenizers=[tokenizer])(batch)


def cache_rows(root: Path, resolution: int, batch: int) -> tuple[str, dict[str, np.ndarray], float]:
    """Precompute the digits with the real pipeline; returns the cache's URI, its rows and the seconds taken."""
    data, cache = str(root / "digits"), str(root / "digits-latents")
    import_digits(data, "imagefolder", resolution)
    source = job(data, "imagefolder", root / "unused", steps=1, batch=batch, resolution=resolution)
    with ray_cluster(source, log_to_driver=False):
        start = time.perf_counter()
        manifest = precompute(source, cache)
        elapsed = time.perf_counter() - start
        fs, path = storage.filesystem(cache)
        rows = ray.data.read_parquet(path, filesystem=fs, file_extensions=["parquet"]).take_batch(
            manifest["rows"], batch_format="numpy")
    return cache, rows, elapsed


def images_per_s(doc, rows, batch: int, threads: int, out: Path) -> float:
    ctx = LocalContext(train=InMemory(rows), validation=None, batch_size=batch, shuffle=False,
                       run_dir=out / "checkpoints", keep_last=1, num_threads=threads)
    Trainer(doc, ctx).run()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return statistics.median([r["images_per_s"] for r in records if "images_per_s" in r][1:])  # skip warm-up


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--resolution", type=int, default=16)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="sdray-latent-cache-"))
    cache, cached, precompute_s = cache_rows(root, args.resolution, args.batch_size)
    pixels = pixel_rows(args.resolution)
    common = dict(steps=args.steps, batch=args.batch_size, resolution=args.resolution)
    online, on_cache = [], []
    for i in range(args.repeats):
        out = root / f"online-{i}"
        online.append(images_per_s(job("unused", "imagefolder", out, **common), pixels, args.batch_size,
                                   args.threads, out))
        out = root / f"cache-{i}"
        on_cache.append(images_per_s(job(cache, "latents", out, **common), cached, args.batch_size,
                                     args.threads, out))
        print(f"online={online[-1]:.1f} images/s  cache={on_cache[-1]:.1f} images/s", flush=True)
    print(f"threads={args.threads} batch={args.batch_size} steps={args.steps} resolution={args.resolution} "
          f"device=cpu precompute={len(pixels['key'])} images in {precompute_s:.1f} s")
    print(f"latent_cache_ratio={max(on_cache) / max(online):.3f} (cache / online encoding; anchor ~1.4)")


if __name__ == "__main__":
    main()
