"""Elastic resume: a checkpoint written by N workers resumes on M ≠ N, keeping the global batch where the
accumulation can absorb the change, and going on where the interrupted epoch was."""

import json
from pathlib import Path

import pytest
from conftest import make_job

from sdray.spec import parse_job
from sdray.train.checkpoint import read_manifest, resumed_accumulation
from sdray.train.launch import run_in_process, run_job


@pytest.mark.parametrize(("saved", "now", "expected"), [
    ((16, 1, 2), (16, 1, 1), (2, "gradient_accumulation_steps 1 → 2 keeps the global batch at 32")),
    ((16, 2, 1), (16, 1, 2), (1, "gradient_accumulation_steps 1 → 1 keeps the global batch at 32")),
    ((16, 1, 1), (16, 1, 2), (1, "the global batch changes 16 → 32")),
    ((16, 1, 2), (16, 1, 2), (1, None)),
])
def test_the_global_batch_is_kept_where_the_accumulation_divides_it(saved, now, expected):
    batch, accumulation, workers = saved
    manifest = {"world_size": workers, "global_batch": batch * accumulation * workers}
    got, note = resumed_accumulation(manifest, batch_size=now[0], accumulation=now[1], world_size=now[2])
    assert got == expected[0]
    assert (note is None) if expected[1] is None else expected[1] in note


@pytest.mark.slow  # a 2-worker Ray Train run between two plain ones (~130 s); the policy is unit-tested above
def test_a_run_resumes_on_more_then_fewer_workers(ray_session, digits_root, tmp_path):
    """1 worker (a plain process) → 2 Ray Train workers → 1 again, each from the other's last checkpoint."""
    out = tmp_path / "out"
    doc = make_job("elastic", out, str(digits_root / "parquet"), data={"format": "parquet"},
                   train={"max_steps": 6, "batch_size": 8, "gradient_accumulation_steps": 2, "log_every_n_steps": 2},
                   checkpoint={"every_n_steps": 3, "keep_last": 2})
    first = run_in_process(parse_job(doc))
    assert first["step"] == 6 and first["elastic"] is None
    saved = max((out / "checkpoints" / first["run"]).glob("checkpoint_*"))
    assert read_manifest(saved)["global_batch"] == 16

    doc["spec"]["train"]["max_steps"] = 10
    doc["spec"]["distributed"] = {"num_workers": 2, "resources_per_worker": {"CPU": 1}}
    doc["spec"]["checkpoint"]["resume"] = str(saved)
    doc["metadata"]["name"] = "elastic-2"
    second = run_job(parse_job(doc))
    assert second["resumed_from"] == 6 and second["step"] == 10
    assert second["elastic"]["from_workers"] == 1 and second["elastic"]["to_workers"] == 2
    assert second["elastic"]["gradient_accumulation_steps"] == 1 and second["elastic"]["global_batch"] == 16
    two = Path(second["checkpoint"])
    assert read_manifest(two)["world_size"] == 2 and read_manifest(two)["global_batch"] == 16

    doc["spec"]["train"]["max_steps"] = 12
    doc["spec"]["distributed"] = {"num_workers": 1}
    doc["spec"]["checkpoint"]["resume"] = str(two)
    doc["metadata"]["name"] = "elastic-3"
    third = run_in_process(parse_job(doc))
    assert third["resumed_from"] == 10 and third["step"] == 12
    assert third["elastic"]["gradient_accumulation_steps"] == 2 and third["elastic"]["global_batch"] == 16
    # the run went on in the epoch it was in: 12 steps × 16 images is under one epoch of the digits
    assert json.loads((out / "summary.json").read_text())["epoch"] == 0


@pytest.mark.slow  # two 2-worker FSDP starts around a plain one (~4-6 min)
@pytest.mark.parametrize("strategy", [{"strategy": "fsdp"}], ids=["fsdp"])
def test_sharded_checkpoints_resume_on_fewer_and_more_workers(ray_session, digits_root, tmp_path, strategy):
    """FSDP (DCP reshards on load): 2 workers → 1 process → 2 workers, each resuming the last one's
    checkpoint. (DeepSpeed needs the same number of workers: ``strategies.deepspeed.EngineLayout``.)"""
    out = tmp_path / "out"
    doc = make_job("elastic", out, str(digits_root / "parquet"), data={"format": "parquet"},
                   train={"max_steps": 4, "batch_size": 8, "log_every_n_steps": 2},
                   distributed={"num_workers": 2, "resources_per_worker": {"CPU": 1}, **strategy},
                   checkpoint={"every_n_steps": 2, "keep_last": 2})
    first = run_job(parse_job(doc))
    layout = {k: v for k, v in read_manifest(Path(first["checkpoint"])).items() if k in ("format", "world_size")}

    doc["spec"]["train"]["max_steps"] = 6
    doc["spec"]["distributed"] = {"num_workers": 1, **strategy}
    doc["spec"]["checkpoint"]["resume"] = first["checkpoint"]
    second = run_in_process(parse_job(doc))
    assert second["resumed_from"] == 4 and second["step"] == 6
    assert second["elastic"]["gradient_accumulation_steps"] == 2  # the global batch of 2 workers, kept
    saved = max((out / "checkpoints" / second["run"]).glob("checkpoint_*"))
    assert read_manifest(saved)["format"] == layout["format"] and read_manifest(saved)["world_size"] == 1

    doc["spec"]["train"]["max_steps"] = 8
    doc["spec"]["distributed"] = {"num_workers": 2, "resources_per_worker": {"CPU": 1}, **strategy}
    doc["spec"]["checkpoint"]["resume"] = str(saved)
    third = run_job(parse_job(doc))
    assert third["resumed_from"] == 6, third
    assert third["step"] == 8 and third["elastic"]["gradient_accumulation_steps"] == 1
    assert (out / "pipeline" / "model_index.json").exists()
