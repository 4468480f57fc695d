"""Talking to the API server: client construction, and DiffusionJob create/get/delete.

kubectl, the REST service's ``kuberay`` backend and the tests all create DiffusionJobs; the controller
does the rest. ``create_diffusionjob`` is the one way sdray code creates them, so a document takes the
same checks whichever way it came.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from sdray.k8s import API_VERSION, DOCUMENT_NAME, GROUP, KIND, PLURAL, VERSION
from sdray.k8s.render import check_name, job_document
from sdray.spec import DiffusionJob


@dataclass
class Clients:
    """The typed APIs sdray uses, over one connection pool."""

    api_client: object
    custom: object
    core: object
    coordination: object

    @classmethod
    def connect(cls, *, host: str | None = None, kubeconfig: str | None = None, context: str | None = None,
                user_agent: str | None = None) -> Clients:
        """In a pod: the in-cluster ServiceAccount; elsewhere ``kubeconfig`` (default ``~/.kube/config``);
        ``host`` alone: a plain-HTTP server without credentials (the tests' fake API server)."""
        from kubernetes import client, config

        configuration = client.Configuration()
        if host is not None:
            configuration.host = host
        elif "KUBERNETES_SERVICE_HOST" in os.environ and kubeconfig is None:
            config.load_incluster_config(client_configuration=configuration)
        else:
            # $KUBECONFIG read now: the client reads it once, when it is imported.
            config.load_kube_config(config_file=kubeconfig or os.environ.get("KUBECONFIG"), context=context,
                                    client_configuration=configuration)
        api_client = client.ApiClient(configuration)
        if user_agent:
            api_client.user_agent = user_agent
        return cls(api_client, client.CustomObjectsApi(api_client), client.CoreV1Api(api_client),
                   client.CoordinationV1Api(api_client))

    @property
    def rbac(self):
        """RBAC (the per-job Role and RoleBinding), over the same connection pool."""
        from kubernetes import client

        return client.RbacAuthorizationV1Api(self.api_client)

    @property
    def events(self):
        """events.k8s.io/v1 Events, over the same connection pool."""
        from kubernetes import client

        return client.EventsV1Api(self.api_client)

    @property
    def networking(self):
        """NetworkPolicies, over the same connection pool."""
        from kubernetes import client

        return client.NetworkingV1Api(self.api_client)

    def close(self) -> None:
        self.api_client.close()

    def to_dict(self, model) -> dict:
        """A typed client model (V1ConfigMap, V1Lease) as the JSON the API server sent."""
        return self.api_client.sanitize_for_serialization(model)


def diffusionjob_object(job: DiffusionJob, namespace: str, labels: dict[str, str] | None = None,
                        name: str | None = None) -> dict:
    """The DiffusionJob resource for a validated document, in ``namespace``, with extra ``labels``; named
    ``name`` (default: the document's), the document's own name then kept in an annotation."""
    name = name or job.metadata.name
    check_name(name)
    doc = job_document(job)
    meta = {"name": name, "namespace": namespace, "labels": {**job.metadata.labels, **(labels or {})}}
    if name != job.metadata.name:
        meta["annotations"] = {DOCUMENT_NAME: job.metadata.name}
    return {"apiVersion": API_VERSION, "kind": KIND, "metadata": meta, "spec": doc["spec"]}


def create_diffusionjob(clients: Clients, job: DiffusionJob, namespace: str,
                        labels: dict[str, str] | None = None, name: str | None = None) -> dict:
    """Create the DiffusionJob for ``job`` (already validated by ``parse_job``); returns the stored object.
    Raises the client's ApiException (409 when the name is taken)."""
    body = diffusionjob_object(job, namespace, labels, name)
    return clients.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)


def get_diffusionjob(clients: Clients, namespace: str, name: str) -> dict | None:
    """The DiffusionJob, or None when there is none."""
    from kubernetes.client import ApiException

    try:
        return clients.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


def delete_diffusionjob(clients: Clients, namespace: str, name: str) -> bool:
    """Delete the DiffusionJob (its ConfigMap and RayJob follow through their owner references).
    Returns False when it was already gone."""
    from kubernetes.client import ApiException

    try:
        clients.custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name,
                                                       propagation_policy="Background")
    except ApiException as exc:
        if exc.status == 404:
            return False
        raise
    return True


def document_of(obj: dict) -> dict:
    """The sdray document inside a DiffusionJob resource (what ``parse_job`` takes): the resource's
    server-side metadata (uid, resourceVersion, …) is not part of it."""
    meta = obj.get("metadata") or {}
    name = (meta.get("annotations") or {}).get(DOCUMENT_NAME) or meta.get("name")
    doc_meta = {"name": name, "namespace": meta.get("namespace")}
    if meta.get("labels"):
        doc_meta["labels"] = meta["labels"]
    return {"apiVersion": obj.get("apiVersion"), "kind": obj.get("kind"), "metadata": doc_meta,
            "spec": obj.get("spec")}
