import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import make_job
from PIL import Image
from typer.testing import CliRunner

from sdray.cli import app

runner = CliRunner()


def sdray(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "sdray.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def write(path, doc):
    path.write_text(yaml.safe_dump(doc))
    return path


def test_validate_ok_prints_a_summary(tmp_path):
    job = write(tmp_path / "job.yaml", make_job("cli-ok", tmp_path / "out", "s3://bucket/data"))
    result = sdray("validate", job)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "ok"
    assert "cli-ok: stage=denoiser family=sd model=tiny data=s3://bucket/data" in lines[1]


def test_validate_errors_name_fields_exit_2_without_traceback(tmp_path):
    doc = make_job("cli-bad", tmp_path / "out", "s3://bucket/data", train={"learning_rate": "fast"})
    doc["spec"]["distributed"]["strategy"] = "horovod"
    doc["spec"]["data"]["colour"] = "blue"
    result = sdray("validate", write(tmp_path / "bad.yaml", doc))
    assert result.returncode == 2
    assert "spec.train.learning_rate" in result.stderr
    assert "spec.distributed.strategy: Input should be 'ddp', 'fsdp' or 'deepspeed'" in result.stderr
    assert "spec.data.colour: unknown field" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


@pytest.mark.parametrize("content, expected", [(None, "cannot read"), ("a: [", "not valid YAML")])
def test_validate_unreadable_documents(tmp_path, content, expected):
    path = tmp_path / "job.yaml"
    if content is not None:
        path.write_text(content)
    result = sdray("validate", path)
    assert result.returncode == 2 and expected in result.stderr and "Traceback" not in result.stderr


def test_train_with_missing_data_fails_cleanly(tmp_path):
    job = write(tmp_path / "job.yaml", make_job("cli-nodata", tmp_path / "out", str(tmp_path / "no-such-data")))
    result = sdray("train", job)
    assert result.returncode == 1
    assert "spec.data.uri: nothing found at" in result.stderr and "no-such-data" in result.stderr
    assert "Traceback" not in result.stderr


def test_schema_command_prints_the_json_schema():
    result = runner.invoke(app, ["schema"])
    assert result.exit_code == 0
    schema = json.loads(result.stdout)
    assert schema["properties"]["kind"]["const"] == "DiffusionJob"


@pytest.mark.parametrize("command", [[], ["validate"], ["schema"], ["train"], ["sample"], ["demo"], ["data"],
                                     ["data", "import-digits"]])
def test_every_command_has_help(command):
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0
    assert "Usage:" in result.stdout and len(result.stdout) > 200


def test_import_digits_writes_each_format(tmp_path):
    result = runner.invoke(app, ["data", "import-digits", str(tmp_path / "d"), "--format", "webdataset",
                                 "--resolution", "24"])
    assert result.exit_code == 0, result.stdout
    assert "wrote 1797 digits (webdataset, 24px)" in result.stdout
    assert len(list((tmp_path / "d").glob("shard-*.tar"))) == 4
    bad = runner.invoke(app, ["data", "import-digits", str(tmp_path / "e"), "--format", "csv"])
    assert bad.exit_code == 2


def test_sample_writes_images_of_the_pipeline(tmp_path):
    from sdray.models.build import build_components
    from sdray.models.pipeline import assemble_pipeline
    from sdray.spec import ModelSpec

    c = build_components(ModelSpec(preset="tiny"))
    assemble_pipeline(c).save_pretrained(tmp_path / "job-out" / "pipeline")
    result = runner.invoke(app, ["sample", str(tmp_path / "job-out"), "-p", "a handwritten digit 4", "-p",
                                 "a handwritten digit 5", "--num", "3", "--steps", "2", "--out", str(tmp_path / "s")])
    assert result.exit_code == 0, result.stdout
    pngs = sorted((tmp_path / "s").glob("prompt*.png"))
    assert len(pngs) == 6 and Image.open(pngs[0]).size == (16, 16)
    assert (tmp_path / "s" / "grid.png").exists()
    missing = sdray("sample", tmp_path / "nothing", "-p", "x")
    assert missing.returncode == 2 and "cannot load a pipeline" in missing.stderr and "Traceback" not in missing.stderr


@pytest.mark.parametrize("example", sorted((Path(__file__).parents[1] / "examples").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_shipped_examples_validate(example):
    result = runner.invoke(app, ["validate", str(example)])
    assert result.exit_code == 0 and result.stdout.startswith("ok"), result.stdout


@pytest.mark.slow  # the service's Ray test runs every job driver with address "auto" too (test-time budget)
def test_train_joins_a_running_cluster_with_address_auto(ray_session, digits_root, tmp_path):
    """`--address auto` submits to the Ray cluster already running here (the test session's)."""
    doc = make_job("joins", tmp_path / "out", str(digits_root / "imagefolder"),
                   train={"max_steps": 4, "batch_size": 8, "log_every_n_steps": 2}, checkpoint={"every_n_steps": 4})
    result = sdray("train", write(tmp_path / "job.yaml", doc), "--address", "auto", timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["step"] == 4 and summary["job"] == "joins"
    assert "joins: done" in result.stdout


@pytest.mark.slow  # an embedded Ray and a run (~60 s); the lines themselves: test_progress (test-time budget)
def test_train_logs_progress_lines_when_stderr_is_no_terminal(digits_root, tmp_path):
    """kubectl logs, `sdray logs -f` and CI see a line per interval (here: every update), not an empty log."""
    doc = make_job("lines", tmp_path / "out", str(digits_root / "parquet"), data={"format": "parquet"},
                   train={"max_steps": 6, "batch_size": 8, "log_every_n_steps": 2}, checkpoint={"every_n_steps": 6})
    result = subprocess.run([sys.executable, "-m", "sdray.cli", "train", str(write(tmp_path / "job.yaml", doc)),
                             "--in-process"], capture_output=True, text=True, timeout=600,
                            env={**os.environ, "SDRAY_PROGRESS_INTERVAL": "0"})
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("lines (denoiser) | ")]
    assert lines and "step 6/6" in lines[-1] and "loss " in lines[-1], result.stderr[-2000:]
