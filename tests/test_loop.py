"""The per-worker loop run as one plain process (no Ray Train), and the training options it honours."""

import json
import math

import pytest
import torch
from conftest import make_job
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file

from sdray.spec import parse_job
from sdray.train.checkpoint import read_manifest
from sdray.train.launch import run_in_process


def records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_plain_process_checkpoints_atomically_and_resumes(ray_session, digits_root, tmp_path):
    out = tmp_path / "out"
    doc = make_job("plain", out, str(digits_root / "imagefolder"),
                   train={"max_steps": 10, "batch_size": 8, "log_every_n_steps": 5},
                   checkpoint={"every_n_steps": 5, "keep_last": 1})
    first = run_in_process(parse_job(doc))
    run_dir = out / "checkpoints" / "plain"
    assert first["step"] == 10 and first["resumed_from"] is None
    assert [p.name for p in run_dir.iterdir()] == ["checkpoint_00000010"]  # keep_last: 1
    # what a crash leaves behind: a staging folder and a folder without its manifest
    (run_dir / ".tmp-checkpoint_00000015").mkdir()
    (run_dir / "checkpoint_00000020").mkdir()
    doc["spec"]["train"]["max_steps"] = 15
    second = run_in_process(parse_job(doc))
    assert second["resumed_from"] == 10 and second["step"] == 15
    assert read_manifest(run_dir / "checkpoint_00000015")["step"] == 15
    assert [r["step"] for r in records(out) if "loss" in r] == [5, 10, 15]

    doc["spec"]["checkpoint"]["resume"] = str(run_dir / "checkpoint_00000015")
    doc["spec"]["train"]["max_steps"] = 20
    third = run_in_process(parse_job(doc))  # a fresh run that starts from a named checkpoint
    assert third["resumed_from"] == 15 and third["run"].startswith("plain-")


def _run(digits_root, tmp_path, **spec):
    out = tmp_path / "out"
    base = {"max_steps": 6, "batch_size": 8, "log_every_n_steps": 1, "learning_rate": 1e-3}
    doc = make_job("opts", out, str(digits_root / "imagefolder"),
                   checkpoint={"every_n_steps": 6}, **{**spec, "train": {**base, **spec.get("train", {})}})
    return run_in_process(parse_job(doc)), out


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_and_v_prediction_train(ray_session, digits_root, tmp_path, precision):
    summary, out = _run(digits_root, tmp_path, train={"mixed_precision": precision},
                        model={"preset": "tiny", "prediction_type": "v_prediction"})
    assert summary["step"] == 6 and all(math.isfinite(r["loss"]) for r in records(out) if "loss" in r)
    scheduler = json.loads((out / "pipeline" / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == "v_prediction"
    state = torch.load(next((out / "checkpoints" / "opts").glob("checkpoint_*")) / "trainer_state.pt",
                       weights_only=False)
    assert bool(state["scaler"]) == (precision == "fp16")  # fp16 trains with a loss scaler


def test_gradient_accumulation_counts_images(ray_session, digits_root, tmp_path):
    _, out = _run(digits_root, tmp_path, train={"gradient_accumulation_steps": 3})
    assert [r["images_seen"] for r in records(out) if "loss" in r] == [24 * i for i in range(1, 7)]


def test_lr_schedule_warms_up_and_decays(ray_session, digits_root, tmp_path):
    _, out = _run(digits_root, tmp_path, train={"lr_scheduler": "cosine", "warmup_steps": 2, "max_steps": 8})
    lrs = [r["lr"] for r in records(out) if "loss" in r]
    assert lrs[0] == pytest.approx(5e-4) and lrs[1] == pytest.approx(1e-3)
    assert lrs[-1] == pytest.approx(0.0, abs=1e-12) and lrs[2:] == sorted(lrs[2:], reverse=True)


def test_ema_weights_are_exported(ray_session, digits_root, tmp_path):
    _, out = _run(digits_root, tmp_path, train={"ema": {"decay": 0.9}})
    ckpt = next((out / "checkpoints" / "opts").glob("checkpoint_*"))
    raw = load_file(next((ckpt / "model").glob("*.safetensors")))
    ema = torch.load(ckpt / "ema.pt", weights_only=False)
    exported = UNet2DConditionModel.from_pretrained(out / "pipeline", subfolder="unet")
    params = list(exported.parameters())
    assert all(torch.allclose(p, s) for p, s in zip(params, ema["shadow_params"]))
    names = [n for n, _ in exported.named_parameters()]
    assert any(not torch.equal(raw[n], p) for n, p in zip(names, params))  # EMA ≠ the raw weights
    assert ema["optimization_step"] == 6


def test_sdxl_shaped_model_trains_and_exports_a_stock_sdxl_pipeline(ray_session, digits_root, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    summary, out = _run(digits_root, tmp_path, model={"preset": "tiny-xl"},
                        train={"caption_dropout": 0.3, "max_steps": 8},
                        validation={"prompts": ["a handwritten digit 2"], "num_inference_steps": 2})
    losses = [r["loss"] for r in records(out) if "loss" in r]
    assert summary["step"] == 8 and all(math.isfinite(v) for v in losses)
    pipe = StableDiffusionXLPipeline.from_pretrained(out / "pipeline")
    image = pipe("a handwritten digit 2", num_inference_steps=2, height=24, width=24).images[0]
    assert image.size == (24, 24)
    assert (out / "samples" / "final.png").exists()


def test_sd_training_options_run_together(ray_session, digits_root, tmp_path):
    summary, out = _run(digits_root, tmp_path,
                        model={"preset": "tiny", "prediction_type": "v_prediction", "rescale_betas_zero_snr": True},
                        train={"snr_gamma": 5.0, "noise_offset": 0.05, "input_perturbation": 0.1,
                               "gradient_checkpointing": True, "allow_tf32": True})
    assert summary["step"] == 6 and all(math.isfinite(r["loss"]) for r in records(out) if "loss" in r)
    assert torch.backends.cuda.matmul.allow_tf32  # set by the loop (it ran in this process)
    scheduler = json.loads((out / "pipeline" / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["rescale_betas_zero_snr"] is True and scheduler["prediction_type"] == "v_prediction"
    torch.backends.cuda.matmul.allow_tf32 = False


@pytest.mark.slow  # torch.compile on CPU (~55 s)
def test_compiled_model_trains(ray_session, digits_root, tmp_path):
    """train.compile: the loop runs through torch.compile's module (first step compiles, ~1 min on CPU)."""
    from sdray.train.parallel import compiled

    assert type(compiled(torch.nn.Linear(2, 2), True)).__name__ == "OptimizedModule"
    summary, out = _run(digits_root, tmp_path, train={"compile": True, "max_steps": 3})
    assert summary["step"] == 3 and all(math.isfinite(r["loss"]) for r in records(out) if "loss" in r)
    assert (out / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors").exists()
