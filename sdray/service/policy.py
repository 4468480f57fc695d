"""The tenant policy: which cluster and host resources a tenant's job document may name.

A platform runs one cluster for many teams. Every field of a document that reaches the cluster or the
service's host (paths, endpoints, secrets, ServiceAccounts, images, priority classes, queues, environment,
placement, resources) is allowed only when the tenant's policy allows it; otherwise the submission is
refused with 403, naming the field and the rule that refused it. Admin tokens bypass the policy.

``sdray serve --policy policy.yaml``::

    default:                 # every tenant not listed under tenants
      namespace: null        # where its jobs run (kuberay backend); null: the service's --namespace
      local_paths: []        # absolute path prefixes its URIs may use (data, checkpoint, output, pretrained, resume)
      s3_prefixes: null      # s3:// prefixes its URIs may use; null: any (the job's credentials decide)
      hub_repos: []          # Hugging Face Hub repositories its hf:// sources may name: org/name, or org/* for an org
      endpoints: []          # S3 endpoints it may name (data.endpoint, storage.endpoint); []: the service's own
      secrets: []            # credentials_secret (data, storage, model.hub) and cluster.env_secrets names
      service_accounts: []   # cluster.service_account; []: the chart's job ServiceAccount only
      images: []             # cluster.image; []: the service's default image only
      priority_classes: []
      queues: []             # Kueue LocalQueues; []: the namespace's default queue
      env: []                # names of cluster.env variables
      tracking_uris: []      # MLflow servers tracking.mlflow.tracking_uri may name; []: the environment's only
      node_selectors: []     # "key=value" or "key=*" pairs of cluster.node_selector and cluster.node_affinity
      tolerations: []        # taint keys cluster.tolerations may name
      pod_labels: []         # keys of cluster.pod_labels: "team", "example.com/*" (a prefix), "*" (any)
      pod_annotations: []    # keys of cluster.pod_annotations, the same way
      volume_claims: []      # PersistentVolumeClaims cluster.volumes may mount: "name", or "name:ro" (read-only only)
      config_maps: []        # ConfigMaps cluster.volumes may mount (always read-only)
      scheduler_names: []    # cluster.scheduler_name; []: the platform's scheduler only
      accelerator_resources: []  # cluster.accelerator_resource; []: the platform's (nvidia.com/gpu) only
      resources: [CPU, GPU, memory]  # Ray resource names resources_per_worker may ask for
      max_workers: 8         # Ray Train workers of one job (× a search's concurrent trials)
    tenants:
      alice: {namespace: team-a, secrets: [team-a-s3], queues: [team-a], local_paths: [/data/team-a]}

Label and annotation keys of the platform's domains (``sdray.spec.RESERVED_KEY_DOMAINS``: sdray.io, ray.io,
kubernetes.io, k8s.io, x-k8s.io, volcano.sh) are refused whatever the lists say (rule ``reserved_keys``): a pod
labelled ``sdray.io/job: <another job>`` would pass that job's NetworkPolicy, and a ``kueue.x-k8s.io/…`` label
would move it to another queue. A job document cannot name a hostPath volume at all (the job model has none).

A tenant's own block overrides the default block field by field. Without ``--policy`` every tenant gets
the default block as above: nothing outside the service's own defaults.

Paths are compared after normalisation (``file://`` stripped, ``..`` and symbolic links resolved), so
``/data/team-a/../team-b`` is ``/data/team-b``. Hub repositories are compared without regard to case, as the
Hub names them; a bare ``org/name`` is a relative path here (it would be a local path wherever one exists
where the job runs): tenants write ``hf://org/name``. A search's ``search_space`` may not vary a field the policy
governs with values the policy refuses: every candidate value is checked like the document's own.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlparse

from pydantic import BaseModel, ConfigDict, Field

from sdray.config_files import load_model
from sdray.spec import DNS_SUBDOMAIN, RESERVED_KEY_DOMAINS, DiffusionJob, JobSpec, hub_source, reserved_key

TENANT_NAME = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS_LABEL = Annotated[str, Field(pattern=TENANT_NAME, max_length=63)]
DNS_NAME = Annotated[str, Field(pattern=DNS_SUBDOMAIN, max_length=253)]
HUB_PATTERN = Annotated[str, Field(pattern=r"^[A-Za-z0-9_][-A-Za-z0-9_.]*/([-A-Za-z0-9_.]*[A-Za-z0-9_]|\*)$",
                                   max_length=96)]
CLAIM_ENTRY = Annotated[str, Field(pattern=DNS_SUBDOMAIN.removesuffix("$") + r"(:ro)?$", max_length=256)]
KEY_ENTRY = Annotated[str, Field(pattern=r"^(\*|[A-Za-z0-9][-A-Za-z0-9_./]*(/\*)?)$", max_length=317)]


class PolicyError(ValueError):
    """The policy file cannot be used; the message names the file and the problem."""


class TenantPolicy(BaseModel):
    """What one tenant's jobs may name. Lists are allow-lists; an empty list allows nothing beyond the
    service's defaults."""

    model_config = ConfigDict(extra="forbid")

    namespace: DNS_LABEL | None = Field(
        default=None, description="Kubernetes namespace of the tenant's jobs (kuberay backend); default: the "
        "service's --namespace.")
    local_paths: list[str] = Field(
        default_factory=list, description="Absolute path prefixes that the job's local URIs may use.")
    s3_prefixes: list[str] | None = Field(
        default=None, description="s3:// prefixes that the job's URIs may use; null: any (access rests on the "
        "credentials the job gets).")
    hub_repos: list[HUB_PATTERN] = Field(
        default_factory=list, description="Hugging Face Hub repositories the job's hf:// sources may name: org/name, "
        "or org/* for every repository of an organisation; []: none.")
    endpoints: list[str] = Field(
        default_factory=list, description="S3 endpoint URLs the job may name; []: only the service's own default.")
    secrets: list[DNS_NAME] = Field(default_factory=list, description="credentials_secret / cluster.env_secrets names.")
    service_accounts: list[DNS_NAME] = Field(default_factory=list, description="cluster.service_account values.")
    images: list[str] = Field(default_factory=list, description="cluster.image values.")
    priority_classes: list[DNS_NAME] = Field(default_factory=list, description="cluster.priority_class values.")
    queues: list[DNS_NAME] = Field(default_factory=list, description="cluster.queue values (Kueue LocalQueues).")
    env: list[str] = Field(default_factory=list, description="Names of cluster.env variables the job may set.")
    tracking_uris: list[str] = Field(
        default_factory=list, description="MLflow tracking URIs tracking.mlflow.tracking_uri may name; []: only the "
        "environment's own (MLFLOW_TRACKING_URI): leave the field out.")
    node_selectors: list[str] = Field(
        default_factory=list, description="cluster.node_selector pairs as key=value, or key=* for any value.")
    tolerations: list[str] = Field(default_factory=list, description="Taint keys cluster.tolerations may tolerate.")
    pod_labels: list[KEY_ENTRY] = Field(
        default_factory=list, description="Keys of cluster.pod_labels: a key, prefix/* or *; the platform's "
        "domains are never allowed.")
    pod_annotations: list[KEY_ENTRY] = Field(
        default_factory=list, description="Keys of cluster.pod_annotations, as pod_labels.")
    volume_claims: list[CLAIM_ENTRY] = Field(
        default_factory=list, description="PersistentVolumeClaims cluster.volumes may mount: name, or name:ro for "
        "read-only mounts only.")
    config_maps: list[DNS_NAME] = Field(default_factory=list, description="ConfigMaps cluster.volumes may mount.")
    scheduler_names: list[DNS_NAME] = Field(default_factory=list, description="cluster.scheduler_name values.")
    accelerator_resources: list[str] = Field(
        default_factory=list, description="cluster.accelerator_resource values (amd.com/gpu …).")
    resources: list[str] = Field(
        default_factory=lambda: ["CPU", "GPU", "memory"],
        description="Ray resource names distributed.resources_per_worker may ask for.")
    max_workers: int | None = Field(
        default=8, ge=1, description="Ray Train workers of one job (a search: × its concurrent trials); null: no limit.")


class PolicyFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    default: TenantPolicy = Field(default_factory=TenantPolicy)
    tenants: dict[DNS_LABEL, TenantPolicy] = Field(default_factory=dict)


@dataclass(frozen=True)
class Refusal:
    """One field the policy refuses: where, by which rule, and why."""

    field: str
    rule: str
    message: str

    def as_dict(self) -> dict:
        return {"field": self.field, "rule": self.rule, "message": self.message}


class Policy:
    """The loaded policy file: ``for_tenant(name)`` and ``check(tenant, job)``."""

    def __init__(self, data: PolicyFile | None = None, source: str = "the built-in default policy"):
        self.data = data or PolicyFile()
        self.source = source

    @classmethod
    def load(cls, path: str | Path | None) -> Policy:
        if path is None:
            return cls()
        return cls(load_model(path, PolicyFile, PolicyError, "policy"), str(path))

    def for_tenant(self, tenant: str) -> TenantPolicy:
        own = self.data.tenants.get(tenant)
        if own is None:
            return self.data.default
        return self.data.default.model_copy(update={k: getattr(own, k) for k in own.model_fields_set})

    def rule_name(self, tenant: str, rule: str) -> str:
        """Where a rule lives in the file, for messages: ``tenants.alice.images`` or ``default.images``."""
        own = self.data.tenants.get(tenant)
        block = f"tenants.{tenant}" if own is not None and rule in own.model_fields_set else "default"
        return f"{block}.{rule}"

    def check(self, tenant: str, job: DiffusionJob) -> list[Refusal]:
        """Every field of ``job`` the tenant's policy refuses (empty: allowed)."""
        allowed = self.for_tenant(tenant)
        refusals = []
        for field, rule, value in _governed(job.spec, allowed):
            problem = _RULES[rule](allowed, value)
            if not problem:
                continue
            if rule == "reserved_keys":  # no list of the file allows these
                refusals.append(Refusal(field, rule, problem))
                continue
            rule = _LIST_OF.get(rule, lambda _: rule)(value)  # named for the list that would allow it
            refusals.append(Refusal(field, rule, f"{problem} (policy rule {self.rule_name(tenant, rule)}, "
                                                 f"from {self.source})"))
        if job.metadata.namespace is not None and job.metadata.namespace != allowed.namespace:
            refusals.append(Refusal("metadata.namespace", "namespace",
                                    f"tenant {tenant!r} runs its jobs in namespace {allowed.namespace or 'of the service'}; "
                                    f"leave metadata.namespace out (policy rule {self.rule_name(tenant, 'namespace')})"))
        if allowed.max_workers is not None and job.spec.ray_train_workers > allowed.max_workers:
            refusals.append(Refusal("spec.distributed.num_workers", "max_workers",
                                    f"the job runs {job.spec.ray_train_workers} Ray Train workers at once; at most "
                                    f"{allowed.max_workers} (policy rule {self.rule_name(tenant, 'max_workers')})"))
        return refusals


def policy_schema() -> dict:
    """The policy file's JSON Schema with every reference inlined (the helm chart's values.schema.json
    carries it under ``policy``, where no ``$defs`` of its own can be referred to)."""
    schema = PolicyFile.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node):
        if isinstance(node, dict):
            if "$ref" in node:
                return inline(defs[node["$ref"].rsplit("/", 1)[-1]])
            return {k: inline(v) for k, v in node.items()}
        if isinstance(node, list):
            return [inline(v) for v in node]
        return node
    return inline(schema)


# -- the fields the policy governs ----------------------------------------------------------------------

# (dotted path under spec, rule): each value found there is checked by the rule.
_URI_FIELDS = ("data.uri", "checkpoint.uri", "output.uri", "model.pretrained", "model.vae.pretrained",
               "model.tokenizer", "checkpoint.resume")
_FIELDS: list[tuple[str, str]] = [
    *((path, "uri") for path in _URI_FIELDS),
    ("data.endpoint", "endpoints"), ("storage.endpoint", "endpoints"),
    ("data.credentials_secret", "secrets"), ("storage.credentials_secret", "secrets"),
    ("model.hub.credentials_secret", "secrets"),
    ("cluster.env_secrets", "secrets"),
    ("cluster.service_account", "service_accounts"),
    ("cluster.image", "images"),
    ("cluster.priority_class", "priority_classes"),
    ("cluster.queue", "queues"),
    ("cluster.env", "env"),
    ("tracking.mlflow.tracking_uri", "tracking_uris"),
    ("cluster.node_selector", "node_selectors"),
    ("cluster.tolerations", "tolerations"),
    ("cluster.pod_labels", "reserved_keys"), ("cluster.pod_labels", "pod_labels"),
    ("cluster.pod_annotations", "reserved_keys"), ("cluster.pod_annotations", "pod_annotations"),
    ("cluster.volumes", "volume"),
    ("cluster.scheduler_name", "scheduler_names"),
    ("cluster.accelerator_resource", "accelerator_resources"),
    ("distributed.resources_per_worker", "resources"),
]
# Rules checked by one function but allowed by one of several lists: the list, from the value.
_LIST_OF: dict[str, Callable[[Any], str]] = {
    "uri": lambda value: "s3_prefixes" if str(value).startswith("s3://") else "hub_repos" if _is_hub(value)
    else "local_paths",
    "volume": lambda volume: "volume_claims" if volume.persistent_volume_claim is not None else "config_maps",
    "node_affinity": lambda _: "node_selectors",
}


def _value_at(spec: Any, path: str) -> Any:
    for part in path.split("."):
        if spec is None:
            return None
        spec = getattr(spec, part, None)
    return spec


def _items(value: Any) -> Iterator[tuple[str, Any]]:
    """A governed value as (suffix, item) pairs: a list or mapping is checked item by item."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield f".{key}", (key, item)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield f"[{i}]", item
    else:
        yield "", value


def _governed(spec: JobSpec, allowed: TenantPolicy) -> Iterator[tuple[str, str, Any]]:
    """(field, rule, value) for every governed value that is set, a search's candidate values included."""
    for path, rule in _FIELDS:
        value = _value_at(spec, path)
        if value is None or (path == "checkpoint.resume" and value in ("auto", "never")):
            continue
        for suffix, item in _items(value):
            yield f"spec.{path}{suffix}", rule, item
    affinity = spec.cluster.node_affinity
    for kind in ("required", "preferred") if affinity is not None else ():
        for i, term in enumerate(getattr(affinity, kind)):
            for j, requirement in enumerate(term.match_expressions):
                yield f"spec.cluster.node_affinity.{kind}[{i}].match_expressions[{j}]", "node_affinity", requirement
    if spec.tune is not None:
        governed = dict(_FIELDS)
        for key, dist in spec.tune.search_space.items():
            rule = governed.get(key)
            if rule is None:
                continue
            for value in dist.candidates():
                if key == "checkpoint.resume" and value in ("auto", "never"):
                    continue
                yield f"spec.tune.search_space.{key}", rule, value


# -- the rules: each returns None (allowed) or why not ------------------------------------------------------

Rule = Callable[[TenantPolicy, Any], "str | None"]


def _listed(what: str, attr: str, key: Callable[[Any], Any] = lambda value: value) -> Rule:
    """A rule that allows the values (``key`` of a mapping's item: its name) listed in the policy's ``attr``."""
    def rule(allowed: TenantPolicy, value: Any) -> str | None:
        if key(value) in getattr(allowed, attr):
            return None
        return f"{what} {key(value)!r} is not allowed for this tenant (allowed: {getattr(allowed, attr) or 'none'})"
    return rule


def normalise_local(uri: str) -> Path | None:
    """An absolute local path with ``..`` and symbolic links resolved, or None when ``uri`` is not one."""
    path = uri.removeprefix("file://")
    if not os.path.isabs(path):
        return None
    return Path(path).resolve(strict=False)


def _is_hub(value: Any) -> bool:
    """Whether a source is written hf:// (a malformed one is refused by the job model before)."""
    try:
        source = hub_source(str(value))
    except ValueError:
        return True
    return source is not None and source.explicit


def _hub_rule(allowed: TenantPolicy, uri: str) -> str | None:
    try:
        source = hub_source(uri)
    except ValueError as exc:
        return f"{uri!r}: {exc}"
    repo = source.repo.lower()
    for pattern in allowed.hub_repos:
        pattern = pattern.lower()
        if repo == pattern or (pattern.endswith("/*") and source.org.lower() == pattern[:-2]):
            return None
    return (f"Hugging Face Hub repository {source.repo!r} is not allowed for this tenant (allowed: "
            f"{allowed.hub_repos or 'none'})")


def _uri_rule(allowed: TenantPolicy, value: Any) -> str | None:
    uri = str(value)
    if _is_hub(uri):
        return _hub_rule(allowed, uri)
    scheme = urlparse(uri).scheme
    if scheme == "s3":
        if {".", ".."} & set(uri.removeprefix("s3://").split("/")):  # some clients resolve them: never compare
            return f"{uri!r}: '.' and '..' segments are not allowed in an s3:// URI"
        if allowed.s3_prefixes is None:
            return None
        if any(uri.rstrip("/") == p.rstrip("/") or uri.startswith(p.rstrip("/") + "/") for p in allowed.s3_prefixes):
            return None
        return f"{uri!r} is outside the s3:// prefixes this tenant may use ({allowed.s3_prefixes or 'none'})"
    if scheme not in ("", "file"):
        return f"{uri!r}: only local paths and s3:// URIs are allowed"
    path = normalise_local(uri)
    if path is None:
        hub = " or hf:// before a Hugging Face Hub repository" if hub_source(uri) is not None else ""
        return f"{uri!r}: give an absolute path{hub} (a relative one depends on where the job runs)"
    for prefix in allowed.local_paths:
        root = normalise_local(prefix)
        if root is not None and (path == root or path.is_relative_to(root)):
            return None
    return (f"{uri!r} (resolved: {path}) is outside the local paths this tenant may use "
            f"({allowed.local_paths or 'none'})")


def _endpoint_key(url: str) -> str:
    parsed = urlparse(url.strip())
    return f"{parsed.scheme.lower()}://{parsed.netloc.lower()}{parsed.path.rstrip('/')}"


def _endpoint_rule(allowed: TenantPolicy, value: Any) -> str | None:
    if _endpoint_key(str(value)) in {_endpoint_key(e) for e in allowed.endpoints}:
        return None
    shown = allowed.endpoints or "only the service's own default endpoint: leave the field out"
    return f"endpoint {value!r} is not allowed for this tenant (allowed: {shown}); the job's credentials would go there"


def _tracking_uri_rule(allowed: TenantPolicy, value: Any) -> str | None:
    if _endpoint_key(str(value)) in {_endpoint_key(u) for u in allowed.tracking_uris}:
        return None
    shown = allowed.tracking_uris or "only the environment's MLFLOW_TRACKING_URI: leave the field out"
    return (f"MLflow tracking URI {value!r} is not allowed for this tenant (allowed: {shown}); the run's parameters "
            "and metrics would go there")


def _node_selector_rule(allowed: TenantPolicy, value: Any) -> str | None:
    key, val = value
    if f"{key}={val}" in allowed.node_selectors or f"{key}=*" in allowed.node_selectors:
        return None
    return f"node selector {key}={val} is not allowed for this tenant (allowed: {allowed.node_selectors or 'none'})"


def _toleration_rule(allowed: TenantPolicy, value: Any) -> str | None:
    key = value.key
    if key is not None and key in allowed.tolerations:
        return None
    shown = repr(key) if key is not None else "every taint (no key)"
    return f"tolerating {shown} is not allowed for this tenant (allowed taint keys: {allowed.tolerations or 'none'})"


def _node_affinity_rule(allowed: TenantPolicy, value: Any) -> str | None:
    key, operator, values = value.key, value.operator, value.values
    if f"{key}=*" in allowed.node_selectors:
        return None
    if operator == "In" and all(f"{key}={v}" in allowed.node_selectors for v in values):
        return None
    shown = f"{key} {operator} {values}" if values else f"{key} {operator}"
    return (f"node affinity {shown} is not allowed for this tenant (allowed: {allowed.node_selectors or 'none'}; "
            "operators other than In need key=*)")


def _reserved_rule(allowed: TenantPolicy, value: Any) -> str | None:
    if reserved_key(value[0]):
        return (f"the key {value[0]!r} is reserved to the platform (keys under {', '.join(RESERVED_KEY_DOMAINS)} are "
                "sdray's, KubeRay's, Kubernetes' and the schedulers'; no policy allows them)")
    return None


def _keys_rule(what: str, attr: str) -> Rule:
    """Keys of a label or annotation map: listed, under a listed ``prefix/*``, or ``*``. Reserved keys are
    the reserved_keys rule's."""
    def rule(allowed: TenantPolicy, value: Any) -> str | None:
        key, entries = value[0], getattr(allowed, attr)
        if reserved_key(key) or "*" in entries or key in entries:
            return None
        if any(e.endswith("/*") and key.startswith(e[:-1]) for e in entries):
            return None
        return f"{what} key {key!r} is not allowed for this tenant (allowed: {entries or 'none'})"
    return rule


def _volume_rule(allowed: TenantPolicy, volume: Any) -> str | None:
    if volume.config_map is not None:
        return _listed("ConfigMap", "config_maps")(allowed, volume.config_map)
    claim = volume.persistent_volume_claim
    if claim in allowed.volume_claims or (volume.read_only and f"{claim}:ro" in allowed.volume_claims):
        return None
    if f"{claim}:ro" in allowed.volume_claims:
        return f"PersistentVolumeClaim {claim!r} may only be mounted read-only by this tenant (read_only: true)"
    return (f"PersistentVolumeClaim {claim!r} is not allowed for this tenant (allowed: "
            f"{allowed.volume_claims or 'none'})")


_RULES: dict[str, Rule] = {
    "uri": _uri_rule,
    "endpoints": _endpoint_rule,
    "tracking_uris": _tracking_uri_rule,
    "secrets": _listed("secret", "secrets"),
    "service_accounts": _listed("ServiceAccount", "service_accounts"),
    "images": _listed("image", "images"),
    "priority_classes": _listed("PriorityClass", "priority_classes"),
    "queues": _listed("queue", "queues"),
    "env": _listed("environment variable", "env", key=lambda item: item[0]),
    "node_selectors": _node_selector_rule,
    "tolerations": _toleration_rule,
    "resources": _listed("Ray resource", "resources", key=lambda item: item[0]),
    "reserved_keys": _reserved_rule,
    "pod_labels": _keys_rule("label", "pod_labels"),
    "pod_annotations": _keys_rule("annotation", "pod_annotations"),
    "volume": _volume_rule,
    "node_affinity": _node_affinity_rule,
    "scheduler_names": _listed("scheduler", "scheduler_names"),
    "accelerator_resources": _listed("accelerator resource", "accelerator_resources"),
}
