"""Storage faults (issue #15): transient ones are retried, permanent ones fail at once with a clear error,
and a checkpoint that cannot be uploaded leaves the previous one the latest.

The faults are real: a proxy on 127.0.0.1 (``tests/s3_proxy.py``) in front of the session's SeaweedFS
server stops listening, answers 503 SlowDown, 500 or 403, or resets connections.
"""

from __future__ import annotations

import json
import logging
import threading
import time

import pytest
from conftest import make_job, wait_for
from s3_proxy import S3Proxy

from sdray import storage
from sdray.spec import StorageSettings, parse_job
from sdray.train.checkpoint import read_manifest

BUCKET = "faults"


@pytest.fixture()
def proxy(seaweed):
    seaweed.create_bucket(BUCKET)
    px = S3Proxy(seaweed.endpoint)
    yield px
    px.close()


def _settings(px: S3Proxy, **retries) -> StorageSettings:
    return StorageSettings(endpoint=px.endpoint, retries=retries)


def _direct(seaweed, key: str) -> bytes:
    """An object as the server holds it (not through the proxy)."""
    return seaweed.client().get_object(Bucket=BUCKET, Key=key)["Body"].read()


def _files(root, names):
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(name)
    return root


@pytest.mark.parametrize("operation", ["write", "upload_dir", "read", "list"])
def test_an_operation_outlasts_an_outage_of_the_storage(proxy, seaweed, tmp_path, caplog, operation):
    """The proxy stops listening (connection refused); the operation, started meanwhile, retries until it is
    back. The SDK makes one attempt per request here, so sdray's own retry of the whole operation does it."""
    settings = _settings(proxy, max_attempts=1, max_elapsed_s=60)
    uri = f"s3://{BUCKET}/outage/{operation}"
    storage.write_bytes(f"{uri}/a.txt", b"before", settings)  # (also looks the bucket up while it is there)
    folder = _files(tmp_path / "folder", ["model_index.json", "unet/config.json"])
    runs = {
        "write": lambda: storage.write_bytes(f"{uri}/a.txt", b"after", settings),
        "upload_dir": lambda: storage.upload_dir(folder, uri, settings),
        "read": lambda: storage.read_bytes(f"{uri}/a.txt", settings),
        "list": lambda: storage.list_files(uri, settings),
    }
    result: dict = {}
    proxy.down()
    caplog.set_level(logging.WARNING, logger="sdray.storage")
    worker = threading.Thread(target=lambda: result.update(value=runs[operation]()), daemon=True)
    worker.start()
    wait_for(lambda: any(f"{uri}" in r.getMessage() and "retrying" in r.getMessage() for r in caplog.records),
             30, "a retry of the operation while the storage is down")
    proxy.up()
    worker.join(timeout=60)
    assert "value" in result, "the operation did not finish after the storage came back"
    expected = {"write": None, "upload_dir": None, "read": b"before",
                "list": [f"{BUCKET}/outage/list/a.txt"]}[operation]
    assert result["value"] == expected
    if operation == "write":
        assert _direct(seaweed, "outage/write/a.txt") == b"after"
    if operation == "upload_dir":
        assert _direct(seaweed, "outage/upload_dir/unet/config.json") == b"unet/config.json"


@pytest.mark.parametrize("fault", ["slow-down", "internal-error", "reset"])
def test_the_sdk_retries_slow_down_server_errors_and_resets(proxy, seaweed, fault):
    """Two faults in a row, then the server: the AWS SDK's own attempts get through (sdray's retry is off)."""
    settings = _settings(proxy, max_attempts=8, max_elapsed_s=0)
    storage.write_bytes(f"s3://{BUCKET}/sdk/{fault}", fault.encode(), settings)
    {"slow-down": lambda: proxy.fail(2, 503, "SlowDown"), "internal-error": lambda: proxy.fail(2, 500, "InternalError"),
     "reset": lambda: proxy.reset(2)}[fault]()
    before = proxy.requests
    assert storage.read_bytes(f"s3://{BUCKET}/sdk/{fault}", settings) == fault.encode()
    assert proxy.pending() == 0 and proxy.requests - before >= 3
    proxy.fail(2, 503, "SlowDown")
    storage.write_bytes(f"s3://{BUCKET}/sdk/{fault}", b"written", settings)
    assert proxy.pending() == 0 and _direct(seaweed, f"sdk/{fault}") == b"written"


def test_access_denied_is_not_retried_and_says_what_to_check(proxy, tmp_path):
    settings = _settings(proxy)  # the defaults: 8 attempts, 60 s
    storage.write_bytes(f"s3://{BUCKET}/denied", b"x", settings)
    proxy.fail(1000, 403, "AccessDenied")
    started, before = time.monotonic(), proxy.requests
    with pytest.raises(storage.StorageError) as err:
        storage.read_bytes(f"s3://{BUCKET}/denied", settings)
    assert proxy.requests - before == 1 and time.monotonic() - started < 5
    assert not err.value.transient
    assert str(err.value).startswith(f"cannot read s3://{BUCKET}/denied: ")
    assert "ACCESS_DENIED" in str(err.value) and "check the keys" in str(err.value)
    before = proxy.requests
    with pytest.raises(storage.StorageError, match=f"cannot write s3://{BUCKET}/denied-dir: .*ACCESS_DENIED"):
        storage.upload_dir(_files(tmp_path, ["a.txt"]), f"s3://{BUCKET}/denied-dir", settings)
    assert proxy.requests - before <= 2, "one look-up of the bucket, one refused write: nothing retried"


def test_a_storage_that_stays_down_gives_a_transient_error_naming_the_uri(proxy):
    settings = _settings(proxy, max_attempts=2, max_elapsed_s=1)
    proxy.fail(1000, 503, "SlowDown")
    with pytest.raises(storage.StorageError) as err:
        storage.write_bytes(f"s3://{BUCKET}/down", b"x", settings)
    assert err.value.transient
    assert str(err.value).startswith(f"cannot write s3://{BUCKET}/down: ")
    assert f"check that {proxy.endpoint} is up" in str(err.value) and "max_elapsed_s" in str(err.value)


def test_a_read_from_a_missing_bucket_names_the_bucket(seaweed, tmp_path):
    for read in (lambda: storage.read_bytes("s3://no-such-bucket/run/summary.json"),
                 lambda: storage.list_files("s3://no-such-bucket/run"),
                 lambda: storage.local_copy("s3://no-such-bucket/pipeline")):
        with pytest.raises(storage.StorageError, match=f"no such bucket 'no-such-bucket' at {seaweed.endpoint}: "
                                                       "nothing to (read|list) at s3://no-such-bucket/"):
            read()
    seaweed.create_bucket("bucket-here")
    with pytest.raises(storage.StorageError, match="^nothing found at s3://bucket-here/absent$"):
        storage.read_bytes("s3://bucket-here/absent")


def _checkpoint_job(name: str, proxy: S3Proxy, digits_root, tmp_path, on_upload_failure: str):
    """A 20-step run whose checkpoints go to S3 through the proxy, every 10 steps."""
    return parse_job(make_job(
        name, tmp_path / "out", str(digits_root / "imagefolder"),
        checkpoint={"uri": f"s3://{BUCKET}/runs", "every_n_steps": 10, "keep_last": 3,
                    "on_upload_failure": on_upload_failure},
        distributed={"num_workers": 1, "max_failures": 0},
        storage={"endpoint": proxy.endpoint, "retries": {"max_attempts": 2, "max_elapsed_s": 2}},
    ))


def _registered_steps(seaweed, name: str) -> list[int]:
    """Steps of the checkpoints Ray Train registered, from its snapshot as the server holds it."""
    snapshot = json.loads(_direct(seaweed, f"runs/{name}/checkpoint_manager_snapshot.json"))
    return sorted(r["metrics"]["step"] for r in snapshot["checkpoint_results"])


@pytest.mark.parametrize("on_upload_failure", [
    "continue",
    # slow: a second Ray Train run (~40 s); the default suite keeps "continue", the same upload path
    pytest.param("fail", marks=pytest.mark.slow),
])
def test_a_checkpoint_that_cannot_be_uploaded_leaves_the_previous_one_the_latest(
        ray_session, seaweed, proxy, digits_root, tmp_path, on_upload_failure):
    """Every request for the step-20 checkpoint is answered 503 SlowDown, past the retries: the step-10 one
    stays the latest and readable; the run trains on (``continue``) or fails with one clear line (``fail``)."""
    from sdray.train.launch import TrainingFailed, run_job

    name = f"upload-{on_upload_failure}"
    proxy.fail(10**6, 503, "SlowDown", path="checkpoint_00000020")
    job = _checkpoint_job(name, proxy, digits_root, tmp_path, on_upload_failure)
    if on_upload_failure == "continue":
        summary = run_job(job, worker_logs=False)
        assert summary["step"] == 20 and summary["checkpoint_upload_failures"] == 1
        assert summary["checkpoint"] == f"s3://{BUCKET}/runs/{name}/checkpoint_00000010"
        records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
        assert {"step": 20, "checkpoint_upload_failures": 1} in records
        assert (tmp_path / "out" / "pipeline" / "model_index.json").exists()
    else:
        with pytest.raises(TrainingFailed) as err:
            run_job(job, worker_logs=False)
        message = str(err.value)
        assert f"cannot write s3://{BUCKET}/runs/{name}/checkpoint_00000020" in message, message
        assert "max_elapsed_s" in message and "\n" not in message
    assert _registered_steps(seaweed, name) == [10]
    latest = storage.local_copy(f"s3://{BUCKET}/runs/{name}/checkpoint_00000010")
    assert read_manifest(latest)["step"] == 10
