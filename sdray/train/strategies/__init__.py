"""The strategies a job may name in ``spec.distributed.strategy`` (``sdray.train.strategies.base`` says what
a strategy owns). Adding one: a module here with a ``Strategy`` subclass and one line in ``_STRATEGIES``."""

from __future__ import annotations

import torch

from sdray.spec import JobSpec
from sdray.train.strategies.base import Strategy
from sdray.train.strategies.ddp import DDP
from sdray.train.strategies.deepspeed import DeepSpeed
from sdray.train.strategies.fsdp import FSDP

_STRATEGIES: dict[str, type[Strategy]] = {cls.name: cls for cls in (DDP, FSDP, DeepSpeed)}


def strategy_for(spec: JobSpec, device: torch.device, amp_dtype: torch.dtype | None) -> Strategy:
    """The strategy ``spec.distributed.strategy`` names, for this worker."""
    return _STRATEGIES[spec.distributed.strategy](spec, device, amp_dtype)


__all__ = ["Strategy", "strategy_for"]
