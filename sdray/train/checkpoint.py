"""Checkpoint contents: one place that saves and restores every stateful piece of a run.

A checkpoint directory holds the model, optimizer and EMA state the way the run's strategy keeps it (its
``Layout``, from ``Strategy.checkpoint_layout``):
- ``model/<component>.safetensors``: the trained weights of each trained component (``unet``, ``vae``,
  ``text_encoder``…; LoRA runs: the adapters alone) and ``ema.pt``, the EMA shadow weights when EMA is
  on, for replicated runs (``Layout``, here); or
- ``sharded/``: FSDP's DCP shards (``strategies.fsdp.ShardedLayout``); or
- ``deepspeed/``: the DeepSpeed engine's own files plus ``ema.pt`` (``strategies.deepspeed.EngineLayout``);
and, whatever the strategy,
- ``trainer_state.pt``: optimizer (replicated runs), LR schedule, loss scaler and the loop's counters;
- ``rng_rank{N}.pt``: each worker's random state (every rank writes its own file);
- ``sdray_checkpoint.json``: step, stage, job name, format (replicated, dcp or deepspeed), world size,
  ZeRO stage and what it holds of each component: what a resuming run checks first.
Everything is read back with ``torch.load(weights_only=True)`` (``load_weights_only``): tensors and plain
values only. ``checkpoint.resume`` may name a checkpoint someone else wrote, and a full unpickling would run
whatever code its pickles name; the files hold nothing else (the RNG states are saved as tensors and ints).
Where the directory goes (Ray Train storage, or a local folder renamed into place) is the caller's
business: every writer here writes into a private staging directory first.
"""

from __future__ import annotations

import json
import pickle
import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

MANIFEST = "sdray_checkpoint.json"


@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0
    images_seen: int = 0
    epoch_images: int = 0  # images of the current epoch read so far (all workers): where a resume picks it up


class UnsafeCheckpoint(ValueError):
    """A checkpoint file holding pickled objects other than tensors and plain values: never unpickled."""


def load_weights_only(path, map_location="cpu", *, allowed=(), what: str | None = None):
    """``torch.load`` of tensors and plain values (dicts, lists, tuples, numbers, strings) only, plus the
    named harmless ``allowed`` types: a file naming anything else (a crafted pickle would name a function
    to call) is refused with ``UnsafeCheckpoint`` before any of it runs. ``what`` names it in the message
    (default: the file)."""
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        named = re.search(r"GLOBAL ([\w.]+)|but got <class '([\w.]+)'>", str(exc))
        raise UnsafeCheckpoint(
            f"{what or f'checkpoint file {path}'} holds pickled objects other than tensors and plain values"
            f"{f' ({named[1] or named[2]})' if named else ''}, which could run code when loaded: refused. A "
            "checkpoint written by sdray holds none; resume from one you trust, or start afresh "
            "(checkpoint.resume: never)"
        ) from None


def _numpy_arrays() -> list:
    """What a NumPy array needs to be unpickled (its reconstructor, type and dtype): the RNG files of earlier
    sdray versions kept NumPy's state as an array. The reconstructor only builds an array; an object array's
    items would still go through the weights-only unpickler."""
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # NumPy 1
        from numpy.core.multiarray import _reconstruct
    return [_reconstruct, (_reconstruct, "numpy.core.multiarray._reconstruct"), np.ndarray, np.dtype,
            type(np.dtype(np.uint32))]  # (the generator's keys are uint32)


def _rng_state() -> dict:
    """Every generator's state as tensors and ints (what ``load_weights_only`` reads back)."""
    algorithm, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "numpy": {"algorithm": algorithm, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}}


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    numpy = state["numpy"]
    if isinstance(numpy, dict):
        numpy = (numpy["algorithm"], numpy["keys"].numpy().astype(np.uint32), numpy["pos"], numpy["has_gauss"],
                 numpy["cached_gaussian"])
    np.random.set_state(numpy)  # (a tuple holding an array in files written before)
    torch.set_rng_state(state["torch"])


class Layout:
    """How a strategy keeps the model, optimizer and EMA state in a checkpoint. This base class is the
    replicated layout (every rank holds the whole model: DDP, and any strategy on one process): rank 0
    writes ``model/<component>.safetensors``, the optimizer into ``trainer_state.pt`` and ``ema.pt``. A
    strategy that keeps its state otherwise returns its own subclass from ``Strategy.checkpoint_layout``
    (FSDP's DCP shards, DeepSpeed's engine files); nothing here asks which strategy it has."""

    # Whether a run on another number of workers can load it (elastic resume): whole weights can.
    any_world_size = True

    def manifest(self) -> dict:
        """The manifest's format fields: what a resuming run must match."""
        return {"format": "replicated"}

    def save(self, directory: Path, *, rank: int, trainable, optimizer, ema, trainer: dict) -> None:
        """Write this rank's share of the state (every rank calls it); what belongs in
        ``trainer_state.pt`` goes into ``trainer``, which rank 0 writes afterwards."""
        if rank != 0:
            return
        (directory / "model").mkdir()
        for name, weights in trainable.state_dicts().items():
            save_file({k: v.detach().contiguous() for k, v in weights.items()},
                      directory / "model" / f"{name}.safetensors")
        trainer["optimizer"] = optimizer.state_dict()
        save_ema(directory, ema)

    def load(self, directory: Path, *, trainable, optimizer, ema, trainer: dict) -> None:
        """Restore what ``save`` wrote (``trainer`` is ``trainer_state.pt``, read weights-only)."""
        trainable.load_state_dicts({name: load_file(directory / "model" / f"{name}.safetensors")
                                    for name in trainable.components})
        optimizer.load_state_dict(trainer["optimizer"])
        load_ema(directory, ema)


def save_ema(directory: Path, ema) -> None:
    """``ema.pt``: the EMA shadow weights (whole on rank 0), when EMA is on."""
    if ema is not None:
        torch.save(ema.state_dict(), directory / "ema.pt")


def load_ema(directory: Path, ema) -> None:
    if ema is not None and (directory / "ema.pt").exists():
        ema.load_state_dict(load_weights_only(directory / "ema.pt"))


def _describe(layout: dict) -> str:
    return {"replicated": "replicated (ddp)", "dcp": "sharded (fsdp)"}.get(
        layout.get("format", "replicated"), f"deepspeed ZeRO-{layout.get('zero_stage')}")


def save_checkpoint(directory: Path, *, rank: int, trainable, optimizer, lr_scheduler, scaler, ema,
                    state: TrainState, stage: str, job_name: str, layout: Layout | None = None,
                    world_size: int = 1, global_batch: int | None = None) -> None:
    """Write this rank's share of a checkpoint into ``directory`` (every rank calls this).

    ``trainable`` is the run's ``sdray.train.trainable.Trainable``; ``layout`` is the strategy's
    ``checkpoint_layout()`` (default: replicated)."""
    layout = layout or Layout()
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(_rng_state(), directory / f"rng_rank{rank}.pt")
    trainer = {"lr_scheduler": lr_scheduler.state_dict(), "scaler": scaler.state_dict(), "state": asdict(state)}
    layout.save(directory, rank=rank, trainable=trainable, optimizer=optimizer, ema=ema, trainer=trainer)
    if rank != 0:
        return
    torch.save(trainer, directory / "trainer_state.pt")
    (directory / MANIFEST).write_text(json.dumps({
        "step": state.step, "stage": stage, "job": job_name, **layout.manifest(),
        "world_size": world_size, "global_batch": global_batch, "weights": trainable.kinds}))


def resumed_accumulation(manifest: dict, *, batch_size: int, accumulation: int,
                         world_size: int) -> tuple[int, str | None]:
    """The gradient accumulation of a run that resumes a checkpoint written by another number of workers,
    and what changed (None: nothing). The policy: keep the checkpoint's global batch (batch_size ×
    accumulation × workers) by changing the accumulation where it divides evenly; otherwise keep the
    document's batch_size and accumulation, so the global batch changes, and say so. The learning rate and
    its schedule stay as they are (the schedule counts optimizer steps, which mean the same batch when the
    global batch is kept)."""
    saved_world = manifest.get("world_size")
    if saved_world in (None, world_size):
        return accumulation, None
    saved_global = manifest.get("global_batch") or batch_size * accumulation * saved_world
    per_step = batch_size * world_size
    resumed = f"resumed on {world_size} worker{'s' * (world_size > 1)} a checkpoint of {saved_world}"
    if saved_global % per_step == 0:
        kept = saved_global // per_step
        return kept, (f"{resumed}: gradient_accumulation_steps {accumulation} → {kept} keeps the global batch at "
                      f"{saved_global}")
    return accumulation, (f"{resumed}: the global batch changes "
                          f"{saved_global} → {per_step * accumulation} ({saved_global} is no multiple of batch_size × "
                          f"num_workers = {per_step}); the learning rate is unchanged")


class CheckpointMismatch(ValueError):
    """A checkpoint written under another strategy, ZeRO stage, world size or trained set than this run's."""


def _check_layout(directory: Path, layout: Layout, world_size: int, kinds: dict) -> None:
    manifest = read_manifest(directory) or {}
    saved = {k: manifest[k] for k in ("format", "zero_stage") if k in manifest}
    saved.setdefault("format", "replicated")
    same_world = layout.any_world_size or manifest.get("world_size") == world_size
    if saved != layout.manifest() or not same_world:
        fix = ("resume it with the same strategy (and zero_stage for deepspeed)" if saved != layout.manifest() else
               "resume it on the same num_workers: this layout is not resharded on load")
        raise CheckpointMismatch(
            f"checkpoint {directory.name} was written by a {_describe(saved)} run of "
            f"{manifest.get('world_size', '?')} workers, this run is {_describe(layout.manifest())} on {world_size}; "
            + fix
        )
    if manifest.get("weights") != kinds:
        raise CheckpointMismatch(
            f"checkpoint {directory.name} holds {manifest.get('weights')} weights, this run trains "
            f"{kinds}: resume it with the same spec.model.lora and spec.train.train_text_encoder"
        )


def load_checkpoint(directory: Path, *, rank: int, trainable, optimizer, lr_scheduler, scaler, ema,
                    layout: Layout | None = None, world_size: int = 1) -> TrainState:
    """Restore everything ``save_checkpoint`` wrote; returns the loop counters to continue from."""
    layout = layout or Layout()
    _check_layout(directory, layout, world_size, trainable.kinds)
    trainer = load_weights_only(directory / "trainer_state.pt")
    layout.load(directory, trainable=trainable, optimizer=optimizer, ema=ema, trainer=trainer)
    lr_scheduler.load_state_dict(trainer["lr_scheduler"])
    scaler.load_state_dict(trainer["scaler"])
    rng = directory / f"rng_rank{rank}.pt"
    if rng.exists():  # a different world size than the saving run: keep this rank's fresh seed
        _set_rng_state(load_weights_only(rng, allowed=_numpy_arrays()))
    return TrainState(**trainer["state"])


def read_manifest(directory: Path) -> dict | None:
    path = directory / MANIFEST
    return json.loads(path.read_text()) if path.exists() else None
