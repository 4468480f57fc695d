"""DeepSpeed ZeRO 1/2/3 on 2 Ray Train workers (gloo on CPU), with the real DeepSpeed engine.

The first engine start JIT-compiles DeepSpeed's CPU communication extension (~40 s, cached under
~/.cache/torch_extensions): the first test here pays for it.
"""

import pytest
import torch
from conftest import make_job
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file
from test_train import losses, metrics, ray_checkpoints

from sdray.spec import parse_job
from sdray.train.checkpoint import CheckpointMismatch, read_manifest
from sdray.train.strategies.deepspeed import engine_config, make_engine
from sdray.train.launch import run_in_process, run_job


def test_deepspeed_settings_map_to_the_engine_config():
    doc = make_job("ds-config", "/tmp/out", "s3://bucket/digits")
    doc["spec"]["distributed"] = {"strategy": "deepspeed", "num_workers": 4,
                                  "deepspeed": {"zero_stage": 3, "offload_optimizer": True, "offload_params": True}}
    doc["spec"]["train"].update(gradient_accumulation_steps=2, mixed_precision="fp16", max_grad_norm=0.5)
    config = engine_config(parse_job(doc).spec, world_size=4)
    assert config["zero_optimization"] == {"stage": 3, "offload_optimizer": {"device": "cpu"},
                                           "offload_param": {"device": "cpu"}}
    assert (config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"],
            config["train_batch_size"]) == (16, 2, 16 * 2 * 4)
    assert config["gradient_clipping"] == 0.5
    assert config["fp16"] == {"enabled": True} and config["bf16"] == {"enabled": False}
    doc["spec"]["distributed"]["deepspeed"] = {"zero_stage": 1}
    doc["spec"]["train"].update(mixed_precision="bf16", max_grad_norm=None)
    config = engine_config(parse_job(doc).spec, world_size=4)
    assert config["zero_optimization"] == {"stage": 1} and config["gradient_clipping"] == 0.0
    assert config["bf16"] == {"enabled": True} and config["fp16"] == {"enabled": False}


def ds_job(name, out, data, deepspeed, max_steps, **train):
    return make_job(name, out, data,
                    train={"max_steps": max_steps, "batch_size": 16, "learning_rate": 2e-3, "log_every_n_steps": 5,
                           **train},
                    distributed={"num_workers": 2, "resources_per_worker": {"CPU": 1}, "strategy": "deepspeed",
                                 "deepspeed": deepspeed},
                    checkpoint={"every_n_steps": 10, "keep_last": 1},
                    validation={"prompts": ["a handwritten digit 5"], "num_inference_steps": 2})


def engine_steps(checkpoint) -> int:
    """The DeepSpeed engine's own optimizer-step counter, as its checkpoint holds it."""
    states = next((checkpoint / "deepspeed" / "engine").glob("*model_states.pt"))
    return torch.load(states, map_location="cpu", weights_only=False)["global_steps"]


@pytest.mark.slow  # 2-worker ZeRO-2 run, resume and export (~245 s)
def test_zero2_with_ema_and_accumulation_checkpoints_resumes_and_exports(ray_session, digits_root, tmp_path):
    out = tmp_path / "out"
    doc = ds_job("ds-zero2", out, str(digits_root / "imagefolder"), {"zero_stage": 2}, 20,
                 gradient_accumulation_steps=2, ema={"decay": 0.9}, lr_scheduler="linear")
    doc["spec"]["validation"]["every_n_steps"] = 10
    first = run_job(parse_job(doc))
    assert first["step"] == 20
    curve = losses(out)
    assert all(torch.isfinite(torch.tensor(curve))) and curve[-1] < curve[0], curve
    run_dir = out / "checkpoints" / "ds-zero2"
    ckpt = ray_checkpoints(run_dir)[-1]
    assert read_manifest(ckpt) | {"job": None} == {"step": 20, "stage": "denoiser", "job": None,
                                                  "format": "deepspeed", "zero_stage": 2, "world_size": 2,
                                                  "weights": {"unet": "full"}}
    engine_files = sorted(p.name for p in (ckpt / "deepspeed" / "engine").iterdir())
    # every rank wrote its own partition of the optimizer state; Ray Train merged them into one checkpoint
    assert [f for f in engine_files if f.endswith("optim_states.pt")] == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    assert (ckpt / "ema.pt").exists() and engine_steps(ckpt) == 20

    doc["spec"]["train"]["max_steps"] = 30
    second = run_job(parse_job(doc))
    assert second["resumed_from"] == 20 and second["step"] == 30
    # the engine's counters and the LR schedule went on from the checkpoint, one step per optimizer step
    assert engine_steps(ray_checkpoints(run_dir)[-1]) == 30
    lr = {m["step"]: m["lr"] for m in metrics(out) if "lr" in m}
    assert lr[5] == pytest.approx(2e-3 * 15 / 20) and lr[25] == pytest.approx(2e-3 * 5 / 30)
    pipe = StableDiffusionPipeline.from_pretrained(out / "pipeline")
    assert pipe("a handwritten digit 5", num_inference_steps=2).images[0].size == (16, 16)

    # another strategy, ZeRO stage or world size refuses the checkpoint with a message that says so
    doc["spec"]["checkpoint"]["resume"] = str(ray_checkpoints(run_dir)[-1])
    doc["spec"]["distributed"] = {"num_workers": 1}
    with pytest.raises(CheckpointMismatch,
                       match=r"deepspeed ZeRO-2 run of 2 workers, this run is replicated \(ddp\) on 1"):
        run_in_process(parse_job(doc))
    doc["spec"]["distributed"] = {"num_workers": 1, "strategy": "deepspeed", "deepspeed": {"zero_stage": 3}}
    doc["spec"]["train"].pop("ema")
    with pytest.raises(CheckpointMismatch, match="deepspeed ZeRO-2 run of 2 workers, this run is deepspeed ZeRO-3 on 1"):
        run_in_process(parse_job(doc))


@pytest.mark.parametrize("deepspeed, train, resume", [
    ({"zero_stage": 1}, {"mixed_precision": "bf16"}, False),
    ({"zero_stage": 3}, {}, False),
    # DeepSpeedCPUAdam is JIT-compiled on first use (~35 s); ZeRO-3 resumes into offloaded parameters
    pytest.param({"zero_stage": 3, "offload_optimizer": True, "offload_params": True}, {}, True,
                 marks=pytest.mark.slow),
], ids=["zero1-bf16", "zero3", "zero3-offload-resume"])
@pytest.mark.slow  # 2-worker ZeRO runs (~90-110 s each); test_checkpoint_safety keeps an engine in the default suite
def test_zero_stage_trains_and_exports_the_trained_weights(ray_session, digits_root, tmp_path, deepspeed, train,
                                                           resume):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    out = tmp_path / "out"
    name = f"ds-zero{deepspeed['zero_stage']}-{len(deepspeed)}"
    doc = ds_job(name, out, str(digits_root / "imagefolder"), deepspeed, 10, **train)
    summary = run_job(parse_job(doc))
    assert summary["step"] == 10 and all(torch.isfinite(torch.tensor(losses(out))))
    if resume:
        doc["spec"]["train"]["max_steps"] = 15
        summary = run_job(parse_job(doc))
        assert summary["resumed_from"] == 10 and summary["step"] == 15
        assert engine_steps(ray_checkpoints(out / "checkpoints" / name)[-1]) == 15
    ckpt = ray_checkpoints(out / "checkpoints" / name)[-1]
    assert read_manifest(ckpt)["zero_stage"] == deepspeed["zero_stage"]
    # the export holds the trained weights: DeepSpeed's own consolidation of the saved fp32 partitions
    # (bf16 runs export the engine's 16-bit weights: equal to them after rounding)
    # (the engine wraps the conditioned UNet, so its weights are named unet.*)
    trained = {k.removeprefix("unet."): v for k, v in
               get_fp32_state_dict_from_zero_checkpoint(str(ckpt / "deepspeed"), tag="engine").items()}
    exported = load_file(out / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors")
    assert trained.keys() == exported.keys()
    bf16 = train.get("mixed_precision") == "bf16"
    assert all(torch.allclose(exported[k], trained[k], rtol=2**-8 if bf16 else 0, atol=0) for k in trained)
    if bf16:  # the engine really trained 16-bit weights
        assert all(torch.equal(exported[k], exported[k].bfloat16().float()) for k in exported)
    assert StableDiffusionPipeline.from_pretrained(out / "pipeline").unet.config.sample_size == 8
    assert (out / "samples" / "final.png").exists()


def test_fp16_where_deepspeed_has_none_is_refused_naming_the_field():
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().is_fp16_supported():
        pytest.skip("this device has fp16 kernels")
    job = parse_job(ds_job("ds-fp16", "/tmp/out", "/tmp/data", {"zero_stage": 2}, 2, mixed_precision="fp16"))
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="spec.train.mixed_precision: DeepSpeed has no fp16 support on this device"):
        make_engine(model, torch.optim.AdamW(model.parameters()), None, job.spec, torch.device("cpu"))
