"""Ray Data against torch's DataLoader: read → decode → augment images/s from SeaweedFS S3, same run.

    .venv/bin/python benchmarks/data_throughput.py [--images 1797] [--source-px 128] [--resolution 64]
                                                   [--epochs 3] [--loader-workers 2] [--train-steps 150]

Starts a real SeaweedFS S3 server on 127.0.0.1 and writes the digits there as an ``imagefolder`` dataset
(PNGs of ``--source-px`` pixels, so decoding and resizing are real work). Then, in this process:

1. **Ray Data**: sdray's own pipeline (``build_datasets``: read metadata.jsonl and image objects, decode,
   resize, random crop and flip, tokenize) iterated in batches, as a training worker does;
2. **DataLoader**: a ``torch.utils.data.Dataset`` over the same objects (each ``__getitem__`` reads one
   object from S3 and runs the same ``Preprocess`` code), ``--loader-workers`` processes, same batch size.

Each side runs ``--epochs`` epochs; the first is warm-up (Ray's workers, the DataLoader's processes), the
best of the rest counts. Prints ``ratio`` = Ray Data / DataLoader.

Then a short Ray Train run of the tiny preset on the same S3 data reports the training loop's
**data-wait share**: the time the loop waited for its next batch over the run's wall time (from its
``metrics.jsonl``).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from sdray import storage
from sdray.data.augment import Preprocess
from sdray.data.digits import import_digits
from sdray.data.pipeline import build_datasets
from sdray.models.build import data_requirements
from sdray.s3server import s3_env, start_seaweed
from sdray.spec import ModelSpec, parse_job
from sdray.train.context import iterate

BUCKET = "bench"


def job_doc(name: str, data_uri: str, out: Path, resolution: int, **train) -> dict:
    return {
        "apiVersion": "sdray.io/v1alpha1", "kind": "DiffusionJob", "metadata": {"name": name},
        "spec": {
            "model": {"preset": "tiny", "resolution": resolution},
            "data": {"uri": data_uri, "crop": "random", "random_flip": True},
            "train": {"batch_size": 32, "learning_rate": 1e-3, "log_every_n_steps": 10, **train},
            "distributed": {"num_workers": 1, "resources_per_worker": {"CPU": 1}},
            "checkpoint": {"every_n_steps": 10_000, "resume": "never"},
            "output": {"uri": str(out)},
        },
    }


def ray_data_rate(job, tokenizers, batch_size: int, epochs: int) -> list[float]:
    rates = []
    with build_datasets(job.spec, resolution=job.spec.model.resolution, tokenizers=tokenizers) as data:
        for _ in range(epochs):
            start, n = time.perf_counter(), 0
            for batch in iterate(data.train, batch_size=batch_size, shuffle=True):
                n += len(batch["key"])
            rates.append(n / (time.perf_counter() - start))
    return rates


class S3Images(torch.utils.data.Dataset):
    """The imagefolder's rows; each item is read from S3 and preprocessed by sdray's ``Preprocess``."""

    def __init__(self, uri: str, preprocess: Preprocess):
        self.uri = uri
        self.rows = [json.loads(line) for line in storage.read_bytes(storage.join(uri, "metadata.jsonl")).splitlines()]
        self.preprocess = preprocess
        self.fs = None

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        if self.fs is None:  # one S3 client per DataLoader process
            self.fs, self.root = storage.filesystem(self.uri)
        row = self.rows[i]
        with self.fs.open_input_stream(f"{self.root}/{row['file_name']}") as f:
            data = f.read()
        out = self.preprocess({"key": np.array([row["file_name"]], dtype=object),
                               "image": np.array([data], dtype=object),
                               "caption": np.array([row["text"]], dtype=object)})
        return {k: v[0] for k, v in out.items()}


def dataloader_rate(uri: str, preprocess: Preprocess, batch_size: int, epochs: int, workers: int) -> list[float]:
    loader = torch.utils.data.DataLoader(S3Images(uri, preprocess), batch_size=batch_size, shuffle=True,
                                         drop_last=True, num_workers=workers, persistent_workers=workers > 0,
                                         prefetch_factor=4 if workers else None)
    rates = []
    for _ in range(epochs):
        start, n = time.perf_counter(), 0
        for batch in loader:
            n += len(batch["key"])
        rates.append(n / (time.perf_counter() - start))
    return rates


def data_wait_share(data_uri: str, root: Path, steps: int) -> tuple[float, float]:
    """Run the tiny preset on Ray Train for ``steps``; returns (data-wait share, images/s)."""
    from sdray.train.launch import run_job

    out = root / "train"
    run_job(parse_job(job_doc("data-wait", data_uri, out, 16, max_steps=steps)), worker_logs=False)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if "data_wait_s" in r][1:]  # skip the first interval (start-up)
    wall = logged[-1]["elapsed_s"] - records[0]["elapsed_s"]
    return sum(r["data_wait_s"] for r in logged) / wall, float(np.median([r["images_per_s"] for r in logged]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1797)
    parser.add_argument("--source-px", type=int, default=128, help="stored image size (decoded and resized)")
    parser.add_argument("--resolution", type=int, default=64, help="training resolution the pipeline crops to")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--loader-workers", type=int, default=2)
    parser.add_argument("--train-steps", type=int, default=150, help="0 skips the data-wait run")
    args = parser.parse_args()

    import ray

    from sdray.data.pipeline import quiet_ray_data
    from sdray.train.launch import RAY_ENV

    root = Path(tempfile.mkdtemp(prefix="sdray-data-bench-"))
    server = start_seaweed(root / "seaweed")
    try:
        os.environ.update(s3_env(server))  # before Ray starts: its workers inherit the credentials
        server.create_bucket(BUCKET)
        uri = f"s3://{BUCKET}/digits"
        import_digits(uri, "imagefolder", args.source_px, limit=args.images)
        ray.init(address="local", num_cpus=4, _node_ip_address="127.0.0.1", runtime_env={"env_vars": RAY_ENV},
                 logging_level="WARNING", log_to_driver=False)
        quiet_ray_data()
        job = parse_job(job_doc("bench", uri, root / "out", args.resolution))
        _, tokenizers = data_requirements(ModelSpec(preset="tiny"))
        preprocess = Preprocess(resolution=args.resolution, resize=None, crop="random", random_flip=True,
                                tokenizers=tokenizers)
        loader = dataloader_rate(uri, preprocess, args.batch_size, args.epochs, args.loader_workers)
        print("dataloader epochs: " + ", ".join(f"{r:.0f}" for r in loader) + " images/s", flush=True)
        raydata = ray_data_rate(job, tokenizers, args.batch_size, args.epochs)
        print("ray data epochs:   " + ", ".join(f"{r:.0f}" for r in raydata) + " images/s", flush=True)
        best_ray, best_loader = max(raydata[1:] or raydata), max(loader[1:] or loader)
        print(f"images={args.images} source_px={args.source_px} resolution={args.resolution} "
              f"batch={args.batch_size} loader_workers={args.loader_workers} cpus={os.cpu_count()}")
        print(f"ray_data={best_ray:.0f} images/s  dataloader={best_loader:.0f} images/s  "
              f"ratio={best_ray / best_loader:.2f} (Ray Data / DataLoader)")
        if args.train_steps:
            small = f"s3://{BUCKET}/digits16"
            import_digits(small, "imagefolder", 16, limit=args.images)
            share, rate = data_wait_share(small, root, args.train_steps)
            print(f"training loop: data_wait_share={share:.3f} of wall time at {rate:.0f} images/s "
                  f"(tiny preset, 1 worker, batch 32)")
        ray.shutdown()
    finally:
        server.stop()


if __name__ == "__main__":
    main()
