"""Checkpoint contents: one place that saves and restores every stateful piece of a run.

A checkpoint directory holds
- ``model/<component>.safetensors``: the trained weights of each trained component (``unet``, ``vae``,
  ``text_encoder``…; LoRA runs: the adapters alone) and ``ema.pt``, the EMA shadow weights when EMA is
  on, for replicated (DDP) runs; or
- ``sharded/``: for FSDP runs, model, optimizer and EMA shards through ``torch.distributed.checkpoint``:
  every rank writes its own shard files, nothing is gathered (resume needs the same strategy and world
  size); or
- ``deepspeed/``: for DeepSpeed runs, the engine's own ``save_checkpoint`` files (module, every rank's
  ZeRO partition of the optimizer state, LR schedule), plus ``ema.pt`` (ZeRO 1/2 keep full weights on
  every rank, so rank 0's EMA is everyone's); resume needs the same ZeRO stage and world size;
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
DEEPSPEED_TAG = "engine"  # the engine's subdirectory under deepspeed/


@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0
    images_seen: int = 0


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


# What torch.distributed.checkpoint pickles into a sharded checkpoint's .metadata besides plain values.
_DCP_METADATA_GLOBALS = frozenset({
    *(("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch.serialization", "_get_layout"),
    ("torch", "Size"), ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("collections", "OrderedDict"),
})


class _DCPMetadataUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _DCP_METADATA_GLOBALS or (module == "torch"
                                                       and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"Unsupported global: GLOBAL {module}.{name}")


def _check_dcp_metadata(sharded: Path) -> None:
    """torch.distributed.checkpoint unpickles its .metadata in full: check first that it names only DCP's
    own metadata types (the same bytes are then read again by DCP)."""
    for path in sorted(sharded.glob("*.metadata")):
        try:
            with path.open("rb") as f:
                _DCPMetadataUnpickler(f).load()
        except pickle.UnpicklingError as exc:
            named = re.search(r"GLOBAL ([\w.]+)", str(exc))
            raise UnsafeCheckpoint(f"checkpoint file {path} names {named[1] if named else 'objects'}, not only "
                                   "torch.distributed.checkpoint's metadata types, which could run code when "
                                   "loaded: refused") from None


def _weights_only_planner():
    """DCP's default load planner, with every non-tensor item (optimizer settings) checked by the
    weights-only unpickler before DCP's own ``torch.load(weights_only=False)`` reads it."""
    from torch.distributed.checkpoint import DefaultLoadPlanner

    class WeightsOnlyLoadPlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value):
            load_weights_only(value, what=f"item {read_item.dest_index.fqn} of a sharded checkpoint")
            value.seek(0)
            super().load_bytes(read_item, value)

    return WeightsOnlyLoadPlanner()


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


def _sharded_state(root, optimizer, ema) -> dict:
    """What DCP saves/loads for a sharded run (the tensors are the live ones: loading fills them)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(root, optimizer)
    state = {"model": model_sd, "optimizer": optim_sd}
    if ema is not None:
        state["ema"] = {str(i): p for i, p in enumerate(ema.shadow_params)}
    return state


def _layout(sharded_root, engine) -> dict:
    """How this run's checkpoints are laid out (the manifest's format fields)."""
    if engine is not None:
        return {"format": "deepspeed", "zero_stage": engine.zero_optimization_stage()}
    return {"format": "dcp" if sharded_root is not None else "replicated"}


def _describe(layout: dict) -> str:
    return {"replicated": "replicated (ddp)", "dcp": "sharded (fsdp)"}.get(
        layout.get("format", "replicated"), f"deepspeed ZeRO-{layout.get('zero_stage')}")


def save_checkpoint(directory: Path, *, rank: int, trainable, optimizer, lr_scheduler, scaler, ema,
                    state: TrainState, stage: str, job_name: str, sharded_root=None, engine=None,
                    world_size: int = 1) -> None:
    """Write this rank's share of a checkpoint into ``directory`` (every rank calls this).

    ``trainable`` is the run's ``sdray.train.trainable.Trainable``. ``sharded_root`` is the FSDP-sharded
    module when the run is sharded; then DCP writes the shards. ``engine`` is the DeepSpeed engine of a
    DeepSpeed run; then the engine writes its own files."""
    import torch.distributed.checkpoint as dcp

    directory.mkdir(parents=True, exist_ok=True)
    torch.save(_rng_state(), directory / f"rng_rank{rank}.pt")
    trainer = {"lr_scheduler": lr_scheduler.state_dict(), "scaler": scaler.state_dict(), "state": asdict(state)}
    if sharded_root is not None:
        dcp.save(_sharded_state(sharded_root, optimizer, ema), checkpoint_id=str(directory / "sharded"))
        if ema is not None:
            trainer["ema"] = {k: v for k, v in ema.state_dict().items() if k != "shadow_params"}
    if engine is not None:
        (directory / "deepspeed").mkdir()
        engine.save_checkpoint(str(directory / "deepspeed"), tag=DEEPSPEED_TAG, save_latest=False)
    if rank != 0:
        return
    if sharded_root is None and engine is None:
        (directory / "model").mkdir()
        for name, weights in trainable.state_dicts().items():
            save_file({k: v.detach().contiguous() for k, v in weights.items()},
                      directory / "model" / f"{name}.safetensors")
        trainer["optimizer"] = optimizer.state_dict()
    if sharded_root is None and ema is not None:
        torch.save(ema.state_dict(), directory / "ema.pt")
    torch.save(trainer, directory / "trainer_state.pt")
    (directory / MANIFEST).write_text(json.dumps({
        "step": state.step, "stage": stage, "job": job_name, **_layout(sharded_root, engine),
        "world_size": world_size, "weights": trainable.kinds}))


class CheckpointMismatch(ValueError):
    """A checkpoint written under another strategy, ZeRO stage, world size or trained set than this run's."""


def _check_layout(directory: Path, layout: dict, world_size: int, kinds: dict) -> None:
    manifest = read_manifest(directory) or {}
    saved = {k: manifest[k] for k in ("format", "zero_stage") if k in manifest}
    saved.setdefault("format", "replicated")
    same_world = saved["format"] == "replicated" or manifest.get("world_size") == world_size
    if saved != layout or not same_world:
        raise CheckpointMismatch(
            f"checkpoint {directory.name} was written by a {_describe(saved)} run of "
            f"{manifest.get('world_size', '?')} workers, this run is {_describe(layout)} on {world_size}; "
            "resume it with the same strategy and num_workers (and zero_stage for deepspeed)"
        )
    if manifest.get("weights") != kinds:
        raise CheckpointMismatch(
            f"checkpoint {directory.name} holds {manifest.get('weights')} weights, this run trains "
            f"{kinds}: resume it with the same spec.model.lora and spec.train.train_text_encoder"
        )


def load_checkpoint(directory: Path, *, rank: int, trainable, optimizer, lr_scheduler, scaler, ema,
                    sharded_root=None, engine=None, world_size: int = 1) -> TrainState:
    """Restore everything ``save_checkpoint`` wrote; returns the loop counters to continue from."""
    import torch.distributed.checkpoint as dcp

    _check_layout(directory, _layout(sharded_root, engine), world_size, trainable.kinds)
    trainer = load_weights_only(directory / "trainer_state.pt")
    if sharded_root is not None:
        from torch.distributed.checkpoint.state_dict import set_state_dict

        state = _sharded_state(sharded_root, optimizer, ema)
        _check_dcp_metadata(directory / "sharded")
        try:
            dcp.load(state, checkpoint_id=str(directory / "sharded"), planner=_weights_only_planner())
        except dcp.CheckpointException as exc:  # DCP gathers each rank's (exception, traceback) into one
            refused = [error for error, _ in exc.failures.values() if isinstance(error, UnsafeCheckpoint)]
            if refused:
                raise refused[0] from None
            raise
        set_state_dict(sharded_root, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
        if ema is not None:
            for key, value in trainer.get("ema", {}).items():
                setattr(ema, key, value)
    elif engine is not None:
        path, _ = engine.load_checkpoint(str(directory / "deepspeed"), tag=DEEPSPEED_TAG)
        if path is None:
            raise FileNotFoundError(f"{directory / 'deepspeed'}: the DeepSpeed engine found no checkpoint to load")
    else:
        trainable.load_state_dicts({name: load_file(directory / "model" / f"{name}.safetensors")
                                    for name in trainable.components})
        optimizer.load_state_dict(trainer["optimizer"])
    if sharded_root is None and ema is not None and (directory / "ema.pt").exists():
        ema.load_state_dict(load_weights_only(directory / "ema.pt"))
    lr_scheduler.load_state_dict(trainer["lr_scheduler"])
    scaler.load_state_dict(trainer["scaler"])
    rng = directory / f"rng_rank{rank}.pt"
    if rng.exists():  # a different world size than the saving run: keep this rank's fresh seed
        _set_rng_state(load_weights_only(rng, allowed=_numpy_arrays()))
    return TrainState(**trainer["state"])


def read_manifest(directory: Path) -> dict | None:
    path = directory / MANIFEST
    return json.loads(path.read_text()) if path.exists() else None
