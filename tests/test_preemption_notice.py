"""`sdray preemption-notice` (the Ray pods' preStop hook) tells the run processes and waits for them."""

import os
import subprocess
import sys
import textwrap

import psutil

from sdray.train import preemption

# A stand-in run process: honours the notice as the loop does (finish, then exit), with the command line of a
# driver so the notice finds it.
RUN = textwrap.dedent("""
    import signal, sys
    from sdray.train import preemption
    preemption.install_signal_handler()
    print("ready", flush=True)
    while not preemption.requested():
        signal.pause()  # the loop's steps, until the notice
    print("checkpointed", flush=True)
    sys.exit(3)
""")


def test_notice_reaches_the_runs_of_this_machine_and_waits_for_their_checkpoint():
    run = subprocess.Popen([sys.executable, "-c", RUN, "sdray", "train", "job.yaml"], stdout=subprocess.PIPE)
    other = subprocess.Popen([sys.executable, "-c", "import signal; signal.pause()", "sdray", "serve"])
    try:
        assert run.stdout.readline().strip() == b"ready"
        told = preemption.notify_local(30, root_pid=os.getpid())
        assert told == [run.pid]  # `sdray serve` is no run: left alone
        # it had ended (the notice reaped it) after its checkpoint by the time the hook returned
        assert not psutil.pid_exists(run.pid) and run.stdout.readline().strip() == b"checkpointed"
        assert other.poll() is None
    finally:
        other.kill()
        run.kill()
        other.wait()
        run.wait()


def test_a_second_sigterm_ends_a_process_that_is_slow_to_honour_the_first():
    code = RUN.replace('print("checkpointed", flush=True)', 'print("noticed", flush=True)\nwhile True:\n'
                       '    signal.pause()  # slow to honour it')
    run = subprocess.Popen([sys.executable, "-c", code, "sdray", "train", "job.yaml"], stdout=subprocess.PIPE)
    try:
        assert run.stdout.readline().strip() == b"ready"
        run.terminate()
        assert run.stdout.readline().strip() == b"noticed" and run.poll() is None  # the first asks, it goes on
        run.terminate()
        assert run.wait(timeout=30) == -15  # Python's default for SIGTERM, the handler that was there before
    finally:
        run.kill()
        run.wait()
