"""What the service needs from whatever runs its jobs.

A backend runs one job document and answers for it by the handle it returned. The service keeps the
queue, the quotas and the record; the backend only runs, reports and stops. ``local`` runs jobs as Ray
jobs on a local or joined Ray cluster; ``kuberay`` creates DiffusionJobs for the controller; ``dry-run``
accepts and finishes jobs without running them (API load tests, trying the service out).
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass, field



def tail_lines(text: str, tail: int | None) -> str:
    """The last ``tail`` lines of ``text`` (all of it when ``tail`` is None)."""
    if tail is None:
        return text
    return "".join(text.splitlines(keepends=True)[-tail:]) if tail > 0 else ""


class BackendError(RuntimeError):
    """The backend could not do what was asked (unreachable, refused); the message says why.

    ``permanent``: asking again cannot succeed (the cluster refused the object itself, e.g. the API
    server's 400/422), so a submission fails the job instead of being retried."""

    def __init__(self, message: str, *, permanent: bool = False):
        super().__init__(message)
        self.permanent = permanent


@dataclass
class BackendStatus:
    """A job as the backend sees it. ``missing``: the backend has no such job (lost with its cluster)."""

    state: str  # a JobState, or "missing"
    message: str = ""
    details: dict = field(default_factory=dict)


class Backend(ABC):
    name: str = "backend"

    @abstractmethod
    def ready(self) -> tuple[bool, str]:
        """Whether the backend answers now, and why not."""

    def capacity(self) -> dict[str, float] | None:
        """Total resources jobs may use (``{"CPU": 8, "GPU": 2}``); None when the backend queues jobs
        itself (Kueue), so the service submits at once."""
        return None

    @abstractmethod
    def submit(self, job_id: str, tenant: str, document: dict, env: dict[str, str], *,
               namespace: str | None = None) -> str:
        """Start the job; returns the handle the other calls take. ``env`` is set for the job's driver;
        ``namespace``: where the tenant's jobs run (its policy's), on backends that have namespaces."""

    def find(self, job_id: str, *, namespace: str | None = None) -> str | None:
        """The handle of a run of ``job_id`` the backend already has (submitted by a service killed before it
        recorded the handle), or None. A backend that cannot tell answers None, and the job is submitted."""
        return None

    @abstractmethod
    def status(self, handle: str) -> BackendStatus:
        """The job's state now."""

    @abstractmethod
    def cancel(self, handle: str) -> None:
        """Stop the job; what it checkpointed stays."""

    @abstractmethod
    def logs(self, handle: str, tail: int | None = None) -> str:
        """The driver's log (the last ``tail`` lines)."""

    async def follow_logs(self, handle: str, offset: int) -> AsyncIterator[str]:
        """What the driver's log gains after its first ``offset`` characters, chunk by chunk; it may end
        when the job does (the caller stops it otherwise). This default reads the whole log every second;
        a backend that can stream its log overrides it."""
        seen = offset
        while True:
            try:
                text = await asyncio.to_thread(self.logs, handle)
            except BackendError:
                text = ""
            if len(text) > seen:
                yield text[seen:]
                seen = len(text)
            await asyncio.sleep(1.0)

    def close(self) -> None:
        """Release connections (the jobs keep running)."""
