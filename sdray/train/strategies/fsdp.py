"""``fsdp``: FSDP2 (``torch.distributed.fsdp.fully_shard``) shards every block the model family names
(``ModelFamily.shard_units``; the VAE's down/mid/up blocks for the autoencoder), then the root. ``full``
reshards parameters after forward (ZeRO-3), ``grad_op`` keeps them gathered until backward (ZeRO-2),
``hybrid`` shards within groups and replicates across them (HSDP, a 2-D device mesh). Only the trainable
module is sharded; the frozen VAE and text encoders stay plain replicas. On one process nothing is
sharded and it trains as ``ddp`` does."""

from __future__ import annotations

import contextlib
import pickle
import re
from pathlib import Path

import torch
import torch.distributed as dist

from sdray.spec import FSDPSpec
from sdray.train.checkpoint import Layout, UnsafeCheckpoint, load_weights_only
from sdray.train.parallel import compiled, is_distributed
from sdray.train.strategies.base import Strategy


def full_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The sharded module's complete weights, on CPU. Collective: every rank must call it; rank 0 gets the
    weights, the others an empty dict."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


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

def sharded_state(root: torch.nn.Module, optimizer, ema) -> dict:
    """What DCP saves/loads for a sharded run (the tensors are the live ones: loading fills them)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(root, optimizer)
    state = {"model": model_sd, "optimizer": optim_sd}
    if ema is not None:
        state["ema"] = {str(i): p for i, p in enumerate(ema.shadow_params)}
    return state


class ShardedLayout(Layout):
    """``sharded/``: model, optimizer and EMA shards through ``torch.distributed.checkpoint``; every rank
    writes its own shard files and nothing is gathered. DCP reshards on load, so a run on another number of
    workers resumes it (elastic resume). DCP's own
    reader unpickles in full: its metadata and non-tensor items are checked first (a ``checkpoint.resume``
    URI may name a checkpoint someone else wrote)."""

    def __init__(self, root: torch.nn.Module):
        self.root = root

    def manifest(self):
        return {"format": "dcp"}

    def save(self, directory, *, rank, trainable, optimizer, ema, trainer):
        import torch.distributed.checkpoint as dcp

        dcp.save(sharded_state(self.root, optimizer, ema), checkpoint_id=str(directory / "sharded"))
        if ema is not None:  # the EMA's counters (its weights are in the shards)
            trainer["ema"] = {k: v for k, v in ema.state_dict().items() if k != "shadow_params"}

    def load(self, directory, *, trainable, optimizer, ema, trainer):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        state = sharded_state(self.root, optimizer, ema)
        _check_dcp_metadata(directory / "sharded")
        try:
            dcp.load(state, checkpoint_id=str(directory / "sharded"), planner=_weights_only_planner())
        except dcp.CheckpointException as exc:  # DCP gathers each rank's (exception, traceback) into one
            refused = [error for error, _ in exc.failures.values() if isinstance(error, UnsafeCheckpoint)]
            if refused:
                raise refused[0] from None
            raise
        set_state_dict(self.root, optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"])
        if ema is not None:
            for key, value in trainer.get("ema", {}).items():
                setattr(ema, key, value)


def shard(model: torch.nn.Module, fsdp: FSDPSpec, device: torch.device, amp_dtype: torch.dtype | None,
          units: list[torch.nn.Module]) -> torch.nn.Module:
    """Shard each of ``units`` on its own, then ``model`` (in place; returned for convenience)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    world = dist.get_world_size()
    if fsdp.sharding == "hybrid":
        group = fsdp.shard_group_size
        mesh = init_device_mesh(device.type, (world // group, group), mesh_dim_names=("replicate", "shard"))
    else:
        mesh = init_device_mesh(device.type, (world,))
    kwargs = dict(
        mesh=mesh,
        reshard_after_forward=fsdp.sharding != "grad_op",
        # Compute in the job's precision, reduce gradients in fp32 (bf16 sums lose small updates).
        mp_policy=MixedPrecisionPolicy(param_dtype=amp_dtype, reduce_dtype=torch.float32 if amp_dtype else None),
        offload_policy=CPUOffloadPolicy() if fsdp.cpu_offload else OffloadPolicy(),
    )
    for block in units:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model


class FSDP(Strategy):
    name = "fsdp"

    def __init__(self, spec, device, amp_dtype):
        super().__init__(spec, device, amp_dtype)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.cfg.mixed_precision == "fp16")
        self.root: torch.nn.Module | None = None  # the sharded module (None on one process)
        self.objective: torch.nn.Module | None = None

    def prepare(self, objective, trainable):
        self.objective = objective
        # Shard first: FSDP2 turns the parameters into sharded DTensors, which the optimizer must hold.
        if is_distributed():
            self.root = shard(objective, self.spec.distributed.fsdp or FSDPSpec(), self.device, self.amp_dtype,
                              trainable.shard_units())
        self.wrapped = compiled(objective, self.cfg.compile)
        self._optimizer(trainable.parameters())

    def no_sync(self):
        if self.root is None:
            return super().no_sync()
        root = self.root

        @contextlib.contextmanager
        def paused():
            root.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                root.set_requires_gradient_sync(True)
        return paused()

    def checkpoint_layout(self):
        # DCP on one process too (whole tensors, no process group needed): a run of any size resumes it.
        return ShardedLayout(self.root if self.root is not None else self.objective)

    def full_model(self, model, prefix, is_main):
        if self.root is None:
            return model
        full = full_state_dict(self.root)
        if not is_main:
            return None
        plain = type(model).from_config(model.config)
        plain.load_state_dict({k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)})
        return plain.to(self.device)
