"""Training objectives of the two stages, with the options users know from diffusers' training scripts."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr


def diffusion_target(scheduler: DDPMScheduler, latents: torch.Tensor, noise: torch.Tensor,
                     timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet learns to predict: the noise (epsilon) or the velocity (v-prediction)."""
    if scheduler.config.prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    return noise


def min_snr_weights(scheduler: DDPMScheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-γ loss weights (Hang et al., 2023): min(SNR, γ)/SNR for epsilon targets and
    min(SNR, γ)/(SNR + 1) for v targets, so that easy (high-SNR) timesteps stop dominating."""
    snr = compute_snr(scheduler, timesteps)
    clipped = torch.clamp(snr, max=gamma)
    if scheduler.config.prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped / snr


def sample_noise(shape, *, noise_offset: float = 0.0, generator=None, device=None, dtype=None) -> torch.Tensor:
    """Gaussian noise; ``noise_offset`` adds a random constant per sample and channel, which lets the
    model learn very dark and very bright images (Guttenberg's offset noise)."""
    noise = torch.randn(shape, generator=generator, device=device, dtype=dtype)
    if noise_offset:
        noise = noise + noise_offset * torch.randn((shape[0], shape[1], 1, 1), generator=generator, device=device,
                                                   dtype=dtype)
    return noise


def diffusion_loss(unet, scheduler: DDPMScheduler, latents: torch.Tensor, cond: dict, *,
                   snr_gamma: float | None = None, noise_offset: float = 0.0, input_perturbation: float = 0.0,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """MSE of the UNet's prediction at uniformly drawn timesteps; ``cond`` holds the UNet's
    conditioning keyword arguments (``sdray.models.conditioning``).

    ``input_perturbation`` perturbs only the noise mixed into the model's input, not the target
    (Ning et al., 2023), which reduces exposure bias."""
    noise = sample_noise(latents.shape, noise_offset=noise_offset, generator=generator, device=latents.device,
                         dtype=latents.dtype)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],),
                              generator=generator, device=latents.device).long()
    input_noise = noise
    if input_perturbation:
        input_noise = noise + input_perturbation * torch.randn(noise.shape, generator=generator, device=noise.device,
                                                               dtype=noise.dtype)
    noisy = scheduler.add_noise(latents, input_noise, timesteps)
    pred = unet(noisy, timesteps, **cond)
    pred = getattr(pred, "sample", pred)  # a diffusers model's output, or a conditioned denoiser's tensor
    target = diffusion_target(scheduler, latents, noise, timesteps)
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=list(range(1, pred.ndim)))
    if snr_gamma:
        per_sample = per_sample * min_snr_weights(scheduler, timesteps, snr_gamma).to(per_sample.device)
    return per_sample.mean()


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
