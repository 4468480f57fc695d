"""Progress, the one record of a run's progress: what it keeps of untrusted input, its JSON, the driver's
reporter to the service, and the service's job runner (which runs jobs through sdray.run, not the CLI)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import httpx
import pytest
from conftest import make_job

from sdray.progress import MAX_CURVE_POINTS, MAX_TRIALS, Progress, ProgressLines, Trial
from sdray.service.progress import ProgressReporter

# The fields a driver may send, as the service's JobManager.record_progress took them.
SERVICE_FIELDS = {
    "step": int, "max_steps": int, "epoch": int, "loss": float, "val_loss": float, "lr": float,
    "images_per_s": float, "step_s": float, "data_wait_s": float, "data_wait_share": float,
    "checkpoint_step": int, "checkpoint_s": float, "checkpoint": str, "gpu_memory_bytes": int,
    "skipped_images": int, "images_seen": int, "elapsed_s": float, "sample": str, "output": str,
    "best": float, "trials_ended": int, "trials_total": int, "images_done": int,
}


def test_every_field_the_service_took_is_a_field_of_its_kind():
    for name, kind in SERVICE_FIELDS.items():
        assert Progress.model_fields[name].annotation == kind | None, name
    assert set(Progress.model_fields) == {*SERVICE_FIELDS, "trials", "curve"}


@pytest.mark.parametrize("value, expected", [
    # converted as int() / float() / str() convert them, as the service always did
    ({"step": 12, "loss": 0.5, "checkpoint": "s3://c/1"}, {"step": 12, "loss": 0.5, "checkpoint": "s3://c/1"}),
    ({"step": "12", "loss": "0.25", "lr": 1}, {"step": 12, "loss": 0.25, "lr": 1.0}),
    ({"step": 3.9, "checkpoint": 5, "sample": 0.5}, {"step": 3, "checkpoint": "5", "sample": "0.5"}),
    # bools, containers, values that do not convert and unknown keys are left out
    ({"step": True, "loss": False, "sample": True}, {}),
    ({"step": [1], "loss": {"v": 1}, "checkpoint": ["a"]}, {}),
    ({"step": "fast", "loss": "low", "max_steps": "1e3", "epoch": "9" * 5000}, {}),
    ({"step": float("nan"), "epoch": float("inf"), "images_seen": "-inf"}, {}),
    ({"bogus": 1, "time": 5, "recent_curve": [["loss", 1, 0.5]]}, {}),
    # null: a number field is set to "not known"; an int or str field is left out
    ({"loss": None, "step": None, "checkpoint": None}, {"loss": None}),
])
def test_from_payload_keeps_the_known_well_typed_fields(value, expected):
    assert Progress.from_payload(value).to_payload() == expected


def test_non_finite_numbers_are_kept_in_the_model_and_null_in_json():
    p = Progress.from_payload({"loss": "NaN", "val_loss": float("inf"), "best": "-Infinity", "lr": 1e-3})
    assert math.isnan(p.loss) and p.val_loss == math.inf and p.best == -math.inf
    payload = p.to_payload()
    assert payload == {"loss": None, "val_loss": None, "best": None, "lr": 1e-3}
    assert json.loads(json.dumps(payload, allow_nan=False)) == payload
    # what the service merges: the stale finite loss is replaced, not left looking current
    assert {"loss": 0.4, **Progress.from_payload(json.loads(json.dumps(payload))).to_payload()}["loss"] is None


def test_junk_payloads_never_raise():
    for junk in (None, [], "step", 5, {"trials": "x", "curve": "y"}, {"trials": None, "curve": None},
                 {"curve": {"loss": "x", "val_loss": {"a": 1}}}, {"trials": [None, 1, "t", []]}):
        assert isinstance(Progress.from_payload(junk), Progress)
    assert Progress.from_payload({"trials": [None, 1, "t", []]}).trials == []


def test_trials_are_bounded_and_reduced_to_their_known_fields():
    rows = [{"trial": f"t{i}", "params": {"train.learning_rate": 1e-3, "train.optimizer.betas": [0.9, 0.99]},
             "state": "terminated", "metric": 0.5, "step": 10, "secret": "dropped"} for i in range(MAX_TRIALS + 500)]
    p = Progress.from_payload({"trials": ["junk", *rows]})
    assert len(p.trials) == MAX_TRIALS and p.trials[0].trial == "t0"
    assert p.to_payload()["trials"][0] == {"trial": "t0", "state": "terminated", "metric": 0.5, "step": 10,
                                           "params": {"train.learning_rate": 1e-3, "train.optimizer.betas": [0.9, 0.99]}}
    odd = Progress.from_payload({"trials": [{"trial": 7, "metric": "nan", "step": True, "state": ["x"],
                                             "params": {"a": float("nan"), 1: "non-str key", "deep": [[[[[1]]]]]}}]})
    # the values that are JSON stay (a non-finite number as null); one nested too deep, or under a key that
    # is not a string, goes
    assert odd.to_payload()["trials"] == [{"trial": "7", "params": {"a": None}, "state": None, "metric": None,
                                           "step": None}]


def test_curve_points_keep_well_formed_finite_points_of_the_known_curves():
    curve = {"loss": [[1, 0.5], [2, 1], [True, 0.4], [3, False], [4.0, 0.3], [5, "0.2"], [6], [7, 0.1, 0],
                      [8, float("nan")], [9, float("inf")], "x", [10, 0.05]],
             "val_loss": [[10, 0.7]], "recon_mse": [[1, 0.1]], "other": "x"}
    p = Progress.from_payload({"curve": curve})
    assert p.curve_points() == {"loss": [(1, 0.5), (2, 1.0), (10, 0.05)], "val_loss": [(10, 0.7)]}
    assert p.to_payload() == {"curve": {"loss": [[1, 0.5], [2, 1.0], [10, 0.05]], "val_loss": [[10, 0.7]]}}
    huge = Progress.from_payload({"curve": {"loss": [[i, 1.0] for i in range(MAX_CURVE_POINTS + 5)]}})
    assert len(huge.curve_points()["loss"]) == MAX_CURVE_POINTS
    assert Progress.from_payload({"curve": "junk"}).to_payload() == {}


def test_a_loop_update_round_trips_through_json():
    p = Progress(step=40, max_steps=80, epoch=1, loss=0.31, lr=1e-3, images_per_s=120.5, images_seen=640,
                 checkpoint_step=40, checkpoint_s=0.8, sample="s3://out/samples/step_00000040.png",
                 curve={"loss": [(35, 0.33), (40, 0.31)], "val_loss": [(40, 0.4)]})
    payload = json.loads(json.dumps(p.to_payload(), allow_nan=False))
    again = Progress.from_payload(payload)
    assert again == p and again.to_payload() == p.to_payload()
    search = Progress(trials_ended=1, trials_total=2, best=0.2,
                      trials=[Trial(trial="a", params={"train.batch_size": 8}, state="running", metric=0.2, step=10)])
    assert Progress.from_payload(json.loads(json.dumps(search.to_payload()))) == search


def test_updated_sets_fields_and_refuses_unknown_ones():
    p = Progress(step=5, loss=0.5).updated(checkpoint_step=5)
    assert p.to_payload() == {"step": 5, "loss": 0.5, "checkpoint_step": 5}
    with pytest.raises(ValueError):
        p.updated(recon_mse=0.1)


def test_the_reporter_posts_json_with_every_curve_point_and_the_new_sample(tmp_path):
    posts, images = [], []

    def service(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/progress"):
            posts.append(json.loads(request.content))  # strict JSON: a NaN would not parse as a number here
        else:
            images.append(request.content)
        return httpx.Response(200, json={"ok": True})

    grid = tmp_path / "grid.png"
    grid.write_bytes(b"\x89PNG\r\n\x1a\nfake")
    reporter = ProgressReporter("http://service/internal/v1/jobs/j1", "token", min_interval_s=3600)
    reporter.close()
    reporter._client = httpx.Client(transport=httpx.MockTransport(service))
    reporter(Progress(step=5, loss=0.9, curve={"loss": [(5, 0.9)]}))
    reporter(Progress(step=10, loss=float("nan"), curve={"loss": [(5, 0.9), (10, float("nan"))]}))  # rate-limited
    reporter(Progress(step=15, loss=0.3, sample=str(grid), curve={"loss": [(10, 0.5), (15, 0.3)]}), final=True)
    reporter.close()
    assert [p["step"] for p in posts] == [5, 15]
    assert posts[0]["curve"] == {"loss": [[5, 0.9]]}
    assert posts[1]["curve"] == {"loss": [[5, 0.9], [10, 0.5], [15, 0.3]]}  # the rate-limited update's points too
    assert posts[1]["sample"] == str(grid) and images == [grid.read_bytes()]
    assert all(json.loads(json.dumps(p, allow_nan=False)) == p for p in posts)


def runner(doc, **env):
    """``python -m sdray.service.runner`` as the service starts it, that also says whether it imported the
    CLI: the runner's last stdout line."""
    probe = ("import sys, runpy\n"
             "try:\n    runpy.run_module('sdray.service.runner', run_name='__main__')\n"
             "finally:\n    print('cli imported:', 'sdray.cli' in sys.modules or 'typer' in sys.modules)\n")
    environ = {k: v for k, v in os.environ.items() if k != "SDRAY_JOB_DOCUMENT"}
    if doc is not None:
        environ["SDRAY_JOB_DOCUMENT"] = json.dumps(doc)
    return subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300,
                          env={**environ, **env})


def test_the_runner_imports_neither_the_cli_nor_typer():
    code = "import sys, sdray.service.runner; print('sdray.cli' in sys.modules, 'typer' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.split() == ["False", "False"], result.stderr


def test_the_runner_refuses_a_missing_or_invalid_document_in_one_line(tmp_path):
    missing = runner(None)
    assert missing.returncode == 2 and "SDRAY_JOB_DOCUMENT is not set" in missing.stderr
    bad = make_job("runner-bad", tmp_path / "out", str(tmp_path), train={"learning_rate": "fast"})
    invalid = runner(bad)
    assert invalid.returncode == 2
    assert invalid.stderr.startswith("error: invalid job document: SDRAY_JOB_DOCUMENT: spec.train.learning_rate")
    assert "Traceback" not in invalid.stderr and invalid.stdout.splitlines()[-1] == "cli imported: False"


def test_the_runner_reports_a_failed_run_in_one_line_without_the_cli(ray_session, tmp_path):
    """The job's driver joins the running cluster (address auto), as under the service; the run fails on its
    data, and the error is one line on stderr with exit status 1."""
    doc = make_job("runner-nodata", tmp_path / "out", str(tmp_path / "no-such-data"))
    # the session's cluster, named: other Ray clusters may run on this machine
    result = runner(doc, RAY_ADDRESS=ray_session.get_runtime_context().gcs_address)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "error: spec.data.uri: nothing found at" in result.stderr and "Traceback" not in result.stderr
    assert result.stdout.splitlines()[0].startswith("runner-nodata: training (denoiser) started")
    assert result.stdout.splitlines()[-1] == "cli imported: False"


def test_progress_lines_write_the_latest_state_once_per_interval_for_logs():
    """Where no bar can draw (kubectl logs, a file), a line per interval with the latest of every field."""
    now = [0.0]
    written: list[str] = []
    lines = ProgressLines("job (denoiser)", written.append, interval_s=30, clock=lambda: now[0])
    lines(Progress(step=10, max_steps=110, loss=0.5, lr=1e-3, images_per_s=40.0, data_wait_share=0.05))
    assert len(written) == 1 and "step 10/110" in written[0] and "loss 0.5000" in written[0]
    now[0] = 10.0
    lines(Progress(step=20, loss=0.25))
    lines(Progress(checkpoint_step=20))  # alone, as a checkpoint comes
    assert len(written) == 1  # within the interval: nothing more
    now[0] = 30.0
    lines(Progress(step=30))
    assert len(written) == 2
    line = written[1]
    assert "step 30/110" in line and "loss 0.2500" in line and "lr 1.00e-03" in line and "data wait 5%" in line
    assert "checkpoint @20" in line and "ETA 2m00s" in line  # 20 steps in 30 s: 80 to go at that rate
    lines.flush()
    assert len(written) == 2  # nothing new since
    lines(Progress(checkpoint_step=30))
    lines.flush()  # the end of the run: the last state whatever the interval
    assert len(written) == 3 and "checkpoint @30" in written[-1]
