"""The job document's rules beyond its fields' own types, for the REST API's OpenAPI document.

``sdray.spec`` checks a DiffusionJob with pydantic; its JSON Schema (``spec.json_schema``, also the CRD's source)
holds each field's own type and bounds. ``job_schema`` adds what the validators check that JSON Schema states
as plain value constraints (the model's source, multiples of 8, label keys, quantities, maps' keys), and
describes the rest: the rules between fields (``UNEXPRESSED``), which the service answers with 422. Those
are described rather than written as if/then: property-based generators (schemathesis's among them) cannot
draw documents from such schemas, and the description is what a reader needs.

The CRD keeps the plain schema: the controller runs the same pydantic checks.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from sdray.spec import PRESETS, json_schema

# A label (or annotation) key as the API server takes it: an optional DNS-1123 subdomain prefix and '/', then
# a name of at most 63 of [A-Za-z0-9._-] that starts and ends with a letter or digit (spec._qualified_name).
QUALIFIED_NAME = (r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
                  r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
QUANTITY = r"^\+?([0-9]+(\.[0-9]*)?|\.[0-9]+)([KMGTPE]i|[numkMGTPE]|[eE][-+]?[0-9]+)?$"  # spec._QUANTITY


@dataclass(frozen=True)
class Rule:
    """A rule the job model checks and JSON Schema cannot express: the field it names, what it asks, and a
    phrase of the error line the service answers with (422) when a document breaks it."""

    field: str
    text: str
    phrase: str


def _rule(field: str, text: str, *phrases: str) -> tuple[Rule, ...]:
    return tuple(Rule(field, text, phrase) for phrase in phrases)


# Rules between fields. Several could be written in JSON Schema (if/then, not); they are described instead,
# because property-based generators (schemathesis's among them) cannot draw documents from such schemas.
UNEXPRESSED = (
    *_rule("spec.stage", "autoencoder refuses the denoiser's settings (model.prediction_type, "
           "rescale_betas_zero_snr, lora; train.caption_dropout, snr_gamma, noise_offset, input_perturbation, "
           "train_text_encoder; validation.prompts; data.format: latents); denoiser refuses train.kl_weight",
           "applies to stage: denoiser only", "applies to stage: autoencoder only"),
    *_rule("spec.model", "lora needs pretrained; rescale_betas_zero_snr needs prediction_type: v_prediction",
           "adapts pretrained weights", "at zero terminal SNR"),
    *_rule("spec.data", "resize does not apply with bucketing; format: latents takes no image_column, "
           "caption_column or crop: random, and no train.train_text_encoder",
           "does not apply with bucketing", "does not apply to format: latents", "holds center crops only",
           "holds fixed prompt embeddings"),
    *_rule("spec.data.bucketing", "min_size ≤ max_size; max_size ≥ step", "must not exceed max_size",
           "must be at least step"),
    *_rule("spec.distributed", "fsdp settings need strategy: fsdp, deepspeed settings strategy: deepspeed; "
           "fsdp.cpu_offload needs use_gpu; shard_group_size goes with sharding: hybrid and divides num_workers "
           "into two or more groups; deepspeed.offload_params needs zero_stage: 3",
           "applies to strategy: fsdp only", "applies to strategy: deepspeed only", "it needs use_gpu: true",
           "applies to sharding: hybrid only", "needs a group size that divides",
           "only partitioned parameters can be offloaded"),
    *_rule("spec.distributed.strategy", "fsdp refuses train.mixed_precision: fp16; fsdp and deepspeed refuse "
           "model.lora and train.train_text_encoder; deepspeed refuses train.compile, and train.ema with "
           "zero_stage: 3", "fp16 needs a sharded loss scaler", "is not available with strategy",
           "is not supported with strategy: deepspeed", "ZeRO-3 partitions the weights"),
    *_rule("spec.tune.search_space", "exactly one of loguniform, uniform, choice, grid; a range's low below its "
           "high (loguniform: above 0); each key a tunable field's dotted path whose field takes every value "
           "(uniform and loguniform on float fields only); no grid with scheduler pbt or search_alg optuna",
           "give exactly one of", "low must be below high", "low must be > 0", "spec.tune.search_space"),
    *_rule("spec.tune", "scheduler fields apply to their scheduler (grace_period, reduction_factor: asha; "
           "perturbation_interval, quantile_fraction, resample_probability: pbt) and grace_period and "
           "perturbation_interval are multiples of checkpoint.every_n_steps; metric val_loss needs "
           "data.validation_fraction > 0; loss and val_loss need mode: min",
           "applies to scheduler", "must be a multiple of checkpoint.every_n_steps",
           "needs a held-out split", "is minimised"),
    *_rule("spec.cluster", "workers_per_pod divides distributed.num_workers × tune.max_concurrent_trials; "
           "worker.gpu needs distributed.use_gpu and is at least the GPUs the pod's Ray Train workers take; "
           "worker.cpu at least their CPUs; env names no credential (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, "
           "AWS_SESSION_TOKEN)", "spec.cluster.workers_per_pod", "the workers use no GPU",
           "GPUs the pod's Ray Train workers take", "CPUs the pod's Ray Train workers take", "is a credential"),
    *_rule("spec.cluster.tolerations", "operator: Exists takes no value; operator: Equal needs a key; "
           "toleration_seconds needs effect: NoExecute", "must be empty with operator: Exists",
           "key is required with operator: Equal", "applies to effect: NoExecute only"),
    *_rule("spec.cluster (head, worker) cpu and memory", "a Kubernetes quantity below 2^63",
           "a Kubernetes quantity must be below 2^63"),
    *_rule("metadata.labels, spec.cluster.node_selector, spec.cluster.tolerations[].key",
           "a key's DNS-subdomain prefix is at most 253 characters", "the prefix before '/'"),
)


def describe() -> str:
    """The rules beyond the schema, one line each (the schema's description holds them)."""
    return "\n".join(dict.fromkeys(f"- {rule.field}: {rule.text}" for rule in UNEXPRESSED))


def _is(name: str, schema: dict) -> dict:
    """The property ``name`` present, with ``schema``."""
    return {"required": [name], "properties": {name: schema}}


def _rules() -> dict[str, list[dict]]:
    """Per $defs model: what its validators (sdray.spec) check that JSON Schema expresses as plain value
    constraints: the model's source, multiples of 8, betas, label keys, quantities."""
    beta = {"type": "number", "minimum": 0.0, "exclusiveMaximum": 1.0}
    return {
        "Metadata": [{"properties": {"labels": {"propertyNames": {"pattern": QUALIFIED_NAME}}}}],
        "ModelSpec": [
            {"anyOf": [_is("preset", {"enum": list(PRESETS)}), _is("pretrained", {"type": "string"})]},
            {"properties": {"resolution": {"anyOf": [{"type": "integer", "multipleOf": 8}, {"type": "null"}]}}},
        ],
        "BucketingSpec": [{"properties": {"step": {"multipleOf": 8}}}],
        "OptimizerSpec": [{"properties": {"betas": {"prefixItems": [beta, beta]}}}],
        "Toleration": [{"properties": {"key": {"anyOf": [{"type": "string", "pattern": QUALIFIED_NAME},
                                                         {"type": "null"}]}}}],
        "PodResources": [_quantities("cpu", "memory")],
        "WorkerPodResources": [_quantities("cpu", "memory")],
        "ClusterSpec": [{"properties": {"node_selector": {"propertyNames": {"pattern": QUALIFIED_NAME}}}}],
    }


def _quantities(*names: str) -> dict:
    """Kubernetes quantities: a non-negative int64, or a string in the quantity syntax."""
    value = {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 2**63 - 1},
                       {"type": "string", "pattern": QUANTITY}, {"type": "null"}]}
    return {"properties": {name: value for name in names}}


def _closed_maps(node: Any) -> None:
    """A map with patterned keys refuses every other key (pydantic writes ``patternProperties`` alone, which
    JSON Schema reads as 'any other key allowed'); say so with ``propertyNames``."""
    if isinstance(node, dict):
        patterns = node.get("patternProperties")
        if isinstance(patterns, dict) and len(patterns) == 1 and "additionalProperties" not in node:
            (pattern, value), = patterns.items()
            names = node.setdefault("propertyNames", {})
            names["pattern"] = pattern
            node["additionalProperties"] = value
            del node["patternProperties"]
        for sub in node.values():
            _closed_maps(sub)
    elif isinstance(node, list):
        for sub in node:
            _closed_maps(sub)


def job_schema() -> dict[str, Any]:
    """``spec.json_schema()`` with the cross-field rules: those JSON Schema expresses as ``allOf`` on each
    model, the rest (``UNEXPRESSED``) in the job's description."""
    schema = copy.deepcopy(json_schema())
    defs = schema["$defs"]
    for name, rules in _rules().items():
        defs[name].setdefault("allOf", []).extend(rules)
    _closed_maps(schema)
    schema["description"] = ("A DiffusionJob document. Beyond this schema the service checks these rules, and "
                             "answers 422 naming the field when one is broken:\n" + describe())
    return schema

