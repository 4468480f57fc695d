"""Training objectives of the two stages."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler


def diffusion_target(scheduler: DDPMScheduler, latents: torch.Tensor, noise: torch.Tensor,
                     timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet learns to predict: the noise (epsilon) or the velocity (v-prediction)."""
    if scheduler.config.prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    return noise


def diffusion_loss(unet, scheduler: DDPMScheduler, latents: torch.Tensor, cond: dict,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """MSE of the UNet's prediction at uniformly drawn timesteps; ``cond`` holds the UNet's
    conditioning keyword arguments (``sdray.models.conditioning``)."""
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],),
                              generator=generator, device=latents.device).long()
    noisy = scheduler.add_noise(latents, noise, timesteps)
    pred = unet(noisy, timesteps, **cond).sample
    return F.mse_loss(pred.float(), diffusion_target(scheduler, latents, noise, timesteps).float())


class AutoencoderObjective(torch.nn.Module):
    """Reconstruction MSE plus a small KL term, as one ``forward`` so DDP can wrap it.

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
