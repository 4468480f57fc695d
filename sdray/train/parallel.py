"""What workers share whatever the strategy (``sdray.train.strategies``): whether the run is distributed,
collective means and counts, epochs kept in lockstep, and ``torch.compile``."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def compiled(module: torch.nn.Module, compile: bool) -> torch.nn.Module:
    """``module`` ``torch.compile``-d when ``compile`` (the last wrap, around DDP or FSDP)."""
    return torch.compile(module) if compile else module


def unwrap_compiled(module: torch.nn.Module) -> torch.nn.Module:
    """The module ``torch.compile`` wrapped (the module itself when it was not compiled)."""
    return getattr(module, "_orig_mod", module)


def mean_across_workers(value: float, device: torch.device) -> float:
    """The mean of ``value`` over all workers (the value itself on one process)."""
    if not is_distributed():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


def _reduce_flag(flag: bool, op, device: torch.device) -> bool:
    if not is_distributed():
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=op)
    return bool(t.item())


def all_workers_have(flag: bool, device: torch.device) -> bool:
    """True when ``flag`` holds on every worker (``flag`` itself on one process). Collective."""
    return _reduce_flag(flag, dist.ReduceOp.MIN, device)


def any_worker_has(flag: bool, device: torch.device) -> bool:
    """True when ``flag`` holds on at least one worker (``flag`` itself on one process). Collective."""
    return _reduce_flag(flag, dist.ReduceOp.MAX, device)


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
