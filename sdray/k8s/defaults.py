"""The platform's defaults for every job's pods: the file ``sdray controller --pod-defaults`` (and ``sdray render
--pod-defaults``) reads, which the helm chart writes from its ``jobPods`` and ``jobServiceAccount.annotations``
values. Keys are the chart's (camelCase)::

    serviceAccountAnnotations:           # on each job's own ServiceAccount (EKS IRSA, GKE Workload Identity)
      eks.amazonaws.com/role-arn: arn:aws:iam::111122223333:role/sdray-jobs
    imagePullSecrets: [{name: registry-credentials}]   # every pod of the RayJob
    annotations: {sidecar.istio.io/inject: "false"}      # every pod of the RayJob
    labels: {cost-center: ml}                            # every pod of the RayJob
    affinity: {nodeAffinity: …}                          # Ray head and workers (a Kubernetes Affinity)
    topologySpreadConstraints: [{maxSkew: 1, topologyKey: topology.kubernetes.io/zone,
                                 whenUnsatisfiable: ScheduleAnyway}]   # Ray head and workers
    volumes: [{name: model-cache, persistentVolumeClaim: {claimName: hf-cache}}]   # Ray head and workers
    volumeMounts: [{name: model-cache, mountPath: /cache}]                       # Ray containers
    acceleratorResource: nvidia.com/gpu  # what worker pods ask their GPUs as (amd.com/gpu, habana.ai/gaudi)
    runtimeClassName: nvidia             # Ray head and workers
    schedulerName: volcano               # every pod of the RayJob
    priorityClassName: training          # every pod, unless the document names spec.cluster.priority_class

The Kubernetes objects in it (affinity, constraints, volumes, mounts) are passed on as written and checked by
the API server with the RayJob; this module checks the shape around them and the names sdray needs for itself.
A topology spread constraint without a ``labelSelector`` spreads the job's own pods: the renderer fills in
``sdray.io/job: <job>`` (Kubernetes would otherwise match no pod with it).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

from sdray.config_files import load_model
from sdray.spec import DNS_LABEL, DNS_SUBDOMAIN, RESERVED_MOUNTS, ExtendedResource, LabelKey, LabelValue

# Volume names the renderer uses itself: Ray's shared memory, the job document, credentials, a document's volumes.
BUILTIN_VOLUMES = ("dshm", "job")
BUILTIN_VOLUME_PREFIXES = ("credentials-", "vol-")


class PodDefaultsError(ValueError):
    """The pod defaults file cannot be used; the message names the file and the field."""


def _empty_is_none(value: Any) -> Any:
    return None if value == "" else value


# "" (the chart's unset value) is None.
OptionalName = Annotated[Annotated[str, Field(pattern=DNS_SUBDOMAIN, max_length=253)] | None,
                         BeforeValidator(_empty_is_none)]


class SecretReference(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=DNS_SUBDOMAIN, max_length=253)


class PodDefaults(BaseModel):
    """What the platform sets on every job's pods (see the module docstring for where each goes)."""

    model_config = ConfigDict(extra="forbid", frozen=True, alias_generator=to_camel, populate_by_name=True)

    service_account_annotations: dict[LabelKey, str] = Field(default_factory=dict)
    image_pull_secrets: list[SecretReference] = Field(default_factory=list)
    annotations: dict[LabelKey, str] = Field(default_factory=dict)
    labels: dict[LabelKey, LabelValue] = Field(default_factory=dict)
    affinity: dict[str, Any] = Field(default_factory=dict)
    topology_spread_constraints: list[dict[str, Any]] = Field(default_factory=list)
    volumes: list[dict[str, Any]] = Field(default_factory=list)
    volume_mounts: list[dict[str, Any]] = Field(default_factory=list)
    accelerator_resource: ExtendedResource = "nvidia.com/gpu"
    runtime_class_name: OptionalName = None
    scheduler_name: OptionalName = None
    priority_class_name: OptionalName = None

    @model_validator(mode="after")
    def _volumes_fit(self) -> PodDefaults:
        names = []
        for i, volume in enumerate(self.volumes):
            name = volume.get("name")
            if not isinstance(name, str) or len(name) > 63 or not re.fullmatch(DNS_LABEL, name):
                raise ValueError(f"volumes[{i}].name: expected a DNS label (lower-case letters, digits, '-'), "
                                 f"got {name!r}")
            if name in BUILTIN_VOLUMES or name.startswith(BUILTIN_VOLUME_PREFIXES) or name in names:
                raise ValueError(f"volumes[{i}].name: {name!r} is taken (sdray names its own volumes "
                                 f"{', '.join(BUILTIN_VOLUMES)}, {'*, '.join(BUILTIN_VOLUME_PREFIXES)}*)")
            names.append(name)
        for i, mount in enumerate(self.volume_mounts):
            path = mount.get("mountPath")
            if mount.get("name") not in names or not isinstance(path, str):
                raise ValueError(f"volumeMounts[{i}]: needs the name of one of volumes ({', '.join(names) or 'none'}) "
                                 "and a mountPath")
            if any(path.rstrip("/") == m or path.startswith(m + "/") for m in RESERVED_MOUNTS):
                raise ValueError(f"volumeMounts[{i}].mountPath: {path} is where sdray mounts what the run needs "
                                 f"({', '.join(RESERVED_MOUNTS)})")
        for i, constraint in enumerate(self.topology_spread_constraints):
            if not {"maxSkew", "topologyKey", "whenUnsatisfiable"} <= set(constraint):
                raise ValueError(f"topologySpreadConstraints[{i}]: needs maxSkew, topologyKey and whenUnsatisfiable")
        return self

    @property
    def mount_paths(self) -> list[str]:
        return [m["mountPath"] for m in self.volume_mounts]

    @classmethod
    def load(cls, path: str | Path) -> PodDefaults:
        return load_model(path, cls, PodDefaultsError, "pod defaults")
