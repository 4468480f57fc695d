"""What a denoiser training step starts from: latents and prompt embeddings.

They are encoded online by the frozen VAE and text encoders (``OnlineEncoder``), or read from a latent
cache written by ``sdray data precompute`` (``CachedEncoder``). Both go through the same functions, so a
cached row holds exactly what online encoding computes.

A cached row keeps the VAE's latent *distribution* (``latent_dist``: mean and log-variance stacked on the
channel axis, diffusers' ``latent_dist.parameters``), not one sample of it, so every epoch draws a fresh
latent from it, as online encoding does. With ``random_flip`` the mirrored image's distribution is kept
too (``latent_dist_flipped``) and each step picks one of the two at random, which is the whole of what a
random horizontal flip can produce.
"""

from __future__ import annotations

import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from sdray.models.build import Components
from sdray.models.conditioning import encode_prompts, unconditional_prompts
from sdray.models.families import ModelFamily

LATENT_DIST = "latent_dist"
LATENT_DIST_FLIPPED = "latent_dist_flipped"
PROMPT_COLUMNS = ("prompt_embeds", "pooled_prompt_embeds")


@torch.no_grad()
def latent_distribution(vae, pixels: torch.Tensor) -> torch.Tensor:
    """The VAE's posterior parameters for ``pixels`` (N, 2×latent channels, h, w), unscaled."""
    return vae.encode(pixels).latent_dist.parameters


def sample_latents(parameters: torch.Tensor, vae_config) -> torch.Tensor:
    """One draw from the posterior, normalised to the denoiser's unit-variance latent space
    (``ModelFamily.scale_latents``: ``(x - shift_factor) × scaling_factor``)."""
    return ModelFamily.scale_latents(DiagonalGaussianDistribution(parameters).sample(), vae_config)


class OnlineEncoder:
    """Encodes each batch's pixels and token ids with the frozen VAE and text encoders."""

    def __init__(self, comps: Components, device: torch.device):
        self.comps = comps
        self.device = device
        self.unconditional = unconditional_prompts(comps, device=device)
        # each text slot's empty-caption ids (what a trained encoder's dropped captions are encoded from)
        self.empty_ids = {slot.ids: comps.tokenizers_by_slot[slot.tokenizer](
            [""], padding="max_length", max_length=comps.tokenizers_by_slot[slot.tokenizer].model_max_length,
            truncation=True, return_tensors="pt").input_ids[0] for slot in comps.family.text_slots_of(comps)}

    def latents(self, batch: dict, *, training: bool) -> torch.Tensor:
        vae = self.comps.vae
        return sample_latents(latent_distribution(vae, batch["pixel_values"].to(self.device)), vae.config)

    def prompts(self, batch: dict) -> dict:
        return encode_prompts(self.comps, batch, device=self.device)


class CachedEncoder:
    """Reads latent distributions and prompt embeddings from latent-cache rows; no model involved."""

    def __init__(self, *, scaling_factor: float, shift_factor: float | None = None, unconditional: dict,
                 device: torch.device):
        self.vae_config = {"scaling_factor": scaling_factor, "shift_factor": shift_factor}
        self.unconditional = {k: v.to(device) for k, v in unconditional.items()}
        self.device = device

    def latents(self, batch: dict, *, training: bool) -> torch.Tensor:
        parameters = batch[LATENT_DIST]
        if training and LATENT_DIST_FLIPPED in batch:
            flip = torch.rand(len(parameters)) < 0.5
            parameters = torch.where(flip[:, None, None, None], batch[LATENT_DIST_FLIPPED], parameters)
        return sample_latents(parameters.to(self.device), self.vae_config)

    def prompts(self, batch: dict) -> dict:
        return {k: batch[k] for k in PROMPT_COLUMNS if k in batch}
