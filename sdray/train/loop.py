"""The per-worker training loop: plain PyTorch, independent of Ray.

``train_worker(job, ctx)`` trains the model family's denoiser (``stage: denoiser``; what exactly trains,
LoRA adapters or the text encoders too, is ``sdray.train.trainable``'s decision) or the AutoencoderKL
(``stage: autoencoder``), checkpoints, validates and, on rank 0, exports the result: the family's stock
diffusers pipeline (with LoRA: also the adapters in diffusers' LoRA format) or an ``AutoencoderKL``, under
``spec.output.uri``. What differs between families is asked of ``Components.family``.

On a latent cache (``data.format: latents``) the VAE and text encoders are not built for training:
rank 0 builds them on first use, for sample grids and the export.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import random
import tempfile
import time
from collections import Counter, deque
from pathlib import Path

import numpy as np
import torch
from diffusers.training_utils import EMAModel

from sdray import storage
from sdray.data.latents import cached_encoder
from sdray.models.build import Components, build_components
from sdray.models.encoding import OnlineEncoder
from sdray.models.pipeline import assemble_pipeline, generate
from sdray.progress import Progress
from sdray.spec import DiffusionJob
from sdray.train.checkpoint import TrainState, load_checkpoint, read_manifest, resumed_accumulation, save_checkpoint
from sdray.train.context import WorkerContext
from sdray.train.objectives import objective_for
from sdray.train.preemption import Preemption
from sdray.train.parallel import in_lockstep, mean_across_workers, sum_counts_across_workers
from sdray.train.strategies import strategy_for
from sdray.train.reporting import RunReport, image_grid, tensor_to_images
from sdray.train.tracking import open_trackers
from sdray.train.trainable import Trainable

log = logging.getLogger("sdray.train")

# Validation-loss batches have a fixed size, so the measurement does not depend on train.batch_size.
VALIDATION_BATCH = 16
AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


class DataTooSmallError(ValueError):
    """An epoch gave a worker no full batch: too few readable images for batch_size × num_workers."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    """One worker's view of a run. Built from the job; ``run()`` trains to ``max_steps``."""

    def __init__(self, job: DiffusionJob, ctx: WorkerContext):
        self.job = job
        self.spec = spec = job.spec
        self.ctx = ctx
        self.cfg = spec.train
        self.device = ctx.device
        self.is_main = ctx.rank == 0
        self.source = self._checkpoint_source()
        self.elastic: dict | None = None
        if self.source is not None:
            self._resize_batch(read_manifest(self.source) or {})
            job, spec = self.job, self.spec
        self.progress = Progress()
        # The last logged (curve, step, value) points, sent with every progress update: the driver polls only
        # the latest update, and with these it still sees every point of the loss curve.
        self.recent_curve: deque = deque(maxlen=200)
        torch.set_num_threads(max(1, ctx.num_threads))
        torch.backends.cuda.matmul.allow_tf32 = self.cfg.allow_tf32
        torch.backends.cudnn.allow_tf32 = self.cfg.allow_tf32

        cached = spec.data.format == "latents"
        self.comps: Components = build_components(spec.model, stage=spec.stage, s3=spec.storage, seed=self.cfg.seed,
                                                  frozen=not cached)
        seed_everything(self.cfg.seed + 1000 * ctx.rank)  # each worker draws its own noise
        self.encoder = None
        if spec.stage == "denoiser":
            for module in self.comps.frozen_modules().values():
                module.to(self.device)
            # Where latents and prompt embeddings come from: the frozen encoders, or the cache's rows.
            self.encoder = cached_encoder(spec, self.device) if cached else OnlineEncoder(self.comps, self.device)
        self.trainable = Trainable(self.comps, spec, self.encoder)  # decides what trains (requires_grad)
        if spec.stage == "denoiser":
            self.model = self.comps.denoiser
            for name, module in self.comps.frozen_modules().items():
                module.train(name in self.trainable.components)
        else:
            self.model = self.comps.vae
            self.recent_latents: deque[torch.Tensor] = deque(maxlen=32)  # for the exported normalisation
        self.objective = self.trainable.objective()
        # The denoiser's training objective (DDPM or flow matching): the family's, with the job's settings.
        self.diffusion = objective_for(spec, self.comps) if spec.stage == "denoiser" else None
        self.last_pixels: torch.Tensor | None = None  # shown in the autoencoder's reconstruction grid
        self.batch_shapes: Counter[str] = Counter()  # "HxW" bucket of each training batch since this start
        self.model.to(self.device).train()
        if self.cfg.gradient_checkpointing:
            self.model.enable_gradient_checkpointing()
        self.amp_dtype = AMP_DTYPES.get(self.cfg.mixed_precision)
        # How the objective is distributed, stepped and saved (DDP, FSDP2, DeepSpeed): the strategy's say.
        self.strategy = strategy_for(spec, self.device, self.amp_dtype)
        self.strategy.prepare(self.objective, self.trainable)
        self.wrapped = self.strategy.wrapped
        self.optimizer, self.lr_scheduler = self.strategy.optimizer, self.strategy.lr_scheduler
        # fp32 shadows even where DeepSpeed keeps 16-bit weights: small EMA updates vanish in 16 bits.
        self.ema = (EMAModel([p.detach().float() for p in self.trainable.parameters()], decay=self.cfg.ema.decay,
                             update_after_step=self.cfg.ema.update_after_step)
                    if self.cfg.ema else None)
        self.state = TrainState()
        self.resumed_from: int | None = None
        self.saved_step: int | None = None  # the step of the last checkpoint this run wrote or resumed from
        self.preemption = Preemption(spec.checkpoint.on_preemption, self.device)
        self.checkpoint_upload_failures = 0  # checkpoints skipped (checkpoint.on_upload_failure: continue)
        self._val_set: list[dict] | None = None
        self._val_measured: tuple[int | None, float | None] = (None, None)
        self._restore()
        self.report = RunReport(spec.output.uri, spec.storage, self.state.step,
                                trackers=open_trackers(job, job.metadata.name, self.state.step)) if self.is_main else None

    def _with_encoders(self) -> Components:
        """The components with the VAE, tokenizers and text encoders, built on first use when training
        on a latent cache (sampling and the export need them; training steps do not)."""
        if self.comps.vae is None:
            frozen = build_components(self.spec.model, s3=self.spec.storage, seed=self.cfg.seed, denoiser=False)
            for module in frozen.frozen_modules().values():
                module.requires_grad_(False).eval().to(self.device)
            self.comps = self.trainable.comps = dataclasses.replace(frozen, denoiser=self.comps.denoiser)
        return self.comps

    # -- checkpoints -------------------------------------------------------------------------------
    def _checkpoint_source(self) -> Path | None:
        """The local copy of the checkpoint this run resumes: the runner's (``resume: auto``), or the one
        ``checkpoint.resume`` names."""
        source = self.ctx.restored_checkpoint()
        resume = self.spec.checkpoint.resume
        if source is None and resume not in ("auto", "never"):
            source = storage.local_copy(resume, self.spec.storage)
        return None if source is None else Path(source)

    def _resize_batch(self, manifest: dict) -> None:
        """Resuming on another number of workers than the checkpoint's (elastic resume): keep its global
        batch by changing the accumulation where it divides, else say what changed (``resumed_accumulation``)."""
        cfg = self.cfg
        accumulation, note = resumed_accumulation(manifest, batch_size=cfg.batch_size,
                                                  accumulation=cfg.gradient_accumulation_steps,
                                                  world_size=self.ctx.world_size)
        if note is None:
            return
        self.elastic = {"from_workers": manifest.get("world_size"), "to_workers": self.ctx.world_size,
                        "gradient_accumulation_steps": accumulation,
                        "global_batch": cfg.batch_size * accumulation * self.ctx.world_size, "note": note}
        if self.is_main:
            log.warning(note)
        if accumulation != cfg.gradient_accumulation_steps:
            train = cfg.model_copy(update={"gradient_accumulation_steps": accumulation})
            self.spec = self.spec.model_copy(update={"train": train})
            self.job = self.job.model_copy(update={"spec": self.spec})
            self.cfg = train

    def _restore(self) -> None:
        source = self.source
        if source is None:
            return
        self.state = load_checkpoint(Path(source), rank=self.ctx.rank, trainable=self.trainable,
                                     optimizer=self.optimizer, lr_scheduler=self.lr_scheduler,
                                     scaler=self.strategy.scaler, ema=self.ema, world_size=self.ctx.world_size,
                                     layout=self.strategy.checkpoint_layout())
        self.resumed_from = self.saved_step = self.state.step
        self._apply_learning_rate()
        if self.is_main:
            log.info("resumed from step %d (%s)", self.state.step, source)

    def _apply_learning_rate(self) -> None:
        """Use this job's learning rate when the checkpoint was trained with another (a PBT trial that
        copied a stronger trial's checkpoint and perturbed its rate): the schedule continues from the
        restored step, scaled to the new base rate."""
        lr = self.cfg.learning_rate
        sched = self.lr_scheduler
        if all(math.isclose(base, lr, rel_tol=1e-9) for base in sched.base_lrs):
            return
        log.info("learning rate %s (checkpoint trained with %s)", lr, sched.base_lrs[0])
        sched.base_lrs = [lr] * len(sched.base_lrs)
        for group, factor in zip(self.optimizer.param_groups, sched.lr_lambdas):
            group["initial_lr"] = lr
            group["lr"] = lr * factor(sched.last_epoch)

    def checkpoint(self, metrics: dict) -> None:
        """Save a checkpoint (every rank); its metrics carry the validation loss when there is a held-out
        split, so a search (``sdray tune``) and the checkpoint list can rank them."""
        val_loss = self.measure_validation_loss()
        if val_loss is not None:
            metrics = {**metrics, "val_loss": val_loss}
        started = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="sdray-ckpt-") as tmp:
            save_checkpoint(Path(tmp), rank=self.ctx.rank, trainable=self.trainable, optimizer=self.optimizer,
                            lr_scheduler=self.lr_scheduler, scaler=self.strategy.scaler, ema=self.ema,
                            state=self.state, stage=self.spec.stage, job_name=self.job.metadata.name,
                            world_size=self.ctx.world_size, layout=self.strategy.checkpoint_layout(),
                            global_batch=self.cfg.batch_size * self.cfg.gradient_accumulation_steps * self.ctx.world_size)
            try:
                self.ctx.save_checkpoint(Path(tmp), {**metrics, "step": self.state.step})
            except storage.StorageError as exc:
                if not (exc.transient and self.spec.checkpoint.on_upload_failure == "continue"):
                    raise
                self._skip_checkpoint(exc)
                return
        self.saved_step = self.state.step
        self._tell(checkpoint_step=self.state.step, checkpoint_s=time.perf_counter() - started)

    def _skip_checkpoint(self, exc: Exception) -> None:
        """A checkpoint could not be uploaded (``on_upload_failure: continue``): count it and train on."""
        self.checkpoint_upload_failures += 1
        if self.is_main:
            log.warning("checkpoint of step %d skipped, the previous one stays the latest: %s", self.state.step, exc)
            self.report.log({"step": self.state.step, "checkpoint_upload_failures": self.checkpoint_upload_failures})

    # -- one step ----------------------------------------------------------------------------------
    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _loss(self, batch: dict, module, training: bool) -> tuple[torch.Tensor, dict]:
        """Loss of one batch through ``module`` (the wrapped objective when training)."""
        with self._autocast():
            if self.spec.stage == "autoencoder":
                pixels = batch["pixel_values"].to(self.device)
                loss, mse, latents, _ = module(pixels)
                if self.is_main and training:
                    self.recent_latents.append(latents.detach().float().cpu())
                    self.last_pixels = pixels[:8].detach().cpu()
                return loss, {"recon_mse": mse.item()}
            drop = None
            if training and self.cfg.caption_dropout > 0:
                drop = torch.rand(len(batch["key"])) < self.cfg.caption_dropout
            with torch.no_grad():
                latents = self.encoder.latents(batch, training=training)
            return self.diffusion.loss(lambda noisy, timesteps: module(noisy, timesteps, batch=batch, drop=drop),
                                       latents, training=training), {}

    def _optimizer_step(self) -> None:
        self.strategy.optimizer_step(self.trainable.parameters())
        if self.ema is not None:
            self.ema.step(self.trainable.parameters())
        self.state.step += 1

    # -- the loop ----------------------------------------------------------------------------------
    def run(self) -> dict:
        try:
            return self._run()
        except BaseException:
            if self.is_main and self.report is not None:
                self.report.finish_tracking("failed", self._summary({}, "failed"))
            raise

    def _run(self) -> dict:
        cfg = self.cfg
        accum = cfg.gradient_accumulation_steps
        window = {"loss": 0.0, "n": 0, "images": 0, "data_wait": 0.0, "extra": {}}
        window_start = time.perf_counter()
        started = time.perf_counter()
        micro = 0
        metrics: dict = {}
        preempted = False
        # A resumed run goes on where its epoch was: each worker passes over its share of the batches read
        # before the checkpoint (the order of a new start differs, so within that one epoch a row may be seen
        # twice or not at all; the epoch keeps its length and every later epoch is whole).
        skip = self.state.epoch_images // (cfg.batch_size * self.ctx.world_size)
        while self.state.step < cfg.max_steps and not preempted:
            batches = 0
            fetch_start = time.perf_counter()
            epoch = self.ctx.train_batches()
            if self.spec.data.bucketed:  # bucket batches per worker differ: stop together
                epoch = in_lockstep(epoch, self.device)
            for batch in epoch:
                batches += 1
                if skip:
                    skip -= 1
                    fetch_start = time.perf_counter()
                    continue
                window["data_wait"] += time.perf_counter() - fetch_start
                if "target_size" in batch:  # a bucket's (height, width), whether it holds pixels or latents
                    self.batch_shapes["x".join(map(str, batch["target_size"][0].tolist()))] += 1
                sync = (micro + 1) % accum == 0
                with contextlib.nullcontext() if sync else self.strategy.no_sync():
                    loss, extra = self._loss(batch, self.wrapped, training=True)
                    self.strategy.backward(loss)
                micro += 1
                self.state.epoch_images += len(batch["key"]) * self.ctx.world_size
                window["loss"] += loss.item()
                window["n"] += 1
                window["images"] += len(batch["key"]) * self.ctx.world_size
                for k, v in extra.items():
                    window["extra"][k] = window["extra"].get(k, 0.0) + v
                if sync:
                    self._optimizer_step()
                    self.state.images_seen += len(batch["key"]) * self.ctx.world_size * accum
                    step = self.state.step
                    if step % cfg.log_every_n_steps == 0 or step == cfg.max_steps:
                        elapsed = time.perf_counter() - window_start
                        shown = {
                            "step": step,
                            "epoch": self.state.epoch,
                            "loss": mean_across_workers(window["loss"] / window["n"], self.device),
                            "lr": self.lr_scheduler.get_last_lr()[0],
                            "images_per_s": window["images"] / elapsed,
                            "data_wait_s": window["data_wait"],
                            "step_s": elapsed / (window["n"] / accum),
                            "data_wait_share": min(1.0, window["data_wait"] / elapsed),
                            "images_seen": self.state.images_seen,
                            "elapsed_s": time.perf_counter() - started,
                        }
                        # the stage's own measures (recon_mse) go to metrics.jsonl, not to the progress display
                        metrics = {**shown, **{k: v / window["n"] for k, v in window["extra"].items()}}
                        window = {"loss": 0.0, "n": 0, "images": 0, "data_wait": 0.0, "extra": {}}
                        window_start = time.perf_counter()
                        if self.is_main:
                            self.report.log(metrics)
                            self.recent_curve.append(("loss", step, metrics["loss"]))
                        self._tell(**shown, max_steps=cfg.max_steps)
                    every = self.spec.validation.every_n_steps
                    if every and step % every == 0 and step < cfg.max_steps:
                        self.validate(step, metrics)
                    if step % self.spec.checkpoint.every_n_steps == 0 or step == cfg.max_steps:
                        self.checkpoint(metrics)
                    if step >= cfg.max_steps:
                        break
                    if self.preemption.agreed():  # told to stop: checkpoint this step and end (every worker)
                        if self.saved_step != step:
                            self.checkpoint(metrics)
                        preempted = True
                        break
                fetch_start = time.perf_counter()
            skip = 0  # (an epoch shorter than the part to pass over: the next one starts whole)
            if batches == 0:
                raise DataTooSmallError(
                    f"spec.data.uri: an epoch gave worker {self.ctx.rank} no full batch: the dataset needs at "
                    f"least batch_size × num_workers = {cfg.batch_size * self.ctx.world_size} readable images"
                    + (" of one aspect-ratio bucket" if self.spec.data.bucketed else "")
                )
            if self.state.step < cfg.max_steps and not preempted:
                self.state.epoch += 1
                self.state.epoch_images = 0
        return self.preempted(metrics) if preempted else self.finish(metrics)

    def _tell(self, **update) -> None:
        """Rank 0 shows its latest progress (metrics, last checkpoint, last sample grid) to the driver."""
        if not self.is_main:
            return
        if self.device.type == "cuda":
            update["gpu_memory_bytes"] = torch.cuda.max_memory_allocated(self.device)
        curve: dict[str, list[tuple[int, float]]] = {}
        for name, step, value in self.recent_curve:
            curve.setdefault(name, []).append((step, value))
        self.progress = self.progress.updated(**update, curve=curve)
        self.ctx.progress(self.progress)

    # -- validation and export (rank 0) ------------------------------------------------------------
    @contextlib.contextmanager
    def _ema_weights(self):
        """Run the body with the EMA weights in the model, when EMA is on."""
        if self.ema is None:
            yield
            return
        self.ema.store(self.trainable.parameters())
        self.ema.copy_to(self.trainable.parameters())
        try:
            yield
        finally:
            self.ema.restore(self.trainable.parameters())

    def _plain_model(self):
        """The trained model with complete weights for sampling and export: the model itself when it is
        replicated; when sharded, a gathered copy on rank 0 (None elsewhere). Collective: every rank calls it."""
        # the wrapped objective holds the model as the VAE, or the denoiser under its pipeline slot name
        prefix = "vae." if self.spec.stage == "autoencoder" else self.trainable.denoiser_slot + "."
        return self.strategy.full_model(self.model, prefix, self.is_main)

    def _validation_set(self) -> list[dict]:
        """The held-out images the validation loss is measured on, read once (rank 0): the
        ``validation.max_batches × 16`` rows with the smallest keys, in key order, in batches of up to 16 rows
        of one shape (a bucketed latent cache's rows keep their buckets' shapes). The
        same images, in the same batches, every time and in every trial of a search, whatever the
        training batch size or the order Ray Data delivers them in."""
        if self._val_set is not None:
            return self._val_set
        self._val_set = []
        batches = self.ctx.validation_batches()
        limit = self.spec.validation.max_batches * VALIDATION_BATCH
        if batches is None or limit == 0:
            return self._val_set
        kept: list[tuple[str, dict]] = []
        for batch in batches:
            for i, key in enumerate(batch["key"]):
                kept.append((key, {k: v[i] for k, v in batch.items() if k != "key"}))
            if len(kept) > 2 * limit:
                kept = sorted(kept, key=lambda r: r[0])[:limit]
        kept = sorted(kept, key=lambda r: r[0])[:limit]
        # Rows of a bucketed latent cache have their bucket's shape: batches group rows of one shape (in
        # key order within each), so the set stays the same whatever order the rows arrive in.
        by_shape: dict[tuple, list[tuple[str, dict]]] = {}
        for key, row in kept:
            by_shape.setdefault(tuple(tuple(v.shape) for v in row.values()), []).append((key, row))
        for rows in by_shape.values():
            for start in range(0, len(rows), VALIDATION_BATCH):
                chunk = rows[start:start + VALIDATION_BATCH]
                out = {"key": [k for k, _ in chunk]}
                for name in chunk[0][1]:
                    out[name] = torch.stack([row[name] for _, row in chunk])
                self._val_set.append(out)
        return self._val_set

    @torch.no_grad()
    def validation_loss(self, model) -> float | None:
        """Mean loss of ``model`` on the validation set, with the noise and timesteps drawn from
        ``validation.seed``: comparable across steps, runs and trials."""
        batches = self._validation_set()
        if not batches:
            return None
        state = torch.get_rng_state()
        torch.manual_seed(self.spec.validation.seed)  # the same noise every time: comparable numbers
        objective = self.trainable.objective(model).eval()
        total, count = 0.0, 0
        try:
            for batch in batches:
                total += self._loss(batch, objective, training=False)[0].item() * len(batch["key"])
                count += len(batch["key"])
        finally:
            objective.train()
            torch.set_rng_state(state)
        return total / count

    def measure_validation_loss(self) -> float | None:
        """The validation loss of the current weights (the EMA's when EMA is on) at this step, measured
        once per step; rank 0 gets it, the others None. Collective when sharded: every rank calls it."""
        if self.spec.data.validation_fraction == 0 or self.spec.validation.max_batches == 0:
            return None
        step = self.state.step
        if self._val_measured[0] != step:
            with self._ema_weights():
                model = self._plain_model()
                value = self.validation_loss(model) if self.is_main else None
            self._val_measured = (step, value)
            if value is not None:
                self.report.log({"step": step, "val_loss": value})
                self.recent_curve.append(("val_loss", step, value))
                self._tell(val_loss=value)
        return self._val_measured[1]

    @torch.no_grad()
    def validate(self, step: int, metrics: dict, final: bool = False) -> str | None:
        """Validation loss and a sample grid (drawn on rank 0; every rank calls this, since gathering
        sharded weights is collective). Returns the grid's URI, if one was drawn."""
        self.measure_validation_loss()
        with self._ema_weights():
            model = self._plain_model()
            if not self.is_main:
                return None
            name = "final" if final else f"step_{step:08d}"
            grid = None
            objective = self.trainable.objective(model).eval()  # the model and any trained text encoder
            if self.spec.stage == "denoiser" and self.spec.validation.prompts:
                v = self.spec.validation
                comps = self._with_encoders()
                rows = generate(assemble_pipeline(comps, model), v.prompts, images_per_prompt=v.images_per_prompt,
                                num_inference_steps=v.num_inference_steps, guidance_scale=v.guidance_scale,
                                seed=v.seed, resolution=self.comps.resolution, **comps.family.sampling_kwargs(comps))
                grid = self.report.save_image(f"samples/{name}.png", image_grid(rows, v.prompts))
            elif self.spec.stage == "autoencoder" and self.last_pixels is not None:
                pixels = self.last_pixels[:8].to(self.device)
                recon = objective(pixels)[3]
                grid = self.report.save_image(f"samples/{name}.png", image_grid(
                    [tensor_to_images(pixels), tensor_to_images(recon)], ["input", "reconstruction"]))
            objective.train()
        self.report.flush()
        if grid is not None:
            self._tell(sample=grid)
        return grid

    def _summary(self, metrics: dict, status: str) -> dict:
        meta = self.job.metadata
        return {"job": meta.name, "namespace": meta.namespace, "labels": meta.labels, "stage": self.spec.stage,
                "status": status, "step": self.state.step, "epoch": self.state.epoch,
                "resumed_from": self.resumed_from, "elastic": self.elastic, "loss": metrics.get("loss"),
                "output": self.spec.output.uri, "checkpoint_upload_failures": self.checkpoint_upload_failures}

    def _write_summary(self, summary: dict) -> None:
        summary["metrics"] = storage.join(self.spec.output.uri, "metrics.jsonl")
        summary["report_upload_failures"] = self.report.upload_failures
        summary["tracking"] = self.report.trackers.names
        self.report.finish_tracking(summary["status"], summary)
        summary["tracking_failures"] = self.report.trackers.failures
        storage.write_bytes(storage.join(self.spec.output.uri, "summary.json"), json.dumps(summary, indent=2).encode(),
                            self.spec.storage)

    def preempted(self, metrics: dict) -> dict:
        """End a preempted run: its checkpoint at this step is written; no export (the run is not done)."""
        summary = self._summary(metrics, "preempted")
        summary["checkpoint_step"] = self.saved_step
        summary["stop_s"] = round(time.monotonic() - self.preemption.noticed_at, 3)
        if self.is_main:
            self.report.flush()
            self._write_summary(summary)
            log.warning("preempted at step %d after %.1f s: resume with the same document (resume: auto)",
                        self.state.step, summary["stop_s"])
        return summary

    def finish(self, metrics: dict) -> dict:
        summary = self._summary(metrics, "succeeded")
        if self.spec.data.bucketed:
            summary["batch_shapes"] = dict(sorted(sum_counts_across_workers(self.batch_shapes).items()))
        with self._ema_weights():
            model = self._plain_model()
            if self.is_main:
                self._export(model, summary)
        summary["samples"] = self.validate(self.state.step, metrics, final=True)
        if self.is_main:
            self._write_summary(summary)
        return summary

    def _export(self, model, summary: dict) -> None:
        """Save the stock diffusers pipeline (or the VAE) under spec.output.uri (rank 0)."""
        out = self.spec.output.uri
        with tempfile.TemporaryDirectory(prefix="sdray-export-") as tmp:
            if self.spec.stage == "denoiser":
                pipe = assemble_pipeline(self._with_encoders(), model)
                if self.trainable.lora:
                    pipe.save_lora_weights(Path(tmp) / "lora", **self.trainable.lora_layers())
                    storage.upload_dir(Path(tmp) / "lora", storage.join(out, "lora"), self.spec.storage)
                    summary["lora"] = storage.join(out, "lora")
                    pipe = self.trainable.merged_pipeline(model)
                pipe.save_pretrained(Path(tmp) / "pipeline", safe_serialization=True)
                storage.upload_dir(Path(tmp) / "pipeline", storage.join(out, "pipeline"), self.spec.storage)
                summary["pipeline"] = storage.join(out, "pipeline")
                return
            if self.recent_latents:
                factors = latent_normalisation(list(self.recent_latents), model.config)
                model.register_to_config(**factors)
                summary.update(factors)
            model.save_pretrained(Path(tmp) / "vae", safe_serialization=True)
            storage.upload_dir(Path(tmp) / "vae", storage.join(out, "vae"), self.spec.storage)
            summary["vae"] = storage.join(out, "vae")


def latent_normalisation(latents: list[torch.Tensor], vae_config) -> dict[str, float]:
    """The VAE config values that make these (unscaled) latents the denoiser's zero-mean, unit-variance input
    (``ModelFamily.scale_latents``): ``scaling_factor`` 1/std, as Stable Diffusion's; and ``shift_factor``
    the mean where the VAE's config has one (SD3's and Flux's do; SD's and SDXL's have none: None)."""
    values = torch.cat([x.flatten() for x in latents])
    factors = {"scaling_factor": 1.0 / values.std().item()}
    if vae_config.get("shift_factor") is not None:
        factors["shift_factor"] = values.mean().item()
    return factors


def train_worker(job: DiffusionJob, ctx: WorkerContext) -> dict:
    """Train ``job`` as one worker of ``ctx``; returns the run summary (rank 0's is complete)."""
    return Trainer(job, ctx).run()
