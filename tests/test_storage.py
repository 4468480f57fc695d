"""Storage credentials, regions and buckets, against the session's real SeaweedFS server."""

from __future__ import annotations

import pytest

from sdray import storage
from sdray.spec import S3Settings


def _buckets(seaweed) -> set[str]:
    return {b["Name"] for b in seaweed.client().list_buckets()["Buckets"]}


def test_a_write_to_a_missing_bucket_is_refused_and_creates_nothing(seaweed, tmp_path):
    # SeaweedFS creates a bucket on the first PUT into it: only sdray's own check stops the typo here.
    with pytest.raises(storage.StorageError) as err:
        storage.write_bytes("s3://typo-bucket/run/metrics.jsonl", b"{}\n")
    assert str(err.value).startswith(f"no such bucket 'typo-bucket' at {seaweed.endpoint}: create it first")
    (tmp_path / "pipe").mkdir()
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    with pytest.raises(storage.StorageError, match=f"no such bucket 'typo-bucket-2' at {seaweed.endpoint}"):
        storage.upload_dir(tmp_path / "pipe", "s3://typo-bucket-2/pipe")
    assert not {"typo-bucket", "typo-bucket-2"} & _buckets(seaweed)
    seaweed.create_bucket("created-first")  # once created, the same writes go through
    storage.write_bytes("s3://created-first/run/metrics.jsonl", b"{}\n")
    storage.upload_dir(tmp_path / "pipe", "s3://created-first/pipe")
    assert storage.list_files("s3://created-first") == ["created-first/pipe/model_index.json",
                                                         "created-first/run/metrics.jsonl"]


def _secret(root, name, seaweed, token=None):
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "AWS_ACCESS_KEY_ID").write_text(seaweed.access_key + "\n")
    (folder / "AWS_SECRET_ACCESS_KEY").write_text(seaweed.secret_key + "\n")
    if token is not None:
        (folder / "AWS_SESSION_TOKEN").write_text(token + "\n")


def test_a_session_token_reaches_s3_from_a_secret_and_from_the_environment(seaweed, tmp_path, monkeypatch):
    """The server refuses the right keys with a bogus session token: a refusal proves the token was sent."""
    seaweed.create_bucket("tokens")
    storage.write_bytes("s3://tokens/x", b"x")
    monkeypatch.setenv("SDRAY_SECRETS_DIR", str(tmp_path))
    _secret(tmp_path, "plain", seaweed)
    _secret(tmp_path, "temporary", seaweed, token="bogus-session-token")
    assert storage.list_files("s3://tokens", S3Settings(credentials_secret="plain")) == ["tokens/x"]
    with pytest.raises(storage.StorageError, match="cannot list s3://tokens: .*INVALID_ACCESS_KEY_ID"):
        storage.list_files("s3://tokens", S3Settings(credentials_secret="temporary"))
    # No secret: the AWS SDK's default chain reads the environment, session token included.
    monkeypatch.setenv("AWS_SESSION_TOKEN", "bogus-session-token")
    with pytest.raises(storage.StorageError, match="INVALID_ACCESS_KEY_ID"):
        storage.list_files("s3://tokens")
    monkeypatch.delenv("AWS_SESSION_TOKEN")
    assert storage.list_files("s3://tokens") == ["tokens/x"]


def test_the_region_comes_from_the_settings_then_aws_region_then_aws_default_region(monkeypatch):
    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    assert storage.filesystem("s3://b/x")[0].region == "us-east-1"
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-3")
    assert storage.filesystem("s3://b/x")[0].region == "eu-west-3"
    monkeypatch.setenv("AWS_REGION", "ap-south-1")
    assert storage.filesystem("s3://b/x")[0].region == "ap-south-1"
    assert storage.filesystem("s3://b/x", S3Settings(region="sa-east-1"))[0].region == "sa-east-1"


def test_a_secret_name_cannot_lead_out_of_the_secrets_dir(seaweed, tmp_path, monkeypatch):
    """Names the job model refuses, given to storage directly (defence in depth), and a link inside."""
    secrets = tmp_path / "secrets"
    _secret(secrets, "mine", seaweed)
    _secret(tmp_path, "other-tenant", seaweed)  # beside the secrets dir, readable by this process
    (secrets / "linked").symlink_to(tmp_path / "other-tenant")
    monkeypatch.setenv("SDRAY_SECRETS_DIR", str(secrets))
    for name in ("../other-tenant", str(tmp_path / "other-tenant"), "mine/../../other-tenant"):
        with pytest.raises(storage.StorageError, match="expected a Kubernetes Secret name"):
            storage.s3_options(S3Settings.model_construct(credentials_secret=name))
    with pytest.raises(storage.StorageError, match=f"{secrets / 'linked'} leads outside {secrets}"):
        storage.s3_options(S3Settings(credentials_secret="linked"))
    assert storage.s3_options(S3Settings(credentials_secret="mine"))["access_key"] == seaweed.access_key


def test_ray_train_tune_and_data_writers_check_the_bucket_before_writing(seaweed, tmp_path):
    # Ray Train, Tune and Data write through pyarrow themselves: each writer of sdray checks first.
    from conftest import make_job

    from sdray.data.precompute import _prepare_destination
    from sdray.spec import parse_job
    from sdray.train.launch import torch_trainer
    from sdray.tuning import _tuner

    job = parse_job(make_job("typo", tmp_path, "s3://digits/imagefolder", checkpoint={"uri": "s3://typo-ckpt/runs"},
                             data={"uri": "s3://digits/imagefolder", "validation_fraction": 0.1},
                             tune={"search_space": {"train.learning_rate": {"choice": [1e-3]}}}))
    with pytest.raises(storage.StorageError, match="no such bucket 'typo-ckpt'"):
        torch_trainer(job, data=None)
    with pytest.raises(storage.StorageError, match="no such bucket 'typo-ckpt'"):
        _tuner(job, restore=False)
    with pytest.raises(storage.StorageError, match="no such bucket 'typo-cache'"):
        _prepare_destination("s3://typo-cache/latents", job.spec.storage, overwrite=False)
    assert not {"typo-ckpt", "typo-cache"} & _buckets(seaweed)
