"""Every model family trains through the same loop: short runs of the flow-matching families (SD3, Flux) on
the digits, their latent caches, LoRA exports that stock pipelines load, and strategies applied to them.
(SD 1.x/2.x and SDXL are covered by test_loop, test_train, test_finetune, test_latents and test_buckets.)"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import make_job
from diffusers import DiffusionPipeline
from test_train import ray_checkpoints

from sdray.data.latents import StaleCacheError
from sdray.models.build import build_components
from sdray.models.pipeline import assemble_pipeline, generate
from sdray.spec import ModelSpec, parse_job
from sdray.train.launch import run_in_process, run_job

FAMILIES = {"tiny-sd3": "StableDiffusion3Pipeline", "tiny-flux": "FluxPipeline"}


def _losses(out) -> list[float]:
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def _family_job(name, preset, out, data_uri, **spec):
    sections = dict(model={"preset": preset},
                    train={"max_steps": 30, "batch_size": 16, "learning_rate": 1e-3, "log_every_n_steps": 10},
                    checkpoint={"every_n_steps": 30},
                    validation={"prompts": ["a handwritten digit 1"], "num_inference_steps": 2})
    for key, value in spec.items():
        sections[key] = {**sections.get(key, {}), **value}
    return make_job(name, out, data_uri, **sections)


@pytest.mark.parametrize("preset", FAMILIES)
def test_each_flow_family_trains_and_exports_its_stock_pipeline(ray_session, digits_root, tmp_path, preset):
    out = tmp_path / "out"
    summary = run_in_process(parse_job(_family_job("fam", preset, out, str(digits_root / "imagefolder"))))
    losses = _losses(out)
    assert summary["step"] == 30 and summary["stage"] == "denoiser"
    assert losses[-1] < losses[0], losses  # flow matching learns the digits' latents
    pipe = DiffusionPipeline.from_pretrained(out / "pipeline")
    assert type(pipe).__name__ == FAMILIES[preset]
    image = generate(pipe, ["a handwritten digit 3"], num_inference_steps=2, resolution=16)[0][0]
    assert image.size == (16, 16) and np.asarray(image).std() > 0
    assert (out / "samples" / "final.png").exists()


@pytest.mark.parametrize("preset", FAMILIES)
def test_lora_export_loaded_on_the_base_draws_what_the_merged_pipeline_draws(ray_session, digits_root, tmp_path,
                                                                             preset):
    base = tmp_path / "base"
    assemble_pipeline(build_components(ModelSpec(preset=preset), seed=3)).save_pretrained(base)
    out = tmp_path / "out"
    doc = _family_job("lora", preset, out, str(digits_root / "imagefolder"),
                      model={"preset": None, "pretrained": str(base), "lora": {"rank": 4}},
                      train={"max_steps": 6, "learning_rate": 5e-2, "log_every_n_steps": 3},
                      checkpoint={"every_n_steps": 6}, validation={"prompts": []})
    del doc["spec"]["model"]["preset"]
    run_in_process(parse_job(doc))
    merged = DiffusionPipeline.from_pretrained(out / "pipeline")
    adapted = DiffusionPipeline.from_pretrained(base)
    adapted.load_lora_weights(out / "lora")
    plain = DiffusionPipeline.from_pretrained(base)

    def draw(pipe):
        torch.manual_seed(0)
        return np.asarray(generate(pipe, ["a handwritten digit 5"], num_inference_steps=3, resolution=16,
                                   guidance_scale=1.0)[0][0], dtype=np.float32)

    with_lora, fused, before = draw(adapted), draw(merged), draw(plain)
    assert np.abs(with_lora - fused).max() <= 2.0  # the same weights, merged or as adapters (rounding apart)
    assert np.abs(with_lora - before).max() > 2.0  # and the adapters changed what the base draws


@pytest.mark.slow  # precompute and a Ray Train run (~45 s); each family still trains in-process in the default suite
def test_a_flux_latent_cache_trains_and_refuses_a_job_of_another_family(ray_session, digits_root, tmp_path):
    from sdray.data.precompute import precompute

    data = str(digits_root / "imagefolder")
    job = parse_job(_family_job("cache", "tiny-flux", tmp_path / "unused", data))
    manifest = precompute(job, str(tmp_path / "cache"))
    assert manifest["family"] == "flux" and "prompt_embeds" in manifest["columns"]
    assert manifest["shift_factor"] == pytest.approx(0.1159)
    out = tmp_path / "out"
    doc = _family_job("cached", "tiny-flux", out, str(tmp_path / "cache"), data={"format": "latents"},
                      train={"max_steps": 10, "log_every_n_steps": 5}, checkpoint={"every_n_steps": 10})
    assert run_in_process(parse_job(doc))["step"] == 10
    assert type(DiffusionPipeline.from_pretrained(out / "pipeline")).__name__ == "FluxPipeline"
    other = _family_job("other", "tiny", tmp_path / "o", str(tmp_path / "cache"), data={"format": "latents"})
    with pytest.raises(StaleCacheError, match="made for a flux model, this job trains a sd model"):
        run_job(parse_job(other))


@pytest.mark.slow  # two 2-worker Ray Train runs (~2 min); the default suite trains each family in-process
@pytest.mark.parametrize("preset, distributed", [
    ("tiny-flux", {"strategy": "fsdp", "fsdp": {"sharding": "full"}}),
    ("tiny-sd3", {"strategy": "deepspeed", "deepspeed": {"zero_stage": 3}}),
], ids=["fsdp-flux", "zero3-sd3"])
def test_sharded_strategies_train_checkpoint_resume_and_export_a_family(ray_session, digits_root, tmp_path, preset,
                                                                         distributed):
    from sdray.train.checkpoint import read_manifest

    out = tmp_path / "out"
    doc = _family_job(f"{preset}-{distributed['strategy']}", preset, out, str(digits_root / "imagefolder"),
                      train={"max_steps": 10, "batch_size": 8, "log_every_n_steps": 5},
                      checkpoint={"every_n_steps": 10, "keep_last": 1},
                      distributed={"num_workers": 2, "resources_per_worker": {"CPU": 1}, **distributed})
    assert run_job(parse_job(doc))["step"] == 10
    ckpt = ray_checkpoints(out / "checkpoints" / doc["metadata"]["name"])[-1]
    assert read_manifest(ckpt)["format"] == {"fsdp": "dcp", "deepspeed": "deepspeed"}[distributed["strategy"]]
    assert read_manifest(ckpt)["weights"] == {"transformer": "full"}
    doc["spec"]["train"]["max_steps"] = 15
    second = run_job(parse_job(doc))
    assert second["resumed_from"] == 10 and second["step"] == 15
    pipe = DiffusionPipeline.from_pretrained(out / "pipeline")
    assert type(pipe).__name__ == FAMILIES[preset]
    # the export holds trained weights, gathered from the shards: not the preset's initial ones
    initial = build_components(ModelSpec(preset=preset), seed=0).denoiser.state_dict()
    assert any(not torch.equal(v, initial[k]) for k, v in pipe.transformer.state_dict().items())
