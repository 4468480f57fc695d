"""Data-parallel strategies, applied to a finished model from outside (as torchtitan's ``parallelize``).

The model code never knows how it is distributed. Only ``ddp`` exists in this release; the job spec
refuses the others until they land.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from sdray.spec import DistributedSpec


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def parallelize(model: torch.nn.Module, spec: DistributedSpec, device: torch.device) -> torch.nn.Module:
    """The module to run forward/backward through: ``model`` itself on one process, DDP-wrapped on many."""
    if spec.strategy != "ddp":
        raise ValueError(f"spec.distributed.strategy: {spec.strategy!r} is not available yet; use 'ddp'")
    if not is_distributed():
        return model
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def mean_across_workers(value: float, device: torch.device) -> float:
    """The mean of ``value`` over all workers (the value itself on one process)."""
    if not is_distributed():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()
