"""The job document: one typed shape for every entry point (CLI, REST, Kubernetes).

A ``DiffusionJob`` is validated once, here, at the edge. Everything below the spec trusts it.
Unknown fields are refused, and every error names the field path it concerns
(``spec.train.learning_rate``) and what was expected.
"""

from __future__ import annotations

import json
import math
import posixpath
import re
import typing
from collections.abc import Hashable
from pathlib import Path
from typing import Annotated, Any, Literal

from dataclasses import dataclass

import yaml
from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator,
                      model_validator)
from yaml.composer import Composer
from yaml.events import AliasEvent
from yaml.nodes import MappingNode

API_VERSION = "sdray.io/v1alpha1"
KIND = "DiffusionJob"
PRESETS = ("tiny", "tiny-xl", "tiny-sd3", "sd15", "sd2-base", "sdxl-base", "tiny-flux", "flux-dev", "flux-schnell",
           "sd3-medium", "sd35-medium", "sd35-large")
# sdray.models.families: the families sdray trains (the spec does not import the models; a test keeps these
# equal to the registry).
FAMILY_NAMES = ("sd", "sdxl", "sd3", "flux")

# What one document text may be: every entry point (CLI, REST service) parses through parse_document_text.
MAX_DOCUMENT_BYTES = 1 << 20
MAX_DOCUMENT_DEPTH = 64
MAX_DOCUMENT_NODES = 100_000
# Seeds reach NumPy's legacy RandomState (Ray Tune's BasicVariantGenerator, Optuna's samplers, np.random.seed),
# which takes 0..2**32-1; torch.manual_seed takes up to 2**64-1 and Python's random any int.
MAX_SEED = 2**32 - 1
MAX_STEPS = 10**8  # optimizer steps, warm-up, intervals: beyond this a run would never end
MAX_WORKERS = 10_000
_INT32 = 2**31 - 1  # KubeRay's RayJob keeps its seconds and retry counts as int32

# Kubernetes names and values, as the API server checks them (apimachinery's validation).
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
LABEL_VALUE = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"
ENV_NAME = r"^[-._a-zA-Z][-._a-zA-Z0-9]*$"
# Ray resource names: CPU, GPU, memory, TPU, accelerator_type:H100, node:10.0.0.1, custom names.
RAY_RESOURCE_NAME = r"^[A-Za-z_][-A-Za-z0-9_.:/]*$"
_LABEL_NAME = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")
# Hugging Face Hub model sources: hf://org/name[@revision], or a bare org/name[@revision] that is not a local
# path. Names as huggingface_hub's validate_repo_id takes them (letters, digits, '-', '_', '.'; no '--' or
# '..'; neither starting nor ending with '-' or '.'); a revision is a branch, tag or commit (a git ref name).
HUB_SCHEME = "hf://"
_HUB_NAME = r"[A-Za-z0-9_](?:[-A-Za-z0-9_.]*[A-Za-z0-9_])?"
_HUB_SOURCE = re.compile(rf"(?P<repo>{_HUB_NAME}/{_HUB_NAME})(?:@(?P<revision>[A-Za-z0-9_][-A-Za-z0-9_./]*))?")
MAX_HUB_REPO = 96
MAX_HUB_REVISION = 255


class SpecError(ValueError):
    """A job document that cannot be accepted. ``errors`` holds one line per problem."""

    def __init__(self, errors: list[str], source: str | None = None):
        self.errors = errors
        self.source = source
        where = f"{source}: " if source else ""
        super().__init__(where + "; ".join(errors))


class _Strict(BaseModel):
    # allow_inf_nan=False: no .inf or .nan in any float field (a NaN in a stored job broke every job list).
    model_config = ConfigDict(extra="forbid", validate_default=True, allow_inf_nan=False)


def _qualified_name(key: str) -> str:
    """A label (or annotation) key as the Kubernetes API server takes it (IsQualifiedName): an optional
    DNS-1123 subdomain prefix of at most 253 characters and '/', then a name of at most 63 of
    [A-Za-z0-9._-] that starts and ends with a letter or digit."""
    prefix, slash, name = key.rpartition("/")
    if slash and not (prefix and len(prefix) <= 253 and re.fullmatch(DNS_SUBDOMAIN, prefix)):
        raise ValueError("the prefix before '/' must be a DNS-1123 subdomain of at most 253 characters "
                         "(lower-case letters, digits, '-' and '.')")
    if not (len(name) <= 63 and _LABEL_NAME.fullmatch(name)):
        raise ValueError("expected a name of at most 63 characters of [A-Za-z0-9._-] that starts and ends with "
                         "a letter or digit (optionally after a DNS-subdomain prefix and '/')")
    return key


LabelKey = Annotated[str, AfterValidator(_qualified_name)]
LabelValue = Annotated[str, Field(max_length=63, pattern=LABEL_VALUE)]


def _json_values(value: Any) -> Any:
    """A free-form value (``model.overrides``, a search's ``choice``/``grid``) as JSON holds it: objects
    with string keys, arrays, strings, booleans, null and finite numbers; stored and sent on as it is."""
    stack = [(value, "")]
    while stack:
        item, where = stack.pop()
        at = f" (at {_clip(where.lstrip('.'), 100)})" if where else ""
        if isinstance(item, dict):
            for key, sub in item.items():
                if not isinstance(key, str):
                    raise ValueError(f"object keys must be strings, got {_clip(repr(key), 100)}{at}")
                stack.append((sub, f"{where}.{key}"))
        elif isinstance(item, (list, tuple)):
            stack.extend((sub, f"{where}[{i}]") for i, sub in enumerate(item))
        elif isinstance(item, float) and not math.isfinite(item):
            raise ValueError(f"expected a finite number, got {item}{at}")
        elif item is not None and not isinstance(item, (str, int, float)):  # (bool is an int)
            raise ValueError(f"expected a JSON value (object, array, string, number, boolean or null), got a "
                             f"{type(item).__name__}{at}")
    return value


JsonObject = Annotated[dict[str, Any], AfterValidator(_json_values)]
JsonList = Annotated[list[Any], AfterValidator(_json_values)]


def by_name(model: type[_Strict]) -> Any:
    """``model`` as a field type that also takes the bare name of what it selects: ``scheduler: asha`` reads as
    ``scheduler: {name: asha}``. For objects whose ``name`` (a Literal) is all they need; their other fields
    keep their defaults. The JSON Schema (and so the CRD) shows both forms; a wrong name is one error naming
    the field and the names it takes."""
    names = typing.get_args(model.model_fields["name"].annotation)

    def expand(value: Any) -> Any:
        if isinstance(value, (dict, model)):
            return value
        if not isinstance(value, str) or value not in names:
            raise ValueError(f"expected one of {', '.join(names)} (or an object with a name)")
        return {"name": value}

    return Annotated[model, BeforeValidator(expand, json_schema_input_type=Literal[names] | model)]


class Metadata(_Strict):
    name: str = Field(
        pattern=DNS_LABEL,
        max_length=63,
        description="Job name: a DNS-1123 label (lower-case letters, digits and '-').",
    )
    namespace: str | None = Field(
        default=None, pattern=DNS_LABEL, max_length=63, description="Kubernetes namespace (a DNS-1123 label).")
    labels: dict[LabelKey, LabelValue] = Field(
        default_factory=dict, description="Kubernetes labels: keys and values as the API server checks them.")


@dataclass(frozen=True)
class HubSource:
    """A model source on the Hugging Face Hub: ``repo`` (org/name) at ``revision`` (None: main)."""

    repo: str
    revision: str | None
    explicit: bool  # written hf://…; a bare org/name is a local path wherever one exists

    @property
    def org(self) -> str:
        return self.repo.split("/", 1)[0]

    def __str__(self) -> str:
        return HUB_SCHEME + self.repo + (f"@{self.revision}" if self.revision else "")


def _hub_problem(repo: str, revision: str | None) -> str | None:
    if len(repo) > MAX_HUB_REPO:
        return f"a repository name of at most {MAX_HUB_REPO} characters"
    if "--" in repo or ".." in repo:
        return "a repository name without '--' or '..'"
    if revision is not None and (len(revision) > MAX_HUB_REVISION or ".." in revision or "//" in revision
                                 or revision.endswith(("/", ".", ".lock"))):
        return (f"a revision of at most {MAX_HUB_REVISION} characters that is a git ref name (a branch, tag or "
                "commit: no '..' or '//', not ending in '/', '.' or '.lock')")
    return None


def hub_source(value: str) -> HubSource | None:
    """The Hub repository a model source names (None: a local path or another URI). ``hf://`` always names
    one, and a malformed ``hf://`` value raises ValueError; a bare value names one when it is exactly
    ``org/name[@revision]`` in the Hub's characters (``model_sources`` decides against a local path)."""
    explicit = value.startswith(HUB_SCHEME)
    match = _HUB_SOURCE.fullmatch(value.removeprefix(HUB_SCHEME))
    problem = _hub_problem(match["repo"], match["revision"]) if match else "org/name or org/name@revision"
    if problem is None:
        return HubSource(match["repo"], match["revision"], explicit)
    if explicit:
        raise ValueError(f"expected hf://org/name[@revision] with {problem} (org and name: letters, digits, '-', "
                         "'_' and '.', starting and ending with a letter, digit or '_')")
    return None


def _pretrained_source(value: str) -> str:
    hub_source(value)  # a malformed hf:// value is refused here, at the edge
    return value


PretrainedSource = Annotated[str, AfterValidator(_pretrained_source)]
_SOURCE_FORMS = ("local dir, s3:// URI, or Hugging Face Hub repository (hf://org/name[@revision], or org/name "
                 "where no such local path exists)")


class S3Settings(_Strict):
    """Connection settings for ``s3://`` URIs. Keys never live in the document: they come from
    ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` or from the named secret."""

    endpoint: str | None = Field(
        default=None,
        description="S3 endpoint URL (e.g. http://127.0.0.1:8333); default: AWS_ENDPOINT_URL or AWS.",
    )
    region: str | None = Field(
        default=None, description="S3 region; default: AWS_REGION, then AWS_DEFAULT_REGION, then us-east-1.")
    credentials_secret: str | None = Field(
        default=None,
        pattern=DNS_SUBDOMAIN,
        max_length=253,
        description=(
            "Name of a secret holding AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, mounted as files under "
            "$SDRAY_SECRETS_DIR/<name>/ (default /var/run/secrets/sdray/<name>/, the layout of a "
            "Kubernetes Secret volume)."
        ),
    )


class StorageRetries(_Strict):
    """How storage faults are retried. Transient: connection refused or reset, timeouts, HTTP 5xx, SlowDown
    and throttling; permanent (403 AccessDenied, no such bucket, a missing object) fail at once."""

    max_attempts: int = Field(
        default=8, ge=1, le=50,
        description="Attempts of each S3 request on a transient error, by the AWS SDK (its standard mode: "
        "exponential backoff with full jitter, each wait up to 20 s); Ray Train's and Ray Data's requests too.",
    )
    max_elapsed_s: float = Field(
        default=60.0, ge=0.0, le=3600.0,
        description="How long sdray retries a whole operation (an object, a folder, a checkpoint upload) that "
        "still fails with a transient error after the SDK's attempts, with exponential backoff and jitter; "
        "0: the SDK's attempts only.",
    )
    connect_timeout_s: float = Field(
        default=5.0, gt=0.0, le=300.0, description="Seconds to wait for a connection to the S3 endpoint.")


class StorageSettings(S3Settings):
    """``spec.storage``: the S3 settings of every ``s3://`` URI of the job, and how its faults are retried."""

    retries: StorageRetries = Field(default_factory=StorageRetries)


class VAESource(_Strict):
    pretrained: PretrainedSource = Field(
        description=f"{_SOURCE_FORMS[0].upper() + _SOURCE_FORMS[1:]} of a diffusers AutoencoderKL (or a pipeline).")


class HubSettings(_Strict):
    """How ``hf://`` model sources reach the Hugging Face Hub. The token never lives in the document: it comes
    from ``HF_TOKEN`` (or ``hf auth login``) or from the named secret."""

    credentials_secret: str | None = Field(
        default=None,
        pattern=DNS_SUBDOMAIN,
        max_length=253,
        description=(
            "Name of a secret holding the Hub token as HF_TOKEN (for gated and private repositories), mounted as "
            "a file under $SDRAY_SECRETS_DIR/<name>/ (default /var/run/secrets/sdray/<name>/HF_TOKEN, the "
            "layout of a Kubernetes Secret volume); default: HF_TOKEN from the environment."
        ),
    )


class LoRASpec(_Strict):
    """Low-rank adapters (LoRA, through peft) on a pretrained UNet: its own weights stay frozen."""

    rank: int = Field(gt=0, le=4096, description="Rank of each adapter's low-rank update.")
    alpha: float | None = Field(
        default=None, gt=0.0, le=65536.0,
        description="Scale numerator: the update is multiplied by alpha/rank; default: rank."
    )
    targets: list[str] | None = Field(
        default=None,
        min_length=1,
        description="Denoiser module names (or name suffixes) that get adapters; default: the family's, as "
        "diffusers' LoRA examples (the attention projections; Flux and SD3 also their context projections).",
    )
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0, description="Dropout on the adapters' input in training.")

    @model_validator(mode="after")
    def _alpha_defaults_to_rank(self) -> LoRASpec:
        if self.alpha is None:
            self.alpha = float(self.rank)
        return self


class ModelSpec(_Strict):
    family: Literal["sd", "sdxl", "sd3", "flux"] | None = Field(
        default=None,
        description="Model family: sd (Stable Diffusion 1.x/2.x), sdxl, sd3 (Stable Diffusion 3 and 3.5), flux "
        "(Flux.1 dev and schnell). Default: the preset's, or the pretrained pipeline's (model_index.json); a "
        "family that contradicts either is refused.",
    )
    preset: Literal["tiny", "tiny-xl", "tiny-sd3", "sd15", "sd2-base", "sdxl-base", "tiny-flux", "flux-dev",
                    "flux-schnell", "sd3-medium", "sd35-medium", "sd35-large"] | None = Field(
        default=None,
        description="Named architecture built without weights: tiny, tiny-xl, tiny-sd3 and tiny-flux (tests, "
        "demos), sd15, sd2-base, sdxl-base, sd3-medium, sd35-medium, sd35-large, flux-dev, flux-schnell (the "
        "public releases' shapes).",
    )
    pretrained: PretrainedSource | None = Field(
        default=None,
        description=f"{_SOURCE_FORMS[0].upper() + _SOURCE_FORMS[1:]} of a diffusers pipeline of the family "
        "(StableDiffusionPipeline, StableDiffusionXLPipeline, StableDiffusion3Pipeline, FluxPipeline), or of one "
        "component.",
    )
    vae: VAESource | None = Field(default=None, description="Use a VAE trained earlier, or another pretrained one.")
    tokenizer: PretrainedSource | None = Field(
        default=None, description=f"{_SOURCE_FORMS[0].upper() + _SOURCE_FORMS[1:]} of a CLIPTokenizer (or of a "
        "pipeline: its tokenizer); default: the pretrained pipeline's, else the preset's."
    )
    hub: HubSettings | None = Field(
        default=None, description="Hugging Face Hub settings of hf:// sources: the secret holding the token.")
    overrides: dict[Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]*$", max_length=64)], JsonObject] = Field(
        default_factory=dict,
        description="Per-component config overrides applied to the preset's configs (scheduler: always), keyed "
        "by the component's name in the family's pipeline (unet or transformer, vae, text_encoder … scheduler); "
        "a name the family's pipeline does not have is refused.",
    )
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"
    resolution: int | None = Field(
        default=None, ge=8, le=8192, description="Training image size in pixels; default: the preset's."
    )
    max_sequence_length: int | None = Field(
        default=None, ge=1, le=4096,
        description="T5 tokens per caption (families with a T5 encoder): Flux dev 512, schnell 256, SD3 at most "
        "154 recommended; default: the preset's, or the pretrained tokenizer's.",
    )
    use_t5: bool = Field(
        default=True,
        description="SD3: encode captions with T5 too (false: the two CLIP encoders alone, zeros in T5's place, "
        "as SD3 allows, to save memory). Families without an optional T5 refuse false.",
    )
    rescale_betas_zero_snr: bool = Field(
        default=False,
        description="Rescale the noise schedule to zero terminal SNR (Lin et al., 2023); needs v_prediction.",
    )
    lora: LoRASpec | None = Field(
        default=None,
        description="Train LoRA adapters on the pretrained denoiser (UNet or transformer) instead of its weights "
        "(needs model.pretrained).",
    )

    @model_validator(mode="after")
    def _needs_a_source(self) -> ModelSpec:
        if self.preset is None and self.pretrained is None:
            raise ValueError("set spec.model.preset (one of %s) or spec.model.pretrained (a URI)" % ", ".join(PRESETS))
        if self.resolution is not None and self.resolution % 8:
            raise ValueError(f"spec.model.resolution must be a multiple of 8, got {self.resolution}")
        if self.lora is not None and self.pretrained is None:
            raise ValueError("spec.model.lora adapts pretrained weights: set spec.model.pretrained (a diffusers "
                             "pipeline dir, s3:// URI or hf:// repository); on a preset's random UNet train the "
                             "UNet itself")
        if self.rescale_betas_zero_snr and self.prediction_type != "v_prediction":
            raise ValueError("spec.model.rescale_betas_zero_snr: at zero terminal SNR an epsilon target is "
                             "undefined; set prediction_type: v_prediction")
        return self


class BucketingSpec(_Strict):
    """Aspect-ratio buckets: each image trains at the bucket shape nearest its own aspect ratio."""

    enabled: bool = True
    min_size: int | None = Field(
        default=None, ge=8, le=16384, description="Shortest bucket side in pixels; default: resolution / 2.")
    max_size: int | None = Field(
        default=None, ge=8, le=16384, description="Longest bucket side in pixels; default: resolution × 2.")
    step: int = Field(default=64, ge=8, le=1024, description="Bucket sides are multiples of this (a multiple of 8).")
    max_aspect: float = Field(
        default=4.0, ge=1.0, le=16.0, description="Largest long-side / short-side ratio of a bucket.")

    @model_validator(mode="after")
    def _consistent(self) -> BucketingSpec:
        if self.step % 8:
            raise ValueError(f"spec.data.bucketing.step must be a multiple of 8 (the VAE's downsampling), got {self.step}")
        if self.min_size is not None and self.max_size is not None and self.min_size > self.max_size:
            raise ValueError(f"spec.data.bucketing.min_size ({self.min_size}) must not exceed max_size ({self.max_size})")
        if self.max_size is not None and self.max_size < self.step:
            raise ValueError(f"spec.data.bucketing.max_size ({self.max_size}) must be at least step ({self.step})")
        return self


class DataSpec(S3Settings):
    uri: str = Field(description="Local path or s3://bucket/prefix of the dataset.")
    format: Literal["imagefolder", "webdataset", "parquet", "latents"] = Field(
        default="imagefolder",
        description="imagefolder: images + metadata.jsonl; webdataset: .tar shards; parquet: image-bytes column; "
        "latents: a latent cache written by `sdray data precompute` (checked against this job's model and "
        "transforms at start).",
    )
    image_column: str | None = Field(
        default=None,
        description="Column (parquet) or member extension (webdataset) holding images; "
        "default: 'image' for parquet, the first image extension found for webdataset.",
    )
    caption_column: str | None = Field(
        default=None,
        description="Key (imagefolder metadata.jsonl), column (parquet) or member extension (webdataset) "
        "holding captions; default: 'text', or 'txt' for webdataset.",
    )
    resize: int | None = Field(
        default=None, ge=8, le=16384,
        description="Shorter side is resized to this before cropping; default: resolution."
    )
    crop: Literal["center", "random"] = "center"
    random_flip: bool = False
    shuffle: bool = Field(default=True, description="Shuffle files and rows every epoch.")
    validation_fraction: float = Field(default=0.0, ge=0.0, lt=1.0)
    bucketing: BucketingSpec | None = Field(
        default=None,
        description="Aspect-ratio bucketing: batches of one bucket shape each instead of square crops "
        "(validation stays square, except on a bucketed latent cache). With format: latents, the cache must "
        "have been made with the same settings.",
    )

    @property
    def bucketed(self) -> bool:
        return self.bucketing is not None and self.bucketing.enabled

    @model_validator(mode="after")
    def _resize_or_buckets(self) -> DataSpec:
        if self.bucketed and self.resize is not None:
            raise ValueError("spec.data.resize does not apply with bucketing (each image is resized to cover its "
                             "bucket); remove it or set bucketing.enabled: false")
        return self

    @model_validator(mode="after")
    def _latent_cache_settings(self) -> DataSpec:
        if self.format != "latents":
            return self
        for name in ("image_column", "caption_column"):
            if getattr(self, name) is not None:
                raise ValueError(f"spec.data.{name} does not apply to format: latents (the cache's manifest "
                                 "records the columns it was made from)")
        if self.crop == "random":
            raise ValueError("spec.data.crop: a latent cache holds center crops only (a random crop cannot be "
                             "precomputed); use crop: center or train on the images")
        return self


class OptimizerSpec(_Strict):
    name: Literal["adamw"] = "adamw"
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = Field(default=1e-2, ge=0.0, le=10.0)
    eps: float = Field(default=1e-8, gt=0.0, le=1.0)

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in v):
            raise ValueError(f"each beta must be in [0, 1), got {list(v)}")
        return v


class EMASpec(_Strict):
    decay: float = Field(default=0.999, gt=0.0, lt=1.0, description="Decay reached once (1+n)/(10+n) exceeds it.")
    update_after_step: int = Field(
        default=0, ge=0, le=MAX_STEPS, description="Optimizer steps before the average starts.")


class FlowMatchingSpec(_Strict):
    """Rectified flow matching (SD3, Flux, Sana): how noise levels σ are drawn and how the loss weighs them."""

    timestep_sampling: Literal["logit_normal", "mode", "uniform"] = Field(
        default="logit_normal",
        description="How noise levels are drawn: logit_normal (sigmoid of a normal draw; the SD3 paper's "
        "best), mode (uniform bent towards the middle by mode_scale), uniform.",
    )
    logit_mean: float = Field(
        default=0.0, ge=-10.0, le=10.0,
        description="Mean of logit_normal's normal draw; above 0 leans towards noisier steps (σ is the noise "
        "share; diffusers' scripts flip this sign).",
    )
    logit_std: float = Field(default=1.0, gt=0.0, le=10.0, description="Spread of logit_normal's normal draw.")
    mode_scale: float = Field(
        default=1.29, ge=-1.0, le=1.75,
        description="Strength of mode sampling's pull towards the middle (negative: towards the ends); "
        "beyond [-1, 2/(π-2)] the draw leaves [0, 1].",
    )
    shift: float | None = Field(
        default=None, gt=0.0, le=100.0,
        description="Noise-level shift σ' = shift·σ/(1+(shift-1)·σ); above 1 trains more on noisy steps, which "
        "larger images need (SD3: 3.0). Default: the model family's (ignored with resolution_shift).",
    )
    resolution_shift: bool | None = Field(
        default=None,
        description="Shift by each batch's resolution instead (Flux: e^mu, mu from 0.5 at 256 image tokens to "
        "1.15 at 4096). Default: the model family's (Flux: true).",
    )
    loss_weighting: Literal["none", "sigma_sqrt", "cosmap"] = Field(
        default="none",
        description="Per-sample loss weight by noise level, as diffusers' SD3 scripts: none, sigma_sqrt (σ⁻²; "
        "numerically unstable near σ = 0), cosmap.",
    )
    precondition_outputs: bool = Field(
        default=False,
        description="SD3 scripts' output preconditioning: the loss compares x_t - σ·prediction with the clean "
        "latents instead of the prediction with the velocity.",
    )


class TrainSpec(_Strict):
    max_steps: int = Field(default=1000, gt=0, le=MAX_STEPS, description="Optimizer steps.")
    batch_size: int = Field(default=16, gt=0, le=65536, description="Images per worker per micro-step.")
    gradient_accumulation_steps: int = Field(default=1, ge=1, le=10_000)
    learning_rate: float = Field(
        default=1e-4, gt=0.0, le=1e6,
        description="Peak learning rate: positive and finite. The cap only keeps absurd values out; a search "
                    "may well try a rate that diverges.")
    lr_scheduler: Literal["constant", "cosine", "linear"] = "constant"
    warmup_steps: int = Field(default=0, ge=0, le=MAX_STEPS)
    optimizer: by_name(OptimizerSpec) = Field(
        default_factory=OptimizerSpec, description="The optimizer: adamw, or {name: adamw, betas, weight_decay, eps}.")
    max_grad_norm: float | None = Field(default=1.0, gt=0.0, le=1e6, description="Gradient clipping; null disables.")
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    seed: int = Field(default=0, ge=0, le=MAX_SEED, description="Seed of initialisation, noise and data order.")
    caption_dropout: float = Field(
        default=0.1, ge=0.0, lt=1.0, description="Share of captions replaced by '' (classifier-free guidance)."
    )
    kl_weight: float = Field(default=1e-6, ge=0.0, le=1e3, description="KL term weight (stage: autoencoder).")
    guidance: float = Field(
        default=1.0, ge=0.0, le=100.0,
        description="Flux: the guidance value embedded during training (1.0 keeps a guidance-distilled model's "
        "distilled guidance; larger values teach real classifier-free guidance). A transformer without guidance "
        "embeddings (schnell) takes none: refused with the flux-schnell preset, ignored for a pretrained one. "
        "Other families refuse it.")
    ema: EMASpec | None = Field(default=None, description="Keep an exponential moving average of the weights.")
    snr_gamma: float | None = Field(
        default=None, gt=0.0, le=1e3, description="Min-SNR-γ loss weighting (5.0 is usual).")
    noise_offset: float = Field(default=0.0, ge=0.0, le=1.0, description="Offset noise strength (0.05–0.1 is usual).")
    input_perturbation: float = Field(
        default=0.0, ge=0.0, le=1.0, description="Input perturbation strength (0.1 is usual).")
    flow: FlowMatchingSpec = Field(
        default_factory=FlowMatchingSpec,
        description="Flow-matching options, for model families trained by rectified flow (SD3, Flux).",
    )
    gradient_checkpointing: bool = Field(default=False, description="Recompute activations in backward: less memory, more compute.")
    allow_tf32: bool = Field(default=False, description="Let CUDA matmuls and convolutions use TF32 (Ampere and newer).")
    compile: bool = Field(
        default=False, description="torch.compile the trained model (slow first step, faster after; ~1 min on CPU)."
    )
    train_text_encoder: bool = Field(
        default=False,
        description="Train the text encoder (SDXL: both) with the UNet; with model.lora, LoRA adapters on its "
        "attention projections instead.",
    )
    log_every_n_steps: int = Field(default=10, gt=0, le=MAX_STEPS, description="Metrics reporting interval.")


class FSDPSpec(_Strict):
    sharding: Literal["full", "grad_op", "hybrid"] = Field(
        default="full",
        description="full: parameters, gradients and optimizer state sharded, parameters re-gathered for "
        "backward (ZeRO-3); grad_op: parameters kept gathered between forward and backward (ZeRO-2); "
        "hybrid: shard within groups of shard_group_size workers, replicate across groups (HSDP).",
    )
    shard_group_size: int | None = Field(
        default=None, ge=1, le=MAX_WORKERS,
        description="Workers per shard group for sharding: hybrid (must divide num_workers)."
    )
    cpu_offload: bool = Field(default=False, description="Keep sharded parameters and optimizer state in host memory (GPU runs).")


class DeepSpeedSpec(_Strict):
    zero_stage: Literal[1, 2, 3] = Field(
        default=2,
        description="1: optimizer state partitioned across workers; 2: gradients too; 3: parameters too "
        "(gathered block by block for forward and backward).",
    )
    offload_optimizer: bool = Field(
        default=False,
        description="Keep optimizer state in host memory and step it there with DeepSpeedCPUAdam "
        "(JIT-compiled on first use, ~35 s; needs a C++ compiler on the workers).",
    )
    offload_params: bool = Field(default=False, description="Keep partitioned parameters in host memory (zero_stage: 3).")


class DistributedSpec(_Strict):
    num_workers: int = Field(default=1, ge=1, le=MAX_WORKERS)
    use_gpu: bool = False
    resources_per_worker: dict[Annotated[str, Field(pattern=RAY_RESOURCE_NAME, max_length=64)],
                               Annotated[float, Field(ge=0.0, le=1e15)]] | None = Field(
        default=None, max_length=64,
        description="Ray resources per worker, e.g. {CPU: 1, GPU: 1}: Ray resource names, amounts >= 0 "
        "(memory in bytes).",
    )
    strategy: Literal["ddp", "fsdp", "deepspeed"] = Field(
        default="ddp",
        description="ddp: replicate the model; fsdp: shard it with FSDP2 (fully_shard); deepspeed: DeepSpeed ZeRO.",
    )
    fsdp: FSDPSpec | None = Field(default=None, description="FSDP settings (strategy: fsdp).")
    deepspeed: DeepSpeedSpec | None = Field(default=None, description="DeepSpeed settings (strategy: deepspeed).")
    max_failures: int = Field(
        default=2, ge=0, le=1000, description="Worker failures to recover from (restart from the latest checkpoint)."
    )

    @property
    def cpus_per_worker(self) -> float:
        return float((self.resources_per_worker or {}).get("CPU", 1))

    @property
    def gpus_per_worker(self) -> float:
        """GPUs each Ray Train worker takes: resources_per_worker.GPU, else one with use_gpu (as Ray Train)."""
        if not self.use_gpu:
            return 0.0
        return float((self.resources_per_worker or {}).get("GPU", 1))

    @model_validator(mode="after")
    def _fsdp_settings(self) -> DistributedSpec:
        if self.fsdp is not None and self.strategy != "fsdp":
            raise ValueError(f"spec.distributed.fsdp applies to strategy: fsdp only (this job has {self.strategy!r})")
        fsdp = self.fsdp or FSDPSpec()
        if fsdp.cpu_offload and not self.use_gpu:
            raise ValueError("spec.distributed.fsdp.cpu_offload moves GPU memory to the host: it needs use_gpu: true")
        if fsdp.sharding == "hybrid":
            group = fsdp.shard_group_size
            if not group or self.num_workers % group or group == self.num_workers:
                raise ValueError(
                    "spec.distributed.fsdp.shard_group_size: sharding: hybrid needs a group size that divides "
                    f"num_workers ({self.num_workers}) into two or more groups, got {group}"
                )
        elif fsdp.shard_group_size is not None:
            raise ValueError("spec.distributed.fsdp.shard_group_size applies to sharding: hybrid only")
        return self

    @model_validator(mode="after")
    def _deepspeed_settings(self) -> DistributedSpec:
        if self.deepspeed is not None and self.strategy != "deepspeed":
            raise ValueError(
                f"spec.distributed.deepspeed applies to strategy: deepspeed only (this job has {self.strategy!r})")
        ds = self.deepspeed or DeepSpeedSpec()
        if ds.offload_params and ds.zero_stage != 3:
            raise ValueError("spec.distributed.deepspeed.offload_params: only partitioned parameters can be offloaded; "
                             f"it needs zero_stage: 3 (got {ds.zero_stage})")
        return self


class CheckpointSpec(_Strict):
    uri: str | None = Field(default=None, description="Local path or s3:// URI; default: <output.uri>/checkpoints.")
    every_n_steps: int = Field(default=500, gt=0, le=MAX_STEPS)
    keep_last: int = Field(default=3, ge=1, le=1000)
    resume: str = Field(
        default="auto",
        description="auto: continue the latest checkpoint of this job; never: start fresh; or a checkpoint URI.",
    )
    on_preemption: bool = Field(
        default=True,
        description="On SIGTERM (eviction, Kueue preemption, spot notice) finish the step, checkpoint and end as "
                    "preempted (not failed); the next start resumes there.",
    )
    grace_period_s: int = Field(
        default=120, ge=10, le=3600,
        description="Seconds a preempted run has to finish its step and checkpoint: the Ray pods' "
                    "terminationGracePeriodSeconds.",
    )
    on_upload_failure: Literal["fail", "continue"] = Field(
        default="fail",
        description="A checkpoint whose upload still fails after spec.storage.retries: fail ends the run (Ray "
        "Train restarts it up to distributed.max_failures times, from the latest checkpoint); continue skips "
        "that checkpoint, counts it in metrics.jsonl and summary.json and trains on. Either way the previous "
        "checkpoint stays the latest. A permanent error (access denied, no such bucket) always fails.",
    )


class ValidationSpec(_Strict):
    prompts: list[str] = Field(default_factory=list)
    every_n_steps: int | None = Field(default=None, gt=0, le=MAX_STEPS, description="Default: only at the end.")
    num_inference_steps: int = Field(default=25, gt=0, le=1000)
    guidance_scale: float = Field(default=5.0, ge=0.0, le=100.0)
    seed: int = Field(default=0, ge=0, le=MAX_SEED, description="Seed of the sample grids' noise.")
    images_per_prompt: int = Field(default=1, ge=1, le=64)
    max_batches: int = Field(default=4, ge=0, le=10_000, description="Validation-loss batches from the held-out split.")


class OutputSpec(_Strict):
    uri: str = Field(description="Where the final model, sample grids and metrics go (local or s3://).")


class MLflowTracking(_Strict):
    enabled: bool | None = Field(
        default=None, description="null: on when MLFLOW_TRACKING_URI is set in the job's environment (the Ray "
        "containers', e.g. through cluster.env), as MLflow's own clients do.")
    tracking_uri: str | None = Field(
        default=None, max_length=2048, description="The MLflow tracking server (http(s)://…) or store "
        "(sqlite:///…); default: MLFLOW_TRACKING_URI. A tenant may name only the servers its policy lists "
        "(rule tracking_uris).")
    experiment: str | None = Field(
        default=None, min_length=1, max_length=500,
        description="Default: MLFLOW_EXPERIMENT_NAME, else the job's metadata.name (a search's trials: the search's).")


class TensorBoardTracking(_Strict):
    enabled: bool = Field(
        default=True, description="Event files under <output.uri>/tensorboard (object storage included), "
        "uploaded at every report flush and at the end.")


class WandbTracking(_Strict):
    enabled: bool | None = Field(
        default=None, description="null: on when WANDB_API_KEY is set, or WANDB_MODE is offline, in the job's "
        "environment.")
    project: str | None = Field(default=None, max_length=128, description="Default: WANDB_PROJECT, else sdray.")
    entity: str | None = Field(default=None, max_length=128, description="Default: WANDB_ENTITY (W&B's own default).")
    mode: Literal["online", "offline"] | None = Field(
        default=None, description="Default: WANDB_MODE, else online. Offline runs are copied to <output.uri>/wandb "
        "for a later `wandb sync`.")
    tags: list[Annotated[str, Field(max_length=64)]] = Field(default_factory=list, max_length=20)


class TrackingSpec(_Strict):
    """Experiment tracking of rank 0: the metrics of metrics.jsonl, the job document as parameters, the
    sample grids as images, the exported pipeline's URI and the run's outcome. A tracker that fails (a
    server down) is logged, counted in summary.json and dropped; training goes on."""

    mlflow: MLflowTracking = Field(default_factory=MLflowTracking)
    tensorboard: TensorBoardTracking = Field(default_factory=TensorBoardTracking)
    wandb: WandbTracking = Field(default_factory=WandbTracking)
    group: str | None = Field(
        default=None, min_length=1, max_length=128,
        description="Runs that belong together (MLflow: children of a parent run of this name; W&B: the group). "
        "A search's trials get the search's metadata.name.")


class Distribution(_Strict):
    """One search dimension: exactly one of the four keys."""

    loguniform: tuple[float, float] | None = Field(default=None, description="[low, high], sampled log-uniformly (low > 0).")
    uniform: tuple[float, float] | None = Field(default=None, description="[low, high], sampled uniformly.")
    choice: JsonList | None = Field(default=None, min_length=1, max_length=100, description="Values sampled uniformly.")
    grid: JsonList | None = Field(
        default=None, min_length=1, max_length=100, description="Every value, once per sample (grid search).")

    @model_validator(mode="after")
    def _exactly_one(self) -> Distribution:
        given = [k for k in ("loguniform", "uniform", "choice", "grid") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of loguniform, uniform, choice, grid (got {given or 'none'})")
        for kind in ("loguniform", "uniform"):
            bounds = getattr(self, kind)
            if bounds is not None and not bounds[0] < bounds[1]:
                raise ValueError(f"{kind}: low must be below high, got {list(bounds)}")
        if self.loguniform is not None and self.loguniform[0] <= 0:
            raise ValueError(f"loguniform: low must be > 0, got {self.loguniform[0]}")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in ("loguniform", "uniform", "choice", "grid") if getattr(self, k) is not None)

    def candidates(self) -> list[Any]:
        """The values that bound what can be sampled (both ends of a range, every listed value)."""
        return list(getattr(self, self.kind))


class TuneSchedulerSpec(_Strict):
    name: Literal["fifo", "asha", "pbt"] = Field(
        default="fifo", description="fifo: run every trial to the end; asha: stop weak trials early; "
        "pbt: population based training (weak trials copy a strong one's checkpoint and perturb its values).")
    grace_period: int | None = Field(
        default=None, gt=0, le=MAX_STEPS, description="asha: steps every trial runs before it can be stopped; default: "
        "checkpoint.every_n_steps.")
    reduction_factor: float = Field(
        default=2.0, gt=1.0, le=100.0, description="asha: the share 1/f of trials kept at each rung.")
    perturbation_interval: int | None = Field(
        default=None, gt=0, le=MAX_STEPS,
        description="pbt: steps between exploit/explore decisions; default: checkpoint.every_n_steps.")
    quantile_fraction: float = Field(default=0.25, gt=0.0, le=0.5, description="pbt: the bottom share that copies the top share.")
    resample_probability: float = Field(default=0.25, ge=0.0, le=1.0, description="pbt: chance of resampling a value instead of perturbing it.")

    @model_validator(mode="after")
    def _fields_of_the_scheduler(self) -> TuneSchedulerSpec:
        owners = {"grace_period": "asha", "reduction_factor": "asha", "perturbation_interval": "pbt",
                  "quantile_fraction": "pbt", "resample_probability": "pbt"}
        for field_name, owner in owners.items():
            if field_name in self.model_fields_set and owner != self.name:
                raise ValueError(f"{field_name} applies to scheduler {owner} only (this one is {self.name})")
        return self


class TuneSpec(_Strict):
    search_space: dict[str, Distribution] = Field(
        min_length=1, max_length=32,
        description="Dotted path of a spec field (train.learning_rate, train.batch_size, …) → "
        "its distribution.")
    num_samples: int = Field(
        default=1, ge=1, le=10_000, description="Trials to sample (each grid value is run num_samples times).")
    scheduler: by_name(TuneSchedulerSpec) = Field(
        default_factory=TuneSchedulerSpec,
        description="fifo, asha or pbt, or an object with the name and the scheduler's settings.")
    search_alg: Literal["random", "optuna"] = Field(default="random", description="optuna needs the optuna package.")
    seed: int | None = Field(
        default=None, ge=0, le=MAX_SEED,
        description="Seed of the search's sampling (PBT's perturbations too): the same trials every time.")
    metric: Literal["val_loss", "loss", "images_per_s"] = Field(
        default="val_loss", description="val_loss: the loss on the held-out split, with fixed images, noise and "
        "timesteps (needs data.validation_fraction > 0).")
    mode: Literal["min", "max"] = "min"
    max_concurrent_trials: int | None = Field(
        default=None, ge=1, le=MAX_WORKERS,
        description="Default: as many as the cluster's CPUs/GPUs fit (trials beyond that queue).")
    time_budget_s: float | None = Field(
        default=None, gt=0, le=366 * 86400, description="Stop the whole search after this long.")
    scale_lr_with_batch: Literal["none", "linear", "sqrt"] = Field(
        default="none", description="Rescale each trial's learning rate by its global batch over this document's "
        "(linear or square root), as practitioners do.")


_QUANTITY = re.compile(r"^\+?(?P<num>[0-9]+(\.[0-9]*)?|\.[0-9]+)(?P<suffix>[KMGTPE]i|[numkMGTPE]|[eE][-+]?[0-9]+)?$")
_SUFFIX = {"n": 1e-9, "u": 1e-6, "m": 1e-3, "": 1.0, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18,
           "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
# Keys that must never be written into a document (the README: credentials come from secrets).
_CREDENTIAL_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


def quantity_value(text: str) -> float:
    """The number a Kubernetes quantity stands for ("500m" → 0.5, "2Gi" → 2147483648.0)."""
    match = _QUANTITY.match(text)
    if match is None:
        raise ValueError(f"expected a Kubernetes quantity such as 8, 500m or 32Gi, got {text!r}")
    suffix = match["suffix"] or ""
    try:
        scale = 10.0 ** int(suffix[1:]) if suffix[:1] in ("e", "E") else _SUFFIX[suffix]
    except OverflowError:  # 1e400
        return math.inf
    return float(match["num"]) * scale


def _quantity(value: int | str) -> str:
    if _QUANTITY.match(str(value)) is None:
        raise ValueError("expected a Kubernetes quantity such as 8, 500m or 32Gi")  # the input is appended
    if quantity_value(str(value)) >= 2**63:
        raise ValueError("a Kubernetes quantity must be below 2^63")
    return str(value)


# An int or a string, as Kubernetes writes resources (x-kubernetes-int-or-string in the CRD).
Quantity = Annotated[int | str, AfterValidator(_quantity)]


class Toleration(_Strict):
    """A Kubernetes toleration of the Ray pods (for tainted GPU nodes)."""

    key: LabelKey | None = Field(default=None, description="Taint key; empty with operator Exists matches every taint.")
    operator: Literal["Exists", "Equal"] = "Equal"
    value: LabelValue | None = Field(default=None, description="Taint value (operator Equal).")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        default=None, description="Taint effect to tolerate; empty: every effect.")
    toleration_seconds: int | None = Field(
        default=None, ge=0, le=_INT32, description="How long a NoExecute taint is tolerated before eviction.")

    @model_validator(mode="after")
    def _consistent(self) -> Toleration:
        if self.operator == "Exists" and self.value is not None:
            raise ValueError("value must be empty with operator: Exists")
        if self.operator == "Equal" and self.key is None:
            raise ValueError("key is required with operator: Equal")
        if self.toleration_seconds is not None and self.effect != "NoExecute":
            raise ValueError("toleration_seconds applies to effect: NoExecute only")
        return self


# Label and annotation key domains that belong to the platform: sdray's own (the NetworkPolicy selects a job's
# pods by sdray.io/job), KubeRay's, Kubernetes' (app.kubernetes.io/* selects the service's pods), Kueue's and the
# other x-k8s.io projects' (queue names, pod groups) and Volcano's. A job document may not set them on its pods.
RESERVED_KEY_DOMAINS = ("sdray.io", "ray.io", "kubernetes.io", "k8s.io", "x-k8s.io", "volcano.sh")
# Where sdray mounts what the run needs (the job document, credentials, Ray's shared memory): no volume of a
# document may cover them, or the driver would read a document the tenant policy never checked.
RESERVED_MOUNTS = ("/etc/sdray", "/var/run/secrets/sdray", "/dev/shm")
_EXTENDED_RESOURCE = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/"
                                r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?")


def reserved_key(key: str) -> bool:
    """Whether a label or annotation key lies in a domain of ``RESERVED_KEY_DOMAINS`` (or a subdomain of one)."""
    prefix, slash, _ = key.rpartition("/")
    return bool(slash) and any(prefix == d or prefix.endswith("." + d) for d in RESERVED_KEY_DOMAINS)


def _extended_resource(name: str) -> str:
    """A Kubernetes extended resource name (a device plugin's: nvidia.com/gpu, amd.com/gpu, habana.ai/gaudi):
    fully qualified, outside the kubernetes.io domain."""
    if len(name) > 253 or not _EXTENDED_RESOURCE.fullmatch(name):
        raise ValueError("expected an extended resource name such as nvidia.com/gpu, amd.com/gpu or habana.ai/gaudi "
                         "(a DNS domain, '/', a name)")
    domain = name.split("/", 1)[0]
    if domain == "kubernetes.io" or domain.endswith(".kubernetes.io") or domain.startswith("requests."):
        raise ValueError(f"{name!r} is not an extended resource (the kubernetes.io domain is Kubernetes' own)")
    return name


ExtendedResource = Annotated[str, AfterValidator(_extended_resource)]


def _mount_path(path: str) -> str:
    if not path.startswith("/") or posixpath.normpath(path) != path or path == "/":
        raise ValueError("expected an absolute, normalised path below / (no '.', '..', '//' or trailing '/')")
    for reserved in RESERVED_MOUNTS:
        if path == reserved or path.startswith(reserved + "/") or reserved.startswith(path + "/"):
            raise ValueError(f"{path} would cover {reserved}, where sdray mounts what the run needs "
                             f"(reserved: {', '.join(RESERVED_MOUNTS)})")
    return path


class ClusterVolume(_Strict):
    """An existing PersistentVolumeClaim or ConfigMap of the job's namespace, mounted into the Ray head and
    worker containers (a dataset, a shared model cache). Nothing else: a job document never names a hostPath
    or any other volume source."""

    name: str = Field(pattern=DNS_LABEL, max_length=48, description="Name of the volume within the pods.")
    mount_path: Annotated[str, AfterValidator(_mount_path)] = Field(
        max_length=1024, description="Absolute path in the Ray containers.")
    persistent_volume_claim: str | None = Field(
        default=None, pattern=DNS_SUBDOMAIN, max_length=253, description="Name of a PersistentVolumeClaim.")
    config_map: str | None = Field(
        default=None, pattern=DNS_SUBDOMAIN, max_length=253, description="Name of a ConfigMap (always read-only).")
    read_only: bool = Field(default=True, description="Mount read-only (default); false to write to a claim.")

    @model_validator(mode="before")
    @classmethod
    def _no_host_path(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key in ("host_path", "hostPath"):
                if key in data:
                    raise ValueError(f"{key}: hostPath volumes are never allowed in a job document (they reach the "
                                     "node's own files); mount a persistent_volume_claim instead")
        return data

    @model_validator(mode="after")
    def _one_source(self) -> ClusterVolume:
        if (self.persistent_volume_claim is None) == (self.config_map is None):
            raise ValueError("give exactly one of persistent_volume_claim and config_map")
        if self.config_map is not None and not self.read_only:
            raise ValueError("read_only: a ConfigMap is always mounted read-only")
        return self


class NodeSelectorRequirement(_Strict):
    key: LabelKey = Field(description="Node label key.")
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist", "Gt", "Lt"]
    values: list[LabelValue] = Field(
        default_factory=list, max_length=64, description="In/NotIn: one or more; Gt/Lt: one integer; else none.")

    @model_validator(mode="after")
    def _values_fit(self) -> NodeSelectorRequirement:
        if self.operator in ("In", "NotIn") and not self.values:
            raise ValueError(f"operator {self.operator} needs values")
        if self.operator in ("Exists", "DoesNotExist") and self.values:
            raise ValueError(f"operator {self.operator} takes no values")
        if self.operator in ("Gt", "Lt") and (len(self.values) != 1 or not re.fullmatch(r"-?[0-9]+", self.values[0])):
            raise ValueError(f"operator {self.operator} takes exactly one integer value")
        return self


class NodeSelectorTerm(_Strict):
    match_expressions: list[NodeSelectorRequirement] = Field(
        min_length=1, max_length=32, description="Node label requirements, all of which must hold.")


class PreferredSchedulingTerm(NodeSelectorTerm):
    weight: int = Field(ge=1, le=100, description="Weight of this preference (1-100).")


class NodeAffinity(_Strict):
    """Which nodes the Ray head and workers may (required) or would rather (preferred) run on; added to the
    platform's own affinity, which still holds."""

    required: list[NodeSelectorTerm] = Field(
        default_factory=list, max_length=16, description="Terms of which at least one must hold.")
    preferred: list[PreferredSchedulingTerm] = Field(default_factory=list, max_length=16)


class PodResources(_Strict):
    cpu: Quantity | None = Field(default=None, description="CPU request and limit of the pod (8, 500m).")
    memory: Quantity | None = Field(default=None, description="Memory request and limit of the pod (32Gi).")


class WorkerPodResources(PodResources):
    gpu: int | None = Field(
        default=None, ge=0, le=128, description="GPUs (cluster.accelerator_resource) of each worker pod; default: the "
        "GPUs its Ray Train workers take (spec.distributed.use_gpu / resources_per_worker.GPU).")


class ClusterSpec(_Strict):
    """How the job runs on Kubernetes (a KubeRay RayJob); ignored by `sdray train` on a machine."""

    image: str | None = Field(
        default=None, description="Container image of the Ray pods; default: the controller's --image.")
    queue: str | None = Field(
        default=None, pattern=DNS_SUBDOMAIN, max_length=253,
        description="Kueue LocalQueue: the RayJob is created suspended and Kueue admits it whole (gang admission).")
    priority_class: str | None = Field(
        default=None, pattern=DNS_SUBDOMAIN, max_length=253, description="PriorityClass of the Ray pods.")
    service_account: str | None = Field(
        default=None, pattern=DNS_SUBDOMAIN, max_length=253,
        description="ServiceAccount of the Ray pods (e.g. one bound to an S3 role; sdray grants it nothing). "
        "Only the accounts the controller's --allow-service-account (and the service's tenant policy) list are "
        "accepted. Default: the controller's --job-service-account, else one made for the job, "
        "sdray-job-<name>, that may only patch this job's status.")
    node_selector: dict[LabelKey, LabelValue] = Field(
        default_factory=dict, description="Node labels the Ray pods need.")
    tolerations: list[Toleration] = Field(default_factory=list)
    head: PodResources = Field(
        default_factory=PodResources, description="Ray head pod (runs the driver and Ray Data); default 2 CPUs, 8Gi.")
    worker: WorkerPodResources = Field(
        default_factory=WorkerPodResources,
        description="Each worker pod; default: the CPUs its Ray Train workers take plus one for Ray Data, "
        "8Gi per Ray Train worker (32Gi with GPUs).")
    workers_per_pod: int = Field(
        default=1, ge=1, le=1024, description="Ray Train workers per worker pod (8 for one pod per 8-GPU node); must "
        "divide the job's Ray Train workers.")
    env_secrets: list[Annotated[str, Field(pattern=DNS_SUBDOMAIN, max_length=253)]] = Field(
        default_factory=list,
        description="Secrets whose keys become environment variables of the Ray containers (envFrom), e.g. "
        "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY for a document that names no credentials_secret.")
    env: dict[Annotated[str, Field(pattern=ENV_NAME)], str] = Field(
        default_factory=dict, description="Plain environment variables of the Ray containers (no credentials).")
    pod_labels: dict[LabelKey, LabelValue] = Field(
        default_factory=dict, max_length=64,
        description="Labels of the Ray pods, beside the platform's (keys of sdray.io, ray.io, kubernetes.io, k8s.io, "
        "x-k8s.io and volcano.sh are the platform's own).")
    pod_annotations: dict[LabelKey, Annotated[str, Field(max_length=4096)]] = Field(
        default_factory=dict, max_length=64,
        description="Annotations of the Ray pods, beside the platform's (same reserved domains as pod_labels).")
    node_affinity: NodeAffinity | None = Field(
        default=None, description="Node affinity of the Ray head and workers, added to the platform's.")
    volumes: list[ClusterVolume] = Field(
        default_factory=list, max_length=16,
        description="PersistentVolumeClaims and ConfigMaps of the job's namespace mounted into the Ray head and workers.")
    accelerator_resource: ExtendedResource | None = Field(
        default=None, description="Resource the worker pods ask their GPUs as (amd.com/gpu …); default: the "
        "platform's (nvidia.com/gpu unless the controller is told otherwise).")
    scheduler_name: str | None = Field(
        default=None, pattern=DNS_SUBDOMAIN, max_length=253,
        description="Kubernetes scheduler of the Ray pods (volcano …); default: the platform's.")
    ttl_seconds_after_finished: int = Field(
        default=600, ge=0, le=_INT32, description="Seconds the finished RayJob (and its cluster's logs) are kept.")
    active_deadline_seconds: int | None = Field(
        default=None, gt=0, le=_INT32, description="The job fails once it has run this long.")
    backoff_limit: int = Field(
        default=0, ge=0, le=100,
        description="Retries of the whole RayJob on a fresh cluster (it resumes from the latest "
        "checkpoint with checkpoint.resume: auto).")

    @model_validator(mode="after")
    def _volumes_apart(self) -> ClusterSpec:
        for attr in ("name", "mount_path"):
            seen = [getattr(v, attr) for v in self.volumes]
            twice = sorted({x for x in seen if seen.count(x) > 1})
            if twice:
                raise ValueError(f"spec.cluster.volumes: {attr} {twice[0]!r} is given twice")
        return self

    @field_validator("env")
    @classmethod
    def _no_credentials(cls, env: dict[str, str]) -> dict[str, str]:
        leaked = [k for k in env if k in _CREDENTIAL_ENV]
        if leaked:
            raise ValueError(f"{leaked[0]} is a credential: put it in a Secret and name it in env_secrets")
        return env


class JobSpec(_Strict):
    # "unet", the denoiser stage's earlier name, stays in the type so that the CRD admits documents written
    # with it; the validator below reads it as "denoiser", so code never sees it.
    stage: Literal["denoiser", "autoencoder", "unet"] = Field(
        default="denoiser",
        description="What trains: denoiser (the family's UNet or transformer; unet, its earlier name, is read as "
        "denoiser) or autoencoder (the family's VAE shape).",
    )
    model: ModelSpec
    data: DataSpec
    train: TrainSpec = Field(default_factory=TrainSpec)
    distributed: DistributedSpec = Field(default_factory=DistributedSpec)
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    validation: ValidationSpec = Field(default_factory=ValidationSpec)
    output: OutputSpec
    storage: StorageSettings = Field(
        default_factory=StorageSettings,
        description="S3 settings for every s3:// URI of the job (model, checkpoints, output); data's own win for data.",
    )
    tune: TuneSpec | None = Field(
        default=None, description="Hyperparameter search: `sdray tune` runs one Ray Train run per trial."
    )
    cluster: ClusterSpec = Field(
        default_factory=ClusterSpec, description="Kubernetes settings: image, Kueue queue, pod resources, placement."
    )
    tracking: TrackingSpec = Field(
        default_factory=TrackingSpec, description="Experiment tracking: MLflow, TensorBoard, Weights & Biases.")

    @field_validator("stage", mode="before")
    @classmethod
    def _unet_is_the_denoiser(cls, stage: Any) -> Any:
        return "denoiser" if stage == "unet" else stage

    @model_validator(mode="after")
    def _fields_of_the_other_stage(self) -> JobSpec:
        """Refuse settings the chosen stage would silently ignore."""
        unet_only = {
            "spec.model.prediction_type": "prediction_type" in self.model.model_fields_set,
            "spec.model.rescale_betas_zero_snr": self.model.rescale_betas_zero_snr,
            "spec.train.caption_dropout": "caption_dropout" in self.train.model_fields_set,
            "spec.train.snr_gamma": self.train.snr_gamma is not None,
            "spec.train.noise_offset": self.train.noise_offset > 0,
            "spec.train.input_perturbation": self.train.input_perturbation > 0,
            "spec.train.train_text_encoder": self.train.train_text_encoder,
            "spec.model.lora": self.model.lora is not None,
            "spec.validation.prompts": bool(self.validation.prompts),
            "spec.data.format: latents": self.data.format == "latents",
        }
        if self.stage == "autoencoder":
            used = [name for name, set_ in unet_only.items() if set_]
            if used:
                raise ValueError(f"{used[0]} applies to stage: denoiser only (this job has stage: autoencoder)")
        elif "kl_weight" in self.train.model_fields_set:
            raise ValueError("spec.train.kl_weight applies to stage: autoencoder only (this job has stage: denoiser)")
        if self.train.train_text_encoder and self.data.format == "latents":
            raise ValueError("spec.train.train_text_encoder: a latent cache holds fixed prompt embeddings; train "
                             "the text encoder on the images (format: imagefolder, webdataset or parquet)")
        return self

    @model_validator(mode="after")
    def _fits_the_strategy(self) -> JobSpec:
        if self.distributed.strategy != "fsdp":
            return self
        if self.train.mixed_precision == "fp16":
            raise ValueError("spec.train.mixed_precision: fp16 needs a sharded loss scaler; use bf16 with strategy: fsdp")
        # Adapters and a trained text encoder have only been run replicated (DDP); sharding them is untested.
        if self.model.lora is not None:
            raise ValueError("spec.model.lora is not available with strategy: fsdp (adapters are small: use ddp)")
        if self.train.train_text_encoder:
            raise ValueError("spec.train.train_text_encoder is not available with strategy: fsdp; use ddp")
        return self

    @model_validator(mode="after")
    def _what_deepspeed_does_not_take(self) -> JobSpec:
        if self.distributed.strategy != "deepspeed":
            return self
        if self.train.compile:
            raise ValueError("spec.train.compile is not supported with strategy: deepspeed (the engine's hooks are "
                             "not compiled here); set compile: false or use ddp or fsdp")
        # Adapters and a trained text encoder have only been run replicated (DDP) so far.
        if self.model.lora is not None:
            raise ValueError("spec.model.lora is not available with strategy: deepspeed (adapters are small: use ddp)")
        if self.train.train_text_encoder:
            raise ValueError("spec.train.train_text_encoder is not available with strategy: deepspeed; use ddp")
        stage = (self.distributed.deepspeed or DeepSpeedSpec()).zero_stage
        if self.train.ema is not None and stage == 3:
            raise ValueError("spec.train.ema: ZeRO-3 partitions the weights an EMA would average; use zero_stage 1 "
                             "or 2 for an EMA, or drop train.ema")
        return self

    @model_validator(mode="after")
    def _search_space_fits_the_spec(self) -> JobSpec:
        if self.tune is None:
            return self
        errors = tune_space_errors(self)
        if errors:
            raise ValueError("\n".join(errors))  # one line per problem (see _format_errors)
        return self

    @model_validator(mode="after")
    def _fits_the_cluster(self) -> JobSpec:
        cluster, per_pod = self.cluster, self.cluster.workers_per_pod
        if self.ray_train_workers % per_pod:
            raise ValueError(f"spec.cluster.workers_per_pod ({per_pod}) must divide the job's Ray Train workers "
                             f"({self.ray_train_workers}: distributed.num_workers × tune.max_concurrent_trials)")
        gpus = self.distributed.gpus_per_worker * per_pod
        if cluster.worker.gpu is not None:
            if cluster.worker.gpu and not self.distributed.use_gpu:
                raise ValueError("spec.cluster.worker.gpu: the workers use no GPU (spec.distributed.use_gpu is false)")
            if cluster.worker.gpu < gpus:
                raise ValueError(f"spec.cluster.worker.gpu ({cluster.worker.gpu}) is less than the {gpus:g} GPUs "
                                 "the pod's Ray Train workers take")
        cpus = self.distributed.cpus_per_worker * per_pod
        if cluster.worker.cpu is not None and quantity_value(str(cluster.worker.cpu)) < cpus:
            raise ValueError(f"spec.cluster.worker.cpu ({cluster.worker.cpu}) is less than the {cpus:g} CPUs the "
                             "pod's Ray Train workers take (distributed.resources_per_worker.CPU × workers_per_pod)")
        return self

    @property
    def ray_train_workers(self) -> int:
        """Ray Train workers running at once: one search's trials run side by side."""
        trials = self.tune.max_concurrent_trials if self.tune is not None else None
        return self.distributed.num_workers * (trials or 1)

    @property
    def data_s3(self) -> S3Settings:
        """The data section's S3 settings, with unset fields taken from spec.storage."""
        own = {k: getattr(self.data, k) for k in S3Settings.model_fields if getattr(self.data, k) is not None}
        return self.storage.model_copy(update=own)

    @property
    def checkpoint_uri(self) -> str:
        return self.checkpoint.uri or self.output.uri.rstrip("/") + "/checkpoints"


def _field_at(model: type[BaseModel], path: list[str]):
    """The pydantic FieldInfo at a dotted path under ``model`` (None if there is none)."""
    info = None
    for i, part in enumerate(path):
        if model is None or part not in model.model_fields:
            return None
        info = model.model_fields[part]
        if i < len(path) - 1:
            nested = [a for a in typing.get_args(info.annotation) or (info.annotation,)
                      if isinstance(a, type) and issubclass(a, BaseModel)]
            model = nested[0] if nested else None
    return info


def _set_path(doc: dict, path: list[str], value: Any) -> None:
    for part in path[:-1]:
        doc = doc.setdefault(part, {})
    doc[path[-1]] = value


_NOT_TUNABLE = ("tune", "output", "checkpoint", "storage", "cluster")


def tune_space_errors(spec: JobSpec) -> list[str]:
    """Every problem of ``spec.tune``: paths that are not spec fields, distributions of the wrong type, values
    the field refuses, and scheduler settings that do not fit the job."""
    tune = spec.tune
    errors = []
    base = spec.model_dump(exclude={"tune"}, exclude_unset=True)
    for key, dist in tune.search_space.items():
        where = f"spec.tune.search_space.{_clip(key, 100)}"
        path = key.split(".")
        info = _field_at(JobSpec, path)
        # cluster: the pods are made once for the whole search, so its values could not differ between trials.
        if info is None or path[0] in _NOT_TUNABLE or isinstance(info.annotation, type) \
                and issubclass(info.annotation, BaseModel):
            errors.append(f"{where}: not a tunable field of the job spec (give a dotted path such as "
                          "train.learning_rate or train.batch_size)")
            continue
        numeric = {int, float} & {info.annotation, *typing.get_args(info.annotation)}
        if dist.kind in ("loguniform", "uniform") and not numeric:
            errors.append(f"{where}: {dist.kind} needs a numeric field; use choice or grid")
            continue
        if dist.kind in ("loguniform", "uniform") and numeric == {int}:
            errors.append(f"{where}: an integer field takes choice or grid, not {dist.kind}")
            continue
        for value in dist.candidates():
            trial = json.loads(json.dumps(base))
            _set_path(trial, path, value)
            try:
                JobSpec.model_validate(trial)
            except ValidationError as exc:
                first = _format_errors(exc)[0]
                errors.append(f"{where}: the value {_clip(repr(value), _MAX_SHOWN)} is refused: {first}")
                break
    sched = tune.scheduler
    every = spec.checkpoint.every_n_steps
    for name, value in (("grace_period", sched.grace_period), ("perturbation_interval", sched.perturbation_interval)):
        if value is not None and value % every:
            errors.append(f"spec.tune.scheduler.{name}: trials report at every checkpoint, so it must be a multiple "
                          f"of checkpoint.every_n_steps ({every}), got {value}")
    if sched.name == "pbt" and any(d.kind == "grid" for d in tune.search_space.values()):
        errors.append("spec.tune.search_space: pbt perturbs values and cannot run a grid; use choice or a range")
    if tune.search_alg == "optuna" and any(d.kind == "grid" for d in tune.search_space.values()):
        errors.append("spec.tune.search_space: search_alg optuna samples its own points; grid needs search_alg random")
    if tune.metric == "val_loss" and spec.data.validation_fraction == 0:
        errors.append("spec.tune.metric: val_loss needs a held-out split: set spec.data.validation_fraction > 0")
    if tune.metric in ("val_loss", "loss") and tune.mode != "min":
        errors.append(f"spec.tune.mode: {tune.metric} is minimised: use mode: min")
    return errors


class DiffusionJob(_Strict):
    apiVersion: Literal["sdray.io/v1alpha1"]
    kind: Literal["DiffusionJob"]
    metadata: Metadata
    spec: JobSpec


_MAX_SHOWN = 200  # characters of an input echoed in an error
_MAX_ERROR_LINES = 50


def _clip(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters: errors never echo a huge input back."""
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _format_errors(exc: ValidationError) -> list[str]:
    lines = []
    for err in exc.errors():
        path = ".".join(_clip(str(p), 100) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field (not part of the DiffusionJob schema)"
        elif err["type"] == "missing":
            msg = "required field is missing"
        got = err.get("input")
        shown = ("" if err["type"] in ("missing", "extra_forbidden") or isinstance(got, dict)
                 else f" (got {_clip(repr(got), _MAX_SHOWN)})")
        for part in msg.split("\n"):
            # A validator that names the full field path itself needs no second prefix.
            line = part + shown if part.startswith("spec.") else f"{path or '<document>'}: {part}{shown}"
            lines.append(_clip(line, 1000))
    if len(lines) > _MAX_ERROR_LINES:
        lines[_MAX_ERROR_LINES:] = [f"… and {len(lines) - _MAX_ERROR_LINES} more errors"]
    return lines


def _integral_floats_as_ints(value: Any) -> Any:
    """JSON Schema's integers include 8.0; pydantic's strict ints do not."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _integral_floats_as_ints(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_integral_floats_as_ints(v) for v in value]
    return value


def parse_job(doc: Any, source: str | None = None, *, strict: bool = False) -> DiffusionJob:
    """Validate a parsed document; raise ``SpecError`` naming every bad field. ``strict``: each value has its
    field's JSON type, as the JSON Schema says (no "8" for 8; 8.0 is an integer), for a JSON body; YAML stays
    lax, since YAML 1.1 reads ``1e-4`` as a string."""
    if not isinstance(doc, dict):
        raise SpecError([f"<document>: expected a mapping with apiVersion, kind, metadata, spec; got {type(doc).__name__}"], source)
    try:
        if strict:  # a check only: the job is built from the document as sent (an override's 1.0 stays a float)
            DiffusionJob.model_validate_json(json.dumps(_integral_floats_as_ints(doc)), strict=True)
        return DiffusionJob.model_validate(doc)
    except ValidationError as exc:
        raise SpecError(_format_errors(exc), source) from None


class _Refused(ValueError):
    """A document text refused before it is built; the message is the one line its SpecError holds."""


_ANCHORS = "YAML anchors and aliases (&name / *name) are not accepted in a job document"
_JSON_ONLY_TAGS = ("binary", "timestamp", "set", "omap", "pairs")  # YAML types JSON has no value for
_TOO_DEEP = f"the document nests deeper than {MAX_DOCUMENT_DEPTH} levels"
_TOO_MANY = f"the document holds more than {MAX_DOCUMENT_NODES} values"

try:  # libyaml parses; the composer below is Python, so that it sees every node before it is built
    from yaml import CSafeLoader as _FastLoader

    _LOADER_BASES: tuple[type, ...] = (Composer, _FastLoader)
except ImportError:  # PyYAML without libyaml: the pure-Python loader, which has this composer already
    _LOADER_BASES = (yaml.SafeLoader,)


class _DocumentLoader(*_LOADER_BASES):
    """A safe YAML loader for job documents: JSON's values only, without anchors, aliases or duplicate keys,
    at most MAX_DOCUMENT_DEPTH levels and MAX_DOCUMENT_NODES nodes. An alias repeats a subtree without
    repeating its text, so 567 bytes of aliases expand to millions of values: they are refused, not counted.
    """

    def __init__(self, stream):
        _LOADER_BASES[-1].__init__(self, stream)
        Composer.__init__(self)
        self._depth = 0
        self._nodes = 0

    def compose_node(self, parent, index):
        event = self.peek_event()
        line = event.start_mark.line + 1
        if isinstance(event, AliasEvent) or event.anchor is not None:
            raise _Refused(f"{_ANCHORS} (line {line})")
        self._nodes += 1
        if self._nodes > MAX_DOCUMENT_NODES:
            raise _Refused(f"{_TOO_MANY} (line {line})")
        if self._depth >= MAX_DOCUMENT_DEPTH:
            raise _Refused(f"{_TOO_DEEP} (line {line})")
        self._depth += 1
        try:
            return Composer.compose_node(self, parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):
        if not isinstance(node, MappingNode):
            return super().construct_mapping(node, deep=deep)  # (raises the loader's own error)
        self.flatten_mapping(node)
        mapping = {}
        for key_node, value_node in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, Hashable):
                raise _Refused(f"a mapping key must be a plain value, not a {type(key).__name__} "
                               f"(line {key_node.start_mark.line + 1})")
            if key in mapping:
                raise _Refused(f"duplicate key {_clip(repr(key), 100)} at line {key_node.start_mark.line + 1}")
            mapping[key] = self.construct_object(value_node, deep=deep)
        return mapping

    def _json_only(self, node):
        tag = node.tag.replace("tag:yaml.org,2002:", "!!")
        raise _Refused(f"YAML tag {tag} is not accepted in a job document: it holds JSON values only "
                       f"(line {node.start_mark.line + 1})")


for _tag in _JSON_ONLY_TAGS:
    _DocumentLoader.add_constructor(f"tag:yaml.org,2002:{_tag}", _DocumentLoader._json_only)
# An unquoted date stays a string, as in JSON (YAML 1.1 would make it a datetime.date).
_DocumentLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.resolver.Resolver.yaml_implicit_resolvers.items()}


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """One line saying what is wrong with a YAML text, and where."""
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem:
        mark = exc.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        return f"{exc.context + ': ' if exc.context else ''}{exc.problem}{where}"
    return str(exc).splitlines()[0]


_JSON_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|[{}\[\]:]')


def _json_duplicate_key(text: str) -> str:
    """The first key repeated within one object of a valid JSON text, and its line (reading it once more:
    the C decoder that found a repeat does not say where)."""
    tokens = list(_JSON_TOKEN.finditer(text))
    objects: list[set | None] = []  # the keys seen in each open object (None for an open array)
    for i, token in enumerate(tokens):
        kind = token.group()
        if kind in "{[":
            objects.append(set() if kind == "{" else None)
        elif kind in "}]":
            objects.pop()
        elif kind.startswith('"') and i + 1 < len(tokens) and tokens[i + 1].group() == ":":
            key = json.loads(kind)
            if key in objects[-1]:
                line = text.count("\n", 0, token.start()) + 1
                return f"duplicate key {_clip(repr(key), 100)} at line {line}"
            objects[-1].add(key)
    return "duplicate key"


class _RepeatedKey(Exception):
    """json.loads met a key twice in one object (which, and where: ``_json_duplicate_key``)."""


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict:
    doc = dict(pairs)
    if len(doc) != len(pairs):
        raise _RepeatedKey
    return doc


def _no_constant(name: str) -> Any:
    raise _Refused(f"not valid JSON: {name} is not a number JSON allows")


def _parse_json(text: str) -> Any:
    try:
        doc = json.loads(text, object_pairs_hook=_no_duplicate_keys, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        raise _Refused(f"not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}") from None
    except RecursionError:
        raise _Refused(_TOO_DEEP) from None
    except _RepeatedKey:
        raise _Refused(_json_duplicate_key(text)) from None
    nodes, stack = 0, [(doc, 1)]
    while stack:
        value, depth = stack.pop()
        nodes += 1 + (len(value) if isinstance(value, dict) else 0)  # keys count, as in YAML
        if nodes > MAX_DOCUMENT_NODES:
            raise _Refused(_TOO_MANY)
        if depth > MAX_DOCUMENT_DEPTH:
            raise _Refused(_TOO_DEEP)
        if isinstance(value, (dict, list)):
            stack.extend((sub, depth + 1) for sub in (value.values() if isinstance(value, dict) else value))
    return doc


def parse_document_text(text: str, fmt: Literal["yaml", "json"], source: str) -> Any:
    """The value a job document's text holds, for ``parse_job``; every entry point parses through here.

    Refused with a one-line ``SpecError``: a text over MAX_DOCUMENT_BYTES, invalid YAML or JSON, YAML
    anchors and aliases, duplicate keys, nesting deeper than MAX_DOCUMENT_DEPTH and more than
    MAX_DOCUMENT_NODES values. YAML yields JSON's values only: an unquoted date stays a string and tags
    such as !!binary or !!set are refused."""
    try:
        if len(text) > MAX_DOCUMENT_BYTES or len(text.encode("utf-8", "surrogatepass")) > MAX_DOCUMENT_BYTES:
            raise _Refused(f"the document is larger than {MAX_DOCUMENT_BYTES} bytes (1 MiB)")
        if fmt == "json":
            return _parse_json(text)
        try:
            return yaml.load(text, Loader=_DocumentLoader)
        except yaml.YAMLError as exc:
            raise _Refused(f"not valid YAML: {_yaml_problem(exc)}") from None
    except _Refused as exc:
        raise SpecError([_clip(str(exc), 1000)], source) from None


def load_job(path: str | Path) -> DiffusionJob:
    """Read a YAML or JSON (``.json``) job document from a file."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_DOCUMENT_BYTES + 1)  # a larger file is refused without reading it all
    except OSError as exc:
        raise SpecError([f"cannot read the job document: {exc.strerror}"], str(path)) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        if len(raw) <= MAX_DOCUMENT_BYTES:
            raise SpecError([f"not UTF-8 text (byte {exc.start})"], str(path)) from None
        text = raw.decode("utf-8", "replace")  # too large either way: parse_document_text says so
    doc = parse_document_text(text, "json" if path.suffix == ".json" else "yaml", str(path))
    return parse_job(doc, str(path))


def json_schema() -> dict[str, Any]:
    """JSON Schema of the job document (the single source of truth for the CRD and the API)."""
    return DiffusionJob.model_json_schema()
