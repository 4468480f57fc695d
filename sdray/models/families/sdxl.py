"""SDXL: a UNet conditioned on two CLIP text encoders' penultimate hidden states side by side, plus the
second encoder's pooled projection and six "time ids" (original size, crop corner, target size: the
aspect-ratio bucket's when bucketing), as diffusers' SDXL pipeline computes them at inference. Trained with
DDPM; exported as ``StableDiffusionXLPipeline``. Its unconditional input is zeros
(``force_zeros_for_empty_prompt``)."""

from __future__ import annotations

import torch
from diffusers import StableDiffusionXLPipeline
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from sdray.models.families.base import TextSlot
from sdray.models.families.sd import StableDiffusion


class StableDiffusionXL(StableDiffusion):
    name = "sdxl"
    pipeline_class = StableDiffusionXLPipeline
    pipeline_names = ("StableDiffusionXLPipeline",)
    text_slots = (TextSlot("text_encoder", "tokenizer", CLIPTextModel, "clip"),
                  TextSlot("text_encoder_2", "tokenizer_2", CLIPTextModelWithProjection, "clip"))
    zero_unconditional = True

    def encode_prompts(self, comps, ids, *, device="cpu"):
        first = comps.text_encoders["text_encoder"](ids["input_ids"].to(device), output_hidden_states=True)
        second = comps.text_encoders["text_encoder_2"](ids["input_ids_2"].to(device), output_hidden_states=True)
        return {"prompt_embeds": torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1),
                "pooled_prompt_embeds": second.text_embeds}

    def text_parameters_without_gradient(self, slot, encoder):
        # the first encoder conditions through its penultimate layer: its last layer gets no gradient
        return [encoder.encoder.layers[-1], encoder.final_layer_norm] \
            if slot == "text_encoder" else []

    def predict(self, denoiser, noisy, timesteps, embeds, batch, *, resolution, guidance=1.0):
        device, n = noisy.device, noisy.shape[0]
        # Bucketed rows carry their bucket's (height, width); square ones are the model's resolution.
        target = (batch["target_size"].to(device) if "target_size" in batch
                  else torch.tensor([[resolution, resolution]], device=device).expand(n, 2))
        time_ids = torch.cat([batch["original_size"].to(device), batch["crop_top_left"].to(device), target], dim=1)
        prompt = embeds["prompt_embeds"]
        return denoiser(noisy, timesteps, encoder_hidden_states=prompt,
                        added_cond_kwargs={"text_embeds": embeds["pooled_prompt_embeds"],
                                           "time_ids": time_ids.to(prompt.dtype)}).sample

    def pipeline_extras(self):
        return {"add_watermarker": False}
