"""Stopping processes sdray started (sdray/processes.py), on real process trees."""

import subprocess
import sys

import psutil

from conftest import wait_for
from sdray.processes import is_running, started_at, stop_process, stop_process_group

# A group leader with three children: one that ignores SIGTERM, one that left the group for a session of its
# own (as daemons do), and a plain one; it prints their PIDs.
TREE = r"""
trap '' TERM
sleep 300 &
a=$!
setsid sleep 300 &
b=$!
(trap - TERM; exec sleep 300) &
c=$!
echo $a $b $c
wait
"""


def test_stop_process_group_ends_the_whole_tree_even_what_ignores_sigterm_or_left_the_group():
    proc = subprocess.Popen(["bash", "-c", TREE], stdout=subprocess.PIPE, text=True, start_new_session=True)
    children = [int(p) for p in proc.stdout.readline().split()]
    wait_for(lambda: all(psutil.pid_exists(p) for p in children), 10, "the children to start")
    wait_for(lambda: len(psutil.Process(proc.pid).children(recursive=True)) >= 3, 10, "the tree to form")
    started = started_at(proc.pid)
    assert is_running(proc.pid, started) and not is_running(proc.pid, started - 100)

    stop_process_group(proc.pid, grace_s=2, started=started - 100)  # another process under that PID: untouched
    assert proc.poll() is None and all(psutil.pid_exists(p) for p in children)

    stop_process_group(proc.pid, grace_s=2, started=started)
    assert proc.wait(timeout=5) is not None
    gone = [p for p in children if not psutil.pid_exists(p) or psutil.Process(p).status() == psutil.STATUS_ZOMBIE]
    assert gone == children


def test_stop_process_kills_what_ignores_sigterm():
    proc = subprocess.Popen([sys.executable, "-c", "import signal; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                             "print('ready', flush=True); signal.pause()"], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    stop_process(proc, grace_s=0.5)
    assert proc.returncode == -9
    stop_process(proc)  # idempotent
