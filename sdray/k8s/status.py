"""A DiffusionJob's status from its RayJob's: state, times and the four conditions.

KubeRay reports two things: ``jobDeploymentStatus`` (the RayJob's life: New, Initializing, Running,
Complete, Failed, Suspending, Suspended, Retrying, …) and ``jobStatus`` (the Ray job's: PENDING, RUNNING,
STOPPED, SUCCEEDED, FAILED). The DiffusionJob says one state and keeps the conditions users ask KubeRay
for (kuberay#5152): Admitted (not held by Kueue), Running, Succeeded, Failed. A job suspended after it ran
(Kueue preempted it for another) is Preempted until it is admitted again.
"""

from __future__ import annotations

from datetime import datetime, timezone

from sdray.states import TERMINAL, JobState


def now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def rayjob_state(rayjob: dict, queue: str | None) -> tuple[str, str, str]:
    """(state, reason, message) of a RayJob."""
    status = rayjob.get("status") or {}
    deployment = status.get("jobDeploymentStatus") or ""
    job = status.get("jobStatus") or ""
    message = status.get("message") or ""
    if deployment == "Complete" and job == "SUCCEEDED":
        return JobState.SUCCEEDED, "Succeeded", message or "the training finished"
    if deployment in ("Failed", "ValidationFailed") or (deployment == "Complete" and job in ("FAILED", "STOPPED")):
        return (JobState.FAILED, status.get("reason") or deployment or "Failed",
                message or f"the Ray job ended {job or deployment}")
    if (rayjob.get("spec") or {}).get("suspend") or deployment in ("Suspended", "Suspending"):
        where = f"Kueue LocalQueue {queue}" if queue else "the RayJob is suspended"
        return (JobState.QUEUED if queue else JobState.PENDING), "Queued", f"waiting for admission ({where})"
    if deployment == "Running" and job == "RUNNING":
        return JobState.RUNNING, "Running", message or "training"
    if deployment == "Retrying":
        return JobState.PENDING, "Retrying", message or "the RayJob failed and starts again on a fresh cluster"
    return JobState.PENDING, deployment or "Created", message or "the Ray cluster is starting"


def set_condition(conditions: list[dict], type_: str, status: bool, reason: str, message: str,
                  generation: int | None) -> list[dict]:
    """``conditions`` with ``type_`` set; its lastTransitionTime moves only when its status changes."""
    value = "True" if status else "False"
    old = next((c for c in conditions if c.get("type") == type_), None)
    changed = old is None or old.get("status") != value
    condition = {"type": type_, "status": value, "reason": reason, "message": message,
                 "lastTransitionTime": now_iso() if changed else old.get("lastTransitionTime", now_iso())}
    if generation is not None:
        condition["observedGeneration"] = generation
    return [condition if c.get("type") == type_ else c for c in conditions] if old else [*conditions, condition]


def conditions_for(current: list[dict], state: str, reason: str, message: str, *, admitted: bool,
                   generation: int | None) -> list[dict]:
    """The four conditions for a state."""
    conditions = list(current)
    admitted_reason = "Admitted" if admitted else reason if state in (JobState.QUEUED, JobState.PENDING) else state
    conditions = set_condition(conditions, "Admitted", admitted, admitted_reason,
                               "the Ray cluster may start" if admitted else message, generation)
    for type_ in ("Running", "Succeeded", "Failed"):
        holds = state == type_
        conditions = set_condition(conditions, type_, holds, reason if holds else state,
                                   message if holds else "", generation)
    return conditions


def rayjob_status(rayjob: dict, queue: str | None, current: dict, generation: int | None) -> dict:
    """The DiffusionJob status fields the controller owns, for this RayJob (step and loss are the driver's).
    A job suspended after it ran (Kueue preempted it for another) is Preempted: its run checkpointed on the
    notice and resumes there once admitted again."""
    state, reason, message = rayjob_state(rayjob, queue)
    if reason == "Queued" and current.get("state") in (JobState.RUNNING, JobState.PREEMPTED):
        state, reason = JobState.PREEMPTED, "Preempted"
        message = "preempted: the run checkpointed and resumes there once admitted again" + (
            f" (Kueue LocalQueue {queue})" if queue else "")
    ray = rayjob.get("status") or {}
    admitted = not (rayjob.get("spec") or {}).get("suspend") and state != JobState.QUEUED
    status = {
        "state": state,
        "message": message,
        "rayJobName": rayjob["metadata"]["name"],
        "conditions": conditions_for(current.get("conditions") or [], state, reason, message, admitted=admitted,
                                     generation=generation),
    }
    if ray.get("startTime"):
        status["startTime"] = ray["startTime"]
    # None removes the field in a merge patch: a job refused before it ran, then fixed, runs again.
    status["completionTime"] = (ray.get("endTime") or current.get("completionTime") or now_iso()) if state in TERMINAL \
        else None
    return status


def failed_status(current: dict, reason: str, message: str, generation: int | None) -> dict:
    """Status of a job that never got a RayJob (its document or its name cannot run)."""
    return {
        "state": JobState.FAILED,
        "message": message,
        "completionTime": current.get("completionTime") or now_iso(),
        "conditions": conditions_for(current.get("conditions") or [], JobState.FAILED, reason, message, admitted=False,
                                     generation=generation),
    }
