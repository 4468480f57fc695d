"""A DiffusionJob as Kubernetes objects: a ConfigMap holding the document, the job's own identity and
network policy, and a KubeRay ``ray.io/v1`` RayJob.

The RayJob's head runs the driver, ``sdray train /etc/sdray/job.yaml --address auto`` (``sdray tune …
--resume-if-exists`` for a document with ``spec.tune``), reading the document from the ConfigMap mounted at ``/etc/sdray``: the
entrypoint is fixed text, nothing of the document is pasted into a shell. One worker group holds the Ray
Train workers, ``spec.cluster.workers_per_pod`` to a pod. With ``spec.cluster.queue`` the RayJob is created
suspended with Kueue's queue label, and Kueue admits the whole cluster at once.

Isolation between jobs (several tenants share a namespace):
- Ray's token authentication (``rayClusterSpec.authOptions.mode: token``, Ray >= 2.52): KubeRay makes a
  random token in a Secret of the Ray cluster and gives it to the head, the workers and the submitter (and
  reads it itself to ask the dashboard about the job); a pod without it cannot use GCS, the dashboard or
  the job API.
- A NetworkPolicy ``<job>-ray`` on the job's pods (label ``sdray.io/job``): they take connections from the
  job's own pods only, and from the KubeRay operator on the dashboard port.
- A ServiceAccount ``sdray-job-<job>`` for the Ray pods, with a Role and RoleBinding of the same name that
  allow ``patch`` on ``diffusionjobs/status`` of this one DiffusionJob (the driver's step and loss), and
  nothing else. Not made when the document names ``spec.cluster.service_account`` or the settings name a
  shared one (sdray grants those nothing), nor when the namespace is unknown (a RoleBinding names its
  ServiceAccount's namespace): the pods then run as the namespace's default ServiceAccount. A document
  may not name another job's ``sdray-job-…`` ServiceAccount.

What the platform sets on every job's pods (image pull secrets, labels and annotations, affinity, topology
spread, volumes, the GPU resource name, runtime class, scheduler, default priority class, the job ServiceAccount's
annotations) comes from ``RenderSettings.pods`` (``sdray.k8s.defaults``, the chart's ``jobPods``); a document adds
its own ``spec.cluster`` labels, annotations, node affinity and volumes to it, never removes from it. Label and
annotation keys of the platform's domains (``sdray.spec.RESERVED_KEY_DOMAINS``: ``sdray.io/job`` is what the
NetworkPolicy lets in, ``kueue.x-k8s.io/*`` what Kueue queues by) are refused in a document, and the controller
mounts only the claims and ConfigMaps it is told documents may name (``--allow-volume-claim``,
``--allow-config-map``).

The same function serves ``sdray render`` (no owner) and the controller (owned by the DiffusionJob).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import yaml

from sdray.k8s import API_VERSION, GROUP, JOB_LABEL, KIND, MANAGED_BY, PLURAL, RAY_GROUP, RAY_VERSION
from sdray.k8s.defaults import PodDefaults
from sdray.spec import RESERVED_KEY_DOMAINS, DiffusionJob, NodeAffinity, NodeSelectorTerm, PodResources, reserved_key

JOB_MOUNT = "/etc/sdray"
JOB_FILE = "job.yaml"
SECRETS_MOUNT = "/var/run/secrets/sdray"  # storage.DEFAULT_SECRETS_DIR: where credentials_secrets are read
SPEC_HASH = "sdray.io/spec-hash"
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
# The driver reports step and loss into the DiffusionJob's status (sdray.k8s.progress): its name, and the
# pod's namespace from the downward API (a rendered RayJob may be applied to any namespace).
JOB_ENV = "SDRAY_DIFFUSIONJOB"
NAMESPACE_ENV = "SDRAY_NAMESPACE"
# KubeRay names the RayCluster "<rayjob>-<5 chars>" and refuses longer RayJob names (MaxRayJobNameLength).
MAX_RAYJOB_NAME = 47
RUN_AS = 1000  # the Dockerfile's sdray user
# Ray's ports that outside callers use; the job's own pods reach each other on every port (GCS 6379, client
# 10001, the node and object managers, the worker ports, the dashboard agent).
DASHBOARD_PORT = 8265
# The per-job ServiceAccount, Role and RoleBinding: a prefix documents may not name in cluster.service_account.
IDENTITY_PREFIX = "sdray-job-"
# The KubeRay operator's pods: its helm chart and its kustomize manifests both label them so.
OPERATOR_LABELS = {"app.kubernetes.io/component": "kuberay-operator"}
OPERATOR_NAMESPACE_ENV = "SDRAY_RAY_OPERATOR_NAMESPACE"
HEAD_DEFAULT = PodResources(cpu="2", memory="8Gi")
MEMORY_PER_WORKER = {False: 8, True: 32}  # Gi per Ray Train worker, without and with GPUs


class RenderError(ValueError):
    """A document that cannot run on Kubernetes as it is; the message names the field."""


def _ray_version() -> str:
    try:
        return metadata.version("ray")
    except metadata.PackageNotFoundError:  # rendering only needs the number
        return "2.60.0"


def _operator_namespace() -> str:
    return os.environ.get(OPERATOR_NAMESPACE_ENV, "kuberay-system")


@dataclass(frozen=True)
class RenderSettings:
    """What the cluster decides rather than the document: the image; a ServiceAccount shared by every job's
    Ray pods (default: none, each job gets its own); where the KubeRay operator runs (``""``: any namespace;
    default ``$SDRAY_RAY_OPERATOR_NAMESPACE``, else ``kuberay-system``)."""

    image: str = "sdray:" + metadata.version("sdray")
    image_pull_policy: str = "IfNotPresent"
    job_service_account: str | None = None
    ray_version: str = field(default_factory=_ray_version)
    ray_operator_namespace: str = field(default_factory=_operator_namespace)
    # ServiceAccounts a document may name in spec.cluster.service_account; None: any (``sdray render``, whose
    # output is applied with its user's own rights). The controller creates pods for whoever may create a
    # DiffusionJob, so it allows only the ones the platform lists (sdray controller --allow-service-account).
    allowed_service_accounts: tuple[str, ...] | None = None
    # PersistentVolumeClaims and ConfigMaps a document may mount (spec.cluster.volumes); None: any (``sdray
    # render``). The controller's --allow-volume-claim / --allow-config-map: the namespace's other claims (the
    # service's own database among them) stay out of reach of whoever may create a DiffusionJob.
    allowed_volume_claims: tuple[str, ...] | None = None
    allowed_config_maps: tuple[str, ...] | None = None
    pods: PodDefaults = field(default_factory=PodDefaults)


def configmap_name(job_name: str) -> str:
    return f"{job_name}-job"


def identity_name(job_name: str) -> str:
    """The job's own ServiceAccount, and the Role and RoleBinding that let it write its job's status."""
    return f"{IDENTITY_PREFIX}{job_name}"


def network_policy_name(job_name: str) -> str:
    return f"{job_name}-ray"


def job_document(job: DiffusionJob, namespace: str | None = None) -> dict[str, Any]:
    """The document the driver reads: as written (fields left out stay out, so the stage checks that tell
    a default from a set value see the same document), in ``namespace``."""
    doc = job.model_dump(mode="json", exclude_unset=True)
    if namespace:
        doc["metadata"]["namespace"] = namespace
    return doc


def spec_hash(doc: dict[str, Any]) -> str:
    """A fingerprint of a document's spec: the controller compares it to tell a changed spec."""
    return hashlib.sha256(json.dumps(doc["spec"], sort_keys=True).encode()).hexdigest()[:32]


def _labels(name: str, component: str) -> dict[str, str]:
    return {**MANAGED_BY, "app.kubernetes.io/component": component, JOB_LABEL: name}


def _owner_references(owner: dict | None) -> list[dict]:
    if owner is None:
        return []
    return [{"apiVersion": API_VERSION, "kind": KIND, "name": owner["metadata"]["name"],
             "uid": owner["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}]


def _metadata(name: str, namespace: str | None, labels: dict, owner: dict | None, **extra) -> dict:
    meta = {"name": name, **({"namespace": namespace} if namespace else {}), "labels": labels, **extra}
    if owner is not None:
        meta["ownerReferences"] = _owner_references(owner)
    return meta


def _resources(cpu: str, memory: str, gpu: int = 0, accelerator: str = "nvidia.com/gpu") -> dict:
    # Requests equal to limits: a training pod is Guaranteed and is not evicted first under pressure.
    amounts = {"cpu": cpu, "memory": memory, **({accelerator: str(gpu)} if gpu else {})}
    return {"requests": dict(amounts), "limits": dict(amounts)}


def worker_pod_size(job: DiffusionJob) -> tuple[int, str, str, int]:
    """(replicas, cpu, memory, gpus) of the worker group.

    Defaults: the CPUs the pod's Ray Train workers take plus one (Ray Data's readers need a CPU beside the
    workers, or a streaming run waits forever), 8Gi per Ray Train worker (32Gi with GPUs), and the GPUs
    they take.
    """
    spec = job.spec
    per_pod = spec.cluster.workers_per_pod
    worker = spec.cluster.worker
    dist = spec.distributed
    cpu = worker.cpu or str(math.ceil(dist.cpus_per_worker * per_pod) + 1)
    memory = worker.memory or f"{MEMORY_PER_WORKER[dist.use_gpu] * per_pod}Gi"
    gpu = worker.gpu if worker.gpu is not None else math.ceil(dist.gpus_per_worker * per_pod)
    return spec.ray_train_workers // per_pod, str(cpu), str(memory), gpu


def _credential_secrets(job: DiffusionJob) -> list[str]:
    """The secrets the document names as credentials_secret (S3 keys; the Hub token, HF_TOKEN), in order, once
    each: Secrets of the job's own namespace, mounted on every Ray pod where sdray reads them."""
    hub = job.spec.model.hub
    names = [job.spec.data.credentials_secret, job.spec.storage.credentials_secret,
             hub.credentials_secret if hub is not None else None]
    return list(dict.fromkeys(n for n in names if n))


def accelerator_resource(job: DiffusionJob, settings: RenderSettings) -> str:
    """The extended resource worker pods ask their GPUs as: the document's, else the platform's."""
    return job.spec.cluster.accelerator_resource or settings.pods.accelerator_resource


def _job_volumes(job: DiffusionJob) -> tuple[list[dict], list[dict]]:
    """(volumes, mounts) of the document's spec.cluster.volumes, named vol-<name> in the pods."""
    volumes, mounts = [], []
    for volume in job.spec.cluster.volumes:
        name = f"vol-{volume.name}"
        if volume.persistent_volume_claim is not None:
            source = {"persistentVolumeClaim": {"claimName": volume.persistent_volume_claim,
                                                **({"readOnly": True} if volume.read_only else {})}}
        else:
            source = {"configMap": {"name": volume.config_map}}
        volumes.append({"name": name, **source})
        mounts.append({"name": name, "mountPath": volume.mount_path, **({"readOnly": True} if volume.read_only else {})})
    return volumes, mounts


def _pod(job: DiffusionJob, settings: RenderSettings, name: str, container: str, resources: dict, *,
         head: bool, account: str | None) -> dict:
    cluster = job.spec.cluster
    pods = settings.pods
    mounts = [{"name": "dshm", "mountPath": "/dev/shm"}]  # Ray's object store lives in shared memory
    volumes = [{"name": "dshm", "emptyDir": {"medium": "Memory"}}]
    for i, secret in enumerate(_credential_secrets(job)):
        mounts.append({"name": f"credentials-{i}", "mountPath": f"{SECRETS_MOUNT}/{secret}", "readOnly": True})
        volumes.append({"name": f"credentials-{i}", "secret": {"secretName": secret}})
    # Fresh copies: YAML would write a dict shared by the head and the workers as an anchor and an alias.
    volumes += copy.deepcopy(pods.volumes)
    mounts += copy.deepcopy(pods.volume_mounts)
    own_volumes, own_mounts = _job_volumes(job)
    volumes += own_volumes
    mounts += own_mounts
    env = [{"name": k, "value": v} for k, v in sorted(cluster.env.items())]
    if head:
        mounts.append({"name": "job", "mountPath": JOB_MOUNT, "readOnly": True})
        volumes.append({"name": "job", "configMap": {"name": configmap_name(name)}})
        env.append({"name": JOB_ENV, "value": name})
        env.append({"name": NAMESPACE_ENV, "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}})
    main = {
        "name": container,
        "image": cluster.image or settings.image,
        "imagePullPolicy": settings.image_pull_policy,
        "resources": resources,
        "volumeMounts": mounts,
        "securityContext": _container_security(),
    }
    if env:
        main["env"] = env
    if cluster.env_secrets:
        main["envFrom"] = [{"secretRef": {"name": secret}} for secret in cluster.env_secrets]
    spec = _common_spec(job, settings)
    if pods.runtime_class_name:
        spec["runtimeClassName"] = pods.runtime_class_name
    affinity = _affinity(pods.affinity, cluster.node_affinity)
    if affinity:
        spec["affinity"] = affinity
    if pods.topology_spread_constraints:
        spec["topologySpreadConstraints"] = [_spread(c, name) for c in pods.topology_spread_constraints]
    checkpoint = job.spec.checkpoint
    if checkpoint.on_preemption:
        # Eviction or preemption: the hook tells the run (Kubernetes signals only Ray, the first process) and
        # waits while it checkpoints; the grace period (which the hook's time counts against) is the job's.
        spec["terminationGracePeriodSeconds"] = checkpoint.grace_period_s
        main["lifecycle"] = {"preStop": {"exec": {"command": [
            "sdray", "preemption-notice", "--timeout", str(max(1, checkpoint.grace_period_s - 5))]}}}
    if account:
        spec["serviceAccountName"] = account
    return {
        "metadata": _pod_metadata(job, settings, name, "ray-head" if head else "ray-worker"),
        "spec": {**spec, "containers": [main], "volumes": volumes},
    }


def _pod_metadata(job: DiffusionJob, settings: RenderSettings, name: str, component: str) -> dict:
    """Labels and annotations of a pod: the platform's, the document's, and sdray's own last (they win)."""
    cluster = job.spec.cluster
    meta: dict[str, Any] = {"labels": {**settings.pods.labels, **cluster.pod_labels, **_labels(name, component)}}
    annotations = {**settings.pods.annotations, **cluster.pod_annotations}
    if annotations:
        meta["annotations"] = annotations
    return meta


def _node_term(term: NodeSelectorTerm) -> dict:
    return {"matchExpressions": [{"key": r.key, "operator": r.operator, **({"values": list(r.values)} if r.values else {})}
                                 for r in term.match_expressions]}


def _affinity(platform: dict, job: NodeAffinity | None) -> dict:
    """The platform's affinity with the document's node affinity added: a required term of each must hold
    (Kubernetes ORs terms, so the result is every pair of them joined), and the preferences of both count."""
    affinity = copy.deepcopy(platform)
    if job is None or not (job.required or job.preferred):
        return affinity
    node = affinity.setdefault("nodeAffinity", {})
    if job.required:
        terms = [_node_term(t) for t in job.required]
        theirs = (node.get("requiredDuringSchedulingIgnoredDuringExecution") or {}).get("nodeSelectorTerms") or []
        if theirs:
            terms = [{**copy.deepcopy(p), "matchExpressions": [*copy.deepcopy(p.get("matchExpressions", [])),
                                                               *j["matchExpressions"]]}
                     for p in theirs for j in terms]
        node["requiredDuringSchedulingIgnoredDuringExecution"] = {"nodeSelectorTerms": terms}
    if job.preferred:
        node.setdefault("preferredDuringSchedulingIgnoredDuringExecution", []).extend(
            {"weight": t.weight, "preference": _node_term(t)} for t in job.preferred)
    return affinity


def _spread(constraint: dict, name: str) -> dict:
    """A topology spread constraint of the platform's; without a labelSelector it spreads the job's own pods."""
    constraint = copy.deepcopy(constraint)
    constraint.setdefault("labelSelector", {"matchLabels": {JOB_LABEL: name}})
    return constraint


def _container_security() -> dict:
    return {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}


def _common_spec(job: DiffusionJob, settings: RenderSettings) -> dict:
    """What every pod of the RayJob gets, the submitter's included: security context, image pull secrets,
    scheduler, priority class and the document's node selector and tolerations."""
    cluster, pods = job.spec.cluster, settings.pods
    spec: dict[str, Any] = {
        "securityContext": {"runAsNonRoot": True, "runAsUser": RUN_AS, "runAsGroup": RUN_AS, "fsGroup": RUN_AS,
                            "seccompProfile": {"type": "RuntimeDefault"}},
    }
    if pods.image_pull_secrets:
        spec["imagePullSecrets"] = [{"name": s.name} for s in pods.image_pull_secrets]
    scheduler = cluster.scheduler_name or pods.scheduler_name
    if scheduler:
        spec["schedulerName"] = scheduler
    priority = cluster.priority_class or pods.priority_class_name
    if priority:
        spec["priorityClassName"] = priority
    if cluster.node_selector:
        spec["nodeSelector"] = dict(cluster.node_selector)
    if cluster.tolerations:
        spec["tolerations"] = [
            {k: v for k, v in {"key": t.key, "operator": t.operator, "value": t.value, "effect": t.effect,
                               "tolerationSeconds": t.toleration_seconds}.items() if v is not None}
            for t in cluster.tolerations]
    return spec


def _submitter(job: DiffusionJob, settings: RenderSettings, name: str) -> dict:
    """The pod that runs ``ray job submit`` (KubeRay fills in its command): small, and as locked down as
    the others."""
    container = {"name": "ray-job-submitter", "image": job.spec.cluster.image or settings.image,
                 "imagePullPolicy": settings.image_pull_policy,
                 "resources": _resources("500m", "1Gi"), "securityContext": _container_security()}
    # It only talks to the Ray dashboard: the namespace's default ServiceAccount, not the job's.
    return {"metadata": _pod_metadata(job, settings, name, "ray-submitter"),
            "spec": {**_common_spec(job, settings), "restartPolicy": "Never", "containers": [container]}}


def check_name(name: str) -> None:
    """Refuse a name KubeRay would refuse for the RayJob (which takes the DiffusionJob's name)."""
    if len(name) > MAX_RAYJOB_NAME or not name[0].isalpha():
        raise RenderError(f"metadata.name: {name!r} cannot name a RayJob: KubeRay needs at most {MAX_RAYJOB_NAME} "
                          "characters, starting with a letter")


def check_service_account(job: DiffusionJob, settings: RenderSettings) -> None:
    """Refuse a document naming a per-job ServiceAccount: its pods would act as that job (and write its
    status). A job's own ServiceAccount is the default; a document never needs to name it. With
    ``settings.allowed_service_accounts``, refuse any other one not listed there (the controller's, or the
    service's, ServiceAccount would otherwise be one line of a document away)."""
    account = job.spec.cluster.service_account
    if account and account.startswith(IDENTITY_PREFIX):
        raise RenderError(f"spec.cluster.service_account: {account!r}: ServiceAccounts named "
                          f"{IDENTITY_PREFIX}<job> belong to sdray's jobs, one each; leave the field out to run "
                          "as this job's own")
    allowed = settings.allowed_service_accounts
    if account and allowed is not None and account not in allowed:
        raise RenderError(f"spec.cluster.service_account: {account!r} is not among the ServiceAccounts this "
                          f"cluster's jobs may use ({', '.join(allowed) or 'none'}: the controller's "
                          "--allow-service-account); leave the field out to run as the job's own")


def check_pod_fields(job: DiffusionJob, settings: RenderSettings) -> None:
    """Refuse what a document may not put on its pods: label or annotation keys of the platform's domains
    (a pod labelled ``sdray.io/job: <victim>`` would pass the victim's NetworkPolicy; a Kueue label would
    jump a queue), claims and ConfigMaps the settings do not list, and a mount path the platform mounts."""
    cluster = job.spec.cluster
    for attr in ("pod_labels", "pod_annotations"):
        for key in getattr(cluster, attr):
            if reserved_key(key):
                raise RenderError(f"spec.cluster.{attr}.{key}: the key is reserved to the platform (keys under "
                                  f"{', '.join(RESERVED_KEY_DOMAINS)} are sdray's, KubeRay's, Kubernetes' and the "
                                  "schedulers')")
    taken = set(settings.pods.mount_paths)
    for i, volume in enumerate(cluster.volumes):
        where = f"spec.cluster.volumes[{i}]"
        kind, value, allowed, flag = (
            ("PersistentVolumeClaim", volume.persistent_volume_claim, settings.allowed_volume_claims,
             "--allow-volume-claim") if volume.persistent_volume_claim is not None else
            ("ConfigMap", volume.config_map, settings.allowed_config_maps, "--allow-config-map"))
        if allowed is not None and value not in allowed:
            raise RenderError(f"{where}: {kind} {value!r} is not among those this cluster's jobs may mount "
                              f"({', '.join(allowed) or 'none'}: the controller's {flag})")
        if volume.mount_path in taken:
            raise RenderError(f"{where}.mount_path: {volume.mount_path} is where the platform mounts one of its "
                              "own volumes")


def _identity(name: str, namespace: str, settings: RenderSettings, owner: dict | None) -> list[dict]:
    """ServiceAccount, Role and RoleBinding ``sdray-job-<name>``: the Ray pods may patch the status of
    DiffusionJob ``name`` (step and loss), and nothing else. The ServiceAccount carries the platform's
    annotations (a cloud identity: EKS IRSA, GKE Workload Identity)."""
    account = identity_name(name)
    rbac = "rbac.authorization.k8s.io"

    def meta(**extra) -> dict:  # one each: YAML would write a shared dict as an anchor and an alias
        return _metadata(account, namespace, _labels(name, "identity"), owner, **extra)

    annotations = dict(settings.pods.service_account_annotations)
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount",
         "metadata": meta(**({"annotations": annotations} if annotations else {}))},
        {"apiVersion": f"{rbac}/v1", "kind": "Role", "metadata": meta(),
         "rules": [{"apiGroups": [GROUP], "resources": [f"{PLURAL}/status"], "resourceNames": [name],
                    "verbs": ["patch"]}]},
        {"apiVersion": f"{rbac}/v1", "kind": "RoleBinding", "metadata": meta(),
         "roleRef": {"apiGroup": rbac, "kind": "Role", "name": account},
         "subjects": [{"kind": "ServiceAccount", "name": account, "namespace": namespace}]},
    ]


def _network_policy(name: str, namespace: str | None, settings: RenderSettings, owner: dict | None) -> dict:
    """Connections into the job's pods: from its own pods (every port), and from the KubeRay operator to the
    dashboard (it asks there how the job goes). Nothing else reaches GCS, the dashboard or the client port."""
    def own() -> dict:  # a fresh dict each time: YAML would write a shared one as an anchor and an alias
        return {"matchLabels": {JOB_LABEL: name}}

    operator: dict[str, Any] = {"podSelector": {"matchLabels": dict(OPERATOR_LABELS)}, "namespaceSelector": {}}
    if settings.ray_operator_namespace:
        operator["namespaceSelector"] = {
            "matchLabels": {"kubernetes.io/metadata.name": settings.ray_operator_namespace}}
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _metadata(network_policy_name(name), namespace, _labels(name, "network-policy"), owner),
        "spec": {
            "podSelector": own(),
            "policyTypes": ["Ingress"],
            "ingress": [
                {"from": [{"podSelector": own()}]},
                {"from": [operator], "ports": [{"protocol": "TCP", "port": DASHBOARD_PORT}]},
            ],
        },
    }


def render(job: DiffusionJob, settings: RenderSettings | None = None, *, namespace: str | None = None,
           owner: dict | None = None) -> list[dict]:
    """The objects of ``job`` in ``namespace`` (default: the document's), in the order to apply them:
    ConfigMap, [ServiceAccount, Role, RoleBinding], NetworkPolicy, RayJob; owned by ``owner`` (the
    DiffusionJob object, with its uid) when given. The three in brackets only when the job runs as its own
    ServiceAccount (see the module's docstring). The objects take the owner's name (the document's
    without one): a job submitted through the service runs under its own DiffusionJob name, while its
    document keeps the name its run and checkpoints go by."""
    settings = settings or RenderSettings()
    name = owner["metadata"]["name"] if owner is not None else job.metadata.name
    check_name(name)
    check_service_account(job, settings)
    check_pod_fields(job, settings)
    namespace = namespace or job.metadata.namespace
    cluster = job.spec.cluster
    account = cluster.service_account or settings.job_service_account
    identity = []
    if account is None and namespace:
        identity = _identity(name, namespace, settings, owner)
        account = identity_name(name)
    doc = job_document(job, namespace)
    configmap = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(configmap_name(name), namespace, _labels(name, "job-document"), owner),
        "data": {JOB_FILE: yaml.safe_dump(doc, sort_keys=False)},
    }
    head_size = HEAD_DEFAULT.model_copy(update=cluster.head.model_dump(exclude_none=True))
    replicas, cpu, memory, gpu = worker_pod_size(job)
    command = "tune" if job.spec.tune is not None else "train"
    labels = _labels(name, "training")
    if cluster.queue:
        labels[QUEUE_LABEL] = cluster.queue
    spec: dict[str, Any] = {
        **({"suspend": True} if cluster.queue else {}),  # Kueue unsuspends it once the whole cluster fits its quota
        # A retried RayJob runs the entrypoint again: training resumes by checkpoint.resume: auto, a search
        # by --resume-if-exists.
        "entrypoint": f"sdray {command} {JOB_MOUNT}/{JOB_FILE} --address auto"
                      + (" --resume-if-exists" if command == "tune" else ""),
        "shutdownAfterJobFinishes": True,
        "ttlSecondsAfterFinished": cluster.ttl_seconds_after_finished,
        "backoffLimit": cluster.backoff_limit,
        "submitterPodTemplate": _submitter(job, settings, name),
        "rayClusterSpec": {
            "rayVersion": settings.ray_version,
            # KubeRay makes the cluster's token and hands it to every Ray container and the submitter.
            "authOptions": {"mode": "token"},
            "headGroupSpec": {
                "rayStartParams": {"dashboard-host": "0.0.0.0"},
                "template": _pod(job, settings, name, "ray-head",
                                 _resources(str(head_size.cpu), str(head_size.memory)), head=True, account=account),
            },
            "workerGroupSpecs": [{
                "groupName": "workers",
                "replicas": replicas, "minReplicas": replicas, "maxReplicas": replicas,
                "rayStartParams": {},
                "template": _pod(job, settings, name, "ray-worker",
                                 _resources(cpu, memory, gpu, accelerator_resource(job, settings)), head=False,
                                 account=account),
            }],
        },
    }
    if cluster.active_deadline_seconds is not None:
        spec["activeDeadlineSeconds"] = cluster.active_deadline_seconds
    rayjob = {
        "apiVersion": f"{RAY_GROUP}/{RAY_VERSION}",
        "kind": "RayJob",
        "metadata": _metadata(name, namespace, labels, owner, annotations={SPEC_HASH: spec_hash(doc)}),
        "spec": spec,
    }
    return [configmap, *identity, _network_policy(name, namespace, settings, owner), rayjob]


class _Dumper(yaml.SafeDumper):
    """Writes multi-line strings (the job document in the ConfigMap) as literal blocks, readable as YAML."""


_Dumper.add_representer(str, lambda dumper, text: dumper.represent_scalar(
    "tag:yaml.org,2002:str", text, style="|" if "\n" in text else None))


def render_yaml(objects: list[dict]) -> str:
    """A YAML multi-document, as ``kubectl apply -f -`` takes it."""
    return yaml.dump_all(objects, Dumper=_Dumper, sort_keys=False, width=120)
