"""What a diffusion model learns, apart from which model it is: one ``Objective`` interface, and DDPM noise
prediction (SD1/2, SDXL).

An objective draws the noise and the timesteps, mixes them into the latents, calls the family's ``predict``
and returns the loss; the family decides how its model is called, the objective what it is asked.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import KW_ONLY, dataclass
from typing import Callable, ClassVar

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

Predict = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Objective(ABC):
    """A training objective: the scalar loss of one batch of latents."""

    name: ClassVar[str]

    @abstractmethod
    def loss(self, predict: Predict, latents: torch.Tensor, *, generator: torch.Generator | None = None,
             training: bool = True) -> torch.Tensor:
        """``predict(noisy_latents, timesteps)`` is the family's model call, returning a tensor of the latents'
        shape. Returns the mean loss over the batch; ``training`` False leaves out what only helps training."""


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


def _per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    # float32 whatever the autocast dtype: the squared errors of a bf16 prediction would lose the loss's digits.
    return F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=list(range(1, pred.ndim)))


@dataclass(frozen=True)
class DDPMObjective(Objective):
    """Noise (or velocity) prediction at integer timesteps drawn uniformly from a DDPM schedule, with
    Min-SNR-γ weighting, offset noise and input perturbation (Ning et al., 2023: only the noise mixed into
    the model's input is perturbed, not the target, which reduces exposure bias)."""

    name: ClassVar[str] = "ddpm"
    scheduler: DDPMScheduler
    _: KW_ONLY
    snr_gamma: float | None = None
    noise_offset: float = 0.0
    input_perturbation: float = 0.0

    def loss(self, predict: Predict, latents: torch.Tensor, *, generator: torch.Generator | None = None,
             training: bool = True) -> torch.Tensor:
        noise = sample_noise(latents.shape, noise_offset=self.noise_offset, generator=generator,
                             device=latents.device, dtype=latents.dtype)
        timesteps = torch.randint(0, self.scheduler.config.num_train_timesteps, (latents.shape[0],),
                                  generator=generator, device=latents.device).long()
        input_noise = noise
        if self.input_perturbation and training:
            input_noise = noise + self.input_perturbation * torch.randn(
                noise.shape, generator=generator, device=noise.device, dtype=noise.dtype)
        pred = predict(self.scheduler.add_noise(latents, input_noise, timesteps), timesteps)
        per_sample = _per_sample_mse(pred, diffusion_target(self.scheduler, latents, noise, timesteps))
        if self.snr_gamma:
            per_sample = per_sample * min_snr_weights(self.scheduler, timesteps, self.snr_gamma).to(per_sample.device)
        return per_sample.mean()
