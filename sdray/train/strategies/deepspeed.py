"""``deepspeed``: DeepSpeed ZeRO (stages 1, 2 and 3), applied to the finished trainable model from outside,
as the ``ddp`` and ``fsdp`` strategies apply theirs; the model code knows nothing of it and the frozen VAE
and text encoders stay plain replicas.

The engine is made with ``deepspeed.initialize`` itself, not through accelerate: accelerate's DeepSpeed
plugin silently runs plain DDP on CPU unless ``ACCELERATE_USE_DEEPSPEED=true`` and a gloo
``InitProcessGroupKwargs`` are set (seen with accelerate 1.15), and sdray keeps its own loop, so accelerate
would only add a second place where the configuration is decided.

The engine then owns what the loop does itself for the other strategies: dividing the loss over
``gradient_accumulation_steps`` and stepping only at their end, fp16 loss scaling, gradient clipping, the
optimizer and LR-schedule steps, and the checkpoint files (every rank writes its own). It reads those files
through ``checkpoint.load_weights_only``, not its own ``torch.load(weights_only=False)``.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from sdray.spec import DeepSpeedSpec, JobSpec
from sdray.train.checkpoint import Layout, load_ema, load_weights_only, save_ema
from sdray.train.strategies.base import Strategy


def settings(spec: JobSpec) -> DeepSpeedSpec:
    return spec.distributed.deepspeed or DeepSpeedSpec()


def _import_deepspeed():
    try:
        import deepspeed
    except ImportError:
        raise ImportError("spec.distributed.strategy: deepspeed needs the deepspeed package on every worker: "
                          "DS_BUILD_OPS=0 pip install --no-build-isolation deepspeed==0.19.8") from None
    return deepspeed


def adamw_class(spec: JobSpec):
    """torch's AdamW, or DeepSpeedCPUAdam (same arguments, AdamW mode) when the optimizer is offloaded:
    DeepSpeed refuses other optimizers for ZeRO-Offload, where the step runs on the host. torch's AdamW
    elsewhere avoids compiling DeepSpeed's cpu_adam extension."""
    if settings(spec).offload_optimizer:
        return _import_deepspeed().ops.adam.DeepSpeedCPUAdam
    return torch.optim.AdamW


def engine_config(spec: JobSpec, world_size: int) -> dict:
    """The DeepSpeed config of a job, from spec.train and spec.distributed.deepspeed."""
    train, ds = spec.train, settings(spec)
    zero: dict = {"stage": ds.zero_stage}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu"}
    return {
        "train_micro_batch_size_per_gpu": train.batch_size,
        "gradient_accumulation_steps": train.gradient_accumulation_steps,
        "train_batch_size": train.batch_size * train.gradient_accumulation_steps * world_size,
        "gradient_clipping": train.max_grad_norm or 0.0,
        "zero_optimization": zero,
        # The engine keeps 16-bit weights (fp32 master weights in the optimizer); the loop still runs the
        # forward under autocast, which casts the fp32 latents and embeddings to the weights' dtype.
        "fp16": {"enabled": train.mixed_precision == "fp16"},  # dynamic loss scaling inside DeepSpeed
        "bf16": {"enabled": train.mixed_precision == "bf16"},
        "zero_allow_untested_optimizer": True,  # torch's AdamW is a client optimizer to DeepSpeed
        "steps_per_print": 2**31 - 1,  # sdray logs its own metrics
        "wall_clock_breakdown": False,
    }


def _ensure_process_group(device: torch.device) -> None:
    """A one-process group for a plain-process run (Ray Train sets one up for its workers); its store
    lives in this process, so nothing listens on a port. DeepSpeed reads the rank from the environment
    that launchers (Ray Train among them) set."""
    if not dist.is_initialized():
        for name in ("LOCAL_RANK", "RANK"):
            os.environ.setdefault(name, "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        dist.init_process_group("gloo" if device.type == "cpu" else "nccl", store=dist.HashStore(), rank=0,
                                world_size=1)


def make_engine(module: torch.nn.Module, optimizer, lr_scheduler, spec: JobSpec, device: torch.device):
    """The DeepSpeed engine over ``module`` (the objective whose parameters ``optimizer`` holds).
    ZeRO-3 partitions the parameters here, after the model was built whole: a model too big for one
    worker's memory would need ``deepspeed.zero.Init`` at construction, which sdray does not do yet."""
    deepspeed = _import_deepspeed()
    accelerator = deepspeed.get_accelerator()
    if spec.train.mixed_precision == "fp16" and not accelerator.is_fp16_supported():
        raise ValueError(f"spec.train.mixed_precision: DeepSpeed has no fp16 support on this device "
                         f"({accelerator.device_name()}); use bf16 or no")
    _ensure_process_group(device)
    engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=lr_scheduler,
                                      config=engine_config(spec, dist.get_world_size()), dist_init_required=False)
    _load_weights_only(engine)
    return engine


def _load_weights_only(engine) -> None:
    """DeepSpeed 0.19.8 reads every checkpoint file through its checkpoint engine's ``load``, which calls
    ``torch.load(weights_only=False)``: a crafted file under a ``checkpoint.resume`` URI would run code. The
    engine reads them weights-only instead, with the few plain data types its ZeRO files pickle (the loss
    scaler's settings, the ZeRO stage, fragment offsets), which run nothing when rebuilt."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    allowed = [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]
    engine.checkpoint_engine.load = lambda path, map_location=None: load_weights_only(path, map_location,
                                                                                       allowed=allowed)


def _gather_units(model: torch.nn.Module):
    """(name, module, recurse) in the order they are gathered for a full copy: every block of a module
    list on its own, every other child whole, and the root's own parameters."""
    for name, child in model.named_children():
        if isinstance(child, torch.nn.ModuleList):
            for i, block in enumerate(child):
                yield f"{name}.{i}", block, True
        else:
            yield name, child, True
    yield "", model, False


def full_copy(model: torch.nn.Module, engine, is_main: bool):
    """The trained model with complete fp32 weights, for sampling and export: the model itself when ZeRO
    1/2 keeps fp32 weights; otherwise a fresh copy on rank 0 (None elsewhere). Collective under ZeRO-3:
    every rank calls it, and one block's parameters are gathered at a time."""
    stage3 = engine.zero_optimization_partition_weights()
    if not stage3 and all(p.dtype == torch.float32 for p in model.parameters()):
        return model
    deepspeed = _import_deepspeed()
    plain = type(model).from_config(model.config) if is_main else None
    for name, unit, recurse in _gather_units(model):
        params = list(unit.parameters(recurse=recurse))
        with deepspeed.zero.GatheredParameters(params, enabled=stage3 and bool(params)):
            if is_main:
                own = {**dict(unit.named_parameters(recurse=recurse)), **dict(unit.named_buffers(recurse=recurse))}
                target = plain.get_submodule(name) if name else plain
                target.load_state_dict({k: v.detach().float() for k, v in own.items()}, strict=recurse)
    return plain.to(engine.device) if is_main else None


ENGINE_TAG = "engine"  # the engine's subdirectory under deepspeed/


class EngineLayout(Layout):
    """``deepspeed/``: the engine's own ``save_checkpoint`` files (module, every rank's ZeRO partition of the
    optimizer state, LR schedule), plus rank 0's ``ema.pt`` (the loop keeps EMA of full weights); resuming
    needs the same ZeRO stage and world size: DeepSpeed 0.19.8 does not re-split its optimizer partitions
    for another number of workers, and its elastic format (``elastic_checkpoint``) cannot resume a torch
    AdamW even on the same number (no saved step: an assertion in ``_restore_step_from_elastic_checkpoint``)."""

    any_world_size = False

    def __init__(self, engine):
        self.engine = engine

    def manifest(self):
        return {"format": "deepspeed", "zero_stage": self.engine.zero_optimization_stage()}

    def save(self, directory, *, rank, trainable, optimizer, ema, trainer):
        (directory / "deepspeed").mkdir()
        self.engine.save_checkpoint(str(directory / "deepspeed"), tag=ENGINE_TAG, save_latest=False)
        if rank == 0:
            save_ema(directory, ema)

    def load(self, directory, *, trainable, optimizer, ema, trainer):
        path, _ = self.engine.load_checkpoint(str(directory / "deepspeed"), tag=ENGINE_TAG)
        if path is None:
            raise FileNotFoundError(f"{directory / 'deepspeed'}: the DeepSpeed engine found no checkpoint to load")
        load_ema(directory, ema)


class DeepSpeed(Strategy):
    """``deepspeed``: the engine owns accumulation, loss scaling, clipping and the optimizer and schedule
    steps; ``optimizer_step`` has nothing left to do."""

    name = "deepspeed"

    def __init__(self, spec, device, amp_dtype):
        super().__init__(spec, device, amp_dtype)
        self.engine = None

    def prepare(self, objective, trainable):
        # The engine is made from the optimizer and the LR schedule (the other way round from FSDP).
        self._optimizer(trainable.parameters(), adamw_class(self.spec))
        self.engine = self.wrapped = make_engine(objective, self.optimizer, self.lr_scheduler, self.spec,
                                                 self.device)

    def backward(self, loss):
        # DeepSpeed divides by gradient_accumulation_steps and scales fp16 losses itself; step() is called
        # after every micro-step and steps the optimizer, clipping and the schedule at the boundary only.
        self.engine.backward(loss)
        self.engine.step()

    def optimizer_step(self, parameters):
        pass

    def checkpoint_layout(self):
        return EngineLayout(self.engine)

    def full_model(self, model, prefix, is_main):
        return full_copy(model, self.engine, is_main)
