"""Experiment tracking (spec.tracking): a run's metrics, parameters, sample grids and outcome reach real
MLflow (a sqlite store), real TensorBoard event files (read back with tensorboard's own reader) and W&B in
offline mode (its run file read back record by record); a resumed run continues them; a search's trials are
grouped; a tracking server that fails never ends a run; a tenant names only the MLflow servers its policy lists."""

import json
import struct

import pytest
from conftest import make_job

from sdray.service.policy import Policy, PolicyFile, TenantPolicy
from sdray.spec import parse_job
from sdray.train.launch import run_in_process
from sdray.train.tracking import MLflowTracker, open_group, open_trackers
from sdray.tuning import trial_job


def jsonl(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]


def wandb_records(path) -> list:
    """The protobuf records of a W&B run file (``run-<id>.wandb``): a 7-byte header, then LevelDB-log
    records (32 KiB blocks; each piece: crc32c, length, type 1 full / 2 first / 3 middle / 4 last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, piece, records = 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        piece, pos = piece + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(piece)
            records.append(record)
            piece = b""
    return records


def wandb_history(run_files) -> dict[int, dict]:
    """step → {key: value} of every history record in these run files."""
    history: dict[int, dict] = {}
    for path in run_files:
        for record in wandb_records(path):
            if record.WhichOneof("record_type") == "history":
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
                history.setdefault(items["_step"], {}).update(items)
    return history


@pytest.fixture
def tracked_env(tmp_path, monkeypatch):
    """An MLflow sqlite store with the experiment an admin made (artifacts in tmp_path), W&B offline."""
    from mlflow import MlflowClient

    store = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(store)
    experiment = client.create_experiment("digits", artifact_location=str(tmp_path / "artifacts"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "digits")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_PROJECT", "sdray-tests")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    return client, experiment


def test_a_run_and_its_resumption_are_tracked_in_mlflow_tensorboard_and_wandb(ray_session, digits_root, tmp_path,
                                                                                tracked_env):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    client, experiment = tracked_env
    out = tmp_path / "out"
    doc = make_job("tracked", out, str(digits_root / "parquet"), data={"format": "parquet"},
                   train={"max_steps": 6, "batch_size": 8, "log_every_n_steps": 2},
                   checkpoint={"every_n_steps": 3, "keep_last": 1},
                   validation={"prompts": ["a handwritten digit 3"], "num_inference_steps": 2})
    first = run_in_process(parse_job(doc))
    assert first["tracking"] == ["mlflow", "tensorboard", "wandb"] and first["tracking_failures"] == 0
    doc["spec"]["train"]["max_steps"] = 9
    second = run_in_process(parse_job(doc))
    assert second["resumed_from"] == 6 and second["tracking_failures"] == 0
    losses = {r["step"]: r["loss"] for r in jsonl(out) if "loss" in r}
    assert sorted(losses) == [2, 4, 6, 8, 9]

    # MLflow: one run, continued by the resumed start, with the document as parameters and the outcome
    [run] = client.search_runs([experiment], "tags.`sdray.run` = 'tracked'")
    assert run.info.status == "FINISHED" and run.data.tags["sdray.pipeline"] == second["pipeline"]
    assert run.data.params["spec.train.learning_rate"] == "0.001" and run.data.params["spec.model.preset"] == "tiny"
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "loss")}
    assert history == pytest.approx(losses)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "job.yaml" in artifacts and "images" in artifacts  # the sample grid (mlflow's log_image)

    # TensorBoard: event files under <output.uri>/tensorboard, read with tensorboard's own reader
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    assert {e.step: e.value for e in events.Scalars("loss")} == pytest.approx(losses)
    assert [e.step for e in events.Images("samples")] == [6, 9]  # each start's final grid
    assert "job/text_summary" in events.Tags()["tensors"]  # the document as text

    # W&B offline: the two starts' run files, copied to <output.uri>/wandb, are one run (one id) for `wandb sync`
    run_files = sorted((out / "wandb").rglob("run-*.wandb"))
    assert len(run_files) == 2 and len({p.name for p in run_files}) == 1
    logged = wandb_history(run_files)
    assert {step: items["loss"] for step, items in logged.items() if "loss" in items} == pytest.approx(losses)
    assert logged[9]["samples/_type"] == "image-file"


def test_a_search_s_trials_are_children_of_one_mlflow_run(digits_root, tmp_path, tracked_env):
    client, experiment = tracked_env
    doc = make_job("search", tmp_path / "out", str(digits_root / "parquet"),
                   tune={"metric": "loss", "num_samples": 2,
                         "search_space": {"train.learning_rate": {"choice": [1e-3, 2e-3]}}})
    search = parse_job(doc)
    open_group(search)
    trials = [trial_job(search, {"train.learning_rate": lr}, f"t{i}_00000") for i, lr in enumerate((1e-3, 2e-3))]
    assert {t.spec.tracking.group for t in trials} == {"search"}
    trackers = [MLflowTracker(t, {"MLFLOW_TRACKING_URI": client.tracking_uri, "MLFLOW_EXPERIMENT_NAME": "digits"},
                              t.metadata.name, 0) for t in trials]
    [parent] = client.search_runs([experiment], "tags.`sdray.group_parent` = 'search'")
    for tracker in trackers:
        assert client.get_run(tracker.run_id).data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert {client.get_run(t.run_id).data.params["spec.train.learning_rate"] for t in trackers} == {"0.001", "0.002"}


def test_a_tracking_server_that_fails_is_dropped_and_the_run_goes_on(digits_root, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "out"
    doc = make_job("down", out, str(digits_root / "parquet"),
                   tracking={"mlflow": {"tracking_uri": "http://127.0.0.1:9"}})  # nothing listens on port 9
    job = parse_job(doc)
    trackers = open_trackers(job, "down")
    assert trackers.names == ["tensorboard"] and trackers.failures == 1
    assert "tracking: mlflow could not start" in caplog.text
    # one that fails later (its event files' destination went away) is dropped, the rest goes on
    trackers.log({"step": 1, "loss": 0.5})
    (tmp_path / "a-file").write_text("")
    trackers.trackers[0].uri = str(tmp_path / "a-file" / "tensorboard")  # a folder that cannot be made
    trackers.flush()
    assert trackers.names == [] and trackers.failures == 2
    trackers.log({"step": 2, "loss": 0.4})  # nothing left to reach: no error


def test_a_tenant_names_only_the_mlflow_servers_its_policy_lists(tmp_path):
    policy = Policy(PolicyFile(default=TenantPolicy(local_paths=["/data"]),
                               tenants={"alice": TenantPolicy(local_paths=["/data"],
                                                              tracking_uris=["https://mlflow.team-a.example"])}))
    doc = make_job("exfil", "/data/out", "/data/digits",
                   tracking={"mlflow": {"tracking_uri": "https://attacker.example/mlflow"}})
    [refusal] = policy.check("bob", parse_job(doc))
    assert refusal.field == "spec.tracking.mlflow.tracking_uri" and refusal.rule == "tracking_uris"
    assert "default.tracking_uris" in refusal.message
    assert policy.check("alice", parse_job(doc))[0].rule == "tracking_uris"  # not alice's either
    doc["spec"]["tracking"]["mlflow"]["tracking_uri"] = "https://MLflow.team-a.example/"
    assert policy.check("alice", parse_job(doc)) == []
