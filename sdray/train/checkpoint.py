"""Checkpoint contents: one place that saves and restores every stateful piece of a run.

A checkpoint directory holds
- ``model/``: the trainable model (diffusers ``save_pretrained``, safetensors);
- ``ema.pt``: the EMA shadow weights, when EMA is on;
- ``trainer_state.pt``: optimizer, LR schedule, loss scaler and the loop's own counters;
- ``rng_rank{N}.pt``: each worker's random state (every rank writes its own file);
- ``sdray_checkpoint.json``: step, stage and job name, for people and tools.
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
from safetensors.torch import load_file

MANIFEST = "sdray_checkpoint.json"


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


def save_checkpoint(directory: Path, *, rank: int, model, optimizer, lr_scheduler, scaler, ema,
                    state: TrainState, stage: str, job_name: str) -> None:
    """Write this rank's share of a checkpoint into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(_rng_state(), directory / f"rng_rank{rank}.pt")
    if rank != 0:
        return
    model.save_pretrained(directory / "model", safe_serialization=True)
    if ema is not None:
        torch.save(ema.state_dict(), directory / "ema.pt")
    torch.save({"optimizer": optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict(),
                "scaler": scaler.state_dict(), "state": asdict(state)}, directory / "trainer_state.pt")
    (directory / MANIFEST).write_text(json.dumps({"step": state.step, "stage": stage, "job": job_name}))


def _weights_file(model_dir: Path) -> Path:
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir}: no .safetensors weights in this checkpoint")
    return files[0]


def load_checkpoint(directory: Path, *, rank: int, model, optimizer, lr_scheduler, scaler, ema) -> TrainState:
    """Restore everything ``save_checkpoint`` wrote; returns the loop counters to continue from."""
    model.load_state_dict(load_file(_weights_file(directory / "model")))
    trainer = torch.load(directory / "trainer_state.pt", map_location="cpu", weights_only=False)
    optimizer.load_state_dict(trainer["optimizer"])
    lr_scheduler.load_state_dict(trainer["lr_scheduler"])
    scaler.load_state_dict(trainer["scaler"])
    if ema is not None and (directory / "ema.pt").exists():
        ema.load_state_dict(torch.load(directory / "ema.pt", map_location="cpu", weights_only=False))
    rng = directory / f"rng_rank{rank}.pt"
    if rng.exists():  # a different world size than the saving run: keep this rank's fresh seed
        _set_rng_state(torch.load(rng, weights_only=False))
    return TrainState(**trainer["state"])


def read_manifest(directory: Path) -> dict | None:
    path = directory / MANIFEST
    return json.loads(path.read_text()) if path.exists() else None
