"""Denoiser training throughput on one GPU: images/s, MFU, and sdray's loop against a plain diffusers loop,
for SD-2-base's UNet and the SD3-medium and Flux-dev transformers.

    python benchmarks/gpu_throughput.py                    # GPU: all three families, bf16
    python benchmarks/gpu_throughput.py --family sd        # the UNet alone: 256 px and 512 px
    python benchmarks/gpu_throughput.py --family sd3 flux  # the transformers alone: 512 px and 1024 px
    python benchmarks/gpu_throughput.py --tiny             # CPU check of the script itself: tiny presets, fp32

Each denoiser is built from its preset's config (no weights downloaded) and trained on **precomputed
latents**: random latents and text conditioning of the shapes the family's VAE and text encoders give,
already on the device, so neither the VAE nor a text encoder (nor a tokenizer) runs, as with
``data.format: latents``. Attention runs through PyTorch's fused SDPA (diffusers' default); bf16 autocast
over fp32 weights; AdamW. What each family measures:

- ``sd``: the ``sd2-base`` UNet (~866 M parameters) at 256 and 512 px: latents 4 × px/8 × px/8, text
  embeddings 77 × 1024. Plain loop: the step of diffusers' text-to-image example (DDPM noise, timesteps,
  predict, MSE, backward, clip, AdamW). Anchors: MosaicML's SD-2-base on A100: 137.5 images/s at 256 px and
  36.3 at 512 px; the goal on one H100 is ≥ 600 images/s at 256 px.
- ``sd3``: the ``sd3-medium`` MMDiT (24 joint blocks, ~2.03 B parameters) at 512 and 1024 px: latents
  16 × px/8 × px/8 (2×2 patches), ``prompt_embeds`` of 77 CLIP + 256 T5 tokens × 4096, pooled 2048.
- ``flux``: the ``flux-dev`` transformer **at reduced depth**: 2 of its 19 double-stream and 4 of its 38
  single-stream blocks, each of the real shape (width 3072, 24 heads of 128), with the real embedders and
  output layers (~1.31 B parameters), at 512 and 1024 px: latents 16 × px/8 × px/8 packed into (px/16)²
  tokens of 64, T5 tokens 512 × 4096, pooled 768, guidance embedded. The whole model (11.9 B parameters)
  needs 190 GB for its fp32 weights, gradients and AdamW states alone, more than an H100 (80 GB) or an
  H200 (141 GB) holds, so it is not run; the script prints that arithmetic. The FLOPs, images/s and MFU are
  those of the reduced model that ran (counted, not scaled from the full one): its MFU says how well
  Flux's real blocks run, its images/s is not Flux-dev's.

For the transformers the plain loop is the step of diffusers' ``train_dreambooth_sd3.py`` /
``train_dreambooth_flux.py`` (logit-normal draws looked up on the scheduler's timestep grid, ``get_sigmas``,
the transformer call as the script writes it, Flux's packing, ids and guidance 3.5, weighting, MSE,
backward, clip, AdamW with the scripts' weight decay). For every family the **sdray** side is sdray's own
``Trainer`` (the per-worker loop: logging, LR schedule, loss-scaler plumbing, checkpoint bookkeeping, and for
the transformers ``FlowMatchingObjective`` at the family's default shift calling ``family.predict``) fed the
same tensors from a latent cache through a plain-process context; its final checkpoint and export are not
run (they are not steps, and a transformer's AdamW states are tens of GB).

For each family and size the script counts the FLOPs of one forward and backward at batch 1
(``torch.utils.flop_counter``), finds the largest batch whose plain step fits (doubling from
``--start-batch``; halving when that does not fit; "does not fit" when not even 1 does), then times both
loops at that batch, alternating, best of ``--repeats``. It prints images/s, the MFU (sdray's images/s ×
counted FLOPs, against the card's dense bf16 peak) and sdray / plain, one line per measurement, and all of
them as one JSON list at the end. The sizes run in rounds (every family's first size, then every family's
second), so that when time runs short it is the largest shapes that go.

Run time on one H100/H200, estimated from the FLOP counts (nothing here has run on a GPU yet): about
3 minutes for the UNet and 1.5 for each transformer. No measurement starts after ``--budget-s`` (default
420 s; the ones left are listed as skipped), so the whole run ends within about 9 minutes even if the
estimate is off. ``--tiny`` (tiny, tiny-sd3 and tiny-flux presets, one 16 px size, fp32 on one CPU thread,
Flux cut to one double and one single block through the same reduced-depth path) takes under a minute.

On the device machine (torch, transformers, accelerate, pyarrow, sentencepiece and protobuf there; not
diffusers or pydantic) carry wheels for ``diffusers``, ``pydantic``, ``pydantic-core``, ``annotated-types``
and ``typing-inspection`` (see the device README) and run it with ``PYTHONPATH=.:/tmp/site``. The
transformer families need no other wheel: no tokenizer and no text encoder runs.
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from sdray.models.families import family_named
from sdray.models.presets import PRESETS, Preset

# Dense bf16 tensor-core peaks (FLOP/s) of the cards we expect; anything else: pass --peak-tflops.
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}
# fp32 weights, fp32 gradients and AdamW's two fp32 moments: the bytes each trained parameter takes.
TRAIN_STATE_BYTES = 16


@dataclass(frozen=True)
class Workload:
    """One family's measurement: the preset whose denoiser runs, at which sizes, for how many steps."""

    family: str
    preset: str
    loop: type[PlainLoop]
    sizes: tuple[int, ...]
    steps: int  # timed steps per measurement
    repeats: int
    start_batch: int
    log_every: int  # sdray's logging interval: its warm-up steps, and the unit of its timed steps
    depth: dict[str, int] = field(default_factory=dict)  # denoiser config overrides: fewer blocks

    @property
    def configs(self) -> Preset:
        """The preset's configs."""
        return PRESETS[self.preset]

    @property
    def config(self) -> dict:
        return {**self.configs.denoiser, **self.depth}

    @property
    def vae_scale(self) -> int:
        """The VAE's downsampling: 8 for the real VAEs, 2 for the tiny ones."""
        return 2 ** (len(self.configs.vae["block_out_channels"]) - 1)

    def depth_label(self) -> str | None:
        """The blocks that run out of the preset's (``num_layers=2/19 num_single_layers=4/38``), if fewer."""
        if not self.depth:
            return None
        return " ".join(f"{k}={v}/{self.configs.denoiser[k]}" for k, v in self.depth.items())

    def build(self, device: torch.device) -> torch.nn.Module:
        """The denoiser with fresh weights, initialised on ``device`` itself (a GPU initialises a
        transformer's billions of weights in a moment, a CPU in many seconds)."""
        torch.manual_seed(0)
        with torch.device(device):
            model = family_named(self.family).denoiser_class.from_config(self.config)
        return model.to(device).train()  # anything a constructor puts on the CPU itself

    def parameters(self, *, full: bool = False) -> int:
        """The denoiser's parameter count (``full``: at the preset's own depth), from a weightless model."""
        with torch.device("meta"):
            model = family_named(self.family).denoiser_class.from_config(self.configs.denoiser if full else self.config)
        return sum(p.numel() for p in model.parameters())

    def batch(self, n: int, px: int, device: torch.device) -> dict[str, torch.Tensor]:
        """``n`` rows of precomputed latents and text conditioning, already on the device."""
        g = torch.Generator(device="cpu").manual_seed(n)
        side = px // self.vae_scale
        out = {"latents": torch.randn(n, self.configs.vae["latent_channels"], side, side, generator=g)}
        for name, shape in self.loop.text_shapes(self.configs, self.config).items():
            out[name] = torch.randn(n, *shape, generator=g)
        return {k: v.to(device) for k, v in out.items()}


class PlainLoop(ABC):
    """A family's training step as diffusers' example script for it writes it, on precomputed latents."""

    weight_decay: ClassVar[float]  # the script's AdamW default

    def __init__(self, workload: Workload, device: torch.device, amp: torch.dtype | None):
        self.model = workload.build(device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-5, weight_decay=self.weight_decay)
        self.workload, self.device, self.amp = workload, device, amp

    @staticmethod
    @abstractmethod
    def text_shapes(preset: Preset, config: dict) -> dict[str, tuple[int, ...]]:
        """The per-row shape of each text-conditioning column (a latent cache's column names)."""

    @abstractmethod
    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, batch: dict) -> torch.Tensor:
        """The model's output in the latents' shape, at ``timesteps`` on the 0‥1000 scale."""

    @abstractmethod
    def loss(self, batch: dict) -> torch.Tensor:
        """One batch's training loss, noise and timesteps drawn as the script draws them."""

    def forward(self, noisy: torch.Tensor, timesteps: torch.Tensor, batch: dict) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
            return self.predict(noisy, timesteps, batch)

    def step(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        loss = self.loss(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
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


class PlainUNetLoop(PlainLoop):
    """The step of diffusers' text-to-image example (``train_text_to_image.py``)."""

    weight_decay = 1e-2

    def __init__(self, workload, device, amp):
        from diffusers import DDPMScheduler

        super().__init__(workload, device, amp)
        self.scheduler = DDPMScheduler(num_train_timesteps=1000)
        self.scheduler.alphas_cumprod = self.scheduler.alphas_cumprod.to(device)

    @staticmethod
    def text_shapes(preset, config):
        return {"prompt_embeds": (preset.tokenizer_max_length, config["cross_attention_dim"])}

    def predict(self, noisy, timesteps, batch):
        return self.model(noisy, timesteps, batch["prompt_embeds"]).sample

    def loss(self, batch):
        latents = batch["latents"]
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (latents.shape[0],), device=self.device)
        pred = self.forward(self.scheduler.add_noise(latents, noise, t), t, batch)
        return torch.nn.functional.mse_loss(pred.float(), noise.float())


class PlainFlowLoop(PlainLoop):
    """The flow-matching step shared by diffusers' ``train_dreambooth_sd3.py`` and ``train_dreambooth_flux.py``
    at their defaults (logit-normal timesteps, no preconditioning)."""

    weight_decay = 1e-4

    def __init__(self, workload, device, amp):
        from diffusers import FlowMatchEulerDiscreteScheduler

        super().__init__(workload, device, amp)
        # Flux's config shifts dynamically, which the script never passes: its grid stays unshifted.
        self.scheduler = FlowMatchEulerDiscreteScheduler.from_config(workload.configs.scheduler)

    def sigmas(self, timesteps: torch.Tensor, n_dim: int, dtype: torch.dtype) -> torch.Tensor:
        """The scripts' ``get_sigmas``: each timestep's σ, found on the grid one row at a time."""
        sigmas = self.scheduler.sigmas.to(device=self.device, dtype=dtype)
        schedule = self.scheduler.timesteps.to(self.device)
        indices = [(schedule == t).nonzero().item() for t in timesteps.to(self.device)]
        return sigmas[indices].flatten().view(-1, *[1] * (n_dim - 1))

    def loss(self, batch):
        from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

        latents = batch["latents"]
        noise = torch.randn_like(latents)
        u = compute_density_for_timestep_sampling(weighting_scheme="logit_normal", batch_size=latents.shape[0],
                                                  logit_mean=0.0, logit_std=1.0, mode_scale=1.29)
        indices = (u * self.scheduler.config.num_train_timesteps).long()
        timesteps = self.scheduler.timesteps[indices].to(device=self.device)
        sigmas = self.sigmas(timesteps, latents.ndim, latents.dtype)
        noisy = (1.0 - sigmas) * latents + sigmas * noise
        pred = self.forward(noisy, timesteps, batch)
        weighting = compute_loss_weighting_for_sd3(weighting_scheme="logit_normal", sigmas=sigmas)
        target = noise - latents
        per_row = torch.mean((weighting.float() * (pred.float() - target.float()) ** 2).reshape(target.shape[0], -1), 1)
        return per_row.mean()


class PlainSD3Loop(PlainFlowLoop):
    """``train_dreambooth_sd3.py``'s transformer call."""

    @staticmethod
    def text_shapes(preset, config):
        # CLIP-L and CLIP-G side by side (padded to T5's width), then T5's tokens; the two CLIP projections
        return {"prompt_embeds": (preset.tokenizer_max_length + preset.t5_max_length, config["joint_attention_dim"]),
                "pooled_prompt_embeds": (config["pooled_projection_dim"],)}

    def predict(self, noisy, timesteps, batch):
        return self.model(hidden_states=noisy, timestep=timesteps, encoder_hidden_states=batch["prompt_embeds"],
                          pooled_projections=batch["pooled_prompt_embeds"], return_dict=False)[0]


class PlainFluxLoop(PlainFlowLoop):
    """``train_dreambooth_flux.py``'s transformer call: packed latents, image and text ids, guidance."""

    guidance_scale = 3.5  # the script's default

    @staticmethod
    def text_shapes(preset, config):
        # T5's tokens; CLIP-L's pooled output
        return {"prompt_embeds": (preset.t5_max_length, config["joint_attention_dim"]),
                "pooled_prompt_embeds": (config["pooled_projection_dim"],)}

    def predict(self, noisy, timesteps, batch):
        from diffusers import FluxPipeline

        n, c, h, w = noisy.shape
        dtype = self.amp or torch.float32  # the script's weight_dtype
        packed = FluxPipeline._pack_latents(noisy, batch_size=n, num_channels_latents=c, height=h, width=w)
        image_ids = FluxPipeline._prepare_latent_image_ids(n, h // 2, w // 2, self.device, dtype)
        text_ids = torch.zeros(batch["prompt_embeds"].shape[1], 3, device=self.device, dtype=dtype)
        guidance = None
        if self.model.config.guidance_embeds:
            guidance = torch.tensor([self.guidance_scale], device=self.device).expand(n)
        pred = self.model(hidden_states=packed, timestep=timesteps / 1000, guidance=guidance,
                          pooled_projections=batch["pooled_prompt_embeds"],
                          encoder_hidden_states=batch["prompt_embeds"], txt_ids=text_ids, img_ids=image_ids,
                          return_dict=False)[0]
        scale = self.workload.vae_scale
        return FluxPipeline._unpack_latents(pred, height=h * scale, width=w * scale, vae_scale_factor=scale)


def workloads(tiny: bool) -> dict[str, Workload]:
    """Each family's measurement: the published shapes on a GPU, the tiny presets for ``--tiny``."""
    if tiny:
        return {"sd": Workload("sd", "tiny", PlainUNetLoop, (16,), steps=10, repeats=2, start_batch=8, log_every=5),
                "sd3": Workload("sd3", "tiny-sd3", PlainSD3Loop, (16,), steps=4, repeats=1, start_batch=8, log_every=2),
                "flux": Workload("flux", "tiny-flux", PlainFluxLoop, (16,), steps=4, repeats=1, start_batch=8,
                                 log_every=2, depth={"num_layers": 1, "num_single_layers": 1})}
    return {"sd": Workload("sd", "sd2-base", PlainUNetLoop, (256, 512), steps=20, repeats=2, start_batch=32,
                           log_every=5),
            "sd3": Workload("sd3", "sd3-medium", PlainSD3Loop, (512, 1024), steps=6, repeats=1, start_batch=4,
                            log_every=3),
            "flux": Workload("flux", "flux-dev", PlainFluxLoop, (512, 1024), steps=6, repeats=1, start_batch=4,
                             log_every=3, depth={"num_layers": 2, "num_single_layers": 4})}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def release(device: torch.device) -> None:
    """Return what the last measurement left behind to the device (an out-of-memory error's frames too)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def training_flops_per_image(workload: Workload, px: int, device: torch.device, amp: torch.dtype | None) -> float:
    """FLOPs of one forward and backward of the denoiser for one image (counted, not estimated)."""
    from torch.utils.flop_counter import FlopCounterMode

    loop = workload.loop(workload, device, amp)
    batch = workload.batch(1, px, device)
    t = torch.tensor([500.0], device=device)
    with FlopCounterMode(display=False) as counter:
        loop.forward(batch["latents"], t, batch).float().pow(2).mean().backward()
    del loop
    release(device)
    return float(counter.get_total_flops())


def fits(workload: Workload, batch: int, px: int, device: torch.device, amp) -> bool:
    """Whether two plain training steps at ``batch`` fit in device memory (the second holds AdamW's states)."""
    try:
        loop = workload.loop(workload, device, amp)
        data = workload.batch(batch, px, device)
        for _ in range(2):
            loop.step(data)
        sync(device)
        return True
    except torch.cuda.OutOfMemoryError:
        return False


def largest_batch(workload: Workload, px: int, device: torch.device, amp, start: int, limit: int) -> int:
    """The largest batch whose training step fits in device memory: doubling from ``start`` while it fits,
    halving from it when it does not; 0 when not even one image fits."""
    if device.type != "cuda":
        return start
    best, batch = 0, start
    while batch <= limit:
        ok = fits(workload, batch, px, device, amp)
        release(device)
        if not ok:
            break
        best, batch = batch, batch * 2
    batch = start // 2
    while best == 0 and batch >= 1:
        if fits(workload, batch, px, device, amp):
            best = batch
        release(device)
        batch //= 2
    return best


class InMemory:
    """The ``iter_batches`` surface of a Ray Dataset, serving one prepared batch ``steps`` times."""

    def __init__(self, batch: dict, steps: int):
        self.batch, self.steps = batch, steps

    def iter_batches(self, **_):
        for _ in range(self.steps):
            yield self.batch


def sdray_images_per_s(workload: Workload, data: dict, px: int, steps: int, device: torch.device) -> float:
    """sdray's own ``Trainer`` on a latent cache of the same tensors (the latents as a zero-variance
    posterior, so each step's latents are exactly ``data``'s), behind a plain-process context."""
    from safetensors.torch import save_file

    from sdray.data.latents import KIND, MANIFEST, UNCONDITIONAL
    from sdray.models.encoding import LATENT_DIST
    from sdray.spec import parse_job
    from sdray.train.context import LocalContext
    from sdray.train.loop import Trainer

    n = data["latents"].shape[0]
    text = {k: v for k, v in data.items() if k != "latents"}
    root = Path(tempfile.mkdtemp(prefix="sdray-gpu-bench-"))
    cache = root / "cache"
    cache.mkdir()
    (cache / MANIFEST).write_text(json.dumps({"kind": KIND, "scaling_factor": 1.0}))
    save_file({k: torch.zeros_like(v[0]).cpu() for k, v in text.items()}, cache / UNCONDITIONAL)
    # mean and a log-variance of -30 (std ~3e-7): the draw is the mean
    dist = torch.cat([data["latents"], torch.full_like(data["latents"], -30.0)], dim=1)
    batch = {"key": [str(i) for i in range(n)], LATENT_DIST: dist, **text}
    # steps before the timed window: the loop logs (and the context marks time) every log_every steps
    warmup = workload.log_every
    steps = max(warmup, steps // warmup * warmup)
    model = {"preset": workload.preset, "resolution": px}
    if workload.depth:
        model["overrides"] = {family_named(workload.family).denoiser: dict(workload.depth)}
    job = parse_job({
        "apiVersion": "sdray.io/v1alpha1", "kind": "DiffusionJob", "metadata": {"name": "gpu-bench"},
        "spec": {"model": model,
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

    # the process's threads (one on the CPU), as the Trainer sets them: the default of one would also slow the
    # CPU initialisation of every later Trainer's denoiser (seconds per GB of weights)
    ctx = Timed(train=InMemory(batch, warmup + steps), validation=None, batch_size=n, shuffle=False,
                run_dir=root / "checkpoints", keep_last=1, device=str(device), num_threads=torch.get_num_threads())
    trainer = Trainer(job, ctx)
    # The benchmark times the steps: not the export, nor the final checkpoint, which would also mark a time
    # after the last step (its progress report) and count its writing as training.
    trainer.finish = lambda metrics: metrics
    trainer.checkpoint = lambda metrics: None
    trainer.run()
    return n * steps / (times[-1] - times[0])


def measure(workload: Workload, px: int, args, device: torch.device, amp, peak: float | None, name: str) -> dict:
    """One family at one size: the batch that fits, both loops' images/s, the FLOPs and the MFU."""
    row: dict = {"family": workload.family, "model": workload.preset}
    if workload.depth:
        row["depth"] = workload.depth_label()
    flops = training_flops_per_image(workload, px, device, amp)
    batch = largest_batch(workload, px, device, amp, args.start_batch or workload.start_batch, args.max_batch)
    row.update(px=px, batch=batch)
    if batch == 0:
        return {**row, "tflop_per_image": flops / 1e12, "device": name, "note": "does not fit"}
    data = workload.batch(batch, px, device)
    steps = args.steps or workload.steps
    plain, ours = [], []
    for _ in range(args.repeats or workload.repeats):
        loop = workload.loop(workload, device, amp)
        plain.append(loop.images_per_s(data, steps, warmup=3))
        del loop
        release(device)
        try:
            ours.append(sdray_images_per_s(workload, data, px, steps, device))
        except torch.cuda.OutOfMemoryError:  # the plain step fitted at this batch, sdray's did not
            row["note"] = f"sdray's loop ran out of memory at batch {batch}"
        release(device)
    best_plain, best_ours = max(plain), max(ours, default=None)
    mfu = best_ours * flops / peak if peak and best_ours else float("nan")
    return {**row, "plain_images_per_s": best_plain, "sdray_images_per_s": best_ours,
            "ratio": best_ours / best_plain if best_ours else None, "tflop_per_image": flops / 1e12, "mfu": mfu,
            "device": name}


def describe(row: dict) -> str:
    """A measurement as one human-readable line."""
    head = f"family={row['family']} px={row['px']}"
    if "skipped" in row:
        return f"{head} skipped: {row['skipped']}"
    if "plain_images_per_s" not in row:
        return f"{head} {row['note']} train_tflop/image={row['tflop_per_image']:.3f}"
    ours = f"{row['sdray_images_per_s']:.1f} images/s" if row["sdray_images_per_s"] else "n/a"
    ratio = f"{row['ratio']:.3f}" if row["ratio"] else "n/a"
    line = (f"{head} batch={row['batch']} plain={row['plain_images_per_s']:.1f} images/s sdray={ours} "
            f"ratio={ratio} train_tflop/image={row['tflop_per_image']:.3f} mfu={row['mfu']:.3f}")
    return line + (f" ({row['note']})" if "note" in row else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny presets, fp32 on CPU: checks the script")
    parser.add_argument("--family", nargs="+", choices=("sd", "sd3", "flux"), default=["sd", "sd3", "flux"],
                        help="the families to measure (default: all three)")
    parser.add_argument("--px", type=int, nargs="+", default=None,
                        help="image sizes for every family (default sd: 256 512; sd3, flux: 512 1024; tiny: 16)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per measurement (default sd: 20, "
                        "sd3, flux: 6)")
    parser.add_argument("--repeats", type=int, default=None, help="measurements of each loop (default sd: 2, "
                        "sd3, flux: 1)")
    parser.add_argument("--start-batch", type=int, default=None, help="default sd: 32; sd3, flux: 4")
    parser.add_argument("--max-batch", type=int, default=1024)
    parser.add_argument("--peak-tflops", type=float, default=None, help="the card's dense bf16 peak")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="start no measurement after this many seconds (default 420 on a GPU; none for --tiny)")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(1)  # what sdray's plain-process context gives its loop
    amp = torch.bfloat16 if device.type == "cuda" else None
    budget = args.budget_s if args.budget_s is not None else (None if args.tiny else 420.0)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = args.peak_tflops * 1e12 if args.peak_tflops else next(
        (v for k, v in PEAK_BF16.items() if k in name), None)
    memory = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    chosen = [workloads(args.tiny)[f] for f in dict.fromkeys(args.family)]
    for w in chosen:
        slot = family_named(w.family).denoiser
        print(f"device={name} {slot}_params={w.parameters() / 1e6:.1f}M amp={amp} steps={args.steps or w.steps} "
              f"family={w.family} model={w.preset}", flush=True)
        if w.depth:
            full = w.parameters(full=True)
            card = f"{memory / 1e9:.0f} GB" if memory else "n/a"
            print(f"  {w.preset} runs at reduced depth ({w.depth_label()}): its full depth has {full / 1e6:.1f}M "
                  f"parameters, {full * TRAIN_STATE_BYTES / 1e9:.1f} GB of fp32 weights, gradients and AdamW states "
                  f"(card: {card})", flush=True)
    started = time.perf_counter()
    results = []
    sizes = {w.family: args.px or w.sizes for w in chosen}
    for i in range(max(len(s) for s in sizes.values())):
        for w in chosen:
            if i >= len(sizes[w.family]):
                continue
            px = sizes[w.family][i]
            if budget is not None and time.perf_counter() - started > budget:
                row = {"family": w.family, "model": w.preset, "px": px,
                       "skipped": f"past the {budget:.0f} s budget (--budget-s)"}
            else:
                row = measure(w, px, args, device, amp, peak, name)
            results.append(row)
            print(describe(row), flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
