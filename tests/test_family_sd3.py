"""The sd3 family (Stable Diffusion 3 / 3.5): its tiny preset trains, its conditioning is exactly what
StableDiffusion3Pipeline feeds (with and without T5), and its exports load as stock diffusers pipelines."""

from __future__ import annotations

import inspect
import json

import pytest
import torch
from conftest import make_job, recorded_calls
from diffusers import (AutoencoderKL, DiffusionPipeline, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                       StableDiffusion3Pipeline)
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from sdray.models.build import ModelError, build_components, check_job, frozen_fingerprints, model_family
from sdray.models.families import ModelFamily
from sdray.models.pipeline import assemble_pipeline, generate, load_pipeline
from sdray.models.presets import PRESETS
from sdray.spec import ModelSpec, parse_job

PROMPTS = ["a handwritten digit 7", "a small red photo of the number three"]


@pytest.fixture(scope="module")
def tiny():
    return build_components(ModelSpec(preset="tiny-sd3"), seed=1)


@pytest.fixture(scope="module")
def tiny_without_t5():
    return build_components(ModelSpec(preset="tiny-sd3", use_t5=False), seed=1)


def _ids(comps, prompts):
    """The batch's token-id columns, tokenised as the data pipeline does."""
    out = {}
    for slot in comps.family.text_slots_of(comps):
        tok = comps.tokenizers_by_slot[slot.tokenizer]
        out[slot.ids] = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                            return_tensors="pt").input_ids
    return out


def _same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _n_params(module):
    return sum(p.numel() for p in module.parameters())


def test_tiny_sd3_builds_an_mmdit_that_takes_a_flow_matching_step(tiny):
    family = tiny.family
    assert family.name == "sd3" and family.objective == "flow_matching" and family.flow_shift == 3.0
    assert isinstance(tiny.denoiser, SD3Transformer2DModel) and tiny.denoiser.config.dual_attention_layers == [0]
    assert {k: type(v) for k, v in tiny.text_encoders.items()} == {
        "text_encoder": CLIPTextModelWithProjection, "text_encoder_2": CLIPTextModelWithProjection,
        "text_encoder_3": T5EncoderModel}
    assert isinstance(tiny.noise_scheduler, FlowMatchEulerDiscreteScheduler)
    assert tiny.noise_scheduler.config.shift == 3.0 and not tiny.noise_scheduler.config.use_dynamic_shifting
    assert 0.5e6 < _n_params(tiny.denoiser) < 2e6
    assert [type(u).__name__ for u in family.shard_units(tiny.denoiser)] == ["JointTransformerBlock"] * 4

    with torch.no_grad():
        latents = family.scale_latents(tiny.vae.encode(torch.rand(4, 3, 16, 16) * 2 - 1).latent_dist.sample(),
                                       tiny.vae.config)
        embeds = family.encode_prompts(tiny, _ids(tiny, PROMPTS * 2))
    assert latents.shape == (4, 16, 8, 8)
    noise, sigmas = torch.randn_like(latents), torch.tensor([0.1, 0.4, 0.7, 0.95])
    noisy = (1 - sigmas.view(-1, 1, 1, 1)) * latents + sigmas.view(-1, 1, 1, 1) * noise
    pred = family.predict(tiny.denoiser, noisy, sigmas * 1000, embeds, {}, resolution=tiny.resolution)
    assert pred.shape == latents.shape
    loss = torch.nn.functional.mse_loss(pred, noise - latents)
    loss.backward()
    assert torch.isfinite(loss) and tiny.denoiser.context_embedder.weight.grad.abs().sum() > 0
    tiny.denoiser.zero_grad(set_to_none=True)


def test_scaled_latents_are_shifted_and_unscaling_inverts_it(tiny):
    config = tiny.vae.config
    assert (config.shift_factor, config.scaling_factor) == (0.0609, 1.5305)
    x = torch.randn(2, 16, 8, 8)
    scaled = ModelFamily.scale_latents(x, config)
    torch.testing.assert_close(scaled, (x - 0.0609) * 1.5305)
    torch.testing.assert_close(ModelFamily.unscale_latents(scaled, config), x, rtol=0, atol=1e-6)


@torch.no_grad()
def _pipeline_embeds(comps):
    pipe = assemble_pipeline(comps)
    kwargs = comps.family.sampling_kwargs(comps)
    return pipe.encode_prompt(prompt=PROMPTS, prompt_2=None, prompt_3=None, do_classifier_free_guidance=True,
                              **kwargs)


@torch.no_grad()
def test_prompt_embeddings_and_the_unconditional_input_are_the_pipelines(tiny):
    embeds = tiny.family.encode_prompts(tiny, _ids(tiny, PROMPTS))
    # 16 CLIP tokens (the two 32-wide CLIPs side by side, zero-padded to T5's 96), then 16 T5 tokens
    assert embeds["prompt_embeds"].shape == (2, 16 + 16, 96) and embeds["pooled_prompt_embeds"].shape == (2, 64)
    assert not embeds["prompt_embeds"][:, :16, 64:].any() and embeds["prompt_embeds"][:, 16:, 64:].any()
    prompt, negative, pooled, negative_pooled = _pipeline_embeds(tiny)
    torch.testing.assert_close(embeds["prompt_embeds"], prompt, rtol=0, atol=0)
    torch.testing.assert_close(embeds["pooled_prompt_embeds"], pooled, rtol=0, atol=0)
    # classifier-free guidance's unconditional input: the empty prompt through all three encoders, not zeros
    unconditional = tiny.family.unconditional(tiny)
    assert unconditional["prompt_embeds"].any()
    # (one row against a batch of two: equal up to the float noise of batched matmuls)
    torch.testing.assert_close(unconditional["prompt_embeds"], negative[0])
    torch.testing.assert_close(unconditional["pooled_prompt_embeds"], negative_pooled[0])


@torch.no_grad()
def test_without_t5_the_conditioning_holds_the_pipelines_zeros(tiny, tiny_without_t5):
    comps = tiny_without_t5
    assert "text_encoder_3" not in comps.text_encoders and "tokenizer_3" not in comps.tokenizers_by_slot
    assert len(comps.tokenizers) == 2 and comps.family.sampling_kwargs(comps) == {"max_sequence_length": 16}
    assert _same(comps.text_encoders["text_encoder_2"], tiny.text_encoders["text_encoder_2"])  # the same seed: the CLIPs do not change
    embeds = comps.family.encode_prompts(comps, _ids(comps, PROMPTS))
    assert embeds["prompt_embeds"].shape == (2, 16 + 16, 96) and not embeds["prompt_embeds"][:, 16:].any()
    prompt, negative, pooled, negative_pooled = _pipeline_embeds(comps)
    torch.testing.assert_close(embeds["prompt_embeds"], prompt, rtol=0, atol=0)
    torch.testing.assert_close(embeds["pooled_prompt_embeds"], pooled, rtol=0, atol=0)
    unconditional = comps.family.unconditional(comps)
    # (one row against a batch of two: equal up to the float noise of batched matmuls)
    torch.testing.assert_close(unconditional["prompt_embeds"], negative[0])
    torch.testing.assert_close(unconditional["pooled_prompt_embeds"], negative_pooled[0])
    # encoding for a latent cache builds no transformer: the zeros' shape comes from its config all the same
    frozen = build_components(ModelSpec(preset="tiny-sd3", use_t5=False), seed=1, denoiser=False)
    assert frozen.denoiser is None
    assert comps.family.encode_prompts(frozen, _ids(frozen, PROMPTS))["prompt_embeds"].shape == (2, 32, 96)


def test_the_export_is_a_stock_sd3_pipeline_that_reloads_identically(tiny, tmp_path):
    assemble_pipeline(tiny).save_pretrained(tmp_path / "pipe")
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline" and index["text_encoder_3"][1] == "T5EncoderModel"
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "pipe")
    assert isinstance(pipe, StableDiffusion3Pipeline)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler) and pipe.scheduler.config.shift == 3.0
    images = generate(pipe, PROMPTS[:1], num_inference_steps=2, resolution=16, **tiny.family.sampling_kwargs(tiny))
    assert images[0][0].size == (16, 16)
    assert generate(pipe, PROMPTS[:1], num_inference_steps=2, resolution=32, max_sequence_length=16)[0][0].size == (
        32, 32)

    spec = ModelSpec(pretrained=str(tmp_path / "pipe"))
    assert model_family(spec).name == "sd3"  # from model_index.json
    again = build_components(spec, seed=99)
    assert again.family.name == "sd3" and _same(again.denoiser, tiny.denoiser) and _same(again.vae, tiny.vae)
    assert all(_same(again.text_encoders[k], tiny.text_encoders[k]) for k in tiny.text_encoders)
    assert again.tokenizers_by_slot["tokenizer_3"].get_vocab() == tiny.tokenizers_by_slot["tokenizer_3"].get_vocab()
    assert again.tokenizers_by_slot["tokenizer_3"].model_max_length == 16
    with torch.no_grad():
        torch.testing.assert_close(again.family.encode_prompts(again, _ids(again, PROMPTS))["prompt_embeds"],
                                   tiny.family.encode_prompts(tiny, _ids(tiny, PROMPTS))["prompt_embeds"])


def test_generate_guides_with_the_pipelines_guidance_scale_and_its_t5_length(tiny):
    assert tiny.family.cfg_kwargs(4.0, 2, None) == {"guidance_scale": 4.0}
    pipe = assemble_pipeline(tiny)
    with recorded_calls(pipe.transformer) as calls:
        rows = generate(pipe, PROMPTS, images_per_prompt=3, num_inference_steps=2, guidance_scale=4.0, resolution=16)
    assert [len(row) for row in rows] == [3, 3] and rows[0][0].size == (16, 16)
    # one call a step on the negative and the prompted halves together: 2 × 2 prompts × 3 images, 16 CLIP tokens
    # and the pipeline's own T5 length (the trained 16, not StableDiffusion3Pipeline's 256)
    assert len(calls) == 2 and calls[0]["encoder_hidden_states"].shape == (12, 16 + 16, 96)
    with torch.no_grad():
        empty = tiny.family.unconditional(tiny)["prompt_embeds"]
    torch.testing.assert_close(calls[0]["encoder_hidden_states"][:6], empty.expand(6, -1, -1))


def test_a_pipeline_saved_without_t5_loads_and_builds_without_it(tiny_without_t5, tmp_path):
    assemble_pipeline(tiny_without_t5).save_pretrained(tmp_path / "pipe")
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    assert index["text_encoder_3"] == [None, None] and index["tokenizer_3"] == [None, None]
    # diffusers loads it when told the absent components are None (SD3's documented way to drop T5) …
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "pipe", text_encoder_3=None, tokenizer_3=None)
    assert isinstance(pipe, StableDiffusion3Pipeline) and pipe.text_encoder_3 is None
    # … which sdray's loader reads from model_index.json
    assert load_pipeline(str(tmp_path / "pipe")).text_encoder_3 is None
    assert generate(pipe, PROMPTS[:1], num_inference_steps=2, resolution=16,
                    **tiny_without_t5.family.sampling_kwargs(tiny_without_t5))[0][0].size == (16, 16)
    for use_t5 in (False, True):  # use_t5 (the default) cannot bring back an encoder the pipeline lacks
        again = build_components(ModelSpec(pretrained=str(tmp_path / "pipe"), use_t5=use_t5,
                                           max_sequence_length=16))
        assert set(again.text_encoders) == {"text_encoder", "text_encoder_2"}
        assert _same(again.denoiser, tiny_without_t5.denoiser)
        assert again.family.sampling_kwargs(again) == {"max_sequence_length": 16}
    # without a length from the spec or a preset, T5's zeros are as long as the pipeline's default makes them
    again = build_components(ModelSpec(pretrained=str(tmp_path / "pipe")), denoiser=False)
    assert again.family.sampling_kwargs(again) == {"max_sequence_length": 256}


def test_a_latent_caches_fingerprint_covers_the_t5_less_conditioning():
    short = frozen_fingerprints(ModelSpec(preset="tiny-sd3", use_t5=False, max_sequence_length=8))
    long = frozen_fingerprints(ModelSpec(preset="tiny-sd3", use_t5=False, max_sequence_length=16))
    assert short.keys() == long.keys() and short["conditioning"] != long["conditioning"]
    assert {k: v for k, v in short.items() if k != "conditioning"} == {
        k: v for k, v in long.items() if k != "conditioning"}
    assert "conditioning" not in frozen_fingerprints(ModelSpec(preset="tiny"))


def _job(**spec):
    return parse_job(make_job("sd3", "/o", "/d", **{"model": {"preset": "tiny-sd3"}, **spec})).spec


@pytest.mark.parametrize(("spec", "error"), [
    ({"train": {"mixed_precision": "fp16"}}, r"spec.train.mixed_precision: T5 overflows to NaN in fp16; use bf16"),
    ({"train": {"snr_gamma": 5.0}}, r"spec.train.snr_gamma: a setting of DDPM training"),
    ({"model": {"preset": "tiny-sd3", "prediction_type": "v_prediction"}}, r"spec.model.prediction_type: a setting of DDPM training"),
    ({"model": {"preset": "tiny-sd3", "overrides": {"unet": {"sample_size": 8}}}},
     r"spec.model.overrides.unet: a sd3 model has no unet; its components are transformer, vae, text_encoder, "
     r"text_encoder_2, text_encoder_3, scheduler"),
])
def test_check_job_refuses_what_sd3_cannot_train_with(spec, error):
    with pytest.raises(ModelError, match=error):
        check_job(_job(**spec))


def test_check_job_accepts_fp16_without_t5_and_a_t5_length():
    assert check_job(_job(model={"preset": "tiny-sd3", "use_t5": False}, train={"mixed_precision": "fp16"})).name \
        == "sd3"
    assert check_job(_job(model={"preset": "tiny-sd3", "max_sequence_length": 77})).name == "sd3"


@pytest.mark.parametrize("preset", ["tiny-sd3", "sd3-medium", "sd35-medium", "sd35-large"])
def test_sd3_presets_wire_their_encoders_into_the_transformer(preset):
    """Configs only: the full-size ones are never built here."""
    p = PRESETS[preset]
    t, clip_l, clip_g, t5 = (p.denoiser, p.text_encoders["text_encoder"], p.text_encoders["text_encoder_2"],
                             p.text_encoders["text_encoder_3"])
    assert p.family == "sd3" and p.scheduler["shift"] == 3.0
    assert t["pooled_projection_dim"] == clip_l["projection_dim"] + clip_g["projection_dim"]
    assert t["joint_attention_dim"] == t5["d_model"] >= clip_l["hidden_size"] + clip_g["hidden_size"]
    assert t["caption_projection_dim"] == t["num_attention_heads"] * t["attention_head_dim"]
    assert t["in_channels"] == t["out_channels"] == p.vae["latent_channels"] == 16
    assert {"shift_factor", "scaling_factor"} <= p.vae.keys()
    assert p.resolution == t["sample_size"] * 2 ** (len(p.vae["block_out_channels"]) - 1)
    assert p.resolution // t["sample_size"] * t["patch_size"] <= 16  # pixel_multiple: a whole patch per 16 px
    # every key is a real config field of the class that builds it
    assert set(t) <= set(inspect.signature(SD3Transformer2DModel).parameters)
    assert set(p.vae) <= set(inspect.signature(AutoencoderKL).parameters)
    assert set(clip_l) | set(clip_g) <= set(CLIPTextConfig().to_dict()) and set(t5) <= set(T5Config().to_dict())


def test_full_size_presets_have_the_releases_shapes():
    medium, medium35, large = (PRESETS[n].denoiser for n in ("sd3-medium", "sd35-medium", "sd35-large"))
    assert (medium["num_layers"], medium["num_attention_heads"], medium["pos_embed_max_size"]) == (24, 24, 192)
    assert "dual_attention_layers" not in medium and "qk_norm" not in medium
    assert medium35["dual_attention_layers"] == list(range(13)) and medium35["qk_norm"] == "rms_norm"
    assert medium35["pos_embed_max_size"] == 384
    assert (large["num_layers"], large["num_attention_heads"], large["caption_projection_dim"]) == (38, 38, 2432)
    p = PRESETS["sd35-large"]
    assert (p.vae["scaling_factor"], p.vae["shift_factor"]) == (1.5305, 0.0609)
    assert (p.resolution, p.tokenizer_max_length, p.t5_max_length) == (1024, 77, 256)
    t5 = p.text_encoders["text_encoder_3"]
    assert (t5["d_model"], t5["d_ff"], t5["num_heads"], t5["num_layers"]) == (4096, 10240, 64, 24)


def test_default_lora_targets_reach_both_attentions_of_a_dual_attention_block(tiny):
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    names = [name for name, _ in tiny.denoiser.named_modules()]
    config = LoraConfig(target_modules=list(tiny.family.lora_targets))
    hit = [name for name in names if check_target_module_exists(config, name)]
    for target in tiny.family.lora_targets:
        assert any(name == target or name.endswith("." + target) for name in hit), target
    assert {"transformer_blocks.0.attn2.to_q", "transformer_blocks.0.attn2.to_out.0",
            "transformer_blocks.0.attn.add_k_proj", "transformer_blocks.2.attn.to_add_out"} <= set(hit)
    # the last block's context stream ends before its output: it has no to_add_out to adapt
    assert "transformer_blocks.3.attn.to_add_out" not in names
    assert all(".attn" in name for name in hit)  # nothing outside attention (proj_out, the embedders)
