"""Build the components of a job of any model family: from a preset's configs, or from pretrained weights.

A pretrained source is a local directory, an ``s3://`` URI or a Hugging Face Hub repository
(``hf://org/name[@revision]``: ``sdray.models.hub``) holding either a whole diffusers pipeline
(``model_index.json`` with its family's folders: ``unet/`` or ``transformer/``, ``vae/``, ``text_encoder/``,
``tokenizer/`` …, ``scheduler/``) or one component (a ``config.json`` naming its class). Components a
pretrained source does not hold come from the preset. Which family the components belong to (``sdray.models.families``) is the spec's ``model.family``, else the preset's, else the
pretrained pipeline's ``_class_name``; a contradiction is refused.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL
from transformers import CLIPTextConfig, CLIPTokenizer

from sdray import storage
from sdray.models import hub
from sdray.models.families import FAMILIES, ModelFamily, TextSlot, family_named, family_of_pipeline
from sdray.models.presets import PRESETS, Preset
from sdray.models.tokenizer import build_tokenizer
from sdray.spec import ModelSpec, S3Settings


class ModelError(ValueError):
    """A model source or override that cannot be used; the message names the field."""


@dataclass
class Components:
    """A job's models, by diffusers pipeline slot; ``family`` knows what to do with them."""

    family: ModelFamily
    denoiser: torch.nn.Module | None  # the UNet or transformer
    vae: AutoencoderKL | None
    text_encoders: dict[str, torch.nn.Module]  # slot ("text_encoder", "text_encoder_2", …) → model
    tokenizers_by_slot: dict[str, Any]  # slot ("tokenizer", …) → tokenizer
    noise_scheduler: Any  # the family's training scheduler
    resolution: int
    extra: dict[str, Any] = field(default_factory=dict)  # the family's build_extras

    @property
    def unet(self):
        """The denoiser (the name the UNet families' code and tests know it by)."""
        return self.denoiser

    @property
    def text_encoder(self):
        return self.text_encoders.get("text_encoder")

    @property
    def tokenizer(self):
        return self.tokenizers_by_slot.get("tokenizer")

    @property
    def tokenizers(self) -> list:
        """The tokenizers in slot order: the data pipeline's ``input_ids``, ``input_ids_2``, … columns."""
        return [self.tokenizers_by_slot[s.tokenizer] for s in self.family.text_slots
                if s.tokenizer in self.tokenizers_by_slot]

    def frozen_modules(self) -> dict[str, torch.nn.Module]:
        """The VAE and text encoders that were built (slot → model)."""
        out = {"vae": self.vae} if self.vae is not None else {}
        out.update({k: v for k, v in self.text_encoders.items() if v is not None})
        return out

    def with_models(self, **models) -> Components:
        """A copy with some models replaced (``denoiser=…``, ``text_encoder=…``, ``vae=…``)."""
        text = dict(self.text_encoders)
        rest = {}
        for name, model in models.items():
            if name in text or name.startswith("text_encoder"):
                text[name] = model
            else:
                rest[name] = model
        return Components(**{**self.__dict__, "text_encoders": text, **rest})


# Each component starts from its own seed, so building some of them (the frozen encoders alone, for a
# latent cache; the denoiser alone, to train on one) initialises each exactly as building them all does.
def _seed_offset(name: str) -> int:
    """vae 0, denoiser 1, text_encoder 2, text_encoder_N N + 1."""
    if name.startswith("text_encoder"):
        return 1 + int(name.removeprefix("text_encoder").lstrip("_") or 1)
    return {"vae": 0, "denoiser": 1}[name]


def _check_overrides(component: str, overrides: dict, accepted: set[str]) -> None:
    unknown = sorted(set(overrides) - accepted)
    if unknown:
        raise ModelError(
            f"spec.model.overrides.{component}.{unknown[0]}: not a config field of the {component} "
            f"(expected one of: {', '.join(sorted(accepted))})"
        )


def _init_params(cls) -> set[str]:
    return {p for p in inspect.signature(cls.__init__).parameters if p != "self"}


_VAE_CLASSES = {"AutoencoderKL": AutoencoderKL}


def _denoiser_kinds() -> dict[str, type]:
    return {f.denoiser_class.__name__: f.denoiser_class for f in FAMILIES.values()}


def _source_kind(path: Path) -> tuple[str, Path]:
    """('pipeline', dir) or (component: 'denoiser', 'vae', 'text_encoder', dir) for a pretrained directory."""
    if (path / "model_index.json").exists():
        return "pipeline", path
    config = path / "config.json"
    if config.exists():
        data = json.loads(config.read_text())
        name = data.get("_class_name") or ""
        if not name and data.get("model_type") == "clip_text_model":
            name = "CLIPTextModel"
        if name in _denoiser_kinds():
            return "denoiser", path
        if name in _VAE_CLASSES:
            return "vae", path
        if name == "CLIPTextModel":
            return "text_encoder", path
        if name == "CLIPTextModelWithProjection":
            raise ModelError(f"{path}: a CLIPTextModelWithProjection alone cannot be used; give the whole pipeline")
    if (path / "vae" / "config.json").exists():  # the output folder of an autoencoder-stage job
        return "vae", path / "vae"
    raise ModelError(
        f"{path}: expected a diffusers pipeline (model_index.json) or one component "
        f"(config.json of {', '.join(sorted(_denoiser_kinds()))}, AutoencoderKL or CLIPTextModel)"
    )


def _clip_encoder(cls, config: dict, tokenizer, overrides: dict):
    config = {
        **config,
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        **overrides,
    }
    return cls(CLIPTextConfig(**config))


def _t5_encoder(cls, config: dict, tokenizer, overrides: dict):
    from transformers import T5Config

    config = {**config, "vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id,
              "eos_token_id": tokenizer.eos_token_id, "decoder_start_token_id": tokenizer.pad_token_id, **overrides}
    return cls(T5Config(**config))


def _t5_config_fields() -> set[str]:
    from transformers import T5Config

    return set(T5Config().to_dict())


# How a preset builds each kind of text encoder and tokenizer, and loads a pretrained tokenizer.
_ENCODER_FROM_CONFIG = {"clip": _clip_encoder, "t5": _t5_encoder}
_ENCODER_FIELDS = {"clip": lambda: set(CLIPTextConfig().to_dict()), "t5": _t5_config_fields}


def _load_tokenizer(kind: str, path: Path, subfolder: str | None = None):
    if kind == "t5":
        from transformers import T5TokenizerFast

        return T5TokenizerFast.from_pretrained(path, subfolder=subfolder) if subfolder else \
            T5TokenizerFast.from_pretrained(path)
    return CLIPTokenizer.from_pretrained(path, subfolder=subfolder) if subfolder else CLIPTokenizer.from_pretrained(path)


def _build_tokenizer(kind: str, max_length: int):
    if kind == "t5":
        from sdray.models.tokenizer import build_t5_tokenizer

        return build_t5_tokenizer(max_length)
    return build_tokenizer(max_length)


class _Sources:
    """Where each component of ``spec`` comes from: a pipeline dir, a component dir, or the preset; and
    which family they make."""

    def __init__(self, spec: ModelSpec, s3: S3Settings | None):
        self.spec = spec
        self.s3 = s3
        self.preset = PRESETS.get(spec.preset) if spec.preset else None
        self.pipeline_dir: Path | None = None
        self.component_dirs: dict[str, Path] = {}
        self.snapshots: list[hub.Snapshot] = []  # the Hub revisions the sources resolved to
        if spec.pretrained:
            kind, path = self._resolve("spec.model.pretrained", spec.pretrained)
            if kind == "pipeline":
                self.pipeline_dir = path
            else:
                self.component_dirs[kind] = path
        self.family = self._family()
        if spec.pretrained:
            for name in ("denoiser", "vae", "text_encoder"):
                key = self.override_key(name)
                if key in spec.overrides and self.is_pretrained(name):
                    raise ModelError(
                        f"spec.model.overrides.{key}: cannot change the architecture of pretrained weights "
                        "(overrides apply to preset components only)"
                    )
        if spec.vae:
            kind, path = self._resolve("spec.model.vae.pretrained", spec.vae.pretrained, "vae")
            if kind not in ("vae", "pipeline"):
                raise ModelError(f"spec.model.vae.pretrained: {spec.vae.pretrained} holds a {kind}, not a VAE")
            self.component_dirs["vae"] = path / "vae" if kind == "pipeline" else path
        self.tokenizer_dir: Path | None = None
        if spec.tokenizer:
            path = self._local("spec.model.tokenizer", spec.tokenizer, "tokenizer")
            self.tokenizer_dir = path / "tokenizer" if (path / "model_index.json").is_file() else path

    def _family(self) -> ModelFamily:
        """The family the spec, the preset and the pretrained pipeline agree on."""
        claims: list[tuple[str, str]] = []
        if self.spec.family:
            claims.append(("spec.model.family", self.spec.family))
        if self.preset is not None:
            claims.append((f"spec.model.preset ({self.spec.preset})", self.preset.family))
        if self.pipeline_dir is not None:
            class_name = json.loads((self.pipeline_dir / "model_index.json").read_text()).get("_class_name", "")
            found = family_of_pipeline(class_name)
            if found is None:
                raise ModelError(f"spec.model.pretrained: a {class_name or 'pipeline without _class_name'} is "
                                 f"not a pipeline of a family sdray trains ({', '.join(FAMILIES)})")
            claims.append((f"spec.model.pretrained ({class_name})", found.name))
        names = {name for _, name in claims}
        if len(names) > 1:
            raise ModelError("spec.model.family: the model's sources disagree on its family: "
                             + ", ".join(f"{where} is {name}" for where, name in claims))
        return family_named(names.pop() if names else "sd")

    def _local(self, field: str, uri: str, wants: str) -> Path:
        """A local directory holding what ``uri`` holds (a Hub snapshot of what ``wants`` needs, a download
        from S3, or the path itself)."""
        try:
            source = hub.model_source(uri)
            if source is None:
                return storage.local_copy(uri, self.s3)
            snapshot = hub.snapshot(source, wants, self.spec.hub)
        except (storage.StorageError, hub.HubError) as exc:
            raise ModelError(f"{field}: {exc}") from None
        self.snapshots.append(snapshot)
        return snapshot.path

    def _resolve(self, field: str, uri: str, wants: str = "model") -> tuple[str, Path]:
        path = self._local(field, uri, wants)
        try:
            return _source_kind(path)
        except ModelError as exc:
            raise ModelError(f"{field}: {exc}") from None

    def fingerprint(self, directory: Path) -> str:
        """What identifies a pretrained component's files: a Hub revision's commit and folder, else a digest
        of the files themselves."""
        for snapshot in self.snapshots:
            if directory.is_relative_to(snapshot.path):
                return snapshot.fingerprint(directory)
        return "files:" + _hash_files(directory)

    def override_key(self, name: str) -> str:
        """The ``spec.model.overrides`` key of a component (the denoiser's is its slot, unet or transformer)."""
        return self.family.denoiser if name == "denoiser" else name

    def folder(self, name: str) -> str:
        return self.family.denoiser if name == "denoiser" else name

    def is_pretrained(self, name: str) -> bool:
        return name in self.component_dirs or self.pipeline_dir is not None

    def need_preset(self, component: str) -> Preset:
        if self.preset is None:
            raise ModelError(
                f"spec.model.preset: the pretrained source has no {component}; name a preset to build it from"
            )
        return self.preset

    def model_class(self, name: str) -> type:
        return self.family.denoiser_class if name == "denoiser" else AutoencoderKL

    def model(self, name: str):
        """The denoiser or the VAE."""
        cls = self.model_class(name)
        if name in self.component_dirs:
            return cls.from_pretrained(self.component_dirs[name])
        if self.pipeline_dir is not None:
            return cls.from_pretrained(self.pipeline_dir, subfolder=self.folder(name))
        return cls.from_config(self.preset_config(name))

    def preset_config(self, name: str) -> dict:
        """The preset's config of the denoiser or the VAE, with the spec's overrides."""
        key = self.override_key(name)
        overrides = self.spec.overrides.get(key, {})
        _check_overrides(key, overrides, _init_params(self.model_class(name)))
        preset = self.need_preset(key)
        return {**(preset.denoiser if name == "denoiser" else preset.vae), **overrides}

    def denoiser_config(self) -> dict:
        """The denoiser's config, read without building it."""
        cls = self.family.denoiser_class
        if "denoiser" in self.component_dirs:
            return dict(cls.load_config(self.component_dirs["denoiser"]))
        if self.pipeline_dir is not None:
            return dict(cls.load_config(self.pipeline_dir, subfolder=self.folder("denoiser")))
        return self.preset_config("denoiser")

    def extras(self) -> dict:
        """The family's ``build_extras`` for this spec (``Components.extra``)."""
        return self.family.build_extras(self.spec, self.preset, self.denoiser_config)

    def text_slots(self) -> tuple[TextSlot, ...]:
        """The text encoders this job uses: the family's, less an optional one the spec or the pretrained
        pipeline leaves out."""
        slots = self.family.active_text_slots(self.spec)
        if self.pipeline_dir is not None:
            slots = tuple(s for s in slots if not s.optional or (self.pipeline_dir / s.encoder).is_dir())
        return slots

    def tokenizer(self, slot: TextSlot):
        max_length = self.family.max_token_length(slot, self.spec, self.preset)
        if self.tokenizer_dir is not None and slot.tokenizer == "tokenizer":
            tok = _load_tokenizer(slot.kind, self.tokenizer_dir)
        elif self.pipeline_dir is not None:
            tok = _load_tokenizer(slot.kind, self.pipeline_dir, slot.tokenizer)
        else:
            tok = _build_tokenizer(slot.kind, max_length or self.need_preset(slot.tokenizer).tokenizer_max_length)
        if max_length:
            tok.model_max_length = max_length
        if len(tok) < 3:
            raise ModelError(f"spec.model.tokenizer: the {slot.tokenizer} loaded is empty (is the directory complete?)")
        return tok

    def text_encoder(self, slot: TextSlot, tokenizer):
        if slot.encoder in self.component_dirs:
            enc = slot.encoder_class.from_pretrained(self.component_dirs[slot.encoder])
        elif self.pipeline_dir is not None:
            enc = slot.encoder_class.from_pretrained(self.pipeline_dir, subfolder=slot.encoder)
        else:
            overrides = self.spec.overrides.get(slot.encoder, {})
            _check_overrides(slot.encoder, overrides, _ENCODER_FIELDS[slot.kind]())
            config = self.need_preset(slot.encoder).text_encoders[slot.encoder]
            enc = _ENCODER_FROM_CONFIG[slot.kind](slot.encoder_class, config, tokenizer, overrides)
        if enc.config.vocab_size < len(tokenizer):
            raise ModelError(
                f"spec.model.tokenizer: {len(tokenizer)} tokens, but the {slot.encoder} knows only "
                f"{enc.config.vocab_size}"
            )
        return enc

    def noise_scheduler(self):
        cls = self.family.scheduler_class
        if self.pipeline_dir is not None and (self.pipeline_dir / "scheduler").exists():
            config = dict(cls.load_config(self.pipeline_dir, subfolder="scheduler"))
        elif self.preset is not None:
            config = dict(self.preset.scheduler)
        else:
            config = dict(PRESETS[self.family.default_preset].scheduler)
        overrides = self.spec.overrides.get("scheduler", {})
        _check_overrides("scheduler", overrides, _init_params(cls))
        return self.family.training_scheduler({**config, **overrides}, self.spec)

    def pretrained_dir(self, slot: str) -> Path | None:
        """The directory a pretrained ``slot`` (a model, tokenizer or text encoder) is loaded from, or None
        when the preset builds it."""
        if slot == "tokenizer" and self.tokenizer_dir is not None:
            return self.tokenizer_dir
        if slot in self.component_dirs:
            return self.component_dirs[slot]
        if self.pipeline_dir is not None and (self.pipeline_dir / slot).is_dir():
            return self.pipeline_dir / slot
        return None

    def build(self, name: str, seed: int, slot: TextSlot | None = None, tokenizer=None):
        """One model (``denoiser``, ``vae``, or a text slot's encoder) from its own seed; the caller's random
        state is left as it was (a trainer may build the frozen ones mid-run)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + _seed_offset(name))
            if slot is None:
                return self.model(name)
            return self.text_encoder(slot, tokenizer)

    def resolution(self) -> int:
        if self.spec.resolution:
            return self.spec.resolution
        if self.preset:
            return self.preset.resolution
        vae_dir = self.component_dirs.get("vae") or (self.pipeline_dir / "vae")
        return int(AutoencoderKL.load_config(vae_dir)["sample_size"])


def model_family(spec: ModelSpec, s3: S3Settings | None = None) -> ModelFamily:
    """The family of ``spec``'s model (from the spec, the preset, or the pretrained pipeline)."""
    return _Sources(spec, s3).family


def check_job(spec) -> ModelFamily:
    """The family of a job (``JobSpec``) after it has checked the job's settings suit it (``ModelError``
    naming the field otherwise). Drivers call it before reading data or starting workers."""
    family = model_family(spec.model, spec.storage)
    try:
        family.check_job(spec)
    except ValueError as exc:
        raise ModelError(str(exc)) from None
    return family


def data_requirements(spec: ModelSpec, *, stage: str = "denoiser", s3: S3Settings | None = None
                      ) -> tuple[int, list]:
    """What the data pipeline needs from the model (image size, tokenizers in slot order) without building
    the models."""
    sources = _Sources(spec, s3)
    if stage == "autoencoder":
        return sources.resolution(), []
    return sources.resolution(), [sources.tokenizer(slot) for slot in sources.text_slots()]


def build_components(spec: ModelSpec, *, stage: str = "denoiser", s3: S3Settings | None = None,
                     seed: int = 0, denoiser: bool = True, frozen: bool = True) -> Components:
    """Every component a job of ``stage`` needs, weights loaded where a pretrained source names them.

    ``seed`` makes preset initialisation identical on every worker. For the denoiser stage,
    ``denoiser=False`` leaves out the denoiser and ``frozen=False`` the VAE, tokenizers and
    text encoders (training on a latent cache needs none of them); each component is the same whichever
    others are built.
    """
    sources = _Sources(spec, s3)
    family = sources.family
    if stage == "autoencoder":
        return Components(family, None, sources.build("vae", seed), {}, {}, sources.noise_scheduler(),
                          sources.resolution())
    model = vae = None
    encoders: dict = {}
    tokenizers: dict = {}
    if denoiser:
        if spec.lora is not None and not sources.is_pretrained("denoiser"):
            raise ModelError(f"spec.model.lora: spec.model.pretrained holds no {family.denoiser} "
                             f"({family.denoiser_class.__name__}), so the adapters would sit on the preset's random "
                             f"weights; give a pipeline or {family.denoiser} to adapt")
        model = sources.build("denoiser", seed)
    if frozen:
        vae = sources.build("vae", seed)
        for slot in sources.text_slots():
            tokenizers[slot.tokenizer] = sources.tokenizer(slot)
            encoders[slot.encoder] = sources.build(slot.encoder, seed, slot, tokenizers[slot.tokenizer])
    return Components(family, model, vae, encoders, tokenizers, sources.noise_scheduler(), sources.resolution(),
                      sources.extras())


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
    """A content digest of each frozen component of a denoiser job (VAE, tokenizers, text encoders): what a
    latent cache depends on. A pretrained component is hashed from its files (config and weights; nothing
    is loaded), one from the Hub named by its resolved commit, a preset one from its configuration and the
    weights ``seed`` initialises."""
    sources = _Sources(spec, s3)
    out: dict[str, str] = {}
    directory = sources.pretrained_dir("vae")
    out["vae"] = sources.fingerprint(directory) if directory else "preset:" + _hash_model(sources.build("vae", seed))
    for slot in sources.text_slots():
        tok = sources.tokenizer(slot)
        directory = sources.pretrained_dir(slot.tokenizer)
        out[slot.tokenizer] = (sources.fingerprint(directory) if directory is not None else "preset:" + hashlib.sha256(
            f"{tok.model_max_length}:{tok.backend_tokenizer.to_str()}".encode()).hexdigest())
        if directory is not None and slot.kind == "t5":
            out[slot.tokenizer] += f":{tok.model_max_length}"  # the T5 length the spec sets changes the rows
        directory = sources.pretrained_dir(slot.encoder)
        out[slot.encoder] = (sources.fingerprint(directory) if directory is not None
                             else "preset:" + _hash_model(sources.build(slot.encoder, seed, slot, tok)))
    extras = sources.extras()
    if extras:  # shapes of the cached prompt embeddings no encoder above fixes (SD3 without T5)
        out["conditioning"] = json.dumps(extras, sort_keys=True)
    return out
