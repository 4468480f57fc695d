"""The driver's side on Kubernetes: write the training's step and loss into its DiffusionJob's status.

The RayJob's head container gets ``SDRAY_DIFFUSIONJOB`` (the job's name) and ``SDRAY_NAMESPACE`` (its pod's
namespace, from the downward API); ``sdray train`` then patches
``status.step`` and ``status.loss`` (the controller owns the other status fields) at most every
``min_interval_s`` seconds, and once more at the end. The pod's ServiceAccount needs ``patch`` on
``diffusionjobs/status`` of this job: the job's own ServiceAccount (``sdray-job-<name>``, made by the
controller) has it for its job alone. Reporting is best effort: a status that cannot be written (a
ServiceAccount the document named, granted nothing) is logged once and never fails the training.
"""

from __future__ import annotations

import logging
import math
import os
import time

from sdray.k8s import GROUP, PLURAL, VERSION
from sdray.k8s.render import JOB_ENV, NAMESPACE_ENV

log = logging.getLogger("sdray.progress")


class StatusReporter:
    """Call it with the training's metrics (``step``, ``loss``); ``final=True`` writes at once."""

    def __init__(self, clients, namespace: str, name: str, min_interval_s: float = 10.0):
        self.clients, self.namespace, self.name = clients, namespace, name
        self.min_interval_s = min_interval_s
        self._last = -math.inf
        self._disabled = False

    @classmethod
    def from_env(cls) -> StatusReporter | None:
        """The reporter for ``$SDRAY_DIFFUSIONJOB`` in a pod, or None (not set, or no API access)."""
        name, namespace = os.environ.get(JOB_ENV), os.environ.get(NAMESPACE_ENV)
        if not (name and namespace):
            return None
        try:
            from sdray.k8s.kube import Clients

            clients = Clients.connect()
        except Exception as exc:  # no ServiceAccount token, no kubernetes package: train without reporting
            log.warning("DiffusionJob %s/%s: the API server is out of reach (%s): status.step/loss stay empty",
                        namespace, name, exc)
            return None
        return cls(clients, namespace, name)

    def __call__(self, metrics: dict, final: bool = False) -> None:
        now = time.monotonic()
        if self._disabled or (not final and now - self._last < self.min_interval_s):
            return
        status = {}
        if metrics.get("step") is not None:
            status["step"] = int(metrics["step"])
        loss = metrics.get("loss")
        if loss is not None and math.isfinite(float(loss)):
            status["loss"] = round(float(loss), 6)
        if not status:
            return
        self._last = now
        try:
            self.clients.custom.patch_namespaced_custom_object_status(
                GROUP, VERSION, self.namespace, PLURAL, self.name, {"status": status})
        except Exception as exc:
            # No permission, or no such job, stays so: stop, rather than log it at every step.
            self._disabled = getattr(exc, "status", None) in (401, 403, 404)
            log.warning("cannot write the status of DiffusionJob %s/%s (%s)%s", self.namespace, self.name, exc,
                        ": reporting stops" if self._disabled else "")

    def close(self) -> None:
        self.clients.close()
