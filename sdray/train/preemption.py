"""Preemption: stop at a step boundary, checkpoint, and say "preempted" instead of failing.

Shared clusters take workers away with notice: Kubernetes evicts a pod (node drain, Kueue preempting for a
higher-priority job, a spot reclaim) by sending SIGTERM and killing it ``terminationGracePeriodSeconds``
later. A run that dies there loses everything since its last periodic checkpoint; one that hears the
notice finishes its step, checkpoints and exits, and the next start resumes with nothing lost.

Who hears the notice:
- a worker process that receives SIGTERM (``install_signal_handler``; on Ray Train it is installed in
  each worker's main thread when the backend starts, replacing Ray's exit-at-once handler). A second
  SIGTERM while the first is being honoured exits as before;
- the driver (``sdray train``) on SIGTERM raises the flag on the run's ``ProgressBoard``; each worker
  watches it (``watch``) and raises its own.
The loop asks ``Preemption.agreed`` after every optimizer step: a collective, so every worker stops at the
same step even when only one was told (one node drained). The run then writes a checkpoint (atomic, as
every checkpoint) unless the step was just saved, skips the export, and reports ``status: preempted``;
``sdray train`` exits with ``EXIT_PREEMPTED``.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import threading
import time
from collections.abc import Callable

import torch

from sdray.train.parallel import any_worker_has

log = logging.getLogger("sdray.train")


_requested = threading.Event()
_reason: list[str] = []


def request(reason: str) -> None:
    """Ask this process's run to stop at the next step boundary with a checkpoint."""
    if not _requested.is_set():
        _reason.append(reason)
        _requested.set()


def requested() -> bool:
    return _requested.is_set()


def reason() -> str | None:
    return _reason[0] if _reason else None


def reset() -> None:
    """Forget a request (a new run in the same process: tests, the plain-process runner)."""
    _requested.clear()
    _reason.clear()


def install_signal_handler() -> bool:
    """Make SIGTERM a preemption request in this process (main thread only; returns False elsewhere).
    The first SIGTERM asks for a checkpointed stop; a second one runs the handler that was there before
    (Ray's worker exits; Python's default ends the process), so a notice never makes a process unkillable.
    (A request that came another way, from the driver, does not count as the first SIGTERM.)"""
    if threading.current_thread() is not threading.main_thread():
        return False
    previous = signal.getsignal(signal.SIGTERM)
    received: list[int] = []

    def handler(signum, frame):
        if received:
            signal.signal(signal.SIGTERM, previous if callable(previous) else signal.SIG_DFL)
            if callable(previous):
                previous(signum, frame)
            else:
                os.kill(os.getpid(), signal.SIGTERM)
            return
        received.append(signum)
        request(f"SIGTERM to pid {os.getpid()}")

    signal.signal(signal.SIGTERM, handler)
    return True


def watch(poll: Callable[[], bool], interval_s: float = 1.0) -> threading.Event:
    """Raise this process's request when ``poll()`` (e.g. the driver's board) says so; checked every
    ``interval_s`` on a daemon thread until the returned event is set."""
    stop = threading.Event()

    def run():
        while not stop.wait(interval_s):
            try:
                if poll():
                    request("the driver was told to stop")
                    return
            except Exception:  # the board is gone: the driver ended; nothing to watch
                return

    threading.Thread(target=run, name="sdray-preemption-watch", daemon=True).start()
    return stop


class Preemption:
    """The loop's view: ``agreed()`` after each optimizer step says whether the run stops here."""

    def __init__(self, enabled: bool, device: torch.device):
        self.enabled = enabled
        self.device = device
        self.stopped_at: int | None = None
        self.noticed_at: float | None = None

    def agreed(self) -> bool:
        """True when any worker was told to stop (collective: every worker calls it at the same step)."""
        if not self.enabled:
            return False
        flag = any_worker_has(requested(), self.device)
        if flag and self.noticed_at is None:
            self.noticed_at = time.monotonic()
            log.warning("preemption: stopping at this step with a checkpoint (%s)", reason() or "another worker")
        return flag


def _is_run_process(cmdline: list[str]) -> bool:
    """A Ray Train worker, or an ``sdray train``/``tune`` driver (a search's driver ends on it and resumes its
    trials from their checkpoints on the next start: ``--resume-if-exists``)."""
    text = " ".join(cmdline)
    return "RayTrainWorker" in text or bool(re.search(r"sdray(\.cli)? (train|tune) ", text + " "))


def notify_local(timeout_s: float, root_pid: int | None = None) -> list[int]:
    """Tell every run process on this machine (container; with ``root_pid``: among that process's
    descendants) that it is being preempted (SIGTERM, once) and wait up to ``timeout_s`` for them to end;
    returns the PIDs told. Kubernetes signals only a container's
    first process, which for a Ray pod is Ray itself: the Ray pods' preStop hook runs this so that the
    drivers and workers hear the notice first and checkpoint within the grace period."""
    import psutil

    told = []
    candidates = psutil.process_iter() if root_pid is None else psutil.Process(root_pid).children(recursive=True)
    for proc in candidates:
        try:
            cmdline = proc.cmdline()
        except psutil.Error:
            continue
        if proc.pid != os.getpid() and _is_run_process(cmdline):
            try:
                proc.send_signal(signal.SIGTERM)
                told.append(proc)
            except psutil.Error:
                pass
    psutil.wait_procs(told, timeout=timeout_s)
    return [p.pid for p in told]
