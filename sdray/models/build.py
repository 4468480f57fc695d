"""Build the Stable Diffusion components of a job: from a preset's configs, or from pretrained weights.

A pretrained source is a local directory or an ``s3://`` URI holding either a whole diffusers pipeline
(``model_index.json`` with ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``) or one
component (a ``config.json`` naming its class). Components a pretrained source does not hold come from
the preset. Nothing is fetched from a hub.
"""

from __future__ import annotations

import hashlib
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
    vae: AutoencoderKL | None
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

# Each component starts from its own seed, so building some of them (the frozen encoders alone, for a
# latent cache; the UNet alone, to train on one) initialises each exactly as building them all does.
_SEED_OFFSETS = {"vae": 0, "unet": 1, "text_encoder": 2, "text_encoder_2": 3}
FROZEN = ("vae", "tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2")


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

    def pretrained_dir(self, slot: str) -> Path | None:
        """The directory a pretrained ``slot`` (a model, tokenizer or text encoder) is loaded from, or None
        when the preset builds it."""
        if slot == "tokenizer" and self.spec.tokenizer:
            return storage.local_copy(self.spec.tokenizer, self.s3)
        if slot in self.component_dirs:
            return self.component_dirs[slot]
        if self.pipeline_dir is not None and (self.pipeline_dir / slot).is_dir():
            return self.pipeline_dir / slot
        return None

    def build(self, slot: str, seed: int, tokenizer: CLIPTokenizer | None = None):
        """One model (``unet``, ``vae``, ``text_encoder``, ``text_encoder_2``) from its own seed; the
        caller's random state is left as it was (a trainer may build the frozen ones mid-run)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + _SEED_OFFSETS[slot])
            if slot in _CLASSES:
                return self.model(slot)
            return self.text_encoder(tokenizer, slot)

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
                     seed: int = 0, unet: bool = True, frozen: bool = True) -> Components:
    """Every component a job of ``stage`` needs, weights loaded where a pretrained source names them.

    ``seed`` makes preset initialisation identical on every worker. For ``stage: unet``, ``unet=False``
    leaves out the UNet and ``frozen=False`` the VAE, tokenizers and text encoders (training on a latent
    cache needs none of them); each component is the same whichever others are built.
    """
    sources = _Sources(spec, s3)
    if stage != "unet":
        return Components(None, sources.build("vae", seed), None, None, sources.noise_scheduler(),
                          sources.resolution())
    parts: dict = dict.fromkeys(("unet", *FROZEN))
    if unet:
        if spec.lora is not None and not sources.is_pretrained("unet"):
            raise ModelError("spec.model.lora: spec.model.pretrained holds no UNet, so the adapters would sit on "
                             "the preset's random weights; give a pipeline or UNet to adapt")
        parts["unet"] = sources.build("unet", seed)
    if frozen:
        parts["vae"] = sources.build("vae", seed)
        pairs = [("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")]
        for tokenizer, encoder in pairs[: 2 if sources.is_xl else 1]:
            parts[tokenizer] = sources.tokenizer(tokenizer)
            parts[encoder] = sources.build(encoder, seed, parts[tokenizer])
    return Components(parts["unet"], parts["vae"], parts["text_encoder"], parts["tokenizer"],
                      sources.noise_scheduler(), sources.resolution(), parts["text_encoder_2"], parts["tokenizer_2"])


def _hash_files(directory: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in directory.iterdir() if p.is_file()):
        digest.update(path.name.encode() + b"\0")
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def _hash_model(model) -> str:
    digest = hashlib.sha256()
    config = model.config.to_dict() if hasattr(model.config, "to_dict") else dict(model.config)
    config = {k: v for k, v in config.items() if not k.startswith("_") and k != "transformers_version"}
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def frozen_fingerprints(spec: ModelSpec, *, s3: S3Settings | None = None, seed: int = 0) -> dict[str, str]:
    """A content digest of each frozen component of a UNet job (VAE, tokenizers, text encoders): what a
    latent cache depends on. A pretrained component is hashed from its files (config and weights; nothing
    is loaded), a preset one from its configuration and the weights ``seed`` initialises."""
    sources = _Sources(spec, s3)
    slots = FROZEN if sources.is_xl else FROZEN[:3]
    out: dict[str, str] = {}
    for slot in slots:
        directory = sources.pretrained_dir(slot)
        if directory is not None:
            out[slot] = "files:" + _hash_files(directory)
        elif slot.startswith("tokenizer"):
            tok = sources.tokenizer(slot)
            out[slot] = "preset:" + hashlib.sha256(
                f"{tok.model_max_length}:{tok.backend_tokenizer.to_str()}".encode()).hexdigest()
        else:
            tokenizer = sources.tokenizer(slot.replace("text_encoder", "tokenizer")) if slot != "vae" else None
            out[slot] = "preset:" + _hash_model(sources.build(slot, seed, tokenizer))
    return out
