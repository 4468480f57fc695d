"""sdray on Kubernetes: the DiffusionJob CRD, its rendering into a KubeRay RayJob, and the controller.

The pydantic job model (``sdray.spec``) is the type; the CRD's schema is generated from it (``crd``); a
DiffusionJob becomes a ConfigMap holding the document, its own ServiceAccount, Role and RoleBinding, a
NetworkPolicy and a ``ray.io/v1`` RayJob (``render``), which the controller (``controller``) creates, owns
and mirrors back into the DiffusionJob's status.
"""

GROUP = "sdray.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "DiffusionJob"
PLURAL = "diffusionjobs"

RAY_GROUP = "ray.io"
RAY_VERSION = "v1"
RAYJOB_PLURAL = "rayjobs"

# On a DiffusionJob named apart from its document (the service names them after its job ids): the document's
# own name, which its run and checkpoints go by.
DOCUMENT_NAME = "sdray.io/document-name"

# Labels the controller puts on everything it creates, and selects by.
JOB_LABEL = "sdray.io/job"
MANAGED_BY = {"app.kubernetes.io/managed-by": "sdray-controller", "app.kubernetes.io/name": "sdray"}
