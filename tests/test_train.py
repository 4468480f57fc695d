import json
import os
import signal
import threading
from pathlib import Path

import psutil
import pytest
import torch
from conftest import kill_tree, make_job, start_cli, wait_for
from diffusers import AutoencoderKL, StableDiffusionPipeline
from safetensors.torch import load_file

from sdray import storage
from sdray.models.pipeline import load_pipeline
from sdray.spec import parse_job
from sdray.train.checkpoint import read_manifest
from sdray.train.launch import run_in_process, run_job


def metrics(output) -> list[dict]:
    return [json.loads(line) for line in storage.read_bytes(storage.join(str(output), "metrics.jsonl")).splitlines()]


def losses(output, key="loss") -> list[float]:
    return [m[key] for m in metrics(output) if key in m and "val_loss" not in m]


def ray_checkpoints(run_dir: Path) -> list[Path]:
    return sorted(p for p in run_dir.glob("checkpoint_*") if read_manifest(p))


def registered_steps(run_dir: Path) -> list[int]:
    """Steps of the checkpoints Ray Train has registered (its snapshot is written after each upload)."""
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    if not snapshot.exists():
        return []
    return sorted(r["metrics"]["step"] for r in json.loads(snapshot.read_text())["checkpoint_results"])


def adam_steps(checkpoint: Path) -> int:
    state = torch.load(checkpoint / "trainer_state.pt", weights_only=False)["optimizer"]["state"]
    return int(next(iter(state.values()))["step"])


def test_two_workers_lower_the_loss_and_export_a_stock_pipeline(ray_session, digits_root, tmp_path):
    out = tmp_path / "out"
    job = parse_job(make_job(
        "two-workers", out, str(digits_root / "imagefolder"),
        data={"validation_fraction": 0.1},
        train={"max_steps": 80, "batch_size": 16, "learning_rate": 2e-3, "log_every_n_steps": 5},
        distributed={"num_workers": 2, "resources_per_worker": {"CPU": 1}},
        checkpoint={"every_n_steps": 40, "keep_last": 1},
        validation={"prompts": ["a handwritten digit 3", "a handwritten digit 8"], "every_n_steps": 40,
                    "num_inference_steps": 4},
    ))
    seen = []
    summary = run_job(job, on_progress=seen.append)
    assert summary["step"] == 80 and summary["skipped_images"] == 0
    curve = losses(out)
    assert len(curve) == 16
    assert sum(curve[-3:]) / 3 < 0.8 * sum(curve[:3]) / 3, curve
    assert seen and seen[-1].step == 80 and seen[-1].curve_points()["loss"][-1] == (80, curve[-1])
    assert any("val_loss" in m for m in metrics(out))
    # keep_last: 1 of the 2 checkpoints is kept
    assert [read_manifest(p)["step"] for p in ray_checkpoints(out / "checkpoints" / "two-workers")] == [80]
    for name in ("samples/step_00000040.png", "samples/final.png", "loss.png", "summary.json"):
        assert (out / name).exists(), name
    # stock diffusers loads the export and draws images of the requested size
    pipe = StableDiffusionPipeline.from_pretrained(out / "pipeline")
    assert (out / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors").exists()
    for size in (16, 24):
        image = pipe("a handwritten digit 3", num_inference_steps=2, height=size, width=size,
                     generator=torch.Generator().manual_seed(0)).images[0]
        assert image.size == (size, size)


@pytest.mark.slow  # kills and restarts a 2-worker run (~250 s); resume stays covered by test_loop and test_finetune
def test_killed_run_resumes_from_its_checkpoint_with_optimizer_state(ray_session, digits_root, tmp_path):
    out = tmp_path / "out"
    doc = make_job("killed", out, str(digits_root / "parquet"), data={"format": "parquet"},
                   train={"max_steps": 400, "batch_size": 16, "log_every_n_steps": 5},
                   distributed={"num_workers": 2, "resources_per_worker": {"CPU": 1}},
                   checkpoint={"every_n_steps": 10, "keep_last": 2})
    run_dir = out / "checkpoints" / "killed"
    proc = start_cli("train", doc, tmp_path / "job.yaml")
    try:
        wait_for(lambda: registered_steps(run_dir), 240, "the first registered checkpoint", proc)
    finally:  # kill the whole run (driver, its Ray cluster and workers) by PID
        kill_tree(proc)
    assert not (out / "pipeline").exists()
    registered = max(registered_steps(run_dir))
    # a checkpoint half-written when the process died (newer name, missing files) must not be resumed
    torn = run_dir / "checkpoint_2099-01-01_00-00-00.000000"
    torn.mkdir()
    (torn / "rng_rank0.pt").write_bytes(b"partial")

    doc["spec"]["train"]["max_steps"] = registered + 20
    summary = run_job(parse_job(doc))
    assert summary["resumed_from"] == registered
    assert summary["step"] == registered + 20
    resumed_steps = [m["step"] for m in metrics(out) if "loss" in m]
    assert resumed_steps == sorted(resumed_steps) and resumed_steps[-1] == registered + 20
    final = max(ray_checkpoints(run_dir), key=lambda p: read_manifest(p)["step"])
    # AdamW's own step counter went on from the saved state: the optimizer state was restored
    assert adam_steps(final) == registered + 20


@pytest.mark.slow  # Ray Train failure recovery on 2 workers (~140 s)
def test_worker_failure_is_recovered_from_the_latest_checkpoint(ray_session, digits_root, tmp_path):
    out = tmp_path / "out"
    job = parse_job(make_job(
        "failover", out, str(digits_root / "webdataset"), data={"format": "webdataset"},
        train={"max_steps": 60, "batch_size": 16, "log_every_n_steps": 5},
        distributed={"num_workers": 2, "resources_per_worker": {"CPU": 1}, "max_failures": 1},
        checkpoint={"every_n_steps": 10, "keep_last": 3},
    ))
    before = {p.pid for p in psutil.process_iter(["cmdline"]) if "RayTrainWorker" in " ".join(p.info["cmdline"] or [])}
    result: dict = {}
    runner = threading.Thread(target=lambda: result.update(run_job(job)))
    runner.start()
    run_dir = out / "checkpoints" / "failover"
    wait_for(lambda: registered_steps(run_dir), 180, "a registered checkpoint")
    workers = wait_for(lambda: [p for p in psutil.process_iter(["cmdline"])
                                if "RayTrainWorker" in " ".join(p.info["cmdline"] or []) and p.pid not in before],
                       30, "the train workers")
    os.kill(workers[-1].pid, signal.SIGKILL)
    runner.join(timeout=300)
    assert not runner.is_alive()
    assert result["step"] == 60
    assert result["resumed_from"] is not None and 10 <= result["resumed_from"] < 60


@pytest.mark.slow  # ~1 min; S3 reads stay in the default run (data, latents, LoRA from S3); test-time budget
def test_checkpoints_and_outputs_on_s3_resume(ray_session, digits_s3, seaweed, tmp_path):
    seaweed.create_bucket("runs")
    doc = make_job("on-s3", "s3://runs/on-s3/out", f"{digits_s3}/imagefolder",
                   train={"max_steps": 10, "batch_size": 16, "log_every_n_steps": 5},
                   checkpoint={"uri": "s3://runs/on-s3/ckpt", "every_n_steps": 5, "keep_last": 1},
                   validation={"prompts": ["a handwritten digit 1"], "num_inference_steps": 2})
    first = run_job(parse_job(doc))
    assert first["checkpoint"].startswith("s3://runs/on-s3/ckpt/on-s3/checkpoint_")
    files = storage.list_files("s3://runs/on-s3")
    assert any(f.endswith("out/pipeline/model_index.json") for f in files)
    assert any(f.endswith("out/samples/final.png") for f in files)
    manifests = [f for f in files if f.endswith("sdray_checkpoint.json")]
    assert len(manifests) == 1  # keep_last: 1
    doc["spec"]["train"]["max_steps"] = 15
    second = run_job(parse_job(doc))
    assert second["resumed_from"] == 10 and second["step"] == 15
    assert [m["step"] for m in metrics("s3://runs/on-s3/out") if "loss" in m] == [5, 10, 15]
    pipe = load_pipeline("s3://runs/on-s3/out")
    assert pipe("a handwritten digit 1", num_inference_steps=2).images[0].size == (16, 16)


@pytest.mark.slow  # two Ray Train stages (~115 s); test_buckets trains the autoencoder stage in-process
def test_autoencoder_stage_lowers_reconstruction_error_and_feeds_the_unet_stage(ray_session, digits_root, tmp_path):
    vae_out = tmp_path / "vae"
    vae_job = parse_job(make_job(
        "ae", vae_out, str(digits_root / "imagefolder"), stage="autoencoder",
        train={"max_steps": 60, "batch_size": 16, "learning_rate": 2e-3, "log_every_n_steps": 5},
        distributed={"num_workers": 2, "resources_per_worker": {"CPU": 1}},
        checkpoint={"every_n_steps": 60},
    ))
    summary = run_job(vae_job)
    mse = losses(vae_out, "recon_mse")
    assert sum(mse[-2:]) / 2 < 0.5 * sum(mse[:2]) / 2, mse
    vae = AutoencoderKL.from_pretrained(vae_out / "vae")
    assert summary["scaling_factor"] == pytest.approx(vae.config.scaling_factor)
    assert vae.config.scaling_factor != 1.0
    assert (vae_out / "samples" / "final.png").exists()

    # its output is a VAE a UNet job can use (run here as one plain process, without Ray Train)
    unet_out = tmp_path / "unet"
    unet_job = parse_job(make_job(
        "uses-ae", unet_out, str(digits_root / "imagefolder"),
        model={"preset": "tiny", "vae": {"pretrained": str(vae_out)}},
        train={"max_steps": 4, "batch_size": 8, "log_every_n_steps": 2}, checkpoint={"every_n_steps": 4},
    ))
    run_in_process(unet_job)
    exported = load_file(unet_out / "pipeline" / "vae" / "diffusion_pytorch_model.safetensors")
    trained = load_file(vae_out / "vae" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(exported[k], trained[k]) for k in trained)


def fsdp_job(name, out, data, fsdp, **train):
    return make_job(name, out, data, data={"format": "webdataset" if data.endswith("webdataset") else "imagefolder"},
                    train={"max_steps": 20, "batch_size": 16, "learning_rate": 2e-3, "log_every_n_steps": 5,
                           **train},
                    distributed={"num_workers": 2, "resources_per_worker": {"CPU": 1}, "strategy": "fsdp",
                                 "fsdp": fsdp},
                    checkpoint={"every_n_steps": 10, "keep_last": 1},
                    validation={"prompts": ["a handwritten digit 5"], "num_inference_steps": 2})


@pytest.mark.slow  # 2-worker FSDP run, resume and export (~210 s)
def test_fsdp_on_two_workers_checkpoints_resumes_and_exports(ray_session, digits_root, tmp_path):
    out = tmp_path / "out"
    doc = fsdp_job("fsdp-full", out, str(digits_root / "imagefolder"), {"sharding": "full"},
                   gradient_accumulation_steps=2, ema={"decay": 0.9})
    first = run_job(parse_job(doc))
    assert first["step"] == 20
    curve = losses(out)
    assert curve[-1] < curve[0]
    ckpt = ray_checkpoints(out / "checkpoints" / doc["metadata"]["name"])[-1]
    shards = sorted(p.name for p in (ckpt / "sharded").iterdir())
    assert ".metadata" in shards and len([s for s in shards if s.endswith(".distcp")]) == 2  # one per rank
    assert not (ckpt / "model").exists()  # nothing was gathered into a full copy
    # resume under the same strategy and world size
    doc["spec"]["train"]["max_steps"] = 30
    second = run_job(parse_job(doc))
    assert second["resumed_from"] == 20 and second["step"] == 30
    # the export is a consolidated, stock pipeline
    pipe = StableDiffusionPipeline.from_pretrained(out / "pipeline")
    assert pipe("a handwritten digit 5", num_inference_steps=2).images[0].size == (16, 16)
    assert (out / "samples" / "final.png").exists()
    # a sharded checkpoint cannot be resumed by a replicated run
    doc["spec"]["distributed"] = {"num_workers": 1}
    doc["spec"]["checkpoint"]["resume"] = str(ray_checkpoints(out / "checkpoints" / doc["metadata"]["name"])[-1])
    with pytest.raises(Exception, match="same strategy"):
        run_in_process(parse_job(doc))


@pytest.mark.slow  # the default run keeps FSDP's full sharding (test_fsdp_on_two_workers_…); test-time budget
@pytest.mark.parametrize("fsdp", [{"sharding": "grad_op"}, {"sharding": "hybrid", "shard_group_size": 1}],
                         ids=["grad_op", "hybrid"])
def test_fsdp_sharding_modes_train_and_export(ray_session, digits_root, tmp_path, fsdp):
    out = tmp_path / "out"
    summary = run_job(parse_job(fsdp_job(f"fsdp-{fsdp['sharding'].replace('_', '-')}", out,
                                         str(digits_root / "webdataset"), fsdp, max_steps=10)))
    assert summary["step"] == 10 and losses(out)[-1] < losses(out)[0]
    assert StableDiffusionPipeline.from_pretrained(out / "pipeline").unet.config.sample_size == 8
