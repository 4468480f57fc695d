"""The training-strategy seam: how the trainable module is distributed, stepped, saved and gathered.

A strategy is one module of ``sdray.train.strategies`` with one ``Strategy`` subclass, applied to the
finished trainable module from outside (as torchtitan's ``parallelize``): the model code never knows how
it is distributed, and the loop (``sdray.train.loop``) asks the strategy, never which one it has:

- ``prepare``: wrap the objective (DDP, FSDP2 shards of the family's blocks, a DeepSpeed engine), then make
  the optimizer and the LR schedule over the parameters that train (after wrapping: FSDP's are sharded);
- ``no_sync``: the micro-steps of gradient accumulation, without gradient communication;
- ``backward`` and ``optimizer_step``: loss scaling, accumulation, clipping, the optimizer and schedule;
- ``checkpoint_layout``: how ``sdray.train.checkpoint`` saves and loads this strategy's state (a
  ``checkpoint.Layout``);
- ``full_model``: the trained model with complete weights for sampling, EMA and export.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod

import torch
from diffusers.optimization import get_scheduler

from sdray.spec import JobSpec
from sdray.train.checkpoint import Layout


class Strategy(ABC):
    """One run's strategy. After ``prepare``: ``wrapped`` (what forward/backward run through),
    ``optimizer``, ``lr_scheduler``, ``scaler``."""

    name: str

    def __init__(self, spec: JobSpec, device: torch.device, amp_dtype: torch.dtype | None):
        self.spec = spec
        self.cfg = spec.train
        self.device = device
        self.amp_dtype = amp_dtype
        self.wrapped: torch.nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.lr_scheduler = None
        self.scaler = torch.amp.GradScaler(device.type, enabled=False)

    @abstractmethod
    def prepare(self, objective: torch.nn.Module, trainable) -> None:
        """Wrap ``objective`` and make the optimizer and LR schedule over ``trainable.parameters()``."""

    def _optimizer(self, parameters, optimizer_class=torch.optim.AdamW) -> None:
        opt = self.cfg.optimizer
        self.optimizer = optimizer_class(parameters, lr=self.cfg.learning_rate, betas=opt.betas,
                                         weight_decay=opt.weight_decay, eps=opt.eps)
        self.lr_scheduler = get_scheduler(self.cfg.lr_scheduler, self.optimizer,
                                          num_warmup_steps=self.cfg.warmup_steps,
                                          num_training_steps=self.cfg.max_steps)

    def no_sync(self):
        """A context in which backward accumulates gradients locally (default: nothing to pause)."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-step's loss (scaled for fp16, divided over the accumulation steps)."""
        self.scaler.scale(loss / self.cfg.gradient_accumulation_steps).backward()

    def optimizer_step(self, parameters: list[torch.nn.Parameter]) -> None:
        """At an accumulation boundary: clip, step the optimizer and the schedule, clear the gradients."""
        if self.cfg.max_grad_norm:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(parameters, self.cfg.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def checkpoint_layout(self) -> Layout:
        """How this strategy's model, optimizer and EMA state is kept in a checkpoint (default: replicated,
        rank 0 writes the whole model)."""
        return Layout()

    def full_model(self, model: torch.nn.Module, prefix: str, is_main: bool) -> torch.nn.Module | None:
        """``model`` with complete weights for sampling and export: the model itself when replicated; a
        gathered copy on rank 0 (None elsewhere) when sharded. ``prefix`` is the model's name inside the
        wrapped objective. Collective: every rank calls it."""
        return model
