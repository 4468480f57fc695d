"""Stable Diffusion 3 and 3.5: an MMDiT transformer (``SD3Transformer2DModel``; SD3.5's dual-attention
blocks and RMS-normed queries and keys are config switches of the same class) over 16-channel latents,
trained with flow matching at a static timestep shift of 3; exported as ``StableDiffusion3Pipeline``.

Its conditioning is what the pipeline's ``encode_prompt`` computes: CLIP-L's and CLIP-G's penultimate
hidden states side by side, zero-padded to T5's width (cropped, should T5 be the narrower), followed on the
sequence axis by T5's last hidden state; the pooled input is the two CLIPs' projections side by side. T5 is
optional (``model.use_t5: false``, or a pipeline saved without it): the pipeline then puts zeros of
``(max_sequence_length, joint_attention_dim)`` in its place, and so does training.

The unconditional input is not zeros: the pipeline encodes the empty negative prompt through all three
encoders for classifier-free guidance, so a dropped caption becomes the empty caption's embeddings (the
base class's default), as it does for SD 1.x/2.x.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from transformers import CLIPTextModelWithProjection, T5EncoderModel

from sdray.models.families.base import ModelFamily, TextSlot

_CLIP_SLOTS = (TextSlot("text_encoder", "tokenizer", CLIPTextModelWithProjection, "clip"),
               TextSlot("text_encoder_2", "tokenizer_2", CLIPTextModelWithProjection, "clip"))
_T5_SLOT = TextSlot("text_encoder_3", "tokenizer_3", T5EncoderModel, "t5", optional=True, trainable=False)

# StableDiffusion3Pipeline.__call__'s default max_sequence_length: the T5 length (or, without T5, the
# length of the zeros in its place) when neither the spec nor the preset sets one.
PIPELINE_T5_LENGTH = 256


class StableDiffusion3(ModelFamily):
    name = "sd3"
    denoiser = "transformer"
    denoiser_class = SD3Transformer2DModel
    pipeline_class = StableDiffusion3Pipeline
    pipeline_names = ("StableDiffusion3Pipeline",)
    text_slots = (*_CLIP_SLOTS, _T5_SLOT)
    scheduler_class = FlowMatchEulerDiscreteScheduler
    objective = "flow_matching"
    flow_shift = 3.0
    pixel_multiple = 16  # the VAE's 8× times the transformer's 2×2 patches
    # diffusers' SD3 LoRA defaults (attn.to_q … attn.to_add_out) without the "attn." prefix, so SD3.5's
    # second, image-only attention (attn2.to_q, attn2.to_k, attn2.to_v, attn2.to_out.0) gets adapters too
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
    default_preset = "tiny-sd3"

    def active_text_slots(self, model_spec):
        return self.text_slots if model_spec.use_t5 else _CLIP_SLOTS

    def build_extras(self, model_spec, preset, denoiser_config):
        # Without T5 the pipeline's zeros take the transformer's context width and the call's T5 length.
        return {"joint_attention_dim": denoiser_config()["joint_attention_dim"],
                "max_sequence_length": self.max_token_length(_T5_SLOT, model_spec, preset) or PIPELINE_T5_LENGTH}

    def check_job(self, spec):
        super().check_job(spec)
        if spec.train.mixed_precision == "fp16" and spec.model.use_t5:
            raise ValueError("spec.train.mixed_precision: T5 overflows to NaN in fp16; use bf16, or leave T5 out "
                             "(spec.model.use_t5: false)")

    def encode_prompts(self, comps, ids, *, device="cpu"):
        hidden, pooled = [], []
        for slot in _CLIP_SLOTS:
            out = comps.text_encoders[slot.encoder](ids[slot.ids].to(device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled.append(out.text_embeds)
        clip = torch.cat(hidden, dim=-1)
        t5 = comps.text_encoders.get(_T5_SLOT.encoder)
        if t5 is not None:
            t5_embeds = t5(ids[_T5_SLOT.ids].to(device))[0]
        else:
            t5_embeds = clip.new_zeros(clip.shape[0], comps.extra["max_sequence_length"],
                                       comps.extra["joint_attention_dim"])
        clip = F.pad(clip, (0, t5_embeds.shape[-1] - clip.shape[-1]))
        return {"prompt_embeds": torch.cat([clip, t5_embeds], dim=-2),
                "pooled_prompt_embeds": torch.cat(pooled, dim=-1)}

    def predict(self, denoiser, noisy, timesteps, embeds, batch, *, resolution, guidance=1.0):
        return denoiser(hidden_states=noisy, timestep=timesteps, encoder_hidden_states=embeds["prompt_embeds"],
                        pooled_projections=embeds["pooled_prompt_embeds"], return_dict=False)[0]

    def sampling_kwargs(self, comps):
        # without T5, the length of the zeros training put in its place, so the pipeline's match them
        return super().sampling_kwargs(comps) or {"max_sequence_length": comps.extra["max_sequence_length"]}
