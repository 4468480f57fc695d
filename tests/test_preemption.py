"""Preemption: SIGTERM (a Kubernetes eviction, Kueue preemption, spot notice) stops a run at a step
boundary with a checkpoint; it ends as "preempted" (exit status 3), and the next start resumes there with
no step lost."""

import json
import os
import signal
import subprocess
import threading

import psutil
import pytest
from conftest import kill_tree, make_job, start_cli, wait_for
from test_train import registered_steps

from sdray.spec import parse_job
from sdray.train import preemption
from sdray.train.checkpoint import read_manifest
from sdray.train.launch import run_in_process


def checkpoint_steps(run_dir) -> list[int]:
    """Steps of the complete checkpoints of a plain-process run (renamed into place once written)."""
    return sorted(read_manifest(p)["step"] for p in run_dir.glob("checkpoint_*") if read_manifest(p))


def summary(out) -> dict:
    return json.loads((out / "summary.json").read_text())


def test_sigterm_stops_a_plain_run_at_a_checkpoint_and_the_next_start_loses_no_step(ray_session, digits_root,
                                                                                      tmp_path):
    out = tmp_path / "out"
    doc = make_job("pre", out, str(digits_root / "parquet"), data={"format": "parquet"},
                   train={"max_steps": 5000, "batch_size": 8, "log_every_n_steps": 2},
                   checkpoint={"every_n_steps": 5, "keep_last": 2})
    job = parse_job(doc)
    run_dir = out / "checkpoints" / "pre"
    handler_before = signal.getsignal(signal.SIGTERM)
    # the notice comes from another thread, as a signal does: the handler runs on the loop's (main) thread
    notifier = threading.Thread(target=lambda: (wait_for(lambda: checkpoint_steps(run_dir), 300, "a checkpoint"),
                                                os.kill(os.getpid(), signal.SIGTERM)))
    notifier.start()
    first = run_in_process(job)
    notifier.join()
    assert first["status"] == "preempted"
    stopped = first["step"]
    assert 5 <= stopped < 5000 and first["checkpoint_step"] == stopped
    assert not (out / "pipeline").exists()  # a preempted run exports nothing
    assert max(checkpoint_steps(run_dir)) == stopped  # the latest checkpoint is where it stopped: no step lost
    assert signal.getsignal(signal.SIGTERM) == handler_before  # the run's handler is gone with the run
    assert not preemption.requested()

    doc["spec"]["train"]["max_steps"] = stopped + 4
    second = run_in_process(parse_job(doc))
    assert second["status"] == "succeeded" and second["resumed_from"] == stopped and second["step"] == stopped + 4
    assert (out / "pipeline" / "model_index.json").exists()


def train_workers(proc: subprocess.Popen) -> list[psutil.Process]:
    """The Ray Train worker processes of the run ``proc`` (a `sdray train` with its own Ray) started."""
    return [p for p in psutil.Process(proc.pid).children(recursive=True)
            if "RayTrainWorker" in " ".join(p.cmdline())]


@pytest.mark.slow  # three starts of a 2-worker Ray Train run (~3 min); the plain-process test covers the loop
def test_preempted_ray_train_run_checkpoints_exits_3_and_resumes_with_no_step_lost(ray_session, digits_root,
                                                                                    tmp_path):
    out = tmp_path / "out"
    doc = make_job("pre2", out, str(digits_root / "parquet"), data={"format": "parquet"},
                   train={"max_steps": 5000, "batch_size": 8, "log_every_n_steps": 2},
                   distributed={"num_workers": 2, "resources_per_worker": {"CPU": 1}},
                   checkpoint={"every_n_steps": 10, "keep_last": 3})
    run_dir = out / "checkpoints" / "pre2"
    resumed = None
    # 1st start: one worker told (one node drained): every worker stops at the same step.
    # 2nd start: the driver told (the RayJob's submitter, or `kill` of sdray train): it tells the workers.
    for told in ("one worker", "driver"):
        proc = start_cli("train", doc, tmp_path / "job.yaml")
        try:
            seen = max(registered_steps(run_dir), default=-1)
            wait_for(lambda: max(registered_steps(run_dir), default=-1) > seen, 240, "a checkpoint of this start",
                     proc)
            target = train_workers(proc)[0] if told == "one worker" else proc
            target.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=120) == 3, proc.stderr.read().decode()[-2000:]
        finally:
            kill_tree(proc)
        stopped = summary(out)
        assert stopped["status"] == "preempted" and stopped["resumed_from"] == resumed
        assert stopped["step"] < 5000 and max(registered_steps(run_dir)) == stopped["step"]  # no step lost
        resumed = stopped["step"]

    doc["spec"]["train"]["max_steps"] = resumed + 4
    proc = start_cli("train", doc, tmp_path / "job.yaml")
    try:
        assert proc.wait(timeout=300) == 0, proc.stderr.read().decode()[-2000:]
    finally:
        kill_tree(proc)
    done = summary(out)
    assert done["status"] == "succeeded" and done["resumed_from"] == resumed and done["step"] == resumed + 4
