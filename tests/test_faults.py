"""One trial of each fault of `benchmarks/faults.py` (its own S3 server and Ray cluster per trial run): the
run survives, with no step lost to a preemption and at most `every_n_steps` to a kill."""

import json
import subprocess
import sys

import pytest
from k8s_checks import REPO

EVERY = 10


@pytest.mark.slow  # each is an uninterrupted run plus the faulted one, 2 Ray workers on S3 (~5-10 min each)
@pytest.mark.parametrize("fault", ["worker-kill", "preempt", "driver-kill", "kill-in-save", "s3-outage"])
def test_one_trial_of_each_fault_survives(fault, tmp_path):
    out = tmp_path / "faults.json"
    result = subprocess.run([sys.executable, "benchmarks/faults.py", "--trials", "1", "--faults", fault,
                             "--steps", "40", "--every", str(EVERY), "--out", str(out)],
                            cwd=REPO, capture_output=True, text=True, timeout=3000)
    assert result.returncode == 0, result.stderr[-3000:]
    [trial] = json.loads(out.read_text())["trials"]
    assert trial["survived"], trial
    assert trial["steps_lost"] <= (0 if fault == "preempt" else EVERY), trial
    if fault == "kill-in-save":
        assert trial["fired"], "the kill did not happen during a checkpoint upload"
