"""The ``kuberay`` backend: each job is a DiffusionJob in one namespace, run by the sdray controller.

The service creates the DiffusionJob through ``sdray.k8s.kube.create_diffusionjob``, the same code (and
checks) as every other sdray caller; from there a job submitted over REST and one applied with kubectl
take one path: the controller makes the RayJob, KubeRay (and Kueue, with ``spec.cluster.queue``) runs
it, and the DiffusionJob's status says how it goes. This backend reads that status back.

- Names: a DiffusionJob is named ``sdray-<job id>`` (unique, and within KubeRay's limits); the document
  keeps its own name, which its run and checkpoints go by (the ``sdray.io/document-name`` annotation).
- The driver's environment (``env``: the service's progress URL and token) goes into a Secret owned by
  the DiffusionJob and reaches the Ray pods through ``spec.cluster.env_secrets``: never in the
  DiffusionJob itself, which anyone who may read jobs can read.
- ``cancel`` deletes the DiffusionJob: its RayJob, and so the Ray cluster, go with it (owner references);
  checkpoints stay in storage. Suspending instead would leave the job to Kueue, which may start it again.
- ``capacity`` is None: the cluster (Kueue) queues jobs itself, so the service submits at once.
"""

from __future__ import annotations

import json
import re

from sdray.service.backends.base import Backend, BackendError, BackendStatus
from sdray.states import JobState, parse_state

_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
JOB_ID_LABEL = "sdray.io/service-job-id"
TENANT_LABEL = "sdray.io/tenant"


def _api_message(exc: Exception) -> str | None:
    """The API server's own message in an ApiException's JSON body (a Status object), if it has one."""
    try:
        return json.loads(getattr(exc, "body", None) or "").get("message")
    except (ValueError, AttributeError):
        return None


def _name(job_id: str) -> str:
    """The DiffusionJob of a service job: one name per job, so the API server refuses a second one."""
    return f"sdray-{job_id}"


class KubeRayBackend(Backend):
    name = "kuberay"

    def __init__(self, namespace: str = "default", clients=None):
        self.namespace = namespace
        self._clients = clients

    @property
    def clients(self):
        """Connected on first use: in a pod through its ServiceAccount, elsewhere through the kubeconfig."""
        if self._clients is None:
            from sdray.k8s.kube import Clients

            try:
                self._clients = Clients.connect(user_agent="sdray-service")
            except Exception as exc:
                raise BackendError(f"cannot reach the Kubernetes API: {exc}") from None
        return self._clients

    def _api_error(self, exc: Exception, what: str, not_found: str = "the DiffusionJob CRD is not installed "
                   "(kubectl apply -f k8s/crd.yaml)", namespace: str | None = None) -> BackendError:
        status = getattr(exc, "status", None)
        if status == 404:
            return BackendError(f"{what}: {not_found}")
        if status == 403:
            return BackendError(f"{what}: the service's ServiceAccount may not do this in namespace "
                                f"{namespace or self.namespace} (the helm chart's Role grants it)")
        reason = _api_message(exc) or getattr(exc, "reason", None) or str(exc)
        # The API server refused the object itself (invalid, malformed): sending it again cannot succeed.
        return BackendError(f"{what}: {f'{status} ' if status else ''}{reason}".strip(),
                            permanent=status in (400, 422))

    def _split(self, handle: str) -> tuple[str, str]:
        namespace, _, name = handle.rpartition("/")
        return namespace or self.namespace, name

    def ready(self) -> tuple[bool, str]:
        from sdray.k8s import GROUP, PLURAL, VERSION

        try:
            self.clients.custom.list_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, limit=1,
                                                              _request_timeout=5)
        except BackendError as exc:
            return False, str(exc)
        except Exception as exc:
            return False, str(self._api_error(exc, f"listing DiffusionJobs in {self.namespace}"))
        return True, f"DiffusionJobs in namespace {self.namespace}"

    def submit(self, job_id: str, tenant: str, document: dict, env: dict[str, str], *,
               namespace: str | None = None) -> str:
        from sdray.k8s.kube import create_diffusionjob, delete_diffusionjob
        from sdray.k8s.render import RenderError
        from sdray.spec import SpecError, parse_job

        namespace = namespace or self.namespace
        name = _name(job_id)
        secret = f"{name}-env"
        doc = {**document, "spec": {**document.get("spec", {})}}
        if env:
            cluster = dict(doc["spec"].get("cluster") or {})
            cluster["env_secrets"] = [*cluster.get("env_secrets", []), secret]
            doc["spec"]["cluster"] = cluster
        labels = {JOB_ID_LABEL: job_id}
        if _LABEL_VALUE.match(tenant) and len(tenant) <= 63:
            labels[TENANT_LABEL] = tenant
        try:
            job = parse_job(doc, f"job {job_id}")
            created = create_diffusionjob(self.clients, job, namespace, labels, name=name)
        except (SpecError, RenderError) as exc:
            raise BackendError(str(exc), permanent=True) from None
        except BackendError:
            raise
        except Exception as exc:
            raise self._api_error(exc, f"creating DiffusionJob {namespace}/{name}", namespace=namespace) from None
        if env:
            try:
                self.clients.core.create_namespaced_secret(namespace, {
                    "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                    "metadata": {"name": secret, "namespace": namespace, "labels": labels,
                                 "ownerReferences": [{"apiVersion": created["apiVersion"], "kind": created["kind"],
                                                      "name": name, "uid": created["metadata"]["uid"],
                                                      "blockOwnerDeletion": True}]},
                    "stringData": dict(env)})
            except Exception as exc:
                delete_diffusionjob(self.clients, namespace, name)  # no job without its environment
                raise self._api_error(exc, f"creating Secret {namespace}/{secret}", namespace=namespace) from None
        return f"{namespace}/{name}"

    def find(self, job_id: str, *, namespace: str | None = None) -> str | None:
        handle = f"{namespace or self.namespace}/{_name(job_id)}"
        return None if self.status(handle).state == "missing" else handle

    def status(self, handle: str) -> BackendStatus:
        from sdray.k8s.kube import get_diffusionjob

        namespace, name = self._split(handle)
        try:
            obj = get_diffusionjob(self.clients, namespace, name)
        except BackendError:
            raise
        except Exception as exc:
            raise self._api_error(exc, f"reading DiffusionJob {handle}") from None
        if obj is None:
            return BackendStatus("missing", f"DiffusionJob {handle} is gone")
        status = obj.get("status") or {}
        details = {k: status[k] for k in ("step", "loss") if status.get(k) is not None}
        # The DiffusionJob says the same states. A preempted one waits for Kueue to admit it again and resumes
        # from its checkpoint: to the service it is queued again (its Preempted is a run that has ended).
        try:
            state = parse_state(status.get("state") or JobState.PENDING)
        except ValueError:
            state = JobState.PENDING
        if state == JobState.PREEMPTED:
            state = JobState.QUEUED
        return BackendStatus(state, status.get("message") or "", details)

    def cancel(self, handle: str) -> None:
        from sdray.k8s.kube import delete_diffusionjob

        namespace, name = self._split(handle)
        try:
            delete_diffusionjob(self.clients, namespace, name)
        except Exception as exc:
            raise self._api_error(exc, f"deleting DiffusionJob {handle}") from None

    def logs(self, handle: str, tail: int | None = None) -> str:
        """The driver's output, as the RayJob's submitter pod shows it (it follows the Ray job's log)."""
        from sdray.k8s import JOB_LABEL

        namespace, name = self._split(handle)
        selector = f"{JOB_LABEL}={name},app.kubernetes.io/component=ray-submitter"
        try:
            pods = self.clients.core.list_namespaced_pod(namespace, label_selector=selector).items
            if not pods:  # queued, or its Ray cluster is starting: the job's conditions say which
                return ""
            newest = max(pods, key=lambda p: p.metadata.creation_timestamp or "")
            kwargs = {"tail_lines": tail} if tail else {}
            return self.clients.core.read_namespaced_pod_log(newest.metadata.name, namespace,
                                                             container="ray-job-submitter", **kwargs)
        except Exception as exc:
            raise self._api_error(exc, f"reading the log of {handle}", "its pod is gone") from None

    def close(self) -> None:
        if self._clients is not None:
            self._clients.close()
