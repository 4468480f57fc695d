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
Where the directory goes (Ray Train storage, or a local folder renamed into place) is the caller's
business: every writer here writes into a private staging directory first.
"""

from __future__ import annotations

import json
import random
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


def _rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
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
    trainer = torch.load(directory / "trainer_state.pt", map_location="cpu", weights_only=False)
    if sharded_root is not None:
        from torch.distributed.checkpoint.state_dict import set_state_dict

        state = _sharded_state(sharded_root, optimizer, ema)
        dcp.load(state, checkpoint_id=str(directory / "sharded"))
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
        ema.load_state_dict(torch.load(directory / "ema.pt", map_location="cpu", weights_only=False))
    lr_scheduler.load_state_dict(trainer["lr_scheduler"])
    scaler.load_state_dict(trainer["scaler"])
    rng = directory / f"rng_rank{rank}.pt"
    if rng.exists():  # a different world size than the saving run: keep this rank's fresh seed
        _set_rng_state(torch.load(rng, weights_only=False))
    return TrainState(**trainer["state"])


def read_manifest(directory: Path) -> dict | None:
    path = directory / MANIFEST
    return json.loads(path.read_text()) if path.exists() else None
