"""The model-family seam: what differs between Stable Diffusion 1.x/2.x, SDXL, SD3 and Flux, in one interface.

A family is one module of ``sdray.models.families`` with one ``ModelFamily`` subclass. It declares its
components (the denoiser's pipeline slot and class, its text encoders and their tokenizers, the training
noise scheduler, the stock pipeline it exports) and implements what its models do differently: turning
token ids into cacheable prompt embeddings, the embeddings a dropped caption becomes, the denoiser call
(SDXL's size ids, Flux's packed latents and guidance), its latent normalisation, the blocks a sharded or
checkpointed run treats as units, its default LoRA targets and objective, and how its stock pipeline is asked
for classifier-free guidance (Flux's ``true_cfg_scale``).

Everything else (the loop, the objectives, the strategies, the data pipeline, the latent cache) asks the
family through ``Components.family`` and never which family it has. Slot names are diffusers' pipeline
component names (``unet``/``transformer``, ``text_encoder``, ``tokenizer_2`` …), so a pretrained
pipeline's folders, a preset's configs and the exported pipeline agree; the token-id column of slot
``text_encoder_N`` is ``input_ids_N`` (``input_ids`` for the first).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

    from sdray.models.build import Components


@dataclass(frozen=True)
class TextSlot:
    """One text encoder of a family and its tokenizer, by pipeline component name."""

    encoder: str  # "text_encoder", "text_encoder_2", "text_encoder_3"
    tokenizer: str  # "tokenizer", "tokenizer_2", "tokenizer_3"
    encoder_class: type
    kind: Literal["clip", "t5"]  # how a preset builds its config and its offline tokenizer
    optional: bool = False  # SD3 runs without T5 (model.text_encoders leaves it out)
    trainable: bool = True  # train.train_text_encoder trains it (T5 stays frozen, as every trainer keeps it)

    @property
    def ids(self) -> str:
        """The batch column holding this tokenizer's ids."""
        suffix = self.tokenizer.removeprefix("tokenizer")
        return "input_ids" + suffix


class ModelFamily(ABC):
    """One model family. Subclasses set the class attributes and implement the abstract methods."""

    name: ClassVar[str]  # the value of spec.model.family
    denoiser: ClassVar[str]  # the denoiser's pipeline slot: "unet" or "transformer"
    denoiser_class: ClassVar[type]
    pipeline_class: ClassVar[type]
    # model_index.json ``_class_name``s of pretrained pipelines of this family (the first: what it exports)
    pipeline_names: ClassVar[tuple[str, ...]]
    text_slots: ClassVar[tuple[TextSlot, ...]]
    scheduler_class: ClassVar[type]  # the training noise scheduler (DDPMScheduler, FlowMatchEulerDiscreteScheduler)
    objective: ClassVar[Literal["ddpm", "flow_matching"]]
    # flow matching: the published timestep shift (a number, or "auto": Flux's resolution-dependent one)
    flow_shift: ClassVar[float | Literal["auto"] | None] = None
    pixel_multiple: ClassVar[int] = 8  # image sides are multiples of this (buckets, resolution)
    lora_targets: ClassVar[tuple[str, ...]] = ("to_q", "to_k", "to_v", "to_out.0")
    # the unconditional input of classifier-free guidance is zeros (SDXL, SD3) rather than the empty
    # caption's embedding (SD 1.x/2.x, Flux)
    zero_unconditional: ClassVar[bool] = False
    embeds_guidance: ClassVar[bool] = False  # the denoiser takes a guidance value (Flux dev)
    default_preset: ClassVar[str]  # the preset whose scheduler config a pretrained source without one gets

    # -- components ----------------------------------------------------------------------------------
    @property
    def components(self) -> tuple[str, ...]:
        """Its pipeline's component names that ``spec.model.overrides`` may configure."""
        return (self.denoiser, "vae", *(slot.encoder for slot in self.text_slots), "scheduler")

    def active_text_slots(self, model_spec: Any) -> tuple[TextSlot, ...]:
        """The text encoders a job of this family uses (all, unless an optional one is left out)."""
        return self.text_slots

    def max_token_length(self, slot: TextSlot, model_spec: Any, preset: Any) -> int | None:
        """The token length of ``slot``'s tokenizer when the job sets it: T5's is ``model.max_sequence_length``,
        else the preset's ``t5_max_length``; None: the tokenizer's own (CLIP's 77, a tiny preset's)."""
        if slot.kind != "t5":
            return None
        return model_spec.max_sequence_length or (preset.t5_max_length if preset is not None else None)

    def check_job(self, spec: Any) -> None:
        """Raise ``ValueError`` naming the field when a job's settings do not suit this family (called
        before anything is built; the spec alone cannot tell a pretrained pipeline's family)."""
        t5 = [s for s in self.text_slots if s.kind == "t5"]
        if not spec.model.use_t5 and not any(s.optional for s in t5):
            raise ValueError(f"spec.model.use_t5: a {self.name} model has no optional T5 encoder to leave out")
        if spec.model.max_sequence_length and not t5:
            raise ValueError(f"spec.model.max_sequence_length: a {self.name} model has no T5 encoder; its CLIP "
                             "tokenizers' length is fixed")
        if self.objective == "flow_matching":
            for section, name in _DDPM_ONLY:
                if name in getattr(spec, section).model_fields_set and getattr(getattr(spec, section), name):
                    raise ValueError(f"spec.{section}.{name}: a setting of DDPM training; a {self.name} model trains "
                                     "with flow matching (its settings: spec.train.flow)")
        elif "flow" in spec.train.model_fields_set:
            raise ValueError(f"spec.train.flow: flow-matching settings; a {self.name} model trains with DDPM "
                             "(prediction_type, snr_gamma …)")
        if spec.model.resolution and spec.model.resolution % self.pixel_multiple:
            raise ValueError(f"spec.model.resolution: a {self.name} model's images are multiples of "
                             f"{self.pixel_multiple} px, got {spec.model.resolution}")
        if spec.data.bucketed and spec.data.bucketing.step % self.pixel_multiple:
            raise ValueError(f"spec.data.bucketing.step: a {self.name} model's images are multiples of "
                             f"{self.pixel_multiple} px, got {spec.data.bucketing.step}")
        for key in spec.model.overrides:
            if key not in self.components:
                raise ValueError(f"spec.model.overrides.{key}: a {self.name} model has no {key}; its components are "
                                 f"{', '.join(self.components)}")
        if "guidance" in spec.train.model_fields_set and not self.embeds_guidance:
            raise ValueError(f"spec.train.guidance: a {self.name} model embeds no guidance value (Flux does)")

    def build_extras(self, model_spec: Any, preset: Any, denoiser_config: Callable[[], dict]) -> dict[str, Any]:
        """What the family's methods need beyond the built models, fixed when the components are built
        (``Components.extra``, JSON values; a latent cache's fingerprint includes them): what neither a
        left-out optional encoder nor a left-out denoiser can tell (SD3's T5-less conditioning shape).
        ``denoiser_config()`` reads the denoiser's config without building it."""
        return {}

    def training_scheduler(self, config: dict, model_spec: Any):
        """The training noise scheduler from its config (a preset's or a pipeline's, with overrides)."""
        return self.scheduler_class.from_config(config)

    # -- text ----------------------------------------------------------------------------------------
    @abstractmethod
    def encode_prompts(self, comps: Components, ids: dict[str, torch.Tensor], *,
                       device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """The cacheable prompt embeddings of a batch's token ids (``prompt_embeds``, and
        ``pooled_prompt_embeds`` where the family has one). Gradients flow into the text encoders unless
        the caller runs this under ``torch.no_grad()``."""

    def text_slots_of(self, comps: Components) -> tuple[TextSlot, ...]:
        """The slots this job's components fill (an optional encoder may be left out)."""
        return tuple(s for s in self.text_slots if comps.text_encoders.get(s.encoder) is not None)

    @torch.no_grad()
    def unconditional(self, comps: Components, *, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """What a dropped caption's embeddings become (classifier-free guidance), one row without a batch
        axis: the empty caption's embeddings, or zeros shaped like them for ``zero_unconditional`` families."""
        ids = {}
        for slot in self.text_slots_of(comps):
            tok = comps.tokenizers_by_slot[slot.tokenizer]
            ids[slot.ids] = tok([""], padding="max_length", max_length=tok.model_max_length, truncation=True,
                                return_tensors="pt").input_ids
        embeds = self.encode_prompts(comps, ids, device=device)
        if self.zero_unconditional:
            embeds = {k: torch.zeros_like(v) for k, v in embeds.items()}
        return {k: v[0] for k, v in embeds.items()}

    def text_parameters_without_gradient(self, slot: str, encoder: torch.nn.Module) -> list[torch.nn.Module]:
        """Modules of a trained text encoder whose output the family does not use (a penultimate-layer
        family's last layer): frozen, since DDP refuses parameters that never get a gradient."""
        return []

    # -- the denoiser --------------------------------------------------------------------------------
    @abstractmethod
    def predict(self, denoiser: torch.nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor,
                embeds: dict[str, torch.Tensor], batch: dict, *, resolution: int, guidance: float = 1.0
                ) -> torch.Tensor:
        """The denoiser's prediction for ``noisy`` latents (B, C, h, w), in the same shape. ``timesteps``
        are on the 0‥1000 scale (integers for DDPM, σ × 1000 for flow matching); ``embeds`` are
        ``encode_prompts``' output (captions already dropped); ``batch`` holds per-image extras
        (SDXL's sizes); ``guidance`` is Flux's embedded guidance value."""

    def shard_units(self, denoiser: torch.nn.Module) -> list[torch.nn.Module]:
        """The blocks FSDP shards one by one and activation checkpointing recomputes: the outermost
        instances of the classes the model itself names in ``_no_split_modules``."""
        names = set(getattr(denoiser, "_no_split_modules", None) or ())
        units: list[torch.nn.Module] = []
        inside: set[int] = set()
        for module in denoiser.modules():
            if id(module) in inside:
                continue
            if type(module).__name__ in names and module is not denoiser:
                units.append(module)
                inside.update(id(m) for m in module.modules())
        return units

    # -- latents -------------------------------------------------------------------------------------
    @staticmethod
    def scale_latents(latents: torch.Tensor, vae_config: Any) -> torch.Tensor:
        """VAE latents → the denoiser's unit-variance space: ``(x - shift_factor) × scaling_factor``
        (SD 1.x/2.x and SDXL VAEs have no shift factor)."""
        shift = _config_value(vae_config, "shift_factor") or 0.0
        return (latents - shift) * _config_value(vae_config, "scaling_factor")

    @staticmethod
    def unscale_latents(latents: torch.Tensor, vae_config: Any) -> torch.Tensor:
        """The exact inverse of ``scale_latents``."""
        shift = _config_value(vae_config, "shift_factor") or 0.0
        return latents / _config_value(vae_config, "scaling_factor") + shift

    # -- the stock pipeline ----------------------------------------------------------------------------
    def assemble_pipeline(self, comps: Components, denoiser: torch.nn.Module | None = None) -> DiffusionPipeline:
        """The family's stock diffusers pipeline around the components (``denoiser`` replaces the
        job's when given), sampling with ``inference_scheduler``."""
        parts: dict[str, Any] = {self.denoiser: denoiser if denoiser is not None else comps.denoiser,
                                 "vae": comps.vae, "scheduler": self.inference_scheduler(comps)}
        for slot in self.text_slots:
            parts[slot.encoder] = comps.text_encoders.get(slot.encoder)
            parts[slot.tokenizer] = comps.tokenizers_by_slot.get(slot.tokenizer)
        return self.pipeline_class(**parts, **self.pipeline_extras())

    def inference_scheduler(self, comps: Components):
        """The scheduler the exported pipeline samples with (default: the training scheduler's config)."""
        return type(comps.noise_scheduler).from_config(comps.noise_scheduler.config)

    def pipeline_extras(self) -> dict[str, Any]:
        """Constructor arguments of ``pipeline_class`` beyond its components."""
        return {}

    def sampling_kwargs(self, comps: Components) -> dict[str, Any]:
        """Extra arguments of the pipeline's ``__call__`` for validation samples: T5's sequence length, the
        one training used (its tokenizer's ``model_max_length``), for families with T5."""
        return self._t5_length(comps.tokenizers_by_slot)

    def pipeline_sampling_kwargs(self, pipe: DiffusionPipeline) -> dict[str, Any]:
        """``sampling_kwargs`` of a loaded pipeline, read from its own T5 tokenizer (an sdray export saves
        it with the length training used; the pipeline's default, 256 or 512, would pad a tiny model's
        conditioning far beyond what it learned)."""
        return self._t5_length({s.tokenizer: getattr(pipe, s.tokenizer, None) for s in self.text_slots})

    def _t5_length(self, tokenizers: dict[str, Any]) -> dict[str, Any]:
        for slot in self.text_slots:
            if slot.kind == "t5" and tokenizers.get(slot.tokenizer) is not None:
                return {"max_sequence_length": tokenizers[slot.tokenizer].model_max_length}
        return {}

    def cfg_kwargs(self, guidance_scale: float, prompts: int, pipe: Any = None) -> dict[str, Any]:
        """The ``pipe``'s ``__call__`` arguments for guidance at ``guidance_scale`` when sampling ``prompts``
        prompts: the stock pipelines' ``guidance_scale`` (classifier-free guidance against the empty caption,
        what a dropped caption became in training, above 1)."""
        return {"guidance_scale": guidance_scale}


# Settings only DDPM training reads: (spec section, field).
_DDPM_ONLY = (("model", "prediction_type"), ("model", "rescale_betas_zero_snr"), ("train", "snr_gamma"),
              ("train", "input_perturbation"))


def _config_value(config: Any, key: str):
    return config.get(key) if isinstance(config, dict) else getattr(config, key, None)
