"""UNet training throughput on one GPU: images/s, MFU, and sdray's loop against a plain diffusers loop.

    python benchmarks/gpu_throughput.py                 # GPU: SD-2-base-shaped UNet, 256 px and 512 px, bf16
    python benchmarks/gpu_throughput.py --tiny          # CPU check of the script itself: tiny UNet, fp32

The UNet is built from the ``sd2-base`` preset's config (~865 M parameters, no weights downloaded) and
trained on **precomputed latents**: random latents (4 × px/8 × px/8) and text embeddings (77 × 1024)
already on the device, so neither the VAE nor the text encoder runs, as with ``data.format: latents``.
Attention runs through PyTorch's fused SDPA (diffusers' default ``AttnProcessor2_0``); bf16 autocast
over fp32 weights; AdamW as the diffusers example makes it (both loops).

For each resolution the script finds the largest batch that fits (doubling from ``--start-batch`` until
out of memory), then times both loops at that batch, alternating, best of ``--repeats``:
- **plain**: the step of diffusers' text-to-image example (noise, timesteps, predict, MSE, backward,
  clip, AdamW);
- **sdray**: sdray's own ``Trainer`` (the per-worker loop: logging, LR schedule, loss-scaler plumbing,
  checkpoint bookkeeping) fed the same tensors through a plain-process context.
It prints images/s, the MFU (model FLOPs counted with ``torch.utils.flop_counter`` over one forward and
backward, against the card's dense bf16 peak), and sdray / plain. Anchors: MosaicML's SD-2-base on A100:
137.5 images/s at 256 px and 36.3 at 512 px; the goal on one H100 is ≥ 600 images/s at 256 px.

On the device machine (torch, transformers, accelerate, pyarrow there; not diffusers or pydantic) carry
wheels for ``diffusers``, ``pydantic``, ``pydantic-core``, ``annotated-types`` and ``typing-inspection``
(see the device README) and run it with ``PYTHONPATH=.:/tmp/site``. It finishes in under 8 minutes.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from sdray.models.presets import PRESETS

# Dense bf16 tensor-core peaks (FLOP/s) of the cards we expect; anything else: pass --peak-tflops.
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}
TEXT_TOKENS = 77


def unet_config(tiny: bool) -> dict:
    preset = PRESETS["tiny" if tiny else "sd2-base"]
    # the latent grid's downsampling, carried with the config: 8 for SD's VAE, 2 for the tiny one
    return {**preset.denoiser, "_vae_scale": 2 ** (len(preset.vae["block_out_channels"]) - 1)}


def build_unet(config: dict, device: torch.device):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel.from_config({k: v for k, v in config.items() if k != "_vae_scale"}).to(device).train()


def synthetic_batch(config: dict, batch: int, px: int, device: torch.device) -> dict[str, torch.Tensor]:
    """A batch of precomputed latents and text embeddings, already on the device."""
    g = torch.Generator(device="cpu").manual_seed(batch)
    side = px // config["_vae_scale"]
    latents = torch.randn(batch, config.get("in_channels", 4), side, side, generator=g)
    tokens = PRESETS["tiny"].tokenizer_max_length if config["cross_attention_dim"] < 256 else TEXT_TOKENS
    hidden = torch.randn(batch, tokens, config["cross_attention_dim"], generator=g)
    return {"latents": latents.to(device), "encoder_hidden_states": hidden.to(device)}


class PlainLoop:
    """The diffusers text-to-image example's step on precomputed latents."""

    def __init__(self, config: dict, device: torch.device, amp: torch.dtype | None):
        from diffusers import DDPMScheduler

        self.unet = build_unet(config, device)
        self.scheduler = DDPMScheduler(num_train_timesteps=1000)
        self.scheduler.alphas_cumprod = self.scheduler.alphas_cumprod.to(device)
        self.optimizer = torch.optim.AdamW(self.unet.parameters(), lr=1e-5)  # the example's optimizer
        self.device, self.amp = device, amp

    def step(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        latents = batch["latents"]
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (latents.shape[0],), device=self.device)
        with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
            pred = self.unet(self.scheduler.add_noise(latents, noise, t), t, batch["encoder_hidden_states"]).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.unet.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss

    def images_per_s(self, batch: dict, steps: int, warmup: int) -> float:
        n = batch["latents"].shape[0]
        for _ in range(warmup):
            self.step(batch)
        sync(self.device)
        start = time.perf_counter()
        for _ in range(steps):
            loss = self.step(batch)
        loss.item()
        sync(self.device)
        return n * steps / (time.perf_counter() - start)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def training_flops_per_image(config: dict, px: int, device: torch.device, amp: torch.dtype | None) -> float:
    """FLOPs of one forward and backward of the UNet for one image (counted, not estimated)."""
    from torch.utils.flop_counter import FlopCounterMode

    unet = build_unet(config, device)
    batch = synthetic_batch(config, 1, px, device)
    t = torch.tensor([500], device=device)
    with FlopCounterMode(display=False) as counter:
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            out = unet(batch["latents"], t, batch["encoder_hidden_states"]).sample
        out.float().pow(2).mean().backward()
    del unet
    return float(counter.get_total_flops())


def largest_batch(config: dict, px: int, device: torch.device, amp, start: int, limit: int) -> int:
    """The largest batch (doubling from ``start``) whose training step fits in device memory."""
    if device.type != "cuda":
        return start
    best, batch = 0, start
    while batch <= limit:
        loop = None
        try:
            loop = PlainLoop(config, device, amp)
            for _ in range(2):
                loop.step(synthetic_batch(config, batch, px, device))
            sync(device)
            best = batch
            batch *= 2
        except torch.cuda.OutOfMemoryError:
            break
        finally:
            del loop
            torch.cuda.empty_cache()
    if best == 0:
        raise SystemExit(f"even batch {start} does not fit at {px} px")
    return best


class InMemory:
    """The ``iter_batches`` surface of a Ray Dataset, serving one prepared batch ``steps`` times."""

    def __init__(self, batch: dict, steps: int):
        self.batch, self.steps = batch, steps

    def iter_batches(self, **_):
        for _ in range(self.steps):
            yield self.batch


def sdray_images_per_s(config: dict, data: dict, px: int, steps: int, device: torch.device, tiny: bool) -> float:
    """sdray's own ``Trainer`` on a latent cache of the same tensors (the latents as a zero-variance
    posterior, so each step's latents are exactly ``data``'s), behind a plain-process context."""
    from safetensors.torch import save_file

    from sdray.data.latents import KIND, MANIFEST, UNCONDITIONAL
    from sdray.models.encoding import LATENT_DIST
    from sdray.spec import parse_job
    from sdray.train.context import LocalContext
    from sdray.train.loop import Trainer

    n = data["latents"].shape[0]
    root = Path(tempfile.mkdtemp(prefix="sdray-gpu-bench-"))
    cache = root / "cache"
    cache.mkdir()
    (cache / MANIFEST).write_text(json.dumps({"kind": KIND, "scaling_factor": 1.0}))
    save_file({"prompt_embeds": torch.zeros_like(data["encoder_hidden_states"][0]).cpu()}, cache / UNCONDITIONAL)
    # mean and a log-variance of -30 (std ~3e-7): the draw is the mean
    dist = torch.cat([data["latents"], torch.full_like(data["latents"], -30.0)], dim=1)
    batch = {"key": [str(i) for i in range(n)], LATENT_DIST: dist, "prompt_embeds": data["encoder_hidden_states"]}
    warmup = 5  # steps before the timed window; the loop logs (and the context marks time) every 5 steps
    steps = max(5, steps // 5 * 5)
    job = parse_job({
        "apiVersion": "sdray.io/v1alpha1", "kind": "DiffusionJob", "metadata": {"name": "gpu-bench"},
        "spec": {"model": {"preset": "tiny" if tiny else "sd2-base", "resolution": px},
                 "data": {"uri": str(cache), "format": "latents", "shuffle": False},
                 "train": {"max_steps": warmup + steps, "batch_size": n, "learning_rate": 1e-5, "caption_dropout": 0.0,
                           "mixed_precision": "bf16" if device.type == "cuda" else "no",
                           "allow_tf32": device.type == "cuda", "log_every_n_steps": warmup},
                 "checkpoint": {"every_n_steps": 10_000}, "output": {"uri": str(root / "out")}},
    })
    times: list[float] = []

    class Timed(LocalContext):
        def progress(self, metrics):  # rank 0's metrics after every logged step: mark the time
            sync(device)
            times.append(time.perf_counter())

    ctx = Timed(train=InMemory(batch, warmup + steps), validation=None, batch_size=n, shuffle=False,
                run_dir=root / "checkpoints", keep_last=1, device=str(device))
    trainer = Trainer(job, ctx)
    trainer.finish = lambda metrics: metrics  # the benchmark times the steps, not the export
    trainer.run()
    return n * steps / (times[-1] - times[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny UNet, fp32 on CPU: checks the script")
    parser.add_argument("--px", type=int, nargs="+", default=None, help="image sizes (default 256 512; tiny: 32)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per measurement")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--start-batch", type=int, default=None)
    parser.add_argument("--max-batch", type=int, default=1024)
    parser.add_argument("--peak-tflops", type=float, default=None, help="the card's dense bf16 peak")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(1)  # what sdray's plain-process context gives its loop
    amp = torch.bfloat16 if device.type == "cuda" else None
    sizes = args.px or ([16] if args.tiny else [256, 512])
    steps = args.steps or (10 if args.tiny else 20)
    config = unet_config(args.tiny)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = args.peak_tflops * 1e12 if args.peak_tflops else next(
        (v for k, v in PEAK_BF16.items() if k in name), None)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    params = sum(p.numel() for p in build_unet(config, torch.device("cpu")).parameters())
    print(f"device={name} unet_params={params / 1e6:.1f}M amp={amp} steps={steps}", flush=True)
    results = []
    for px in sizes:
        flops = training_flops_per_image(config, px, device, amp)
        batch = largest_batch(config, px, device, amp, args.start_batch or (8 if args.tiny else 32), args.max_batch)
        data = synthetic_batch(config, batch, px, device)
        plain, ours = [], []
        for _ in range(args.repeats):
            loop = PlainLoop(config, device, amp)
            plain.append(loop.images_per_s(data, steps, warmup=3))
            del loop
            ours.append(sdray_images_per_s(config, data, px, steps, device, args.tiny))
            if device.type == "cuda":
                torch.cuda.empty_cache()
        best_plain, best_ours = max(plain), max(ours)
        mfu = best_ours * flops / peak if peak else float("nan")
        row = {"px": px, "batch": batch, "plain_images_per_s": best_plain, "sdray_images_per_s": best_ours,
               "ratio": best_ours / best_plain, "tflop_per_image": flops / 1e12, "mfu": mfu, "device": name}
        results.append(row)
        print(f"px={px} batch={batch} plain={best_plain:.1f} images/s sdray={best_ours:.1f} images/s "
              f"ratio={best_ours / best_plain:.3f} train_tflop/image={flops / 1e12:.3f} mfu={mfu:.3f}", flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
