"""sdray's training loop against a plain diffusers training loop: same model, data (in memory), batch.

    .venv/bin/python benchmarks/train_overhead.py [--steps 300] [--batch-size 32] [--threads 1] [--repeats 2]

Both run in this process, one after the other, each ``--repeats`` times (alternating; the best of each
counts). sdray's side is the real ``Trainer`` (the per-worker loop) behind a plain-process
``LocalContext`` whose data is already in memory. Its images/s come from its own metrics, so the
logging, EMA-free optimizer step, checkpoint bookkeeping and AMP/loss-scaler plumbing are all inside the
measurement. The baseline is the loop from diffusers' text-to-image example, reduced to what the same
step computes. Prints ``overhead_ratio`` = sdray / plain (goal ≥ 0.97).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from sdray.data.digits import CAPTION, digit_images
from sdray.data.augment import Preprocess
from sdray.models.build import build_components
from sdray.spec import ModelSpec, parse_job
from sdray.train.context import LocalContext
from sdray.train.loop import Trainer


class InMemory:
    """The ``iter_batches`` surface of a Ray Dataset, over numpy arrays already decoded."""

    def __init__(self, rows: dict[str, np.ndarray]):
        self.rows = rows

    def iter_batches(self, *, batch_size, drop_last, **_):
        n = len(self.rows["key"]) // batch_size * batch_size
        for i in range(0, n, batch_size):
            yield {k: v[i:i + batch_size] for k, v in self.rows.items()}


def digits_in_memory(tokenizer) -> dict[str, np.ndarray]:
    pngs, labels = digit_images(16)
    batch = {"key": np.array([str(i) for i in range(len(pngs))], dtype=object), "image": np.array(pngs, dtype=object),
             "caption": np.array([CAPTION.format(t) for t in labels], dtype=object)}
    return Preprocess(resolution=16, resize=None, crop="center", random_flip=False, tokenizers=[tokenizer])(batch)


def sdray_images_per_s(rows, steps: int, batch: int, threads: int, root: Path) -> float:
    out = root / f"sdray-{time.time_ns()}"
    job = parse_job({
        "apiVersion": "sdray.io/v1alpha1", "kind": "DiffusionJob", "metadata": {"name": "overhead"},
        "spec": {"model": {"preset": "tiny"}, "data": {"uri": "unused", "shuffle": False},
                 "train": {"max_steps": steps, "batch_size": batch, "learning_rate": 1e-4, "caption_dropout": 0.0,
                           "log_every_n_steps": 25},
                 "checkpoint": {"every_n_steps": steps}, "output": {"uri": str(out)}},
    })
    ctx = LocalContext(train=InMemory(rows), validation=None, batch_size=batch, shuffle=False,
                       run_dir=out / "checkpoints", keep_last=1, num_threads=threads)
    Trainer(job, ctx).run()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [r["images_per_s"] for r in records if "images_per_s" in r][1:]  # skip the warm-up interval
    return statistics.median(rates)


def plain_images_per_s(rows, steps: int, batch: int, threads: int) -> float:
    """The diffusers text-to-image example's step: encode, noise, predict, MSE, clip, AdamW, schedule."""
    torch.set_num_threads(threads)
    c = build_components(ModelSpec(preset="tiny"), seed=0)
    c.vae.requires_grad_(False)
    c.text_encoder.requires_grad_(False)
    unet, scheduler = c.unet.train(), c.noise_scheduler
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    pixels_all = torch.from_numpy(rows["pixel_values"])
    ids_all = torch.from_numpy(rows["input_ids"])
    n = len(pixels_all) // batch
    times = []
    for step in range(steps):
        i = step % n
        start = time.perf_counter()
        pixels, ids = pixels_all[i * batch:(i + 1) * batch], ids_all[i * batch:(i + 1) * batch]
        with torch.no_grad():
            latents = c.vae.encode(pixels).latent_dist.sample() * c.vae.config.scaling_factor
            encoded = c.text_encoder(ids)[0]
        noise = torch.randn_like(latents)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,))
        pred = unet(scheduler.add_noise(latents, noise, t), t, encoded).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()  # the example logs the loss every step, as sdray accumulates it
        times.append(time.perf_counter() - start)
    per_step = statistics.median(times[steps // 5:])
    return batch / per_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    rows = digits_in_memory(build_components(ModelSpec(preset="tiny")).tokenizer)
    root = Path(tempfile.mkdtemp(prefix="sdray-overhead-"))
    sdray, plain = [], []
    for _ in range(args.repeats):
        plain.append(plain_images_per_s(rows, args.steps, args.batch_size, args.threads))
        sdray.append(sdray_images_per_s(rows, args.steps, args.batch_size, args.threads, root))
        print(f"plain={plain[-1]:.1f} images/s  sdray={sdray[-1]:.1f} images/s", flush=True)
    print(f"threads={args.threads} batch={args.batch_size} steps={args.steps} device=cpu")
    print(f"overhead_ratio={max(sdray) / max(plain):.3f} (sdray loop / plain diffusers loop; goal >= 0.97)")


if __name__ == "__main__":
    main()
