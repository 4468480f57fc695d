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


def stop_process_group(pid: int, grace_s: float = 5.0) -> None:
    """SIGTERM the process group led by ``pid``, SIGKILL it when any member outlives ``grace_s`` s, and
    wait until every member that existed when called has exited. Nothing happens when ``pid`` is gone."""
    import psutil

    try:
        leader = psutil.Process(pid)
        members = [leader, *leader.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        _, alive = psutil.wait_procs(members, timeout=grace_s)
        if not alive:
            return
