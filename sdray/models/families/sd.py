"""Stable Diffusion 1.x/2.x: a UNet conditioned on one CLIP text encoder's last hidden state, trained
with DDPM (epsilon or v-prediction); exported as ``StableDiffusionPipeline``."""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel

from sdray.models.families.base import ModelFamily, TextSlot

# The containers of repeated blocks in diffusers' UNets: FSDP shards each block on its own, so only one
# block's parameters are gathered at a time.
_BLOCK_LISTS = ("down_blocks", "up_blocks")
_SINGLE_BLOCKS = ("mid_block",)


def unet_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The down, mid and up blocks of a UNet (or of a VAE's encoder and decoder)."""
    blocks = []
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in _BLOCK_LISTS and isinstance(module, torch.nn.ModuleList):
            blocks.extend(module)
        elif leaf in _SINGLE_BLOCKS and module is not None:
            blocks.append(module)
    return blocks


class StableDiffusion(ModelFamily):
    name = "sd"
    denoiser = "unet"
    denoiser_class = UNet2DConditionModel
    pipeline_class = StableDiffusionPipeline
    pipeline_names = ("StableDiffusionPipeline",)
    text_slots = (TextSlot("text_encoder", "tokenizer", CLIPTextModel, "clip"),)
    scheduler_class = DDPMScheduler
    objective = "ddpm"
    default_preset = "tiny"

    def training_scheduler(self, config, model_spec):
        return DDPMScheduler.from_config({**config, "prediction_type": model_spec.prediction_type,
                                          "rescale_betas_zero_snr": model_spec.rescale_betas_zero_snr})

    def encode_prompts(self, comps, ids, *, device="cpu"):
        return {"prompt_embeds": comps.text_encoders["text_encoder"](ids["input_ids"].to(device))[0]}

    def predict(self, denoiser, noisy, timesteps, embeds, batch, *, resolution, guidance=1.0):
        return denoiser(noisy, timesteps, encoder_hidden_states=embeds["prompt_embeds"]).sample

    def shard_units(self, denoiser):
        return unet_blocks(denoiser)

    def inference_scheduler(self, comps):
        # DPM-Solver++: good images in ~20 steps
        return DPMSolverMultistepScheduler.from_config(comps.noise_scheduler.config)

    def pipeline_extras(self):
        return {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
