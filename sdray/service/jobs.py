"""What the service does with jobs: accept within quota, queue, start when resources allow, follow,
cancel, take progress from the drivers, and pick up where it left off after a restart.

The queue is the service's own: a job waits until the backend's capacity has room for it, in submission
order per tenant (a tenant's big job is not overtaken by its own later small one; other tenants' jobs
that fit go ahead). A backend that queues by itself (Kueue) reports no capacity and gets every job at once.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from sdray.progress import Progress
from sdray.service.auth import Authenticator, Principal, hash_token
from sdray.service.backends.base import Backend, BackendError
from sdray.service.store import JobRecord, JobStore
from sdray.spec import DiffusionJob
from sdray.states import ACTIVE, FINAL, JobState, parse_state

log = logging.getLogger("sdray.service")

# A submission the backend refused for a passing reason is tried again after 1, 2, 4 … s, at most a minute apart.
RETRY_FIRST_S, RETRY_MAX_S = 1.0, 60.0


class QuotaExceeded(Exception):
    """Submission refused: the tenant is at a quota (HTTP 429); the message says which."""


@dataclass
class Demand:
    workers: int
    cpus: float
    gpus: float

    def as_dict(self) -> dict:
        return {"workers": self.workers, "CPU": self.cpus, "GPU": self.gpus}


def demand_of(job: DiffusionJob) -> Demand:
    """Resources the job holds while it runs: its workers (times the concurrent trials of a search) plus
    one CPU for its driver."""
    d = job.spec.distributed
    res = d.resources_per_worker or {}
    gpus = float(res.get("GPU", 1 if d.use_gpu else 0))
    copies = 1
    if job.spec.tune is not None:
        copies = job.spec.tune.max_concurrent_trials or 1
    workers = d.num_workers * copies
    return Demand(workers=workers, cpus=workers * float(res.get("CPU", 1)) + 1, gpus=workers * gpus)


def condition(rec: JobRecord, type_: str, status: bool, reason: str, message: str = "") -> list[dict]:
    """``rec.conditions`` with one condition set (its time changes only when its status does)."""
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    out = [c for c in rec.conditions if c["type"] != type_]
    old = next((c for c in rec.conditions if c["type"] == type_), None)
    changed = old is None or old["status"] != ("True" if status else "False")
    out.append({"type": type_, "status": "True" if status else "False", "reason": reason, "message": message,
                "lastTransitionTime": now if changed else old["lastTransitionTime"]})
    return out


class JobManager:
    def __init__(self, store: JobStore, backend: Backend, auth: Authenticator | None, *, public_url: str,
                 on_transition=None, namespace_of: Callable[[str], str | None] | None = None):
        self.store = store
        self.backend = backend
        self.auth = auth
        self.public_url = public_url.rstrip("/")
        # on_transition(state, tenant, waited_s=None): a job entered a state (waited_s: its wait to start)
        self.on_transition = on_transition or (lambda state, tenant, waited_s=None: None)
        # Where a tenant's jobs run (its policy's namespace); None: the backend's own.
        self.namespace_of = namespace_of or (lambda tenant: None)
        # Submissions the backend refused for a passing reason: job id -> (failures so far, next try's time).
        self._retry: dict[str, tuple[int, float]] = {}
        # One decision at a time: a quota check and its insert, an admission round, a cancel.
        self._lock = threading.RLock()

    # -- submission --------------------------------------------------------------------------------
    def submit(self, principal: Principal, job: DiffusionJob, document: dict) -> JobRecord:
        need = demand_of(job)
        with self._lock:
            self._check_quota(principal.tenant, need)
            return self._insert(principal, job, document, need)

    def _insert(self, principal: Principal, job: DiffusionJob, document: dict, need: Demand) -> JobRecord:
        now = time.time()
        rec = JobRecord(
            id=uuid.uuid4().hex[:12], seq=0, tenant=principal.tenant, name=job.metadata.name,
            kind="tune" if job.spec.tune is not None else "train", state=JobState.QUEUED,
            labels=dict(job.metadata.labels), document=document, demand=need.as_dict(),
            progress_token_hash="", created=now, updated=now,
        )
        rec.conditions = condition(rec, "Admitted", False, "Queued", "waiting for resources")
        self.store.insert(rec)
        self.on_transition(JobState.QUEUED, rec.tenant)
        return rec

    def _check_quota(self, tenant: str, need: Demand) -> None:
        if self.auth is None:
            return
        quota = self.auth.quota(tenant)
        if quota.max_concurrent_jobs is None and quota.max_workers is None and quota.max_gpus is None:
            return
        active, workers, gpus = self.store.active_usage(tenant)
        if quota.max_concurrent_jobs is not None and active + 1 > quota.max_concurrent_jobs:
            raise QuotaExceeded(f"tenant {tenant!r} has {active} active jobs; its quota is "
                                f"max_concurrent_jobs={quota.max_concurrent_jobs}: wait for one to finish or cancel one")
        for key, limit, unit in (("workers", quota.max_workers, "max_workers"), ("GPU", quota.max_gpus, "max_gpus")):
            used = workers if key == "workers" else gpus
            asked = need.workers if key == "workers" else need.gpus
            if limit is not None and used + asked > limit:
                raise QuotaExceeded(f"tenant {tenant!r} would use {used + asked:g} {key.lower()} "
                                    f"({used:g} in active jobs + {asked:g} asked); its quota is {unit}={limit}")

    # -- the queue ---------------------------------------------------------------------------------
    def admit(self) -> None:
        """Start pending jobs that fit, in submission order per tenant."""
        with self._lock:
            self._admit()

    def _admit(self) -> None:
        waiting = [r for r in self.store.list(states=[JobState.QUEUED]) if r.handle is None]
        if not waiting:
            return
        try:
            capacity = self.backend.capacity()
        except BackendError as exc:
            self._wait_for_capacity(waiting, str(exc))
            return
        if capacity is not None and not capacity.get("CPU"):
            # No cluster has no CPU at all: one that lists none is still starting (its head's node not
            # registered yet). Deciding "unschedulable" against it would fail jobs that fit a moment later.
            self._wait_for_capacity(waiting, f"the {self.backend.name} backend lists no CPU yet "
                                             "(its nodes are still registering)")
            return
        used = {"CPU": 0.0, "GPU": 0.0}
        for r in self.store.list(states=sorted(ACTIVE)):
            if r.handle is not None:
                for k in used:
                    used[k] += r.demand.get(k, 0)
        blocked: set[str] = set()
        for rec in waiting:
            never = [k for k in used if capacity is not None and rec.demand.get(k, 0) > capacity.get(k, 0)]
            if never:  # waiting would be forever: say so now, wherever the job is in its queue
                self._finish(rec, JobState.FAILED, "Unschedulable",
                             f"the job asks for {rec.demand[never[0]]:g} {never[0]} but the cluster has "
                             f"{capacity.get(never[0], 0):g} {never[0]} in all")
                continue
            if rec.tenant in blocked:
                continue
            if self._retry.get(rec.id, (0, 0.0))[1] > time.monotonic():  # backing off: it keeps its place
                blocked.add(rec.tenant)
                continue
            if capacity is not None:
                if any(used[k] + rec.demand.get(k, 0) > capacity.get(k, 0) for k in used):
                    blocked.add(rec.tenant)
                    if any(c["reason"] == "CapacityUnknown" for c in rec.conditions):  # known again: say so
                        self.store.update(rec.id, conditions=condition(rec, "Admitted", False, "Queued",
                                                                       "waiting for resources"))
                    continue
            self._start(rec)
            for k in used:
                used[k] += rec.demand.get(k, 0)

    def _wait_for_capacity(self, waiting: list[JobRecord], why: str) -> None:
        """Capacity is unknown for now: the queued jobs wait, and say why (once, not at every poll)."""
        log.warning("backend capacity unknown: %s", why)
        message = f"capacity unknown, waiting: {why}"
        for rec in waiting:
            admitted = next((c for c in rec.conditions if c["type"] == "Admitted"), {})
            if admitted.get("message") != message:
                self.store.update(rec.id, conditions=condition(rec, "Admitted", False, "CapacityUnknown", message))

    def _start(self, rec: JobRecord) -> None:
        if rec.progress_token_hash and self._adopt(rec):
            return
        token = secrets.token_urlsafe(24)
        env = {
            "SDRAY_JOB_ID": rec.id, "SDRAY_TENANT": rec.tenant,
            "SDRAY_PROGRESS_URL": f"{self.public_url}/internal/v1/jobs/{rec.id}",
            "SDRAY_PROGRESS_TOKEN": token,
        }
        self.store.update(rec.id, progress_token_hash=hash_token(token))
        try:
            handle = self.backend.submit(rec.id, rec.tenant, rec.document, env, namespace=self.namespace_of(rec.tenant))
        except BackendError as exc:
            if exc.permanent:  # the cluster refused the job itself: retrying would hold the quota forever
                self._retry.pop(rec.id, None)
                self._finish(rec, JobState.FAILED, "SubmitRefused", str(exc))
                return
            failures = self._retry.get(rec.id, (0, 0.0))[0] + 1
            delay = min(RETRY_MAX_S, RETRY_FIRST_S * 2 ** (failures - 1))
            self._retry[rec.id] = (failures, time.monotonic() + delay)
            log.warning("job %s: submission failed (try %d, next in %.0f s): %s", rec.id, failures, delay, exc)
            self.store.update(rec.id, conditions=condition(
                rec, "Admitted", False, "SubmitFailed", f"{exc} (try {failures}; trying again in {delay:.0f} s)"))
            return
        self._record_handle(rec, handle, f"submitted to the {self.backend.name} backend as {handle}")

    def _record_handle(self, rec: JobRecord, handle: str, message: str) -> None:
        """The job is the backend's now: Pending (starting) until the backend says more."""
        self._retry.pop(rec.id, None)
        self.store.update(rec.id, handle=handle, attempts=rec.attempts + 1, state=JobState.PENDING,
                          conditions=condition(rec, "Admitted", True, "Submitted", message))
        if rec.state != JobState.PENDING:
            self.on_transition(JobState.PENDING, rec.tenant)
        log.info("job %s (%s/%s): %s", rec.id, rec.tenant, rec.name, message)

    def _adopt(self, rec: JobRecord) -> bool:
        """A job given a progress token was (maybe) submitted before: by a service killed before it recorded
        the handle, or one whose record failed. If the backend runs it, follow that run (its driver holds the
        token whose hash is stored) instead of submitting it twice; the backend would refuse the second."""
        try:
            handle = self.backend.find(rec.id, namespace=self.namespace_of(rec.tenant))
        except BackendError as exc:
            log.warning("job %s: cannot tell whether it was submitted before; trying again: %s", rec.id, exc)
            return True  # not submitted now: the next round asks again
        if handle is None:
            return False
        self._record_handle(rec, handle, f"found running on the {self.backend.name} backend as {handle} after a "
                                         "restart of the service (it had been submitted before)")
        return True

    # -- following ---------------------------------------------------------------------------------
    def refresh(self) -> None:
        """Ask the backend about every submitted, unfinished job and record what changed."""
        with self._lock:
            self._refresh()

    def _refresh(self) -> None:
        for rec in self.store.list(states=sorted(ACTIVE)):
            if rec.handle is None:
                continue
            try:
                status = self.backend.status(rec.handle)
            except BackendError as exc:
                log.warning("job %s: status unknown: %s", rec.id, exc)
                continue
            if status.details:
                self.record_progress(rec.id, status.details)
            state = status.state if status.state == "missing" else parse_state(status.state)
            if state == "missing":
                self._finish(rec, JobState.FAILED, "BackendLost",
                             f"the {self.backend.name} backend no longer knows {rec.handle}: {status.message}".rstrip(": "))
            elif state in FINAL:
                reason = {JobState.SUCCEEDED: "Completed", JobState.FAILED: "Failed", JobState.CANCELLED: "Cancelled",
                          JobState.PREEMPTED: "Preempted"}[state]
                self._finish(rec, state, reason, status.message)
            elif state != rec.state:  # Pending → Running; Running → Queued (Kueue preempted it) …
                running = state == JobState.RUNNING
                first_start = running and rec.started is None
                started = rec.started or (time.time() if running else None)
                rec = self.store.update(rec.id, state=state, started=started, conditions=condition(
                    rec, "Running", running, "Started" if running else state, status.message))
                self.on_transition(state, rec.tenant, waited_s=rec.started - rec.created if first_start else None)

    def tick(self) -> None:
        with self._lock:
            self._refresh()
            self._admit()

    def _finish(self, rec: JobRecord, state: str, reason: str, message: str) -> None:
        self._retry.pop(rec.id, None)
        conds = condition(rec, "Running", False, reason, message)
        rec.conditions = conds
        if state == JobState.SUCCEEDED:
            conds = condition(rec, "Succeeded", True, reason, message)
        elif state == JobState.FAILED:
            conds = condition(rec, "Failed", True, reason, message)
        rec.conditions = conds
        if rec.handle is None:
            conds = condition(rec, "Admitted", False, reason, message)
        self.store.update(rec.id, state=state, finished=time.time(), conditions=conds)
        self.on_transition(state, rec.tenant)
        log.info("job %s: %s (%s) %s", rec.id, state, reason, message)

    def cancel(self, rec: JobRecord) -> JobRecord:
        """Stop the job (its checkpoints stay); a job still in the queue just leaves it."""
        with self._lock:
            rec = self.store.get(rec.id)
            if rec.state in FINAL:
                return rec
            if rec.handle is not None:
                self.backend.cancel(rec.handle)
            self._finish(rec, JobState.CANCELLED, "Cancelled", "cancelled by request; checkpoints are kept")
            return self.store.get(rec.id)

    def reconcile(self) -> None:
        """After a restart: follow again what still runs, fail what the backend lost."""
        self.refresh()

    # -- progress from the drivers -----------------------------------------------------------------
    def check_progress_token(self, rec: JobRecord, token: str) -> bool:
        return bool(rec.progress_token_hash) and secrets.compare_digest(hash_token(token), rec.progress_token_hash)

    def record_progress(self, job_id: str, payload: dict) -> JobRecord | None:
        """Merge a driver's (untrusted) update into the job's progress; its loss-curve points go to the
        curve. Non-finite numbers are stored as unknown (None): NaN is no JSON, and would break every list."""
        rec = self.store.get(job_id)
        if rec is None:
            return None
        update = Progress.from_payload(payload)
        self.store.add_points(job_id, [(name, step, value) for name, points in update.curve_points().items()
                                       for step, value in points])
        clean = update.to_payload()
        clean.pop("curve", None)
        clean["time"] = time.time()
        if clean.get("checkpoint_step") is not None and clean["checkpoint_step"] != rec.progress.get("checkpoint_step"):
            clean["checkpoint_time"] = clean["time"]  # a new checkpoint: its age is measured from now
        return self.store.update(job_id, progress={**rec.progress, **clean})
