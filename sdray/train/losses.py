"""Losses of the two stages: the autoencoder's here, the diffusion stage's in ``sdray.train.objectives``
(re-exported, with ``diffusion_loss`` for callers of a UNet)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from sdray.train.objectives import DDPMObjective, diffusion_target, min_snr_weights, sample_noise

__all__ = ["AutoencoderObjective", "DDPMObjective", "diffusion_loss", "diffusion_target", "min_snr_weights",
           "sample_noise"]


def diffusion_loss(unet, scheduler: DDPMScheduler, latents: torch.Tensor, cond: dict, *,
                   snr_gamma: float | None = None, noise_offset: float = 0.0, input_perturbation: float = 0.0,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """``DDPMObjective``'s loss of a UNet (or anything returning ``.sample``); ``cond`` holds its conditioning
    keyword arguments (``sdray.models.conditioning``)."""
    objective = DDPMObjective(scheduler, snr_gamma=snr_gamma, noise_offset=noise_offset,
                              input_perturbation=input_perturbation)
    return objective.loss(lambda noisy, timesteps: unet(noisy, timesteps, **cond).sample, latents,
                          generator=generator)


class AutoencoderObjective(torch.nn.Module):
    """Reconstruction MSE plus a small KL term, as one ``forward`` so DDP/FSDP can wrap it.

    Returns (loss, reconstruction MSE, latents, reconstruction)."""

    def __init__(self, vae, kl_weight: float):
        super().__init__()
        self.vae = vae
        self.kl_weight = kl_weight

    def forward(self, pixels: torch.Tensor):
        posterior = self.vae.encode(pixels).latent_dist
        latents = posterior.sample()
        reconstruction = self.vae.decode(latents).sample
        mse = F.mse_loss(reconstruction.float(), pixels.float())
        return mse + self.kl_weight * posterior.kl().mean(), mse, latents, reconstruction
