"""Precomputed latents: `sdray data precompute`, training on the cache, and stale caches refused."""

import hashlib
import json
import math

import numpy as np
import pytest
import ray.data
import torch
import yaml
from conftest import make_job
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors.torch import load as load_safetensors
from test_data import corrupt_dataset
from typer.testing import CliRunner

from sdray import storage
from sdray.cli import app
from sdray.data.augment import Preprocess
from sdray.data.digits import CAPTION, digit_images
from sdray.data.formats import DataError
from sdray.data.latents import StaleCacheError
from sdray.data.pipeline import build_datasets
from sdray.data.precompute import precompute
from sdray.models.build import build_components
from sdray.models.conditioning import encode_prompts, unconditional_prompts
from sdray.models.encoding import CachedEncoder, latent_distribution
from sdray.spec import ModelSpec, SpecError, parse_job
from sdray.train.context import LocalContext, to_torch
from sdray.train.launch import run_in_process, run_job
from sdray.train.loop import Trainer

runner = CliRunner()
CACHE = "s3://latents/digits"


def cache_rows(uri: str) -> list[dict]:
    fs, path = storage.filesystem(uri)
    return ray.data.read_parquet(path, filesystem=fs, file_extensions=["parquet"]).take_all()


def digit_batch(indices, model: ModelSpec):
    """The digits at ``indices`` through the training transforms (center crop, no flip), as tensors."""
    pngs, labels = digit_images(16)
    comps = build_components(model, seed=0)  # everything, as an online training run builds it
    raw = {"key": np.array([str(i) for i in indices], dtype=object),
           "image": np.array([pngs[i] for i in indices], dtype=object),
           "caption": np.array([CAPTION.format(labels[i]) for i in indices], dtype=object)}
    batch = Preprocess(resolution=16, resize=None, crop="center", random_flip=False, tokenizers=comps.tokenizers)(raw)
    return comps, to_torch(batch)


def latents_job(name, out, uri, **spec):
    data = {"uri": uri, "format": "latents", **spec.pop("data", {})}
    return make_job(name, out, uri, data=data, **spec)


@pytest.fixture(scope="module")
def s3_cache(ray_session, seaweed, digits_s3, tmp_path_factory):
    """The 400 digits (webdataset on SeaweedFS) precomputed with the tiny preset and random_flip, by the CLI."""
    seaweed.create_bucket("latents")
    root = tmp_path_factory.mktemp("precompute")
    doc = make_job("digits-pre", root / "out", f"{digits_s3}/webdataset",
                   data={"format": "webdataset", "random_flip": True})
    path = root / "job.yaml"
    path.write_text(yaml.safe_dump(doc))
    result = runner.invoke(app, ["data", "precompute", str(path), "--out", CACHE, "--batch-size", "50"],
                           env={"SDRAY_PROGRESS_INTERVAL": "0"})
    assert result.exit_code == 0, result.output
    assert "latent cache written" in result.output and "400" in result.output
    # not a terminal (a log, kubectl logs): progress lines on stderr, the last one at the end
    lines = [line for line in result.stderr.splitlines() if "images encoded" in line]
    assert lines and lines[-1].startswith("digits-pre: precompute | 400 images encoded"), result.stderr
    return CACHE


def test_precompute_writes_a_manifest_and_the_latents_online_encoding_computes(s3_cache):
    manifest = json.loads(storage.read_bytes(storage.join(s3_cache, "manifest.json")))
    assert manifest["rows"] == 400 and manifest["skipped_images"] == 0
    assert manifest["transform"] == {"resolution": 16, "resize": 16, "crop": "center", "random_flip": True,
                                     "bucketing": None}
    assert manifest["model"]["preset"] == "tiny" and manifest["scaling_factor"] == 1.0
    assert set(manifest["fingerprints"]) == {"vae", "tokenizer", "text_encoder"}
    assert manifest["source"]["format"] == "webdataset" and manifest["dtype"] == "float32"
    assert {"latent_dist", "latent_dist_flipped", "prompt_embeds"} <= set(manifest["columns"])

    rows = {r["key"].rsplit("#", 1)[-1]: r for r in cache_rows(s3_cache)}
    assert len(rows) == 400
    picked = ["00003", "00117", "00398"]
    comps, batch = digit_batch([int(k) for k in picked], ModelSpec(preset="tiny"))
    with torch.no_grad():
        dist = latent_distribution(comps.vae, batch["pixel_values"])
        flipped = latent_distribution(comps.vae, batch["pixel_values"].flip(-1))
        prompts = encode_prompts(comps, batch)["prompt_embeds"]
    for i, key in enumerate(picked):
        row = rows[key]
        assert row["latent_dist"].shape == (8, 8, 8)  # mean and log-variance of 4 × 8 × 8 latents
        np.testing.assert_allclose(row["latent_dist"], dist[i].numpy(), atol=1e-5)
        np.testing.assert_allclose(row["latent_dist_flipped"], flipped[i].numpy(), atol=1e-5)
        np.testing.assert_allclose(row["prompt_embeds"], prompts[i].numpy(), atol=1e-5)
        assert not np.allclose(row["latent_dist"], row["latent_dist_flipped"])
    # the empty caption's embedding, for classifier-free guidance's dropped captions
    unconditional = load_safetensors(storage.read_bytes(storage.join(s3_cache, "unconditional.safetensors")))
    torch.testing.assert_close(unconditional["prompt_embeds"], unconditional_prompts(comps)["prompt_embeds"])


@pytest.mark.slow  # precompute and a Ray Train run (~55 s); test_families trains on a cache in-process
def test_training_on_the_cache_builds_no_encoders_lowers_the_loss_and_exports(s3_cache, tmp_path, request):
    out = tmp_path / "out"
    job = parse_job(latents_job(
        "on-cache", out, s3_cache, data={"random_flip": True, "validation_fraction": 0.1},
        train={"max_steps": 40, "batch_size": 16, "learning_rate": 2e-3, "log_every_n_steps": 5},
        checkpoint={"every_n_steps": 40}, validation={"prompts": ["a handwritten digit 3"], "num_inference_steps": 2}))
    data = build_datasets(job.spec, resolution=16)
    request.addfinalizer(data.close)
    ctx = LocalContext(train=data.train, validation=data.validation, batch_size=16, shuffle=True,
                       run_dir=tmp_path / "ckpt", keep_last=1)
    trainer = Trainer(job, ctx)
    # nothing frozen was built: training steps read latents and embeddings from the cache
    assert trainer.comps.vae is None and trainer.comps.text_encoder is None and trainer.comps.tokenizer is None
    assert isinstance(trainer.encoder, CachedEncoder)
    summary = trainer.run()
    curve = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if '"loss"' in line]
    assert summary["step"] == 40 and len(curve) == 8
    assert sum(curve[-3:]) / 3 < 0.8 * sum(curve[:3]) / 3, curve
    assert any("val_loss" in line for line in (out / "metrics.jsonl").read_text().splitlines())
    # the export holds the job's own VAE and text encoder (built for it) and loads with stock diffusers
    pipe = StableDiffusionPipeline.from_pretrained(out / "pipeline")
    job_comps = build_components(ModelSpec(preset="tiny"), seed=0)
    assert all(torch.equal(a, b) for a, b in zip(pipe.vae.state_dict().values(), job_comps.vae.state_dict().values()))
    assert all(torch.equal(a, b) for a, b in zip(pipe.text_encoder.state_dict().values(),
                                                 job_comps.text_encoder.state_dict().values()))
    assert pipe("a handwritten digit 3", num_inference_steps=2).images[0].size == (16, 16)
    assert (out / "samples" / "final.png").exists()


@pytest.mark.slow  # precompute to S3 and a 2-worker run (~70 s)
def test_ray_train_workers_train_on_the_s3_cache(s3_cache, tmp_path):
    out = tmp_path / "out"
    summary = run_job(parse_job(latents_job(
        "cache-ray", out, s3_cache, data={"random_flip": True},
        train={"max_steps": 4, "batch_size": 16, "log_every_n_steps": 2},
        distributed={"num_workers": 2, "resources_per_worker": {"CPU": 1}}, checkpoint={"every_n_steps": 4})))
    assert summary["step"] == 4 and summary["skipped_images"] == 0
    assert StableDiffusionPipeline.from_pretrained(out / "pipeline") is not None


@pytest.mark.parametrize("change, named", [
    ({"model": {"preset": "tiny", "resolution": 24}}, "spec.model.resolution is 24 here, 16 in the cache"),
    ({"model": {"preset": "tiny", "overrides": {"vae": {"scaling_factor": 0.5}}}},
     "the vae differs from the one that encoded the cache"),
    ({"train": {"seed": 1}}, "the text_encoder differs"),  # preset weights come from the seed
    ({"data": {"random_flip": False}}, "spec.data.random_flip is false here, true in the cache"),
], ids=["resolution", "vae", "seed", "flip"])
def test_a_stale_cache_is_refused_naming_what_differs(s3_cache, tmp_path, change, named):
    doc = latents_job("stale", tmp_path / "out", s3_cache, **{"data": {"random_flip": True}, **change})
    with pytest.raises(StaleCacheError, match=named) as err:
        build_datasets(parse_job(doc).spec, resolution=16)
    assert "sdray data precompute" in str(err.value) and "\n" not in str(err.value)


def test_cli_refuses_a_stale_or_missing_cache_in_one_line(s3_cache, tmp_path):
    doc = latents_job("stale-cli", tmp_path / "out", s3_cache, model={"preset": "tiny", "resolution": 24},
                      data={"random_flip": True})
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(doc))
    result = runner.invoke(app, ["train", "--in-process", str(path)])
    assert result.exit_code == 1 and "stale" in result.output and "Traceback" not in result.output
    (tmp_path / "no-manifest").mkdir()
    doc["spec"]["data"]["uri"] = str(tmp_path / "no-manifest")
    with pytest.raises(DataError, match="no manifest.json in .*no-manifest.*sdray data precompute"):
        run_in_process(parse_job(doc))


def test_precompute_skips_and_counts_corrupt_images(ray_session, tmp_path, request):
    n_good, n_bad = corrupt_dataset(tmp_path / "data")
    job = parse_job(make_job("corrupt", tmp_path / "out", str(tmp_path / "data")))
    manifest = precompute(job, str(tmp_path / "cache"))
    assert manifest["rows"] == n_good and manifest["skipped_images"] == n_bad
    assert manifest["uri"] == str(tmp_path / "cache")
    cached = parse_job(latents_job("corrupt", tmp_path / "out", str(tmp_path / "cache"))).spec
    data = build_datasets(cached, resolution=16)
    request.addfinalizer(data.close)
    assert data.train.count() == n_good and data.skipped() == n_bad  # the run's summary reports them
    with pytest.raises(DataError, match="is not empty; .* --overwrite"):
        precompute(job, str(tmp_path / "cache"))


@pytest.mark.slow  # SDXL precompute and a Ray Train run (~65 s)
def test_tiny_xl_cache_holds_pooled_embeddings_and_trains(ray_session, digits_root, tmp_path):
    job = parse_job(make_job("xl-pre", tmp_path / "pre", str(digits_root / "parquet"), model={"preset": "tiny-xl"},
                             data={"format": "parquet"}))
    manifest = precompute(job, str(tmp_path / "cache"), dtype="float16", concurrency=1)
    assert {"pooled_prompt_embeds", "original_size", "crop_top_left"} <= set(manifest["columns"])
    assert "latent_dist_flipped" not in manifest["columns"] and manifest["dtype"] == "float16"
    first_png = hashlib.sha1(digit_images(16)[0][0]).hexdigest()[:16]  # parquet keys end with the image digest
    row = next(r for r in cache_rows(str(tmp_path / "cache")) if r["key"].endswith(first_png))
    assert row["latent_dist"].dtype == np.float16 and row["original_size"].tolist() == [16, 16]
    comps, batch = digit_batch([0], ModelSpec(preset="tiny-xl"))
    with torch.no_grad():
        encoded = encode_prompts(comps, batch)
    for name in ("prompt_embeds", "pooled_prompt_embeds"):
        np.testing.assert_allclose(row[name], encoded[name][0].numpy(), atol=2e-3, rtol=2e-3)

    out = tmp_path / "out"
    summary = run_in_process(parse_job(latents_job(
        "xl-cache", out, str(tmp_path / "cache"), model={"preset": "tiny-xl"},
        train={"max_steps": 6, "batch_size": 16, "caption_dropout": 0.3, "log_every_n_steps": 2},
        checkpoint={"every_n_steps": 6})))
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert summary["step"] == 6 and all(math.isfinite(v) for v in losses)
    pipe = StableDiffusionXLPipeline.from_pretrained(out / "pipeline")
    assert pipe("a handwritten digit 2", num_inference_steps=2, height=16, width=16).images[0].size == (16, 16)


def test_settings_a_cache_cannot_honour_are_refused(ray_session, digits_root, tmp_path):
    def doc(**spec):
        return latents_job("refused", tmp_path / "out", str(tmp_path / "cache"), **spec)

    with pytest.raises(SpecError, match="spec.data.crop: a latent cache holds center crops only"):
        parse_job(doc(data={"crop": "random"}))
    with pytest.raises(SpecError, match="spec.data.caption_column does not apply to format: latents"):
        parse_job(doc(data={"caption_column": "text"}))
    with pytest.raises(SpecError, match="spec.data.format: latents applies to stage: denoiser only"):
        parse_job(doc(stage="autoencoder"))
    random_crop = parse_job(make_job("crop", tmp_path / "out", str(digits_root / "imagefolder"),
                                     data={"crop": "random"}))
    with pytest.raises(DataError, match="spec.data.crop: a random crop cannot be cached"):
        precompute(random_crop, str(tmp_path / "cache"))
