"""``fsdp``: FSDP2 (``torch.distributed.fsdp.fully_shard``) shards every block the model family names
(``ModelFamily.shard_units``; the VAE's down/mid/up blocks for the autoencoder), then the root. ``full``
reshards parameters after forward (ZeRO-3), ``grad_op`` keeps them gathered until backward (ZeRO-2),
``hybrid`` shards within groups and replicates across them (HSDP, a 2-D device mesh). Only the trainable
module is sharded; the frozen VAE and text encoders stay plain replicas. On one process nothing is
sharded and it trains as ``ddp`` does."""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from sdray.spec import FSDPSpec
from sdray.train.parallel import compiled, is_distributed
from sdray.train.strategies.base import Strategy


def full_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The sharded module's complete weights, on CPU. Collective: every rank must call it; rank 0 gets the
    weights, the others an empty dict."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


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

    def prepare(self, objective, trainable):
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
        return {"sharded_root": self.root} if self.root is not None else {}

    def full_model(self, model, prefix, is_main):
        if self.root is None:
            return model
        full = full_state_dict(self.root)
        if not is_main:
            return None
        plain = type(model).from_config(model.config)
        plain.load_state_dict({k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)})
        return plain.to(self.device)
