"""Data-parallel strategies, applied to a finished model from outside (as torchtitan's ``parallelize``).

The model code never knows how it is distributed:
- ``ddp``: ``DistributedDataParallel`` replicates the model and all-reduces gradients;
- ``fsdp``: FSDP2 (``torch.distributed.fsdp.fully_shard``) shards every block of the model, then the root.
  ``full`` reshards parameters after forward (ZeRO-3), ``grad_op`` keeps them gathered until backward
  (ZeRO-2), ``hybrid`` shards within groups and replicates across them (HSDP, a 2-D device mesh).
Only the trainable model is wrapped; the frozen VAE and text encoders stay plain replicas.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from sdray.spec import DistributedSpec, FSDPSpec

def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_sharded(module: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(getattr(module, "_orig_mod", module), FSDPModule)


def _shard(model: torch.nn.Module, fsdp: FSDPSpec, device: torch.device, amp_dtype: torch.dtype | None,
           units: list[torch.nn.Module]):
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


def parallelize(model: torch.nn.Module, spec: DistributedSpec, device: torch.device,
                amp_dtype: torch.dtype | None = None, compile: bool = False,
                units: list[torch.nn.Module] = ()) -> torch.nn.Module:
    """The module to run forward/backward through: ``model`` itself on one process, DDP-wrapped or
    FSDP-sharded (in place) on many; ``torch.compile``-d last when ``compile``. FSDP shards each of
    ``units`` (the model family's blocks) on its own, then the root, so only one block's parameters are
    gathered at a time."""
    wrapped = model
    if is_distributed() and spec.strategy == "fsdp":
        wrapped = _shard(model, spec.fsdp or FSDPSpec(), device, amp_dtype, list(units))
    elif is_distributed():
        wrapped = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return torch.compile(wrapped) if compile else wrapped


def unwrap_compiled(module: torch.nn.Module) -> torch.nn.Module:
    """The module ``torch.compile`` wrapped (the module itself when it was not compiled)."""
    return getattr(module, "_orig_mod", module)


def no_gradient_sync(module: torch.nn.Module):
    """A context in which backward accumulates gradients locally (the micro-steps of accumulation)."""
    module = unwrap_compiled(module)
    if isinstance(module, DistributedDataParallel):
        return module.no_sync()
    if is_sharded(module):
        @contextlib.contextmanager
        def paused():
            module.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                module.set_requires_gradient_sync(True)
        return paused()
    return contextlib.nullcontext()


def mean_across_workers(value: float, device: torch.device) -> float:
    """The mean of ``value`` over all workers (the value itself on one process)."""
    if not is_distributed():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


def all_workers_have(flag: bool, device: torch.device) -> bool:
    """True when ``flag`` holds on every worker (``flag`` itself on one process). Collective."""
    if not is_distributed():
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def in_lockstep(batches: Iterable, device: torch.device) -> Iterator:
    """``batches`` until any worker runs out: every worker then ends its epoch at the same step. For
    data whose batch count differs between workers (aspect-ratio buckets); without it the worker with
    more batches would wait forever in a gradient all-reduce its peers never join."""
    it = iter(batches)
    while True:
        batch = next(it, None)
        if not all_workers_have(batch is not None, device):
            return
        yield batch


def sum_counts_across_workers(counts: dict[str, int]) -> dict[str, int]:
    """Per-key sums of every worker's ``counts`` (a copy of ``counts`` on one process). Collective."""
    if not is_distributed():
        return dict(counts)
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, dict(counts))
    return dict(sum((Counter(c) for c in gathered), Counter()))


def full_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The module's complete weights, on CPU. Collective when sharded: every rank must call it; rank 0
    gets the weights, the others an empty dict."""
    module = unwrap_compiled(module)
    if not is_sharded(module):
        return {k: v.detach().cpu() for k, v in module.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
