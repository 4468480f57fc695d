"""Stopping processes sdray started, by PID: SIGTERM first, SIGKILL for what has not exited in time.

``stop_process`` ends one child (``subprocess.Popen``); ``stop_process_group`` ends a process that was
started in its own session (``start_new_session=True``) together with everything it started, even when
this process is not its parent (a service restarted since it started it).
"""

from __future__ import annotations

import os
import signal
import subprocess


def stop_process(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM ``proc``, SIGKILL it if it has not exited after ``grace_s`` s; wait for it. Idempotent."""
    if proc.poll() is not None:
        return
    try:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=grace_s)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=grace_s)


def started_at(pid: int) -> float | None:
    """When process ``pid`` started (seconds since the epoch, as the OS records it), or None if none runs.
    Recorded beside a PID, it tells the process from a later one that reuses the number."""
    import psutil

    try:
        return round(psutil.Process(pid).create_time(), 2)
    except psutil.NoSuchProcess:
        return None


def is_running(pid: int, started: float | None = None) -> bool:
    """Whether ``pid`` runs and, when ``started`` is given, is the process that started then."""
    now = started_at(pid)
    return now is not None and (started is None or now == started)


def stop_process_group(pid: int, grace_s: float = 5.0, started: float | None = None) -> None:
    """SIGTERM the process group led by ``pid``, SIGKILL it when any member outlives ``grace_s`` s, then
    SIGKILL any descendant that left the group; returns once all of them have exited. Nothing happens
    when ``pid`` is gone, or (with ``started``) is another process that reuses the number."""
    import psutil

    if not is_running(pid, started):
        return
    try:
        leader = psutil.Process(pid)
        members = [leader, *leader.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            break
        _, alive = psutil.wait_procs(members, timeout=grace_s)
        if not alive:
            return
    for proc in alive:  # descendants in a group (or session) of their own
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=grace_s)
