import pytest
import torch
from transformers import CLIPTokenizer

from sdray import storage
from sdray.models.build import ModelError, build_components, data_requirements
from sdray.models.pipeline import assemble_pipeline
from sdray.models.presets import PRESETS
from sdray.models.tokenizer import WORDS, build_tokenizer
from sdray.spec import ModelSpec
from sdray.train.loop import latent_normalisation


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def test_offline_tokenizer_roundtrips_in_clip_format(tmp_path):
    tok = build_tokenizer()
    assert all(len(tok(w).input_ids) == 3 for w in WORDS)  # bos, the word as one token, eos
    ids = tok("a handwritten digit 7").input_ids
    assert tok.decode(ids, skip_special_tokens=True) == "a handwritten digit 7"
    tok.save_pretrained(tmp_path)
    again = CLIPTokenizer.from_pretrained(tmp_path)
    assert again("a handwritten digit 7").input_ids == ids
    assert again("Unseen WORDS tokenize too!").input_ids[-1] == tok.eos_token_id


def test_tiny_preset_builds_every_component():
    c = build_components(ModelSpec(preset="tiny"))
    assert 0.5e6 < n_params(c.unet) < 1.5e6 and n_params(c.vae) < 1e6
    assert c.text_encoder.config.vocab_size == len(c.tokenizer)
    assert c.resolution == 16
    latents = c.vae.encode(torch.zeros(2, 3, 16, 16)).latent_dist.mode()
    assert latents.shape == (2, 4, 8, 8)
    hidden = c.text_encoder(c.tokenizer(["a digit"] * 2, padding="max_length", return_tensors="pt").input_ids)[0]
    assert c.unet(latents, torch.tensor([10, 20]), hidden).sample.shape == (2, 4, 8, 8)


@pytest.mark.parametrize("preset", ["tiny", "tiny-sd3", "tiny-flux"])
def test_the_autoencoder_exports_the_normalisation_its_family_reads(preset):
    """``latent_normalisation`` (the autoencoder stage's export) gives a VAE config under which the family's
    ``scale_latents`` turns its latents into zero-mean (with a shift factor) unit-variance ones."""
    c = build_components(ModelSpec(preset=preset), stage="autoencoder", seed=0)
    with torch.no_grad():
        latents = [c.vae.encode(torch.rand(4, 3, 16, 16) * 2 - 1).latent_dist.sample() + 0.5 for _ in range(2)]
    factors = latent_normalisation(latents, c.vae.config)
    has_shift = c.vae.config.shift_factor is not None
    assert has_shift == (preset != "tiny") and ("shift_factor" in factors) == has_shift
    c.vae.register_to_config(**factors)
    scaled = c.family.scale_latents(torch.cat(latents), c.vae.config)
    assert scaled.std().item() == pytest.approx(1.0, rel=1e-4)
    if has_shift:
        assert scaled.mean().item() == pytest.approx(0.0, abs=1e-4)
    else:  # SD's VAE has no shift: the latents keep their (scaled) mean, as every SD VAE's do
        raw = torch.cat(latents)
        assert c.vae.config.shift_factor is None
        assert scaled.mean().item() == pytest.approx((raw.mean() / raw.std()).item(), rel=1e-4)


def test_same_seed_same_weights_on_every_worker():
    a = build_components(ModelSpec(preset="tiny"), seed=3)
    b = build_components(ModelSpec(preset="tiny"), seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.unet.parameters(), b.unet.parameters()))


def test_overrides_change_the_architecture_and_unknown_keys_are_named():
    c = build_components(ModelSpec(preset="tiny", overrides={"unet": {"block_out_channels": [16, 32]},
                                                             "scheduler": {"num_train_timesteps": 500}}))
    assert list(c.unet.config.block_out_channels) == [16, 32]
    assert c.noise_scheduler.config.num_train_timesteps == 500
    with pytest.raises(ModelError, match=r"spec.model.overrides.unet.block_channels: not a config field"):
        build_components(ModelSpec(preset="tiny", overrides={"unet": {"block_channels": [8]}}))


def test_prediction_type_reaches_the_scheduler():
    c = build_components(ModelSpec(preset="tiny", prediction_type="v_prediction"))
    assert c.noise_scheduler.config.prediction_type == "v_prediction"


@pytest.mark.parametrize("preset", ["sd15", "sd2-base"])
def test_large_presets_have_release_shapes(preset):
    p = PRESETS[preset]
    assert p.family == "sd" and p.resolution == 512 and p.denoiser["block_out_channels"] == [320, 640, 1280, 1280]
    assert p.denoiser["cross_attention_dim"] == p.text_encoders["text_encoder"]["hidden_size"]


@pytest.mark.parametrize("preset", ["sdxl-base", "tiny-xl"])
def test_xl_presets_wire_two_text_encoders_into_the_unet(preset):
    p = PRESETS[preset]
    first, second = p.text_encoders["text_encoder"], p.text_encoders["text_encoder_2"]
    assert p.family == "sdxl"
    assert p.denoiser["cross_attention_dim"] == first["hidden_size"] + second["hidden_size"]
    assert p.denoiser["projection_class_embeddings_input_dim"] == (
        second["projection_dim"] + 6 * p.denoiser["addition_time_embed_dim"])
    if preset == "sdxl-base":
        assert p.resolution == 1024 and p.denoiser["transformer_layers_per_block"] == [1, 2, 10]


def test_tiny_xl_conditioning_drives_the_unet(tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from sdray.models.conditioning import drop_captions, encode_prompts, unconditional_prompts

    c = build_components(ModelSpec(preset="tiny-xl"))
    assert c.family.name == "sdxl" and len(c.tokenizers) == 2
    batch = {"input_ids": c.tokenizer(["a digit"] * 3, padding="max_length", return_tensors="pt").input_ids,
             "input_ids_2": c.tokenizers_by_slot["tokenizer_2"](["a digit"] * 3, padding="max_length", return_tensors="pt").input_ids,
             "original_size": torch.tensor([[16, 16]] * 3), "crop_top_left": torch.tensor([[0, 0]] * 3)}
    embeds = drop_captions(encode_prompts(c, batch), unconditional=unconditional_prompts(c),
                           drop=torch.tensor([False, True, False]))
    assert embeds["prompt_embeds"].shape == (3, 16, 64)
    assert not embeds["prompt_embeds"][1].any() and embeds["prompt_embeds"][0].any()  # SDXL's unconditional: zeros
    seen = {}

    def unet(noisy, timesteps, **kwargs):
        seen.update(kwargs)
        return c.unet(noisy, timesteps, **kwargs)

    out = c.family.predict(unet, torch.randn(3, 4, 8, 8), torch.tensor([1, 2, 3]), embeds, batch,
                           resolution=c.resolution)
    assert seen["added_cond_kwargs"]["time_ids"].tolist()[0] == [16, 16, 0, 0, 16, 16]
    assert out.shape == (3, 4, 8, 8)
    assemble_pipeline(c).save_pretrained(tmp_path / "xl")
    assert isinstance(StableDiffusionXLPipeline.from_pretrained(tmp_path / "xl"), StableDiffusionXLPipeline)
    again = build_components(ModelSpec(pretrained=str(tmp_path / "xl")))
    assert again.family.name == "sdxl" and _same(again.text_encoders["text_encoder_2"], c.text_encoders["text_encoder_2"])


def _save_pipeline(path, seed=7):
    c = build_components(ModelSpec(preset="tiny"), seed=seed)
    assemble_pipeline(c).save_pretrained(path, safe_serialization=True)
    return c


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_pretrained_pipeline_and_single_component_load(tmp_path):
    saved = _save_pipeline(tmp_path / "pipe")
    loaded = build_components(ModelSpec(pretrained=str(tmp_path / "pipe")), seed=99)
    assert _same(saved.unet, loaded.unet) and _same(saved.vae, loaded.vae)
    assert _same(saved.text_encoder, loaded.text_encoder)
    assert loaded.tokenizer.get_vocab() == saved.tokenizer.get_vocab()
    # a UNet component alone: the rest comes from the preset
    only_unet = build_components(ModelSpec(pretrained=str(tmp_path / "pipe" / "unet"), preset="tiny"), seed=99)
    assert _same(saved.unet, only_unet.unet) and not _same(saved.vae, only_unet.vae)
    with pytest.raises(ModelError, match="spec.model.preset: the pretrained source has no vae"):
        build_components(ModelSpec(pretrained=str(tmp_path / "pipe" / "unet")))
    with pytest.raises(ModelError, match="spec.model.overrides.unet: cannot change"):
        build_components(ModelSpec(pretrained=str(tmp_path / "pipe"), overrides={"unet": {"layers_per_block": 2}}))


def test_pretrained_vae_and_pipeline_from_s3(tmp_path, seaweed):
    saved = _save_pipeline(tmp_path / "pipe", seed=11)
    seaweed.create_bucket("models")
    storage.upload_dir(tmp_path / "pipe", "s3://models/tiny-pipe")
    loaded = build_components(ModelSpec(pretrained="s3://models/tiny-pipe"))
    assert _same(saved.unet, loaded.unet)
    with_vae = build_components(ModelSpec(preset="tiny", vae={"pretrained": "s3://models/tiny-pipe/vae"}))
    assert _same(saved.vae, with_vae.vae)
    assert data_requirements(ModelSpec(pretrained="s3://models/tiny-pipe"))[0] == 16


def test_s3_downloads_are_cached_per_node_until_the_objects_change(tmp_path, seaweed):
    _save_pipeline(tmp_path / "pipe", seed=5)
    seaweed.create_bucket("models")
    storage.upload_dir(tmp_path / "pipe", "s3://models/cached-pipe")
    first = storage.local_copy("s3://models/cached-pipe")
    assert first.parent == storage.cache_root() / "downloads"
    marker = first / "unet" / "config.json"
    stamp = marker.stat().st_mtime_ns
    again = storage.local_copy("s3://models/cached-pipe")  # the same copy, not downloaded again
    assert again == first and marker.stat().st_mtime_ns == stamp
    assert not [p for p in first.parent.iterdir() if p.name.startswith(".")]  # no staging left behind
    storage.write_bytes("s3://models/cached-pipe/unet/config.json", marker.read_bytes() + b" ")
    changed = storage.local_copy("s3://models/cached-pipe")
    assert changed != first and (changed / "unet" / "config.json").read_bytes().endswith(b" ")
    with pytest.raises(storage.StorageError, match="nothing found at s3://models/absent"):
        storage.local_copy("s3://models/absent")


def test_missing_or_wrong_sources_are_named(tmp_path):
    with pytest.raises(ModelError, match="spec.model.pretrained: nothing found at"):
        build_components(ModelSpec(pretrained=str(tmp_path / "nope")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="spec.model.pretrained: .*expected a diffusers pipeline"):
        build_components(ModelSpec(pretrained=str(tmp_path / "empty")))
    _save_pipeline(tmp_path / "pipe")
    with pytest.raises(ModelError, match="spec.model.vae.pretrained: .* holds a denoiser, not a VAE"):
        build_components(ModelSpec(preset="tiny", vae={"pretrained": str(tmp_path / "pipe" / "unet")}))


def test_family_comes_from_the_preset_or_the_pipeline_and_a_contradiction_is_refused(tmp_path):
    from sdray.models.build import check_job, model_family
    from sdray.spec import parse_job

    assert model_family(ModelSpec(preset="tiny")).name == "sd"
    assert model_family(ModelSpec(preset="tiny-xl")).name == "sdxl"
    assemble_pipeline(build_components(ModelSpec(preset="tiny-xl"))).save_pretrained(tmp_path / "xl")
    assert model_family(ModelSpec(pretrained=str(tmp_path / "xl"))).name == "sdxl"  # from model_index.json
    with pytest.raises(ModelError, match=r"spec.model.family: .*spec.model.family is sd, "
                                         r"spec.model.pretrained \(StableDiffusionXLPipeline\) is sdxl"):
        build_components(ModelSpec(family="sd", pretrained=str(tmp_path / "xl")))
    with pytest.raises(ModelError, match=r"spec.model.preset \(tiny\) is sd"):
        build_components(ModelSpec(family="sdxl", preset="tiny"))
    doc = {"apiVersion": "sdray.io/v1alpha1", "kind": "DiffusionJob", "metadata": {"name": "f"},
           "spec": {"model": {"preset": "tiny", "use_t5": False}, "data": {"uri": "/d"}, "output": {"uri": "/o"}}}
    with pytest.raises(ModelError, match="spec.model.use_t5: a sd model has no optional T5"):
        check_job(parse_job(doc).spec)
    doc["spec"]["model"] = {"preset": "tiny"}
    doc["spec"]["train"] = {"guidance": 3.5}
    with pytest.raises(ModelError, match="spec.train.guidance: a sd model embeds no guidance"):
        check_job(parse_job(doc).spec)


def test_the_documents_family_and_preset_names_are_the_registrys():
    import typing

    from sdray.models.families import FAMILIES
    from sdray.spec import FAMILY_NAMES, PRESETS as PRESET_NAMES

    assert FAMILY_NAMES == tuple(FAMILIES)
    assert typing.get_args(ModelSpec.model_fields["family"].annotation)[0] == typing.Literal[FAMILY_NAMES]
    assert PRESET_NAMES == tuple(PRESETS)
    assert typing.get_args(ModelSpec.model_fields["preset"].annotation)[0] == typing.Literal[PRESET_NAMES]
    assert {p.family for p in PRESETS.values()} <= set(FAMILIES)
