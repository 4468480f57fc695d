"""Leader election over a ``coordination.k8s.io/v1`` Lease, as client-go's leaderelection does it.

One replica holds the Lease and renews it; the others watch it. A Lease is taken over only when it has
not changed for ``lease_duration`` seconds by the *observer's* clock (client-go's rule: no comparison of
clocks across machines). Every write carries the resourceVersion read, so two candidates racing for the
same Lease cannot both win: the API server answers the slower one 409 Conflict. A leader that has not
renewed within ``lease_duration`` stops counting itself leader before anyone else may take over.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import datetime, timezone

log = logging.getLogger("sdray.controller")


def _micro_time() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaderElector:
    """Keeps trying to hold Lease ``namespace/name`` for ``identity``; ``is_leader`` says whether it does."""

    def __init__(self, clients, namespace: str, name: str, identity: str, *, lease_duration: float = 15.0,
                 renew_every: float = 5.0, retry_every: float = 2.0):
        if renew_every >= lease_duration:
            raise ValueError("renew_every must be shorter than lease_duration")
        self.clients, self.namespace, self.name, self.identity = clients, namespace, name, identity
        self.lease_duration, self.renew_every, self.retry_every = lease_duration, renew_every, retry_every
        self._renewed_at: float | None = None  # monotonic time of our last successful write
        self._observed: tuple | None = None  # (holder, renewTime) last seen, and when it last changed
        self._observed_at = 0.0
        self._changed = threading.Condition()
        self._was_leader = False

    @property
    def is_leader(self) -> bool:
        return self._renewed_at is not None and time.monotonic() - self._renewed_at < self.lease_duration

    def wait_for_leadership(self, stop: threading.Event, timeout: float) -> bool:
        """Wait (at most ``timeout`` s, or until ``stop``) for this replica to lead."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not self.is_leader and not stop.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(min(left, self.retry_every))
        return self.is_leader

    def run(self, stop: threading.Event) -> None:
        """Try to acquire or renew until ``stop``; then give the Lease up if held."""
        while not stop.is_set():
            try:
                self._try()
            except Exception as exc:  # the API server unreachable: keep trying; leadership lapses by itself
                log.warning("lease %s/%s: %s", self.namespace, self.name, exc)
            self._notify()
            stop.wait(self.renew_every if self.is_leader else self.retry_every)
        self.release()
        self._notify()

    def _notify(self) -> None:
        leader = self.is_leader
        with self._changed:
            self._changed.notify_all()
        if leader != self._was_leader:
            self._was_leader = leader
            log.info("%s %s leadership of lease %s/%s", self.identity, "took" if leader else "lost",
                     self.namespace, self.name)

    def _try(self) -> None:
        from kubernetes.client import ApiException

        coord = self.clients.coordination
        try:
            lease = self.clients.to_dict(coord.read_namespaced_lease(self.name, self.namespace))
        except ApiException as exc:
            if exc.status != 404:
                raise
            self._write(None)
            return
        spec = lease.get("spec") or {}
        holder = spec.get("holderIdentity") or ""
        now = time.monotonic()
        seen = (holder, spec.get("renewTime"))
        if seen != self._observed:
            self._observed, self._observed_at = seen, now
        duration = spec.get("leaseDurationSeconds") or self.lease_duration
        if holder == self.identity or not holder or now - self._observed_at > duration:
            self._write(lease)
        else:
            self._renewed_at = None

    def _write(self, lease: dict | None) -> None:
        """Create the Lease, or take/renew it at the resourceVersion read; a 409 means someone else won."""
        from kubernetes.client import ApiException

        now = _micro_time()
        spec = dict((lease or {}).get("spec") or {})
        ours = spec.get("holderIdentity") == self.identity
        spec.update(holderIdentity=self.identity, leaseDurationSeconds=int(round(self.lease_duration)), renewTime=now)
        if not ours:
            spec["acquireTime"] = now
            spec["leaseTransitions"] = (spec.get("leaseTransitions") or 0) + (1 if lease else 0)
        meta = {"name": self.name, "namespace": self.namespace}
        if lease:
            meta["resourceVersion"] = lease["metadata"]["resourceVersion"]
        body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": meta, "spec": spec}
        started = time.monotonic()
        try:
            if lease is None:
                self.clients.coordination.create_namespaced_lease(self.namespace, body)
            else:
                self.clients.coordination.replace_namespaced_lease(self.name, self.namespace, body)
        except ApiException as exc:
            if exc.status != 409:
                raise
            self._renewed_at = None
            return
        self._renewed_at = started

    def release(self) -> None:
        """Give the Lease up (holder emptied) so that another replica takes over at once."""
        if not self.is_leader:
            return
        from kubernetes.client import ApiException

        self._renewed_at = None
        try:
            lease = self.clients.to_dict(self.clients.coordination.read_namespaced_lease(self.name, self.namespace))
            if (lease.get("spec") or {}).get("holderIdentity") != self.identity:
                return
            lease["spec"]["holderIdentity"] = ""
            lease["spec"]["leaseDurationSeconds"] = 1
            self.clients.coordination.replace_namespaced_lease(self.name, self.namespace, lease)
        except (ApiException, OSError) as exc:  # it expires by itself anyway
            log.warning("could not release lease %s/%s: %s", self.namespace, self.name, exc)
