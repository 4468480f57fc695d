import json

import numpy as np
import pytest
from conftest import make_job, wait_for

from sdray import storage
from sdray.data.augment import Preprocess, in_validation_split
from sdray.data.digits import CAPTION, digit_images, write_dataset
from sdray.data.formats import DataError
from sdray.data.pipeline import build_datasets
from sdray.models.tokenizer import build_tokenizer
from sdray.spec import parse_job
from sdray.train.context import iterate

FORMATS = ["imagefolder", "webdataset", "parquet"]


def job_spec(uri, fmt="imagefolder", **data):
    return parse_job(make_job("data-test", "/tmp/unused", uri, data={"format": fmt, **data})).spec


def read_all(spec, tokenizer=None):
    with build_datasets(spec, resolution=16, tokenizers=[tokenizer] if tokenizer else []) as data:
        rows = data.train.take_all()
    return data, rows  # closed: its skip count stays readable


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_reads_locally(ray_session, digits_root, fmt):
    tok = build_tokenizer()
    data, rows = read_all(job_spec(str(digits_root / fmt), fmt), tok)
    assert len(rows) == 400 and data.skipped() == 0
    assert rows[0]["pixel_values"].shape == (3, 16, 16)
    assert -1.0 <= rows[0]["pixel_values"].min() and rows[0]["pixel_values"].max() <= 1.0
    decoded = tok.decode(rows[0]["input_ids"], skip_special_tokens=True)
    assert decoded.startswith("a handwritten digit ")
    assert len({r["key"] for r in rows}) == 400


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_reads_from_seaweedfs(ray_session, digits_s3, digits_root, fmt):
    data, rows = read_all(job_spec(f"{digits_s3}/{fmt}", fmt))
    assert len(rows) == 400 and data.skipped() == 0
    # the very same pixels as the local copy
    local = {r["key"].rsplit("/", 1)[-1].rsplit("#", 1)[-1]: r for r in read_all(job_spec(str(digits_root / fmt), fmt))[1]}
    row = rows[0]
    twin = local[row["key"].rsplit("/", 1)[-1].rsplit("#", 1)[-1]]
    np.testing.assert_allclose(row["pixel_values"], twin["pixel_values"])


def test_wrong_s3_keys_fail_clearly(ray_session, digits_s3, tmp_path, monkeypatch):
    secrets = tmp_path / "secrets" / "bad"
    secrets.mkdir(parents=True)
    (secrets / "AWS_ACCESS_KEY_ID").write_text("nobody")
    (secrets / "AWS_SECRET_ACCESS_KEY").write_text("wrong")
    monkeypatch.setenv("SDRAY_SECRETS_DIR", str(tmp_path / "secrets"))
    with pytest.raises(DataError, match=f"{digits_s3}/parquet"):
        read_all(job_spec(f"{digits_s3}/parquet", "parquet", credentials_secret="bad"))


def live_skip_counters() -> int:
    # The GCS of the cluster this process is connected to (ray.util.state's list_actors looks for a dashboard
    # address instead, and refuses when other Ray clusters run on the machine: "multiple active Ray instances").
    from ray._private.state import actors

    return sum(a["ActorClassName"] == "SkipCounter" and a["State"] == "ALIVE" for a in actors().values())


def test_closed_datasets_end_their_skip_counter_also_when_the_data_is_refused(ray_session, digits_root, tmp_path):
    """The counter is an actor (a worker process): one left per dataset built piled up to dozens of processes
    in a test session and starved Ray Data of workers (a CI run hung in ``take``)."""
    before = live_skip_counters()
    with build_datasets(job_spec(str(digits_root / "parquet"), "parquet"), resolution=16) as data:
        assert data.train.take(1)
        wait_for(lambda: live_skip_counters() == before + 1, 30, "the dataset's skip counter")
    wait_for(lambda: live_skip_counters() == before, 30, "the closed dataset's counter to end")
    assert data.skipped() == 0  # the count outlives the actor
    write_dataset(str(tmp_path / "junk"), [b"junk"] * 3, ["x"] * 3, "imagefolder")
    with pytest.raises(DataError, match=r"no readable image .*\(3 unreadable"):
        build_datasets(job_spec(str(tmp_path / "junk")), resolution=16)
    wait_for(lambda: live_skip_counters() == before, 30, "the refused dataset's counter to end")


def test_named_secret_supplies_credentials(ray_session, digits_s3, seaweed, tmp_path, monkeypatch):
    secrets = tmp_path / "secrets" / "digits-reader"
    secrets.mkdir(parents=True)
    (secrets / "AWS_ACCESS_KEY_ID").write_text(seaweed.access_key + "\n")
    (secrets / "AWS_SECRET_ACCESS_KEY").write_text(seaweed.secret_key + "\n")
    monkeypatch.setenv("SDRAY_SECRETS_DIR", str(tmp_path / "secrets"))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "nobody")  # the secret wins over the environment
    spec = job_spec(f"{digits_s3}/parquet", "parquet", credentials_secret="digits-reader",
                    endpoint=seaweed.endpoint)
    assert len(read_all(spec)[1]) == 400
    with pytest.raises(storage.StorageError, match="missing-secret"):
        storage.s3_options(spec.data_s3.model_copy(update={"credentials_secret": "missing-secret"}))


def corrupt_dataset(tmp_path, n_good=40):
    pngs, labels = digit_images(16)
    pngs, captions = pngs[:n_good], [CAPTION.format(t) for t in labels[:n_good]]
    bad = [b"not an image at all", pngs[0][: len(pngs[0]) // 2], b""]
    write_dataset(str(tmp_path), pngs + bad, captions + ["bad"] * len(bad), "imagefolder")
    # a metadata line whose file does not exist
    with open(tmp_path / "metadata.jsonl", "a") as f:
        f.write(json.dumps({"file_name": "images/missing.png", "text": "gone"}) + "\n")
    return n_good, len(bad) + 1


def test_corrupt_images_are_skipped_and_counted(ray_session, tmp_path):
    n_good, n_bad = corrupt_dataset(tmp_path)
    data, rows = read_all(job_spec(str(tmp_path)))
    assert len(rows) == n_good
    assert data.skipped() == n_bad


def test_all_corrupt_dataset_fails_naming_the_uri(ray_session, tmp_path):
    write_dataset(str(tmp_path), [b"junk"] * 5, ["x"] * 5, "imagefolder")
    with pytest.raises(DataError) as err:
        read_all(job_spec(str(tmp_path)))
    assert str(tmp_path) in str(err.value) and "no readable image" in str(err.value) and "5" in str(err.value)


def test_missing_dataset_and_bad_columns_fail_clearly(ray_session, tmp_path, digits_root):
    with pytest.raises(DataError, match="spec.data.uri: nothing found at .*nothing-here"):
        read_all(job_spec(str(tmp_path / "nothing-here")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no metadata.jsonl files under .*empty"):
        read_all(job_spec(str(tmp_path / "empty")))
    with pytest.raises(DataError, match="spec.data.caption_column: no column 'caption'"):
        read_all(job_spec(str(digits_root / "parquet"), "parquet", caption_column="caption"))


def test_validation_split_is_stable_and_disjoint(ray_session, digits_root):
    spec = job_spec(str(digits_root / "imagefolder"), validation_fraction=0.2)
    with build_datasets(spec, resolution=16) as data:
        train = {r["key"] for r in data.train.take_all()}
        val = {r["key"] for r in data.validation.take_all()}
    assert not train & val and len(train | val) == 400
    assert 40 <= len(val) <= 120
    assert all(in_validation_split(k, 0.2) for k in val)


def test_augmentation_random_crop_and_flip():
    pngs, _ = digit_images(16)
    batch = {"key": np.array(["k"] * 16, dtype=object), "image": np.array([pngs[3]] * 16, dtype=object),
             "caption": np.array(["c"] * 16, dtype=object)}
    out = Preprocess(resolution=16, resize=24, crop="center", random_flip=False)(batch)
    center = out["pixel_values"]
    assert center.shape == (16, 3, 16, 16)
    assert out["original_size"].tolist()[0] == [16, 16] and out["crop_top_left"].tolist()[0] == [4, 4]
    assert all(np.array_equal(center[0], c) for c in center)  # deterministic
    rand = Preprocess(resolution=16, resize=24, crop="random", random_flip=True)(batch)["pixel_values"]
    assert len({r.tobytes() for r in rand}) > 1  # crops and flips differ
    val = Preprocess(resolution=16, resize=24, crop="random", random_flip=True, split="validation")(batch)
    np.testing.assert_array_equal(val["pixel_values"], center)  # validation never augments


@pytest.mark.slow  # a 2-worker Ray Train run (~30 s)
def test_shards_are_disjoint_across_workers(ray_session, digits_root, tmp_path, request):
    """Two Ray Train workers each see a disjoint share of one epoch, together all of it."""
    from ray.train import DataConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    spec = job_spec(str(digits_root / "webdataset"), "webdataset")
    data = build_datasets(spec, resolution=16)
    request.addfinalizer(data.close)
    out = tmp_path / "keys"
    out.mkdir()

    def loop(config):
        import ray.train

        rank = ray.train.get_context().get_world_rank()
        keys = [k for b in iterate(ray.train.get_dataset_shard("train"), batch_size=10, shuffle=True)
                for k in b["key"]]
        (config["out"] / f"rank{rank}.json").write_text(json.dumps(keys))

    TorchTrainer(loop, train_loop_config={"out": out},
                 scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
                 run_config=RunConfig(name="shards", storage_path=str(tmp_path / "runs")),
                 datasets={"train": data.train}, dataset_config=DataConfig(datasets_to_split=["train"])).fit()
    a = json.loads((out / "rank0.json").read_text())
    b = json.loads((out / "rank1.json").read_text())
    assert len(a) == len(b) == 200
    assert not set(a) & set(b)
    assert len(set(a) | set(b)) == 400


def test_import_digits_writes_straight_to_s3(ray_session, seaweed):
    from sdray.data.digits import import_digits

    seaweed.create_bucket("imported")
    assert import_digits("s3://imported/wds", "webdataset", 16, limit=60) == 60
    assert storage.list_files("s3://imported/wds") == ["imported/wds/shard-00000.tar"]
    data, rows = read_all(job_spec("s3://imported/wds", "webdataset"))
    assert len(rows) == 60 and data.skipped() == 0
