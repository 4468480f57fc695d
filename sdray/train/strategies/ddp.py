"""``ddp``: one replica of the trainable module per worker, gradients all-reduced by
``DistributedDataParallel`` (a plain module on one process)."""

from __future__ import annotations

import torch
from torch.nn.parallel import DistributedDataParallel

from sdray.train.parallel import compiled, is_distributed
from sdray.train.strategies.base import Strategy


class DDP(Strategy):
    name = "ddp"

    def __init__(self, spec, device, amp_dtype):
        super().__init__(spec, device, amp_dtype)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.cfg.mixed_precision == "fp16")

    def prepare(self, objective, trainable):
        wrapped = objective
        if is_distributed():
            wrapped = DistributedDataParallel(objective, device_ids=[self.device.index]
                                              if self.device.type == "cuda" else None)
        self.wrapped = compiled(wrapped, self.cfg.compile)
        self._optimizer(trainable.parameters())

    def no_sync(self):
        module = getattr(self.wrapped, "_orig_mod", self.wrapped)
        return module.no_sync() if isinstance(module, DistributedDataParallel) else super().no_sync()
