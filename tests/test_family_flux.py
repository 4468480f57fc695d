"""The Flux family (sdray.models.families.flux) against diffusers' FluxPipeline, on the tiny-flux preset."""

import pytest
import torch
from conftest import recorded_calls
from diffusers import (AutoencoderKL, DiffusionPipeline, FlowMatchEulerDiscreteScheduler, FluxPipeline,
                       FluxTransformer2DModel)
from transformers import CLIPTextModel, T5EncoderModel, T5TokenizerFast

from sdray.models.build import ModelError, build_components, check_job
from sdray.models.conditioning import drop_captions, encode_prompts, unconditional_prompts
from sdray.models.families import family_named, family_of_pipeline
from sdray.models.families.flux import latent_image_ids, pack_latents, unpack_latents
from sdray.models.pipeline import assemble_pipeline, generate
from sdray.models.presets import PRESETS
from sdray.spec import ModelSpec, parse_job

PROMPTS = ["a handwritten digit 7", "", "two small red photo of the number nine, large and blue"]


@pytest.fixture(scope="module")
def comps():
    return build_components(ModelSpec(preset="tiny-flux"), seed=1)


def _ids(c, prompts):
    return {"input_ids": c.tokenizer(prompts, padding="max_length", max_length=c.tokenizer.model_max_length,
                                     truncation=True, return_tensors="pt").input_ids,
            "input_ids_2": c.tokenizers_by_slot["tokenizer_2"](prompts, padding="max_length", max_length=c.tokenizers_by_slot["tokenizer_2"].model_max_length,
                                         truncation=True, return_tensors="pt").input_ids}


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_tiny_flux_builds_flux_components(comps):
    assert comps.family is family_named("flux") and family_of_pipeline("FluxPipeline") is comps.family
    assert isinstance(comps.denoiser, FluxTransformer2DModel) and isinstance(comps.vae, AutoencoderKL)
    assert isinstance(comps.text_encoder, CLIPTextModel) and isinstance(comps.text_encoders["text_encoder_2"], T5EncoderModel)
    assert isinstance(comps.tokenizers_by_slot["tokenizer_2"], T5TokenizerFast) and comps.tokenizers_by_slot["tokenizer_2"].model_max_length == 16
    assert isinstance(comps.noise_scheduler, FlowMatchEulerDiscreteScheduler)
    assert comps.noise_scheduler.config.use_dynamic_shifting  # Flux's shift comes from the resolution
    assert 0.5e6 < sum(p.numel() for p in comps.denoiser.parameters()) < 2e6
    assert comps.denoiser.config.guidance_embeds and comps.resolution == 16
    latents = comps.vae.encode(torch.zeros(2, 3, 16, 16)).latent_dist.mode()
    assert latents.shape == (2, 16, 8, 8)
    units = comps.family.shard_units(comps.denoiser)
    assert [type(u).__name__ for u in units] == ["FluxTransformerBlock"] * 2 + ["FluxSingleTransformerBlock"] * 2


def test_encode_prompts_is_what_the_flux_pipeline_computes(comps):
    pipe = assemble_pipeline(comps)
    with torch.no_grad():
        ours = comps.family.encode_prompts(comps, _ids(comps, PROMPTS))
        prompt_embeds, pooled, text_ids = pipe.encode_prompt(
            prompt=PROMPTS, prompt_2=PROMPTS, max_sequence_length=comps.tokenizers_by_slot["tokenizer_2"].model_max_length)
    assert set(ours) == {"prompt_embeds", "pooled_prompt_embeds"}  # cacheable: no ids
    assert ours["prompt_embeds"].shape == (3, 16, 32) and ours["pooled_prompt_embeds"].shape == (3, 32)
    assert torch.equal(ours["prompt_embeds"], prompt_embeds)
    assert torch.equal(ours["pooled_prompt_embeds"], pooled)
    assert text_ids.shape == (16, 3)
    # a dropped caption is the empty caption's embeddings, as FluxPipeline encodes a negative prompt
    empty = unconditional_prompts(comps)
    assert torch.equal(empty["prompt_embeds"], prompt_embeds[1]) and empty["pooled_prompt_embeds"].any()
    batch = _ids(comps, PROMPTS[:1] * 2)
    dropped = drop_captions(encode_prompts(comps, batch), unconditional=empty, drop=torch.tensor([False, True]))
    assert torch.equal(dropped["pooled_prompt_embeds"][1], pooled[1])


def test_sequence_length_follows_the_spec():
    c = build_components(ModelSpec(preset="tiny-flux", max_sequence_length=8), frozen=True, denoiser=False)
    assert c.family.sampling_kwargs(c) == {"max_sequence_length": 8}
    with torch.no_grad():
        assert c.family.encode_prompts(c, _ids(c, PROMPTS))["prompt_embeds"].shape == (3, 8, 32)


@pytest.mark.parametrize("height,width,vae_scale", [(8, 8, 2), (6, 10, 8), (128, 96, 8)])
def test_packing_is_the_pipelines_and_unpacking_inverts_it(height, width, vae_scale):
    latents = torch.randn(2, 16, height, width)
    tokens = pack_latents(latents)
    assert tokens.shape == (2, height // 2 * width // 2, 64)
    assert torch.equal(tokens, FluxPipeline._pack_latents(latents, 2, 16, height, width))
    assert torch.equal(unpack_latents(tokens, height, width), latents)
    pixels = (height * vae_scale, width * vae_scale)
    assert torch.equal(FluxPipeline._unpack_latents(tokens, *pixels, vae_scale), latents)
    assert torch.equal(latent_image_ids(height, width),
                       FluxPipeline._prepare_latent_image_ids(2, height // 2, width // 2, "cpu", torch.float32))


def _inputs(c, n=3, height=8, width=8):
    torch.manual_seed(0)
    with torch.no_grad():
        embeds = c.family.encode_prompts(c, _ids(c, PROMPTS[:n]))
    return torch.randn(n, 16, height, width), torch.tensor([999.0, 500.0, 3.0])[:n], embeds


def test_predict_follows_the_pipelines_conventions(comps):
    noisy, timesteps, embeds = _inputs(comps, height=8, width=12)  # not square: rows and columns stay apart
    with torch.no_grad():
        out = comps.family.predict(comps.denoiser, noisy, timesteps, embeds, {}, resolution=16, guidance=3.5)
        tokens = comps.denoiser(
            hidden_states=FluxPipeline._pack_latents(noisy, 3, 16, 8, 12), timestep=timesteps / 1000,
            guidance=torch.full([1], 3.5, dtype=torch.float32).expand(3),
            pooled_projections=embeds["pooled_prompt_embeds"], encoder_hidden_states=embeds["prompt_embeds"],
            txt_ids=torch.zeros(16, 3), img_ids=FluxPipeline._prepare_latent_image_ids(3, 4, 6, "cpu", torch.float32),
            return_dict=False)[0]
    assert out.shape == noisy.shape
    assert torch.equal(out, FluxPipeline._unpack_latents(tokens, 8 * 2, 12 * 2, 2))


def _guidance_seen(c, guidance):
    seen = {}

    def spy(module, args, kwargs):
        seen["guidance"] = kwargs["guidance"]

    noisy, timesteps, embeds = _inputs(c)
    handle = c.denoiser.register_forward_pre_hook(spy, with_kwargs=True)
    try:
        with torch.no_grad():
            out = c.family.predict(c.denoiser, noisy, timesteps, embeds, {}, resolution=16, guidance=guidance)
    finally:
        handle.remove()
    return seen["guidance"], out


def test_guidance_reaches_dev_shaped_models_only(comps):
    seen, low = _guidance_seen(comps, 1.0)
    assert seen.tolist() == [1.0, 1.0, 1.0]
    assert not torch.allclose(low, _guidance_seen(comps, 4.0)[1])
    schnell = build_components(ModelSpec(preset="tiny-flux", overrides={"transformer": {"guidance_embeds": False}}))
    seen, low = _guidance_seen(schnell, 1.0)
    assert seen is None and torch.equal(low, _guidance_seen(schnell, 4.0)[1])


def test_a_flow_matching_step_trains_every_transformer_weight(comps):
    noisy, timesteps, embeds = _inputs(comps)
    model = FluxTransformer2DModel.from_config(comps.denoiser.config)
    pred = comps.family.predict(model, noisy, timesteps, embeds, {}, resolution=16)
    (pred - torch.randn_like(pred)).pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_latent_scaling_uses_flux_shift_and_inverts_exactly(comps):
    config = comps.vae.config
    assert (config.shift_factor, config.scaling_factor) == (0.1159, 0.3611)
    x = torch.randn(2, 16, 8, 8, dtype=torch.float64)
    scaled = comps.family.scale_latents(x, config)
    assert torch.allclose(scaled, (x - 0.1159) * 0.3611)
    # FluxPipeline decodes (latents / scaling_factor) + shift_factor: the same as unscale_latents
    assert torch.allclose(comps.family.unscale_latents(scaled, config), x, rtol=0, atol=1e-12)


def test_the_pipeline_saves_loads_stock_generates_and_reloads(comps, tmp_path):
    assemble_pipeline(comps).save_pretrained(tmp_path / "flux", safe_serialization=True)
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "flux")
    assert isinstance(pipe, FluxPipeline)
    # the loaded pipeline tells generate the T5 length training used (its tokenizer's) and the size (its VAE's:
    # FluxPipeline's own default would be 128 latent pixels, 256 px with the tiny VAE)
    assert comps.family.sampling_kwargs(comps) == {"max_sequence_length": 16}
    assert comps.family.pipeline_sampling_kwargs(pipe) == {"max_sequence_length": 16, "height": 16, "width": 16}
    images = generate(pipe, ["a digit 3"], num_inference_steps=2, guidance_scale=3.5)
    assert images[0][0].size == (16, 16)
    again = build_components(ModelSpec(pretrained=str(tmp_path / "flux")), seed=99)
    assert again.family.name == "flux" and again.resolution == 16
    reloaded = {"denoiser": again.denoiser, **again.frozen_modules()}
    for slot, model in {"denoiser": comps.denoiser, **comps.frozen_modules()}.items():  # vae, both encoders
        assert _same(reloaded[slot], model), slot
    assert again.tokenizers_by_slot["tokenizer_2"].get_vocab() == comps.tokenizers_by_slot["tokenizer_2"].get_vocab()
    only_transformer = build_components(ModelSpec(pretrained=str(tmp_path / "flux" / "transformer"),
                                                  preset="tiny-flux"), frozen=False)
    assert _same(only_transformer.denoiser, comps.denoiser)
    assert again.tokenizers_by_slot["tokenizer_2"].model_max_length == 16
    settings = [{k: v for k, v in s.config.items() if not k.startswith("_")}
                for s in (again.noise_scheduler, comps.noise_scheduler)]
    assert settings[0] == settings[1]


def test_a_distilled_model_gets_its_guidance_value_and_one_without_embeddings_true_cfg(comps):
    # dev-shaped (guidance embeddings): FluxPipeline's guidance_scale is the embedded value, one call a step
    pipe = assemble_pipeline(comps)
    assert comps.family.cfg_kwargs(4.0, 2, pipe) == {"guidance_scale": 4.0}
    prompts = ["a handwritten digit 3", "a handwritten digit 7"]
    with recorded_calls(pipe.transformer) as calls:
        generate(pipe, prompts, num_inference_steps=2, guidance_scale=4.0, resolution=16)
    assert len(calls) == 2 and calls[0]["guidance"].tolist() == [4.0, 4.0]
    # without guidance embeddings (schnell-shaped, or trained from scratch): real CFG against the empty caption,
    # one negative prompt per prompt to pair with the prompts' batch
    plain = build_components(ModelSpec(preset="tiny-flux", overrides={"transformer": {"guidance_embeds": False}}))
    pipe = assemble_pipeline(plain)
    assert plain.family.cfg_kwargs(4.0, 2, pipe) == {"true_cfg_scale": 4.0, "negative_prompt": ["", ""]}
    with recorded_calls(pipe.transformer) as calls:
        rows = generate(pipe, prompts, images_per_prompt=3, num_inference_steps=2, guidance_scale=4.0, resolution=16)
    assert [len(row) for row in rows] == [3, 3] and rows[0][0].size == (16, 16)
    assert len(calls) == 2 * 2  # each step: the prompts, then the negative prompt
    prompted, negative = calls[0], calls[1]
    # 2 prompts × 3 images, each with the pipeline's own T5 length (the trained 16, not FluxPipeline's 512)
    assert prompted["encoder_hidden_states"].shape == negative["encoder_hidden_states"].shape == (6, 16, 32)
    empty = unconditional_prompts(plain)  # what a dropped caption was in training
    torch.testing.assert_close(negative["encoder_hidden_states"], empty["prompt_embeds"].expand(6, -1, -1))
    torch.testing.assert_close(negative["pooled_projections"], empty["pooled_prompt_embeds"].expand(6, -1))
    assert prompted["guidance"] is None and negative["guidance"] is None
    with recorded_calls(pipe.transformer) as calls:
        generate(pipe, prompts, num_inference_steps=2, guidance_scale=1.0, resolution=16)
    assert len(calls) == 2  # no guidance: one call a step


def _job(model, train=None):
    doc = {"apiVersion": "sdray.io/v1alpha1", "kind": "DiffusionJob", "metadata": {"name": "f"},
           "spec": {"model": model, "data": {"uri": "/d"}, "output": {"uri": "/o"}, "train": train or {}}}
    return parse_job(doc).spec


@pytest.mark.parametrize("model,train,refused", [
    ({}, {"mixed_precision": "fp16"}, r"spec.train.mixed_precision: .*NaN in fp16; use bf16"),
    ({}, {"snr_gamma": 5.0}, r"spec.train.snr_gamma: a setting of DDPM training"),
    ({"prediction_type": "epsilon"}, {}, r"spec.model.prediction_type: a setting of DDPM training"),
    ({"max_sequence_length": 1024}, {}, r"spec.model.max_sequence_length: FluxPipeline takes at most 512"),
    ({"resolution": 24}, {}, r"spec.model.resolution: .*multiples of 16"),
    ({"use_t5": False}, {}, r"spec.model.use_t5: a flux model has no optional T5"),
    ({"preset": "flux-schnell"}, {"guidance": 3.5}, r"spec.train.guidance: the flux-schnell transformer has no "),
])
def test_check_job_refuses_what_flux_cannot_train(model, train, refused):
    with pytest.raises(ModelError, match=refused):
        check_job(_job({"preset": "tiny-flux", **model}, train))


def test_check_job_accepts_flux_settings():
    assert check_job(_job({"preset": "tiny-flux", "max_sequence_length": 512},
                          {"mixed_precision": "bf16", "guidance": 3.5})).name == "flux"
    assert check_job(_job({"preset": "flux-dev"}, {"guidance": 1.0})).name == "flux"


@pytest.mark.parametrize("preset", ["tiny-flux", "flux-dev", "flux-schnell"])
def test_flux_presets_are_consistent(preset):
    p = PRESETS[preset]
    t, clip, t5 = p.denoiser, p.text_encoders["text_encoder"], p.text_encoders["text_encoder_2"]
    assert p.family == "flux" and p.t5_max_length
    assert t["attention_head_dim"] == sum(t["axes_dims_rope"])
    assert t["in_channels"] == 4 * p.vae["latent_channels"] == 64
    assert t["joint_attention_dim"] == t5["d_model"] and t["pooled_projection_dim"] == clip["hidden_size"]
    assert t5["d_model"] == t5["d_kv"] * t5["num_heads"]
    assert not p.vae["use_quant_conv"] and not p.vae["use_post_quant_conv"]
    # latents with even sides at the preset's resolution: 2 ** (blocks - 1) is the VAE's scale
    assert p.resolution // 2 ** (len(p.vae["block_out_channels"]) - 1) % 2 == 0
    if preset != "tiny-flux":
        assert (t["num_layers"], t["num_single_layers"], t["num_attention_heads"]) == (19, 38, 24)
        assert p.resolution == 1024 and t["guidance_embeds"] == (preset == "flux-dev")
        assert p.t5_max_length == (512 if preset == "flux-dev" else 256)
        assert (t5["d_ff"], t5["num_layers"], t5["vocab_size"]) == (10240, 24, 32128)
        assert p.vae["block_out_channels"] == [128, 256, 512, 512] and clip["num_hidden_layers"] == 12


def test_default_lora_targets_name_transformer_modules_but_not_its_output(comps):
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    names = [name for name, _ in comps.denoiser.named_modules()]
    for target in comps.family.lora_targets:
        assert any(check_target_module_exists(LoraConfig(target_modules=[target]), n) for n in names), target
    config = LoraConfig(target_modules=list(comps.family.lora_targets))
    adapted = {n for n in names if check_target_module_exists(config, n)}
    assert "proj_out" not in adapted and "single_transformer_blocks.0.proj_mlp" in adapted
    assert "transformer_blocks.1.ff_context.net.2" in adapted and "single_transformer_blocks.1.attn.to_q" in adapted
