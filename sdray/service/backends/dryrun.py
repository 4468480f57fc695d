"""A backend that accepts every job and reports it succeeded without running anything.

For trying the API, and for the API load benchmark, where only the service's own work is measured."""

from __future__ import annotations

import itertools

from sdray.service.backends.base import Backend, BackendStatus, tail_lines
from sdray.states import JobState, parse_state


class DryRunBackend(Backend):
    name = "dry-run"

    def __init__(self, *, hold: bool = False, capacity: dict[str, float] | None = None):
        """``hold``: jobs show as running until cancelled (to try queues and quotas); ``capacity``: the
        resources the pretend cluster has (None: unlimited)."""
        self.hold = hold
        self.cluster = capacity  # what capacity() answers (a test may change it, as nodes join a cluster)
        self._ids = itertools.count(1)
        self._jobs: dict[str, JobState] = {}
        self._handles: dict[str, str] = {}  # service job id -> handle
        self._logs: dict[str, str] = {}
        self.env: dict[str, dict[str, str]] = {}  # what each job's driver would have been given

    def capacity(self) -> dict[str, float] | None:
        return self.cluster

    def ready(self) -> tuple[bool, str]:
        return True, "dry run: jobs are accepted, not run"

    def submit(self, job_id: str, tenant: str, document: dict, env: dict[str, str], *,
               namespace: str | None = None) -> str:
        handle = f"dry-{next(self._ids)}"
        self._jobs[handle] = JobState.RUNNING if self.hold else JobState.SUCCEEDED
        self._logs[handle] = "dry run: the job was accepted and not run\n"
        self.env[handle] = dict(env)
        self._handles[job_id] = handle
        return handle

    def find(self, job_id: str, *, namespace: str | None = None) -> str | None:
        return self._handles.get(job_id)

    def status(self, handle: str) -> BackendStatus:
        state = self._jobs.get(handle)
        if state is None:
            return BackendStatus("missing", "the dry-run backend forgets its jobs when the service restarts")
        return BackendStatus(state, "dry run: nothing was trained")

    def cancel(self, handle: str) -> None:
        if handle in self._jobs:
            self.finish(handle, JobState.CANCELLED)

    def log(self, handle: str, line: str) -> None:
        """Add a line to a job's log (as a driver would print one)."""
        self._logs[handle] = self._logs.get(handle, "") + line + "\n"

    def finish(self, handle: str, state: str = JobState.SUCCEEDED) -> None:
        """End a held job as ``state`` (a JobState, in any case; its log says so)."""
        state = parse_state(state)
        self._jobs[handle] = state
        self.log(handle, f"dry run: the job ended as {state}")

    def logs(self, handle: str, tail: int | None = None) -> str:
        return tail_lines(self._logs.get(handle, ""), tail)
