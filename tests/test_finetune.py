"""Fine-tuning a pretrained pipeline from S3: LoRA adapters on the UNet (model.lora) and training the text
encoder with the UNet (train.train_text_encoder)."""

import json

import numpy as np
import pytest
import torch
from conftest import make_job
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors.torch import load_file

from sdray import storage
from sdray.models.build import ModelError, build_components
from sdray.models.pipeline import assemble_pipeline
from sdray.spec import ModelSpec, parse_job
from sdray.train.checkpoint import CheckpointMismatch, read_manifest
from sdray.train.launch import run_in_process, run_job
from sdray.train.trainable import Trainable

# Adapters on the attention projections alone barely move a random UNet's loss; the convolutions too do.
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "conv_out", "proj_in", "proj_out"]
PROMPT = "a handwritten digit 7"


@pytest.fixture(scope="module")
def base(seaweed, tmp_path_factory):
    """A tiny pipeline built from the preset and saved by the test, locally and on S3."""
    local = tmp_path_factory.mktemp("base") / "pipeline"
    assemble_pipeline(build_components(ModelSpec(preset="tiny"), seed=3)).save_pretrained(local)
    seaweed.create_bucket("models")
    storage.upload_dir(local, "s3://models/tiny-base")
    return local, "s3://models/tiny-base"


def losses(out):
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def checkpoint(out, job, step):
    path = out / "checkpoints" / job / f"checkpoint_{step:08d}"
    assert read_manifest(path)["step"] == step
    return path


def optimizer_state(ckpt):
    return torch.load(ckpt / "trainer_state.pt", weights_only=False)["optimizer"]["state"]


def weights(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def differing(a: dict, b: dict) -> set[str]:
    assert a.keys() == b.keys()
    return {k for k in a if not torch.equal(a[k], b[k])}


def in_lora_file(ckpt, component):
    """A checkpoint's adapters of ``component``, named as diffusers' LoRA file names them."""
    return {f"{component}.{k}": v for k, v in load_file(ckpt / "model" / f"{component}.safetensors").items()}


def draw(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe(PROMPT, num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="np").images


def assert_lora_export_matches_merged(base_dir, out, pipeline_cls=StableDiffusionPipeline):
    """Stock diffusers: the base + load_lora_weights(out/lora) draws what the merged out/pipeline draws."""
    merged = pipeline_cls.from_pretrained(out / "pipeline")
    adapted = pipeline_cls.from_pretrained(base_dir)
    plain = draw(adapted)
    adapted.load_lora_weights(out / "lora")
    assert np.allclose(draw(adapted), draw(merged), atol=1e-4)
    assert not np.allclose(plain, draw(merged), atol=1e-3)  # the adapters change what is drawn
    return merged


def test_lora_from_s3_trains_only_adapters_resumes_and_exports(ray_session, digits_root, base, tmp_path):
    base_dir, base_uri = base
    out = tmp_path / "out"
    doc = make_job("lora", out, str(digits_root / "imagefolder"),
                   model={"pretrained": base_uri, "lora": {"rank": 8, "alpha": 16, "targets": TARGETS}},
                   train={"max_steps": 40, "batch_size": 16, "learning_rate": 1e-2, "log_every_n_steps": 5},
                   checkpoint={"every_n_steps": 20, "keep_last": 2})
    first = run_in_process(parse_job(doc))
    assert first["step"] == 40 and first["lora"] == str(out / "lora")
    curve = losses(out)
    assert sum(curve[-2:]) / 2 < 0.8 * sum(curve[:2]) / 2, curve

    # the checkpoint holds the adapters alone, and the optimizer was given nothing else
    ckpt = checkpoint(out, "lora", 40)
    assert read_manifest(ckpt)["weights"] == {"unet": "lora"}
    assert sorted(p.name for p in (ckpt / "model").iterdir()) == ["unet.safetensors"]
    adapters = load_file(ckpt / "model" / "unet.safetensors")
    assert adapters and all(".lora_A." in k or ".lora_B." in k for k in adapters)
    assert len(optimizer_state(ckpt)) == len(adapters)

    # diffusers' LoRA file: the adapters as trained (their up/B halves start at zero)
    lora_file = load_file(out / "lora" / "pytorch_lora_weights.safetensors")
    expected = in_lora_file(ckpt, "unet")
    assert lora_file.keys() == expected.keys() and not differing(lora_file, expected)
    assert all(v.any() for k, v in adapters.items() if ".lora_B." in k)

    # the merged pipeline: a plain UNet whose adapted weights moved; every other weight is the base's, bit for bit
    merged = assert_lora_export_matches_merged(base_dir, out)
    original = StableDiffusionPipeline.from_pretrained(base_dir)
    adapted_modules = {k.split(".lora_A.")[0] for k in adapters if ".lora_A." in k}
    changed = differing(weights(merged.unet), weights(original.unet))
    assert {k.rsplit(".", 1)[0] for k in changed} == adapted_modules
    assert all(k.endswith(".weight") for k in changed)
    for name in ("text_encoder", "vae"):  # frozen without train_text_encoder
        assert not differing(weights(getattr(merged, name)), weights(getattr(original, name))), name

    # resume: continues from step 40 with the adapters' optimizer state
    doc["spec"]["train"]["max_steps"] = 50
    second = run_in_process(parse_job(doc))
    assert second["resumed_from"] == 40 and second["step"] == 50
    final = checkpoint(out, "lora", 50)
    assert {int(s["step"]) for s in optimizer_state(final).values()} == {50}


def test_train_text_encoder_full_fine_tune_from_s3(ray_session, digits_root, base, tmp_path):
    base_dir, base_uri = base
    out = tmp_path / "out"
    doc = make_job("text", out, str(digits_root / "imagefolder"), model={"pretrained": base_uri},
                   train={"max_steps": 10, "batch_size": 16, "learning_rate": 1e-3, "log_every_n_steps": 5,
                          "train_text_encoder": True, "caption_dropout": 0.2},
                   checkpoint={"every_n_steps": 10, "keep_last": 2})
    assert run_in_process(parse_job(doc))["step"] == 10
    ckpt = checkpoint(out, "text", 10)
    assert read_manifest(ckpt)["weights"] == {"unet": "full", "text_encoder": "full"}
    saved = load_file(ckpt / "model" / "text_encoder.safetensors")
    original = StableDiffusionPipeline.from_pretrained(base_dir)
    exported = StableDiffusionPipeline.from_pretrained(out / "pipeline")
    trained = weights(exported.text_encoder)
    assert not differing(trained, saved)  # the export holds the trained encoder
    assert differing(trained, weights(original.text_encoder))
    assert differing(weights(exported.unet), weights(original.unet))
    assert draw(exported).shape == (1, 16, 16, 3)

    doc["spec"]["train"]["max_steps"] = 15
    resumed = run_in_process(parse_job(doc))
    assert resumed["resumed_from"] == 10 and resumed["step"] == 15
    # the text encoder's weights and optimizer state came back: Adam went on counting
    assert {int(s["step"]) for s in optimizer_state(checkpoint(out, "text", 15)).values()} == {15}

    # its checkpoint cannot be resumed by a run that trains less
    doc["spec"]["train"]["train_text_encoder"] = False
    doc["spec"]["checkpoint"]["resume"] = str(checkpoint(out, "text", 15))
    with pytest.raises(CheckpointMismatch, match="same spec.model.lora and spec.train.train_text_encoder"):
        run_in_process(parse_job(doc))


def test_sdxl_trains_both_text_encoders(ray_session, digits_root, tmp_path):
    out = tmp_path / "out"
    doc = make_job("xl-text", out, str(digits_root / "imagefolder"), model={"preset": "tiny-xl"},
                   train={"max_steps": 3, "batch_size": 8, "log_every_n_steps": 1, "train_text_encoder": True},
                   checkpoint={"every_n_steps": 3})
    run_in_process(parse_job(doc))
    initial = build_components(ModelSpec(preset="tiny-xl"), seed=0)
    exported = StableDiffusionXLPipeline.from_pretrained(out / "pipeline")
    for name in ("text_encoder", "text_encoder_2"):
        changed = differing(weights(getattr(exported, name)), weights(initial.text_encoders[name]))
        assert changed, name
    # the first encoder's last layer does not condition SDXL's UNet: it is left out (and stays as it was)
    last = f"encoder.layers.{initial.text_encoder.config.num_hidden_layers - 1}."
    changed = differing(weights(exported.text_encoder), weights(initial.text_encoder))
    assert not any(k.startswith(last) or k.startswith("final_layer_norm.") for k in changed), changed
    assert any(k.startswith(last) for k in weights(initial.text_encoder))  # (the names are right)


@pytest.mark.slow  # 2-worker Ray Train run (~65 s)
def test_lora_and_trained_text_encoder_on_two_ddp_workers_with_ema(ray_session, digits_root, base, tmp_path):
    base_dir, _ = base
    out = tmp_path / "out"
    job = parse_job(make_job(
        "lora-ddp", out, str(digits_root / "imagefolder"),
        model={"pretrained": str(base_dir), "lora": {"rank": 4, "targets": TARGETS}},
        train={"max_steps": 12, "batch_size": 16, "learning_rate": 1e-2, "log_every_n_steps": 4,
               "train_text_encoder": True, "ema": {"decay": 0.8}},
        distributed={"num_workers": 2, "resources_per_worker": {"CPU": 1}, "max_failures": 0},
        checkpoint={"every_n_steps": 12, "keep_last": 1}))
    assert run_job(job)["step"] == 12
    lora_file = load_file(out / "lora" / "pytorch_lora_weights.safetensors")
    assert any(k.startswith("text_encoder.") for k in lora_file) and any(k.startswith("unet.") for k in lora_file)
    ckpt = next(p for p in (out / "checkpoints" / "lora-ddp").glob("checkpoint_*") if read_manifest(p))
    assert read_manifest(ckpt)["weights"] == {"unet": "lora", "text_encoder": "lora"}
    # the export holds the EMA of the adapters (the checkpoint's EMA shadow), not the raw ones
    shadow = torch.load(ckpt / "ema.pt", weights_only=False)["shadow_params"]
    raw = {**in_lora_file(ckpt, "unet"), **in_lora_file(ckpt, "text_encoder")}
    assert lora_file.keys() == raw.keys() and len(shadow) == len(raw)
    assert all(any(torch.equal(v, s) for s in shadow) for v in lora_file.values())
    assert differing(lora_file, raw)
    merged = assert_lora_export_matches_merged(base_dir, out)
    original = StableDiffusionPipeline.from_pretrained(base_dir)
    assert differing(weights(merged.text_encoder), weights(original.text_encoder))


def test_lora_refusals_at_build_time(base):
    base_dir, _ = base
    only_vae = parse_job(make_job("x", "/tmp/x", "/tmp/d", model={
        "preset": "tiny", "pretrained": str(base_dir / "vae"), "lora": {"rank": 4}})).spec
    with pytest.raises(ModelError,
                       match=r"spec.model.lora: spec.model.pretrained holds no unet \(UNet2DConditionModel\)"):
        build_components(only_vae.model, s3=only_vae.storage)
    nowhere = parse_job(make_job("x", "/tmp/x", "/tmp/d", model={
        "pretrained": str(base_dir), "lora": {"rank": 4, "targets": ["no_such_layer"]}})).spec
    with pytest.raises(ModelError, match="spec.model.lora.targets: none of .'no_such_layer'. names a module"):
        Trainable(build_components(nowhere.model), nowhere)
