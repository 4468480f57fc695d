"""Build the Stable Diffusion components of a job: from a preset's configs, or from pretrained weights.

A pretrained source is a local directory or an ``s3://`` URI holding either a whole diffusers pipeline
(``model_index.json`` with ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``) or one
component (a ``config.json`` naming its class). Components a pretrained source does not hold come from
the preset. Nothing is fetched from a hub.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from sdray import storage
from sdray.models.presets import PRESETS, Preset
from sdray.models.tokenizer import build_tokenizer
from sdray.spec import ModelSpec, S3Settings


class ModelError(ValueError):
    """A model source or override that cannot be used; the message names the field."""


@dataclass
class Components:
    unet: UNet2DConditionModel | None
    vae: AutoencoderKL
    text_encoder: CLIPTextModel | None
    tokenizer: CLIPTokenizer | None
    noise_scheduler: DDPMScheduler
    resolution: int
    # SDXL only: the second text encoder, whose pooled projection also conditions the UNet.
    text_encoder_2: CLIPTextModelWithProjection | None = None
    tokenizer_2: CLIPTokenizer | None = None

    @property
    def is_xl(self) -> bool:
        return self.text_encoder_2 is not None

    @property
    def tokenizers(self) -> list[CLIPTokenizer]:
        return [t for t in (self.tokenizer, self.tokenizer_2) if t is not None]


_CLASSES = {"unet": UNet2DConditionModel, "vae": AutoencoderKL}


def _check_overrides(component: str, overrides: dict, accepted: set[str]) -> None:
    unknown = sorted(set(overrides) - accepted)
    if unknown:
        raise ModelError(
            f"spec.model.overrides.{component}.{unknown[0]}: not a config field of the {component} "
            f"(expected one of: {', '.join(sorted(accepted))})"
        )


def _init_params(cls) -> set[str]:
    return {p for p in inspect.signature(cls.__init__).parameters if p != "self"}


def _source_kind(path: Path) -> tuple[str, Path]:
    """('pipeline', dir) or (component name, dir) for a pretrained directory."""
    if (path / "model_index.json").exists():
        return "pipeline", path
    config = path / "config.json"
    if config.exists():
        name = json.loads(config.read_text()).get("_class_name") or ""
        if not name and json.loads(config.read_text()).get("model_type") == "clip_text_model":
            name = "CLIPTextModel"
        kinds = {"UNet2DConditionModel": "unet", "AutoencoderKL": "vae", "CLIPTextModel": "text_encoder"}
        if name in kinds:
            return kinds[name], path
        if name == "CLIPTextModelWithProjection":
            raise ModelError(f"{path}: a CLIPTextModelWithProjection alone cannot be used; give the whole SDXL pipeline")
    if (path / "vae" / "config.json").exists():  # the output folder of an autoencoder-stage job
        return "vae", path / "vae"
    raise ModelError(
        f"{path}: expected a diffusers pipeline (model_index.json) or one component "
        "(config.json of UNet2DConditionModel, AutoencoderKL or CLIPTextModel)"
    )


def _text_encoder_from_config(cls, config: dict, tokenizer: CLIPTokenizer, overrides: dict):
    config = {
        **config,
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        **overrides,
    }
    return cls(CLIPTextConfig(**config))


class _Sources:
    """Where each component of ``spec`` comes from: a pipeline dir, a component dir, or the preset."""

    def __init__(self, spec: ModelSpec, s3: S3Settings | None):
        self.spec = spec
        self.s3 = s3
        self.preset = PRESETS.get(spec.preset) if spec.preset else None
        self.pipeline_dir: Path | None = None
        self.component_dirs: dict[str, Path] = {}
        if spec.pretrained:
            kind, path = self._resolve("spec.model.pretrained", spec.pretrained)
            if kind == "pipeline":
                self.pipeline_dir = path
            else:
                self.component_dirs[kind] = path
            for name in ("unet", "vae", "text_encoder"):
                if name in spec.overrides and self.is_pretrained(name):
                    raise ModelError(
                        f"spec.model.overrides.{name}: cannot change the architecture of pretrained weights "
                        "(overrides apply to preset components only)"
                    )
        if spec.vae:
            kind, path = self._resolve("spec.model.vae.pretrained", spec.vae.pretrained)
            if kind not in ("vae", "pipeline"):
                raise ModelError(f"spec.model.vae.pretrained: {spec.vae.pretrained} holds a {kind}, not a VAE")
            self.component_dirs["vae"] = path / "vae" if kind == "pipeline" else path

    def _resolve(self, field: str, uri: str) -> tuple[str, Path]:
        try:
            return _source_kind(storage.local_copy(uri, self.s3))
        except (storage.StorageError, ModelError) as exc:
            raise ModelError(f"{field}: {exc}") from None

    def is_pretrained(self, name: str) -> bool:
        return name in self.component_dirs or self.pipeline_dir is not None

    def need_preset(self, component: str) -> Preset:
        if self.preset is None:
            raise ModelError(
                f"spec.model.preset: the pretrained source has no {component}; name a preset to build it from"
            )
        return self.preset

    def model(self, name: str):
        cls = _CLASSES[name]
        if name in self.component_dirs:
            return cls.from_pretrained(self.component_dirs[name])
        if self.pipeline_dir is not None:
            return cls.from_pretrained(self.pipeline_dir, subfolder=name)
        overrides = self.spec.overrides.get(name, {})
        _check_overrides(name, overrides, _init_params(cls))
        return cls.from_config({**getattr(self.need_preset(name), name), **overrides})

    @property
    def is_xl(self) -> bool:
        if self.pipeline_dir is not None:
            return (self.pipeline_dir / "text_encoder_2").exists()
        return bool(self.preset and self.preset.is_xl)

    def tokenizer(self, slot: str = "tokenizer") -> CLIPTokenizer:
        if self.spec.tokenizer and slot == "tokenizer":
            tok = CLIPTokenizer.from_pretrained(storage.local_copy(self.spec.tokenizer, self.s3))
        elif self.pipeline_dir is not None:
            tok = CLIPTokenizer.from_pretrained(self.pipeline_dir, subfolder=slot)
        else:
            tok = build_tokenizer(self.need_preset(slot).tokenizer_max_length)
        if len(tok) < 3:
            raise ModelError(f"spec.model.tokenizer: the {slot} loaded is empty (is the directory complete?)")
        return tok

    def text_encoder(self, tokenizer: CLIPTokenizer, slot: str = "text_encoder"):
        cls = CLIPTextModelWithProjection if slot == "text_encoder_2" else CLIPTextModel
        if slot in self.component_dirs:
            enc = cls.from_pretrained(self.component_dirs[slot])
        elif self.pipeline_dir is not None:
            enc = cls.from_pretrained(self.pipeline_dir, subfolder=slot)
        else:
            overrides = self.spec.overrides.get(slot, {})
            _check_overrides(slot, overrides, set(CLIPTextConfig().to_dict()))
            enc = _text_encoder_from_config(cls, getattr(self.need_preset(slot), slot), tokenizer, overrides)
        if enc.config.vocab_size < len(tokenizer):
            raise ModelError(
                f"spec.model.tokenizer: {len(tokenizer)} tokens, but the {slot} knows only "
                f"{enc.config.vocab_size}"
            )
        return enc

    def noise_scheduler(self) -> DDPMScheduler:
        if self.pipeline_dir is not None and (self.pipeline_dir / "scheduler").exists():
            config = DDPMScheduler.load_config(self.pipeline_dir, subfolder="scheduler")
        else:
            config = dict((self.preset or PRESETS["tiny"]).scheduler)
        overrides = self.spec.overrides.get("scheduler", {})
        _check_overrides("scheduler", overrides, _init_params(DDPMScheduler))
        return DDPMScheduler.from_config({**config, **overrides, "prediction_type": self.spec.prediction_type,
                                          "rescale_betas_zero_snr": self.spec.rescale_betas_zero_snr})

    def resolution(self) -> int:
        if self.spec.resolution:
            return self.spec.resolution
        if self.preset:
            return self.preset.resolution
        vae_dir = self.component_dirs.get("vae") or (self.pipeline_dir / "vae")
        return int(AutoencoderKL.load_config(vae_dir)["sample_size"])


def data_requirements(spec: ModelSpec, *, stage: str = "unet", s3: S3Settings | None = None
                      ) -> tuple[int, list[CLIPTokenizer]]:
    """What the data pipeline needs from the model (image size, tokenizers) without building the models."""
    sources = _Sources(spec, s3)
    if stage != "unet":
        return sources.resolution(), []
    slots = ["tokenizer", "tokenizer_2"] if sources.is_xl else ["tokenizer"]
    return sources.resolution(), [sources.tokenizer(slot) for slot in slots]


def build_components(spec: ModelSpec, *, stage: str = "unet", s3: S3Settings | None = None,
                     seed: int = 0) -> Components:
    """Every component a job of ``stage`` needs, weights loaded where a pretrained source names them.

    ``seed`` makes preset initialisation identical on every worker.
    """
    sources = _Sources(spec, s3)
    torch.manual_seed(seed)
    vae = sources.model("vae")
    unet = text_encoder = tokenizer = text_encoder_2 = tokenizer_2 = None
    if stage == "unet":
        if spec.lora is not None and not sources.is_pretrained("unet"):
            raise ModelError("spec.model.lora: spec.model.pretrained holds no UNet, so the adapters would sit on "
                             "the preset's random weights; give a pipeline or UNet to adapt")
        unet = sources.model("unet")
        tokenizer = sources.tokenizer()
        text_encoder = sources.text_encoder(tokenizer)
        if sources.is_xl:
            tokenizer_2 = sources.tokenizer("tokenizer_2")
            text_encoder_2 = sources.text_encoder(tokenizer_2, "text_encoder_2")
    return Components(unet, vae, text_encoder, tokenizer, sources.noise_scheduler(), sources.resolution(),
                      text_encoder_2, tokenizer_2)
