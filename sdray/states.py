"""The one set of job states: the REST service, the DiffusionJob CRD's ``status.state``, the CLI and the
``state`` label of the metrics all say these strings.

CamelCase, as Kubernetes writes states and conditions (a Pod's phase, a Job's conditions, KubeRay's
``jobDeploymentStatus``); the REST API uses the same strings, so that a script reads one vocabulary
whichever way it asks. Each surface uses the states that can happen there:

- ``Queued``: waiting for admission: in the service's own queue (room on the cluster), or in Kueue's.
- ``Pending``: admitted; its Ray cluster or Ray job is starting (a retried RayJob too).
- ``Running``: training.
- ``Succeeded``, ``Failed``: ended.
- ``Cancelled``: stopped by request (the service's ``DELETE``; a DiffusionJob is cancelled by deleting it).
- ``Preempted``: stopped at a checkpoint on a preemption notice. A DiffusionJob waits for Kueue to admit it
  again and resumes there; in the service the run has ended (its driver exited 3): submitting the same
  document again continues it.

This module imports nothing of sdray: the service, the controller and the CLI may all import it.
"""

from __future__ import annotations

from enum import StrEnum


class JobState(StrEnum):
    QUEUED = "Queued"
    PENDING = "Pending"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    CANCELLED = "Cancelled"
    PREEMPTED = "Preempted"


# Plain strings (a JobState equals its string): what YAML and SQL are given.
STATES: tuple[str, ...] = tuple(state.value for state in JobState)
# Jobs that hold their resources (and count against a tenant's quota).
ACTIVE = frozenset({JobState.QUEUED.value, JobState.PENDING.value, JobState.RUNNING.value})
# A service job in these has ended and changes no more.
FINAL = frozenset({JobState.SUCCEEDED.value, JobState.FAILED.value, JobState.CANCELLED.value,
                   JobState.PREEMPTED.value})
# A DiffusionJob in these has ended (a preempted one resumes once Kueue admits it again).
TERMINAL = frozenset({JobState.SUCCEEDED.value, JobState.FAILED.value})

_BY_FOLDED = {state.casefold(): state for state in JobState}


def parse_state(text: str) -> JobState:
    """The state ``text`` names, in any case (``running``, as the REST API wrote states before there was
    one set); ValueError naming the states for anything else."""
    try:
        return _BY_FOLDED[str(text).casefold()]
    except KeyError:
        raise ValueError(f"expected one of {', '.join(STATES)}, got {text!r}") from None
