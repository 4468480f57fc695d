"""Flux.1 (dev and schnell): a transformer over 2×2-packed latent tokens, conditioned on T5's token sequence
(``encoder_hidden_states``) and CLIP-L's pooled output (``pooled_projections``), with rotary position ids for
image and text tokens and, on dev, an embedded guidance value. Trained with flow matching (velocity
``noise - x0``) at Flux's resolution-dependent timestep shift; exported as ``FluxPipeline``.

Every convention here is ``FluxPipeline``'s (diffusers 0.42): prompts as ``encode_prompt``, latents packed as
``_pack_latents``, image ids as ``_prepare_latent_image_ids`` (2-D; the 3-D form is deprecated), text ids
zeros, ``timestep / 1000`` (the transformer multiplies timestep and guidance by 1000 inside), guidance a
per-row tensor when the transformer has guidance embeddings and None when not (schnell).
"""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from transformers import CLIPTextModel, T5EncoderModel

from sdray.models.families.base import ModelFamily, TextSlot
from sdray.models.presets import PRESETS

# The most T5 tokens FluxPipeline accepts (its check_inputs refuses more).
MAX_SEQUENCE_LENGTH = 512

# The guidance value training embeds unless a job sets train.guidance; sampling embeds it too.



def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) latents → (B, h/2 · w/2, 4C) tokens, one per 2×2 patch (``FluxPipeline._pack_latents``)."""
    b, c, h, w = latents.shape
    patches = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of ``pack_latents``: (B, h/2 · w/2, 4C) → (B, C, h, w) for latents ``height`` × ``width``
    (``FluxPipeline._unpack_latents``, which takes the image's size in pixels and the VAE's scale)."""
    b, _, channels = tokens.shape
    patches = tokens.view(b, height // 2, width // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(b, channels // 4, height, width)


def latent_image_ids(height: int, width: int, *, device=None, dtype=None) -> torch.Tensor:
    """The (h/2 · w/2, 3) rotary position ids of the packed tokens of ``height`` × ``width`` latents: 0, the
    patch's row, its column (``FluxPipeline._prepare_latent_image_ids``)."""
    rows, cols = height // 2, width // 2
    ids = torch.zeros(rows, cols, 3)
    ids[..., 1] = torch.arange(rows)[:, None]
    ids[..., 2] = torch.arange(cols)[None, :]
    return ids.reshape(rows * cols, 3).to(device=device, dtype=dtype)


def has_guidance_embeds(denoiser: torch.nn.Module) -> bool:
    """Whether a Flux transformer embeds a guidance value (dev does, schnell does not)."""
    return bool(denoiser.config.guidance_embeds)


class Flux(ModelFamily):
    """Flux.1: ``encode_prompts`` gives T5's last hidden state (``prompt_embeds``, B × max_sequence_length ×
    d_model) and CLIP's pooled output (``pooled_prompt_embeds``); ``predict`` packs, calls, unpacks.

    A dropped caption becomes the empty caption's embeddings, not zeros: ``FluxPipeline`` encodes its
    negative prompt (true CFG, ``true_cfg_scale`` > 1) like any prompt and has no zeros option.
    ``train.guidance`` reaches dev-shaped transformers only: one without guidance embeddings (schnell) gets
    None, as in ``FluxPipeline``; ``check_job`` refuses the setting where the preset shows such a model."""

    name = "flux"
    denoiser = "transformer"
    denoiser_class = FluxTransformer2DModel
    pipeline_class = FluxPipeline
    pipeline_names = ("FluxPipeline",)
    text_slots = (TextSlot("text_encoder", "tokenizer", CLIPTextModel, "clip"),
                  TextSlot("text_encoder_2", "tokenizer_2", T5EncoderModel, "t5", trainable=False))
    scheduler_class = FlowMatchEulerDiscreteScheduler
    objective = "flow_matching"
    flow_shift = "auto"
    # 2×2 packing of latents from an 8× VAE (a preset's smaller VAE needs less: its latents' sides must be even)
    pixel_multiple = 16
    # diffusers' train_dreambooth_lora_flux.py defaults (double blocks' image and context attention and
    # feed-forwards; "to_q/k/v" also name the single blocks' attention), plus the single blocks' MLP input.
    # The single blocks' proj_out is left out: a "proj_out" pattern also names the model's final projection.
    lora_targets = ("to_k", "to_q", "to_v", "to_out.0", "add_k_proj", "add_q_proj", "add_v_proj", "to_add_out",
                    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp")
    zero_unconditional = False
    embeds_guidance = True  # dev; predict asks the transformer itself, so schnell gets no guidance
    default_preset = "tiny-flux"

    def check_job(self, spec) -> None:
        super().check_job(spec)
        if spec.train.mixed_precision == "fp16":
            raise ValueError("spec.train.mixed_precision: Flux's T5 encoder overflows to NaN in fp16; use bf16")
        if (spec.model.max_sequence_length or 0) > MAX_SEQUENCE_LENGTH:
            raise ValueError(f"spec.model.max_sequence_length: FluxPipeline takes at most {MAX_SEQUENCE_LENGTH} "
                             f"T5 tokens, got {spec.model.max_sequence_length}")
        if "guidance" in spec.train.model_fields_set and not _preset_embeds_guidance(spec.model):
            raise ValueError(f"spec.train.guidance: the {spec.model.preset} transformer has no guidance embeddings "
                             "(schnell-shaped); leave guidance out")

    # -- text ----------------------------------------------------------------------------------------
    def encode_prompts(self, comps, ids, *, device="cpu"):
        clip = comps.text_encoders["text_encoder"](ids["input_ids"].to(device), output_hidden_states=False)
        t5 = comps.text_encoders["text_encoder_2"](ids["input_ids_2"].to(device), output_hidden_states=False)
        return {"prompt_embeds": t5[0], "pooled_prompt_embeds": clip.pooler_output}

    # -- the denoiser --------------------------------------------------------------------------------
    def predict(self, denoiser, noisy, timesteps, embeds, batch, *, resolution, guidance=1.0):
        n, _, height, width = noisy.shape
        prompt = embeds["prompt_embeds"]
        guidance_values = (torch.full((n,), guidance, device=noisy.device, dtype=torch.float32)
                           if has_guidance_embeds(denoiser) else None)
        tokens = denoiser(
            hidden_states=pack_latents(noisy),
            timestep=timesteps.to(noisy.dtype) / 1000,
            guidance=guidance_values,
            pooled_projections=embeds["pooled_prompt_embeds"],
            encoder_hidden_states=prompt,
            txt_ids=torch.zeros(prompt.shape[1], 3, device=noisy.device, dtype=noisy.dtype),
            img_ids=latent_image_ids(height, width, device=noisy.device, dtype=noisy.dtype),
            return_dict=False,
        )[0]
        return unpack_latents(tokens, height, width)

    # -- the stock pipeline ----------------------------------------------------------------------------
    def pipeline_sampling_kwargs(self, pipe):
        # FluxPipeline's default size is 128 latent pixels a side whatever the VAE (256 px for a tiny preset's
        # 2× VAE); the VAE's sample_size is the size the model was made for (1024 for FLUX.1's, as that default)
        size = pipe.vae.config.sample_size
        return {**super().pipeline_sampling_kwargs(pipe), "height": size, "width": size}

    def cfg_kwargs(self, guidance_scale, prompts, pipe=None):
        # A transformer with guidance embeddings (dev) was distilled to take the guidance value as an input:
        # FluxPipeline's guidance_scale is that value, as every Flux user samples dev. One without them (schnell,
        # or a model trained from scratch without guidance, as the demo's) needs real classifier-free guidance:
        # true_cfg_scale, which runs (above 1) only with a negative prompt, one "" per prompt (a single "" is a
        # batch of one that cannot pair with the prompts' batch).
        if pipe is None or has_guidance_embeds(pipe.transformer):
            return {"guidance_scale": guidance_scale}
        return {"true_cfg_scale": guidance_scale, "negative_prompt": [""] * prompts}


def _preset_embeds_guidance(model_spec) -> bool:
    """Whether the preset's transformer (with the spec's overrides) embeds guidance; True when the spec builds
    no preset transformer (a pretrained one is only known once loaded)."""
    if model_spec.pretrained or not model_spec.preset:
        return True
    config = {**PRESETS[model_spec.preset].denoiser, **model_spec.overrides.get("transformer", {})}
    return bool(config.get("guidance_embeds", False))
