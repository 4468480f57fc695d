"""``sdray controller``: reconcile DiffusionJobs into KubeRay RayJobs and mirror their status back.

Built on the official ``kubernetes`` client rather than kopf: the loop is small (watch two kinds, one
work queue, one reconcile function), leader election is a plain ``coordination.k8s.io`` Lease as every
Go controller uses (kopf's peering needs its own CRD and lets all replicas see every event), and the same
calls are tested over HTTP against a fake API server.

How it works:
- one watcher thread per kind and namespace lists, then watches from the list's resourceVersion,
  continues from the last event's version when a watch times out, and lists again on ``410 Gone``
  (the version was compacted away) and every ``resync_every`` seconds; every event enqueues its job's key;
- a work queue holds each key once, with exponential backoff for keys whose reconcile failed;
- only the replica holding the Lease takes keys off the queue; the others keep watching, ready to lead;
- ``reconcile`` is idempotent: it reads what exists and creates only what is missing (an object that
  already exists is adopted when it is owned by the same DiffusionJob, and never otherwise), so a
  restarted controller, or a new leader, creates nothing twice;
- before a job's RayJob it makes what its pods need (``sdray.k8s.render``): the document's ConfigMap,
  the job's own ServiceAccount with a Role and RoleBinding that let it patch only this job's status, and
  the NetworkPolicy that closes its Ray ports to other pods. It can grant that Role because it holds the
  permission itself (the API server's escalation check).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import yaml
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from sdray.k8s import API_VERSION, GROUP, JOB_LABEL, KIND, MANAGED_BY, PLURAL, RAY_GROUP, RAY_VERSION, RAYJOB_PLURAL, VERSION
from sdray.k8s.kube import Clients, document_of
from sdray.k8s.leader import LeaderElector
from sdray.k8s.render import JOB_FILE, SPEC_HASH, RenderError, RenderSettings, configmap_name, render
from sdray.k8s.status import TERMINAL, failed_status, rayjob_state, rayjob_status
from sdray.spec import SpecError, parse_job
from sdray.states import JobState

log = logging.getLogger("sdray.controller")
GENERATION = "sdray.io/generation"  # the DiffusionJob generation a RayJob was made from
REPORTING_CONTROLLER = "sdray.io/controller"  # events.k8s.io/v1 reportingController: a qualified name
# An Event repeated within this many seconds (same object, reason and note) counts up its series instead of
# being recorded again, as client-go's event recorder does; the controller remembers this many.
EVENT_SERIES_S, EVENT_MEMORY = 1800.0, 1000
# A RayJob whose Ray job has not started may be replaced by one made from a changed spec.
_NOT_STARTED = {"", "New", "Initializing", "Suspended", "Suspending"}
# The objects made beside the RayJob: kind → (the Clients API that serves it, the stem of its method names).
_APIS = {
    "ConfigMap": ("core", "namespaced_config_map"),
    "ServiceAccount": ("core", "namespaced_service_account"),
    "Role": ("rbac", "namespaced_role"),
    "RoleBinding": ("rbac", "namespaced_role_binding"),
    "NetworkPolicy": ("networking", "namespaced_network_policy"),
}


class NameConflict(RuntimeError):
    """An object the job needs exists and belongs to something else: it is never adopted."""


def default_identity() -> str:
    return f"{os.environ.get('POD_NAME') or socket.gethostname()}-{uuid.uuid4().hex[:6]}"


@dataclass
class ControllerConfig:
    """Where the controller looks and how it paces itself; the tests shorten the times."""

    namespaces: list[str] | None = None  # None: every namespace (needs a ClusterRole)
    lease_namespace: str = "default"
    lease_name: str = "sdray-controller"
    identity: str = field(default_factory=default_identity)
    lease_duration: float = 15.0
    renew_every: float = 5.0
    retry_every: float = 2.0
    watch_timeout: int = 60
    resync_every: float = 600.0
    backoff_base: float = 0.5
    backoff_cap: float = 60.0
    render: RenderSettings = field(default_factory=RenderSettings)


class WorkQueue:
    """Keys to reconcile, each held once, handed out when due. A key added while being worked on comes
    back after ``done``; ``retry`` delays a failed key exponentially (``base`` · 2^n, at most ``cap``)."""

    def __init__(self, base: float = 0.5, cap: float = 60.0):
        self.base, self.cap = base, cap
        self._cond = threading.Condition()
        self._due: dict = {}
        self._again: dict = {}
        self._active: set = set()
        self._failures: dict = {}

    def add(self, key, delay: float = 0.0) -> None:
        due = time.monotonic() + delay
        with self._cond:
            target = self._again if key in self._active else self._due
            target[key] = min(target.get(key, due), due)
            self._cond.notify_all()

    def get(self, stop: threading.Event, timeout: float):
        """The next due key, or None after ``timeout`` s or on ``stop``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not stop.is_set():
                now = time.monotonic()
                if self._due:
                    key = min(self._due, key=self._due.get)
                    if self._due[key] <= now:
                        del self._due[key]
                        self._active.add(key)
                        return key
                    wake = min(self._due[key], deadline)
                else:
                    wake = deadline
                if now >= deadline:
                    return None
                self._cond.wait(wake - now)
        return None

    def done(self, key) -> None:
        with self._cond:
            self._active.discard(key)
            if key in self._again:
                due = self._again.pop(key)
                self._due[key] = min(self._due.get(key, due), due)
                self._cond.notify_all()

    def retry(self, key) -> float:
        """Put a failed key back after its backoff; returns the delay."""
        with self._cond:
            n = self._failures.get(key, 0)
            self._failures[key] = n + 1
        delay = min(self.cap, self.base * 2 ** n)
        self.add(key, delay)
        return delay

    def forget(self, key) -> None:
        with self._cond:
            self._failures.pop(key, None)

    def failures(self, key) -> int:
        with self._cond:
            return self._failures.get(key, 0)

    def depth(self) -> int:
        """Keys waiting: due now or later (a failed key's backoff included), or added again while worked on."""
        with self._cond:
            return len(self._due) + len(self._again)


class ControllerMetrics:
    """The controller's Prometheus metrics, in a registry of its own (served on ``/metrics`` by
    ``serve_health``)."""

    def __init__(self, controller: Controller):
        self.registry = CollectorRegistry()
        self.reconciles = Counter("sdray_controller_reconciles", "Reconciles of a DiffusionJob started.",
                                  registry=self.registry)
        self.errors = Counter("sdray_controller_reconcile_errors", "Reconciles that failed (retried with backoff).",
                              registry=self.registry)
        self.duration = Histogram("sdray_controller_reconcile_duration_seconds", "Seconds one reconcile took.",
                                  buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
                                  registry=self.registry)
        Gauge("sdray_controller_leader", "1 while this replica holds the leader Lease.",
              registry=self.registry).set_function(lambda: float(controller.elector.is_leader))
        Gauge("sdray_controller_queue_depth", "DiffusionJobs waiting in the work queue.",
              registry=self.registry).set_function(lambda: float(controller.queue.depth()))

    def text(self) -> bytes:
        return generate_latest(self.registry)


def changed_paths(old, new, prefix: str = "spec") -> list[str]:
    """The dotted paths where two documents differ (a list counts as one value)."""
    if isinstance(old, dict) and isinstance(new, dict):
        paths = []
        for key in sorted(set(old) | set(new)):
            paths += changed_paths(old.get(key), new.get(key), f"{prefix}.{key}")
        return paths
    return [] if old == new else [prefix]


class Controller:
    """Reconciles DiffusionJobs in ``config.namespaces``; ``start``/``stop`` run it on threads."""

    def __init__(self, clients: Clients, config: ControllerConfig | None = None):
        self.clients = clients
        self.config = config or ControllerConfig()
        self.queue = WorkQueue(self.config.backoff_base, self.config.backoff_cap)
        self.elector = LeaderElector(clients, self.config.lease_namespace, self.config.lease_name,
                                     self.config.identity, lease_duration=self.config.lease_duration,
                                     renew_every=self.config.renew_every, retry_every=self.config.retry_every)
        self.metrics = ControllerMetrics(self)
        # (namespace, regarding uid, reason, note) → (Event name, count, first time): repeated Events form a series.
        self._recorded: dict[tuple, tuple[str, int, float]] = {}
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    # -- running --------------------------------------------------------------------------------------
    def start(self) -> Controller:
        namespaces = self.config.namespaces or [None]
        targets = [(self.elector.run, (self._stop,), "lease"), (self._work, (), "worker")]
        for ns in namespaces:
            targets.append((self._watch, (GROUP, VERSION, PLURAL, ns, None, self._on_diffusionjob), f"watch-dj-{ns}"))
            selector = ",".join(f"{k}={v}" for k, v in MANAGED_BY.items())
            targets.append((self._watch, (RAY_GROUP, RAY_VERSION, RAYJOB_PLURAL, ns, selector, self._on_rayjob),
                            f"watch-rayjob-{ns}"))
        for target, args, name in targets:
            thread = threading.Thread(target=target, args=args, name=f"sdray-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def request_stop(self) -> None:
        """Ask the threads to stop (safe from a signal handler); ``run_forever`` then returns."""
        self._stop.set()

    def stop(self, timeout: float | None = None, watches: bool = True) -> None:
        """Stop every thread and give the Lease up, waiting at most ``timeout`` s. A watch in flight ends at
        its own timeout: ``watches=False`` leaves those daemon threads to end with the process."""
        self._stop.set()
        deadline = time.monotonic() + (timeout if timeout is not None else self.config.watch_timeout + 5)
        for thread in self._threads[:2] if not watches else self._threads:  # the Lease's and the worker's first
            thread.join(max(0.0, deadline - time.monotonic()))

    @property
    def healthy(self) -> bool:
        return bool(self._threads) and all(t.is_alive() for t in self._threads)

    def run_forever(self, stop_timeout: float = 5.0) -> None:
        """Run until ``request_stop`` (SIGTERM in ``sdray controller``) or a thread dies."""
        self.start()
        try:
            while self.healthy and not self._stop.is_set():
                self._stop.wait(5.0)
        finally:
            self.stop(stop_timeout, watches=False)

    # -- watching -------------------------------------------------------------------------------------
    def _on_diffusionjob(self, obj: dict) -> None:
        meta = obj.get("metadata") or {}
        self.queue.add((meta.get("namespace"), meta.get("name")))

    def _on_rayjob(self, obj: dict) -> None:
        meta = obj.get("metadata") or {}
        self.queue.add((meta.get("namespace"), (meta.get("labels") or {}).get(JOB_LABEL, meta.get("name"))))

    def _watch(self, group, version, plural, namespace, selector, on_object) -> None:
        from kubernetes import watch
        from kubernetes.client import ApiException

        custom = self.clients.custom
        if namespace:
            lister, args = custom.list_namespaced_custom_object, (group, version, namespace, plural)
        else:
            lister, args = custom.list_cluster_custom_object, (group, version, plural)
        kwargs = {"label_selector": selector} if selector else {}
        failures = 0
        while not self._stop.is_set():
            try:
                listing = lister(*args, **kwargs)
                for item in listing.get("items", []):
                    on_object(item)
                version_seen = listing["metadata"]["resourceVersion"]
                relist_at = time.monotonic() + self.config.resync_every
                failures = 0
                while not self._stop.is_set() and time.monotonic() < relist_at:
                    stream = watch.Watch()
                    for event in stream.stream(lister, *args, resource_version=version_seen,
                                               timeout_seconds=self.config.watch_timeout,
                                               _request_timeout=(10, self.config.watch_timeout + 10), **kwargs):
                        on_object(event["object"])
                        if self._stop.is_set():
                            stream.stop()
                    version_seen = stream.resource_version or version_seen
            except ApiException as exc:
                if exc.status == 410:
                    log.info("watch of %s in %s expired (410 Gone): listing again", plural, namespace or "all")
                    continue
                failures += 1
                log.warning("watching %s in %s: %s %s", plural, namespace or "all", exc.status, exc.reason)
            except Exception as exc:  # connection refused/reset: the API server restarts, or a network blip
                failures += 1
                log.warning("watching %s in %s: %s", plural, namespace or "all", exc)
            self._stop.wait(min(self.config.backoff_cap, self.config.backoff_base * 2 ** max(0, failures - 1)))

    # -- working --------------------------------------------------------------------------------------
    def _work(self) -> None:
        while not self._stop.is_set():
            if not self.elector.is_leader:
                self.elector.wait_for_leadership(self._stop, timeout=1.0)
                continue
            key = self.queue.get(self._stop, timeout=1.0)
            if key is None:
                continue
            try:
                self.metrics.reconciles.inc()
                with self.metrics.duration.time():
                    after = self.reconcile(*key)
                self.queue.forget(key)
                if after is not None:
                    self.queue.add(key, after)
            except Exception as exc:  # API errors, the server unreachable: try again later
                self.metrics.errors.inc()
                delay = self.queue.retry(key)
                log.warning("reconciling %s/%s failed (retry in %.1f s): %s", *key, delay, exc)
            finally:
                self.queue.done(key)

    def reconcile(self, namespace: str, name: str) -> float | None:
        """Bring one DiffusionJob's RayJob and status in line with its spec; returns a delay after which
        to look again, if any. Raises on API errors (the caller retries with backoff)."""
        dj = self._get(GROUP, VERSION, PLURAL, namespace, name)
        if dj is None or dj["metadata"].get("deletionTimestamp"):
            return None  # deleted: the garbage collector removes what it owned
        status = dj.get("status") or {}
        rayjob = self._get(RAY_GROUP, RAY_VERSION, RAYJOB_PLURAL, namespace, name)
        if rayjob is not None and not self._owned(rayjob, dj):
            message = f"a RayJob named {name} exists that this DiffusionJob does not own; rename the DiffusionJob"
            self._fail(dj, "NameConflict", message)
            return None
        # status.observedGeneration: the last spec generation this controller has seen and acted on, whatever it
        # did with it (applied, made the RayJob again, refused: see refusedGeneration, failed as invalid).
        if rayjob is not None and rayjob["metadata"].get("deletionTimestamp"):
            return 2.0  # a replaced RayJob is still going away (KubeRay's finalizer)
        try:
            job = parse_job(document_of(dj), f"{KIND} {namespace}/{name}")
            *beside, desired = render(job, self.config.render, namespace=namespace, owner=dj)
        except (SpecError, RenderError) as exc:
            message = "; ".join(exc.errors) if isinstance(exc, SpecError) else str(exc)
            if rayjob is None:
                self._fail(dj, "InvalidSpec", f"invalid document: {message}")
            else:
                self._mirror(dj, rayjob, None, self._refuse(dj, f"the changed document is invalid: {message}"))
            return None
        desired["metadata"]["annotations"][GENERATION] = str(dj["metadata"].get("generation", 1))
        if rayjob is None:
            generation = dj["metadata"].get("generation")
            refused_before = not status.get("rayJobName") and status.get("observedGeneration") != generation
            if status.get("state") in TERMINAL and not refused_before:
                # A finished job is never started again (its RayJob was deleted by hand); one whose document
                # was refused before it ran starts once its spec changes.
                return None
            try:  # the ConfigMap, the job's ServiceAccount and RBAC, its NetworkPolicy: before its pods
                for obj in beside:
                    self._apply(obj, dj)
            except NameConflict as exc:
                self._fail(dj, "NameConflict", str(exc))
                return None
            rayjob = self._create_rayjob(desired, dj)
        elif rayjob["metadata"].get("annotations", {}).get(SPEC_HASH) != desired["metadata"]["annotations"][SPEC_HASH]:
            ray = rayjob.get("status") or {}
            if ray.get("jobDeploymentStatus", "") in _NOT_STARTED and ray.get("jobStatus", "") in ("", "PENDING"):
                self._replace_rayjob(dj, rayjob)
                return None  # its DELETED event brings the job back here, to create the new one
            self._mirror(dj, rayjob, job.spec.cluster.queue, self._refuse(dj, self._change_message(dj, rayjob, beside[0])))
            return None
        self._mirror(dj, rayjob, job.spec.cluster.queue)
        return None

    # -- pieces of reconcile ----------------------------------------------------------------------------
    def _get(self, group, version, plural, namespace, name) -> dict | None:
        from kubernetes.client import ApiException

        try:
            return self.clients.custom.get_namespaced_custom_object(group, version, namespace, plural, name)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    @staticmethod
    def _owned(obj: dict, dj: dict) -> bool:
        return any(ref.get("uid") == dj["metadata"]["uid"] for ref in obj["metadata"].get("ownerReferences") or [])

    def _apply(self, obj: dict, dj: dict) -> None:
        """Create an object of the job, or adopt it when it is already the job's (an earlier answer was lost).
        A ConfigMap is brought up to date (a spec changed before the start); the other kinds follow from the
        job's name and are left as they are. One that belongs to anything else raises NameConflict: adopting
        a ServiceAccount or RoleBinding made by someone else would run the job as their identity."""
        from kubernetes.client import ApiException

        api_name, stem = _APIS[obj["kind"]]
        api, meta = getattr(self.clients, api_name), obj["metadata"]
        try:
            getattr(api, f"create_{stem}")(meta["namespace"], obj)
            return
        except ApiException as exc:
            if exc.status != 409:
                raise
        current = self.clients.to_dict(getattr(api, f"read_{stem}")(meta["name"], meta["namespace"]))
        if not self._owned(current, dj):
            raise NameConflict(f"a {obj['kind']} named {meta['name']} exists that this DiffusionJob does not own; "
                               "rename the DiffusionJob")
        if obj["kind"] == "ConfigMap" and current.get("data") != obj["data"]:
            meta["resourceVersion"] = current["metadata"]["resourceVersion"]
            getattr(api, f"replace_{stem}")(meta["name"], meta["namespace"], obj)

    def _create_rayjob(self, desired: dict, dj: dict) -> dict:
        from kubernetes.client import ApiException

        meta = desired["metadata"]
        try:
            created = self.clients.custom.create_namespaced_custom_object(
                RAY_GROUP, RAY_VERSION, meta["namespace"], RAYJOB_PLURAL, desired)
        except ApiException as exc:
            if exc.status != 409:
                raise
            # Created by an earlier attempt whose answer was lost: adopt it if it is ours.
            existing = self._get(RAY_GROUP, RAY_VERSION, RAYJOB_PLURAL, meta["namespace"], meta["name"])
            if existing is None or not self._owned(existing, dj):
                raise RuntimeError(f"RayJob {meta['namespace']}/{meta['name']} exists and is not this job's") from None
            return existing
        queue = meta["labels"].get("kueue.x-k8s.io/queue-name")
        self._event(dj, "Normal", "Created", f"created RayJob {meta['name']}"
                    + (f" in Kueue LocalQueue {queue}" if queue else ""), action="CreateRayJob")
        return created

    def _replace_rayjob(self, dj: dict, rayjob: dict) -> None:
        meta = rayjob["metadata"]
        self.clients.custom.delete_namespaced_custom_object(RAY_GROUP, RAY_VERSION, meta["namespace"], RAYJOB_PLURAL,
                                                            meta["name"], propagation_policy="Background")
        generation = dj["metadata"].get("generation")
        self._event(dj, "Normal", "Updated", f"the spec changed before the job started (generation "
                    f"{generation}): RayJob {meta['name']} is made again from it", action="ReplaceRayJob")
        self._patch_status(dj, {"observedGeneration": generation})

    def _change_message(self, dj: dict, rayjob: dict, configmap: dict) -> str:
        """Which fields changed, read against the document the running RayJob was made from."""
        from kubernetes.client import ApiException

        try:
            current = self.clients.to_dict(self.clients.core.read_namespaced_config_map(
                configmap_name(dj["metadata"]["name"]), dj["metadata"]["namespace"]))
            applied = yaml.safe_load(current["data"][JOB_FILE])
        except (ApiException, KeyError, yaml.YAMLError):
            applied = None
        new = yaml.safe_load(configmap["data"][JOB_FILE])
        paths = changed_paths((applied or {}).get("spec"), new["spec"]) if applied else ["spec"]
        shown = ", ".join(paths[:6]) + (f" and {len(paths) - 6} more" if len(paths) > 6 else "")
        state = rayjob_state(rayjob, None)[0].lower()
        return (f"changes to {shown} refused: the job is {state} and keeps the document it started with; "
                "create a new DiffusionJob to train with the new one")

    def _refuse(self, dj: dict, message: str) -> dict:
        """Refuse a spec change of a started job: a Warning Event (once per generation); returns the status
        fields that say so (refusedGeneration), which ``_mirror`` writes with the rest in one patch."""
        generation = dj["metadata"].get("generation")
        if (dj.get("status") or {}).get("refusedGeneration") != generation:
            self._event(dj, "Warning", "SpecChangeRefused", f"generation {generation}: {message}",
                        action="RefuseSpecChange")
        return {"refusedGeneration": generation}

    def _fail(self, dj: dict, reason: str, message: str) -> None:
        status = dj.get("status") or {}
        if status.get("state") == JobState.FAILED and status.get("message") == message:
            return
        self._event(dj, "Warning", reason, message, action="FailJob")
        new = failed_status(status, reason, message, dj["metadata"].get("generation"))
        new["observedGeneration"] = dj["metadata"].get("generation")
        self._patch_status(dj, new)

    def _mirror(self, dj: dict, rayjob: dict, queue: str | None, also: dict | None = None) -> None:
        """Copy the RayJob's progress into the DiffusionJob's status, when it changed. The spec generation seen
        is this one (observedGeneration, the conditions' too), even when it was refused; appliedGeneration is
        the one the RayJob was made from."""
        applied = int(rayjob["metadata"].get("annotations", {}).get(GENERATION, 0)) or None
        seen = dj["metadata"].get("generation") or applied
        current = dj.get("status") or {}
        new = rayjob_status(rayjob, queue, current, seen)
        new["observedGeneration"] = seen
        new["appliedGeneration"] = applied
        new.update(also or {})
        if any(current.get(k) != v for k, v in new.items()):
            if new["state"] != current.get("state"):
                kind = "Warning" if new["state"] == JobState.FAILED else "Normal"
                self._event(dj, kind, new["state"], new["message"], action="UpdateStatus")
            self._patch_status(dj, new)

    def _patch_status(self, dj: dict, status: dict) -> None:
        meta = dj["metadata"]
        updated = self.clients.custom.patch_namespaced_custom_object_status(
            GROUP, VERSION, meta["namespace"], PLURAL, meta["name"], {"status": status})
        dj["status"] = updated.get("status") or {}

    def _event(self, dj: dict, type_: str, reason: str, note: str, *, action: str) -> None:
        """Record an events.k8s.io/v1 Event regarding the DiffusionJob: what happened (``reason``), what the
        controller did (``action``), in words (``note``). The same Event again within EVENT_SERIES_S counts up
        the first one's ``series`` instead. Best effort: an Event lost is not worth a retry."""
        from kubernetes.client import ApiException

        meta = dj["metadata"]
        namespace, note = meta["namespace"], note[:1024]  # the API server's limit on a note
        key = (namespace, meta["uid"], reason, note)
        now = time.time()
        try:
            known = self._recorded.get(key)
            if known is not None and now - known[2] < EVENT_SERIES_S:
                name, count, first = known
                series = {"count": count + 1, "lastObservedTime": _micro_time(now)}
                try:
                    self.clients.events.patch_namespaced_event(name, namespace, {"series": series},
                                                               _content_type="application/merge-patch+json")
                    self._recorded[key] = (name, count + 1, first)
                    return
                except ApiException as exc:
                    if exc.status != 404:  # gone (Events expire): record it afresh
                        raise
            event = {
                "apiVersion": "events.k8s.io/v1", "kind": "Event",
                "metadata": {"name": f"{meta['name']}.{uuid.uuid4().hex[:16]}", "namespace": namespace},
                "eventTime": _micro_time(now),
                "reportingController": REPORTING_CONTROLLER, "reportingInstance": self.config.identity[:128],
                "action": action, "reason": reason, "type": type_, "note": note,
                "regarding": {"apiVersion": API_VERSION, "kind": KIND, "name": meta["name"], "namespace": namespace,
                              "uid": meta["uid"], "resourceVersion": meta.get("resourceVersion")},
            }
            self.clients.events.create_namespaced_event(namespace, event)
            if len(self._recorded) >= EVENT_MEMORY:
                self._recorded.pop(next(iter(self._recorded)))  # the oldest
            self._recorded[key] = (event["metadata"]["name"], 1, now)
        except Exception as exc:
            log.warning("could not record event %s on %s/%s: %s", reason, namespace, meta["name"], exc)


def _micro_time(t: float) -> str:
    """A MicroTime as the API server writes it (events.k8s.io/v1 eventTime)."""
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def serve_health(controller: Controller, port: int, host: str = "0.0.0.0") -> ThreadingHTTPServer:
    """``/healthz`` (every thread alive), ``/readyz`` and ``/metrics`` (the controller's prometheus_client
    registry, ``ControllerMetrics``) on ``port``."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            content_type = "text/plain; charset=utf-8"
            if self.path in ("/healthz", "/readyz"):
                ok = controller.healthy
                data, code = ("ok\n" if ok else "threads stopped\n").encode(), (200 if ok else 503)
            elif self.path == "/metrics":
                data, code, content_type = controller.metrics.text(), 200, CONTENT_TYPE_LATEST
            else:
                data, code = b"not found\n", 404
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="sdray-health", daemon=True).start()
    return server
