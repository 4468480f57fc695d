"""Resuming reads a checkpoint someone else may have written (``checkpoint.resume`` takes any URI): its
files are read weights-only, and a crafted pickle in any of them is refused before it runs.

Every attack here writes a pickle whose ``__reduce__`` makes the unpickler run ``touch MARKER``; the test
first shows the payload live (a full unpickling creates the marker), then that sdray refuses the file and
the marker never appears. The checkpoint functions are called directly: no Ray."""

from __future__ import annotations

import json
import os
import pickle
import random
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
from conftest import make_job
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel

from sdray.train.checkpoint import TrainState, UnsafeCheckpoint, load_checkpoint, save_checkpoint
from sdray.train.strategies.fsdp import ShardedLayout, sharded_state


class Payload:
    """Unpickled in full, it runs ``touch marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


class TinyTrainable:
    """What the checkpoint functions use of ``sdray.train.trainable.Trainable``, around one Linear."""

    def __init__(self, seed: int):
        torch.manual_seed(seed)
        self.components = {"unet": torch.nn.Linear(4, 3)}
        self.kinds = {"unet": "full"}

    def parameters(self):
        return list(self.components["unet"].parameters())

    def state_dicts(self):
        return {"unet": self.components["unet"].state_dict()}

    def load_state_dicts(self, state):
        self.components["unet"].load_state_dict(state["unet"])


def run_parts(seed: int) -> dict:
    """A run's stateful pieces, as the loop makes them (diffusers' schedule and EMA, torch's AdamW)."""
    trainable = TinyTrainable(seed)
    optimizer = torch.optim.AdamW(trainable.parameters(), lr=1e-2)
    return {"trainable": trainable, "optimizer": optimizer,
            "lr_scheduler": get_scheduler("cosine", optimizer, num_warmup_steps=2, num_training_steps=10),
            "scaler": torch.amp.GradScaler("cpu", enabled=False),
            "ema": EMAModel([p.detach().float() for p in trainable.parameters()], decay=0.9)}


def train(parts: dict, steps: int) -> None:
    for _ in range(steps):
        loss = parts["trainable"].components["unet"](torch.randn(2, 4)).pow(2).mean()
        loss.backward()
        parts["optimizer"].step()
        parts["lr_scheduler"].step()
        parts["optimizer"].zero_grad()
        parts["ema"].step(parts["trainable"].parameters())


def saved_checkpoint(directory: Path, sharded: bool = False) -> dict:
    parts = run_parts(seed=0)
    train(parts, 3)
    extra = {"layout": ShardedLayout(parts["trainable"].components["unet"])} if sharded else {}
    save_checkpoint(directory, rank=0, state=TrainState(step=3, epoch=0, images_seen=6), stage="unet",
                    job_name="safety", **parts, **extra)
    return parts


def draws() -> tuple:
    return random.random(), float(np.random.rand()), float(torch.rand(1))


@pytest.mark.parametrize("sharded", [False, True], ids=["replicated", "dcp"])
def test_a_checkpoint_sdray_wrote_still_loads_whole(tmp_path, sharded):
    saved = saved_checkpoint(tmp_path / "ckpt", sharded)
    expected_draws = draws()  # the generators continue from where the checkpoint caught them
    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    fresh = run_parts(seed=1)
    extra = {"layout": ShardedLayout(fresh["trainable"].components["unet"])} if sharded else {}
    state = load_checkpoint(tmp_path / "ckpt", rank=0, **fresh, **extra)
    assert state == TrainState(step=3, epoch=0, images_seen=6)
    assert draws() == expected_draws
    for a, b in zip(saved["trainable"].parameters(), fresh["trainable"].parameters()):
        assert torch.equal(a, b)
    assert fresh["optimizer"].state_dict()["state"][0]["step"] == 3
    assert fresh["lr_scheduler"].last_epoch == 3
    assert fresh["ema"].optimization_step == 3
    for a, b in zip(saved["ema"].shadow_params, fresh["ema"].shadow_params):
        assert torch.equal(a, b)


def test_rng_files_of_earlier_versions_still_load(tmp_path):
    """Before, NumPy's state was saved as it comes, a tuple holding an array."""
    saved_checkpoint(tmp_path / "ckpt")
    torch.save({"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()},
               tmp_path / "ckpt" / "rng_rank0.pt")
    expected_draws = draws()
    np.random.seed(99)
    load_checkpoint(tmp_path / "ckpt", rank=0, **run_parts(seed=1))
    assert draws() == expected_draws


def _write_payload(path: Path, marker: Path, how: str) -> None:
    if how == "torch.save":
        torch.save({"state": Payload(marker)}, path)
    else:
        path.write_bytes(pickle.dumps(Payload(marker)))


def _load_in_full(path: Path, how: str) -> None:
    """What the loader did before (torch.load(weights_only=False) unpickles a plain pickle as well)."""
    if how == "torch.save":
        torch.load(path, weights_only=False)
    else:
        pickle.loads(path.read_bytes())


@pytest.mark.parametrize("how", ["torch.save", "pickle"])
@pytest.mark.parametrize("name", ["trainer_state.pt", "ema.pt", "rng_rank0.pt"])
def test_a_crafted_pickle_in_a_checkpoint_is_refused_before_it_runs(tmp_path, name, how):
    saved_checkpoint(tmp_path / "ckpt")
    live, marker = tmp_path / "live-marker", tmp_path / "marker"
    _write_payload(tmp_path / "probe.pt", live, how)
    _load_in_full(tmp_path / "probe.pt", how)
    assert live.exists()  # the payload is live
    _write_payload(tmp_path / "ckpt" / name, marker, how)
    with pytest.raises(UnsafeCheckpoint) as err:
        load_checkpoint(tmp_path / "ckpt", rank=0, **run_parts(seed=1))
    assert not marker.exists()
    message = str(err.value)
    assert message.startswith(f"checkpoint file {tmp_path / 'ckpt' / name} holds pickled objects other than tensors "
                              "and plain values")
    assert "which could run code when loaded: refused" in message
    if how == "torch.save":  # (torch's unpickler stops a protocol-4 pickle before it reads the name)
        assert "(posix.system)" in message


def test_a_crafted_dcp_metadata_file_is_refused_before_it_runs(tmp_path):
    """torch.distributed.checkpoint unpickles a sharded checkpoint's .metadata with pickle.load."""
    saved_checkpoint(tmp_path / "ckpt", sharded=True)
    live, marker = tmp_path / "live-marker", tmp_path / "marker"
    pickle.loads(pickle.dumps(Payload(live)))  # what DCP does with it: the payload runs
    assert live.exists()
    (tmp_path / "ckpt" / "sharded" / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    fresh = run_parts(seed=1)
    with pytest.raises(UnsafeCheckpoint, match=r"sharded/\.metadata names posix\.system, not only torch\.distributed"):
        load_checkpoint(tmp_path / "ckpt", rank=0, layout=ShardedLayout(fresh["trainable"].components["unet"]), **fresh)
    assert not marker.exists()


def test_a_crafted_non_tensor_item_of_a_dcp_checkpoint_is_refused_before_it_runs(tmp_path):
    """DCP saves non-tensor state (the optimizer's settings) with torch.save and reads it with
    torch.load(weights_only=False)."""
    parts = saved_checkpoint(tmp_path / "ckpt", sharded=True)
    marker = tmp_path / "marker"
    state = sharded_state(parts["trainable"].components["unet"], parts["optimizer"], parts["ema"])
    state["optimizer"]["param_groups"][0]["lr"] = Payload(marker)
    dcp.save(state, checkpoint_id=str(tmp_path / "ckpt" / "sharded"))
    fresh = run_parts(seed=1)
    with pytest.raises(UnsafeCheckpoint, match=r"\(posix\.system\), which could run code when loaded"):
        load_checkpoint(tmp_path / "ckpt", rank=0, layout=ShardedLayout(fresh["trainable"].components["unet"]), **fresh)
    assert not marker.exists()
    live = tmp_path / "live-marker"  # DCP's own planner would have run it
    state["optimizer"]["param_groups"][0]["lr"] = Payload(live)
    dcp.save(state, checkpoint_id=str(tmp_path / "live"))
    dcp.load(sharded_state(fresh["trainable"].components["unet"], fresh["optimizer"], None),
             checkpoint_id=str(tmp_path / "live"))
    assert live.exists()


DEEPSPEED_RUN = r"""
import json, os, shlex, sys
from pathlib import Path

import torch

from sdray.spec import parse_job
from sdray.train.checkpoint import UnsafeCheckpoint
from sdray.train.strategies.deepspeed import ENGINE_TAG, make_engine


class Payload:
    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(sys.argv[3])}",)


doc, root = json.loads(sys.argv[1]), Path(sys.argv[2])
torch.manual_seed(0)
model = torch.nn.Linear(4, 2)
engine = make_engine(model, torch.optim.AdamW(model.parameters(), lr=1e-2), None, parse_job(doc).spec,
                     torch.device("cpu"))
for _ in range(3):
    engine.backward(engine(torch.randn(2, 4)).pow(2).mean())
    engine.step()
engine.save_checkpoint(str(root), tag=ENGINE_TAG, save_latest=False)
path, _ = engine.load_checkpoint(str(root), tag=ENGINE_TAG)
result = {"loaded": path is not None, "global_steps": engine.global_steps}
(optim,) = (root / ENGINE_TAG).glob("*optim_states.pt")
torch.save({"optimizer_state_dict": Payload()}, optim)
try:
    engine.load_checkpoint(str(root), tag=ENGINE_TAG)
except UnsafeCheckpoint as exc:
    result["refused"] = str(exc)
print(json.dumps(result))
"""


def test_deepspeed_reads_its_checkpoint_files_weights_only(tmp_path):
    """DeepSpeed 0.19.8 loads its files with torch.load(weights_only=False); the engine sdray makes reads
    them weights-only (its own process: the engine sets up a process group)."""
    pytest.importorskip("deepspeed")
    doc = make_job("ds-safety", tmp_path / "out", str(tmp_path / "data"),
                   train={"batch_size": 2, "max_steps": 3}, distributed={"strategy": "deepspeed"})
    marker = tmp_path / "marker"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "RAY_ADDRESS")}
    proc = subprocess.run([sys.executable, "-c", DEEPSPEED_RUN, json.dumps(doc), str(tmp_path / "ds"), str(marker)],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["loaded"] and result["global_steps"] == 3  # the engine's own files load through the wrapper
    assert "optim_states.pt holds pickled objects other than tensors and plain values (posix.system)" in \
        result["refused"]
    assert not marker.exists()
