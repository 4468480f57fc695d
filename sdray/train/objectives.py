"""What a diffusion model learns, apart from which model it is: one ``Objective`` interface and its two kinds,
DDPM noise prediction (SD1/2, SDXL) and rectified flow matching (SD3, Flux, Sana).

An objective draws the noise and the timesteps, mixes them into the latents, calls the family's ``predict``
and returns the loss; the family decides how its model is called, the objective what it is asked.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import KW_ONLY, dataclass
from typing import Callable, ClassVar, Literal

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

Predict = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
TIMESTEP_SAMPLINGS = ("logit_normal", "mode", "uniform")
LOSS_WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")


def _unknown(what: str, value: str, choices: tuple[str, ...]) -> ValueError:
    return ValueError(f"{what} must be one of {', '.join(choices)}, got {value!r}")


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


def sample_flow_sigmas(n: int, *, timestep_sampling: str = "logit_normal", logit_mean: float = 0.0,
                       logit_std: float = 1.0, mode_scale: float = 1.29, generator: torch.Generator | None = None,
                       device=None) -> torch.Tensor:
    """``n`` noise levels σ in [0, 1] (float32), drawn as diffusers' ``compute_density_for_timestep_sampling``
    (SD3 paper, Esser et al., 2024): ``logit_normal`` is sigmoid(N(mean, std)); ``mode`` bends uniform draws
    towards the middle for ``mode_scale`` > 0 (a density only for scales in [-1, 2/(π-2)]); ``uniform``.

    σ is the noise share, as in the paper's t, so ``logit_mean`` > 0 leans towards noise. diffusers' scripts
    look the draw up on the scheduler's descending timestep grid instead, which flips that sign."""
    if timestep_sampling == "logit_normal":
        return torch.sigmoid(torch.normal(logit_mean, logit_std, (n,), generator=generator, device=device))
    u = torch.rand((n,), generator=generator, device=device)
    if timestep_sampling == "mode":
        return 1 - u - mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    if timestep_sampling == "uniform":
        return u
    raise _unknown("timestep_sampling", timestep_sampling, TIMESTEP_SAMPLINGS)


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """``shift·σ / (1 + (shift-1)·σ)``: a shift above 1 moves noise levels towards pure noise, which large
    images need (their pixels are more redundant, so moderate noise hides less). SD3 trains with 3.0.

    With ``shift = exp(resolution_mu(...))`` this is Flux's resolution-dependent shift, diffusers' exponential
    ``time_shift(mu, 1.0, σ) = e^mu / (e^mu + 1/σ - 1)`` multiplied through by σ (so σ = 0 stays 0, no 1/0)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def resolution_mu(image_seq_len: int, *, base_image_seq_len: int = 256, max_image_seq_len: int = 4096,
                  base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """Flux's log-shift for an image of ``image_seq_len`` tokens: linear from ``base_shift`` at
    ``base_image_seq_len`` to ``max_shift`` at ``max_image_seq_len`` (diffusers' ``calculate_shift``),
    extrapolated beyond."""
    slope = (max_shift - base_shift) / (max_image_seq_len - base_image_seq_len)
    return base_shift + slope * (image_seq_len - base_image_seq_len)


def flow_loss_weights(sigmas: torch.Tensor, scheme: str) -> torch.Tensor:
    """Per-sample loss weights of diffusers' ``compute_loss_weighting_for_sd3``: ``sigma_sqrt`` σ⁻² (infinite
    at σ = 0), ``cosmap`` 2/(π(1-2σ+2σ²)), ``none`` ones."""
    if scheme == "sigma_sqrt":
        return (sigmas ** -2.0).float()
    if scheme == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas ** 2))
    if scheme == "none":
        return torch.ones_like(sigmas)
    raise _unknown("loss_weighting", scheme, LOSS_WEIGHTINGS)


@dataclass(frozen=True, kw_only=True)
class FlowMatchingObjective(Objective):
    """Rectified flow, as diffusers' SD3 and Flux training scripts and SimpleTuner: ``x_t = (1-σ)·x0 + σ·ε``
    and the model predicts the velocity ``ε - x0``, at ``timesteps = σ · num_train_timesteps`` (a float tensor;
    a family whose model wants σ itself, as Flux, divides).

    ``shift`` is a number (1.0: none) or ``"auto"``: Flux's resolution-dependent shift, from the latents'
    ``(H/2)·(W/2)`` tokens (Flux packs 2×2 patches). ``precondition_outputs`` (SD3 scripts) turns the
    prediction into ``x_t - σ·pred`` and the target into ``x0``. Sampling, shift and loss weighting are the
    module's functions."""

    name: ClassVar[str] = "flow_matching"
    num_train_timesteps: int = 1000
    timestep_sampling: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    shift: float | Literal["auto"] = 1.0
    loss_weighting: str = "none"
    precondition_outputs: bool = False
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    base_shift: float = 0.5
    max_shift: float = 1.15
    noise_offset: float = 0.0

    def __post_init__(self):
        if self.timestep_sampling not in TIMESTEP_SAMPLINGS:
            raise _unknown("timestep_sampling", self.timestep_sampling, TIMESTEP_SAMPLINGS)
        if self.loss_weighting not in LOSS_WEIGHTINGS:
            raise _unknown("loss_weighting", self.loss_weighting, LOSS_WEIGHTINGS)

    def shift_for(self, latents: torch.Tensor) -> float:
        """The shift applied to noise levels for latents of this shape (B, C, H, W)."""
        if self.shift != "auto":
            return self.shift
        mu = resolution_mu((latents.shape[-2] // 2) * (latents.shape[-1] // 2), base_image_seq_len=self.base_image_seq_len,
                     max_image_seq_len=self.max_image_seq_len, base_shift=self.base_shift, max_shift=self.max_shift)
        return math.exp(mu)

    def loss(self, predict: Predict, latents: torch.Tensor, *, generator: torch.Generator | None = None,
             training: bool = True) -> torch.Tensor:
        """As ``Objective.loss``; ``training`` changes nothing here (no input perturbation in flow matching)."""
        noise = sample_noise(latents.shape, noise_offset=self.noise_offset, generator=generator,
                             device=latents.device, dtype=latents.dtype)
        sigmas = sample_flow_sigmas(latents.shape[0], timestep_sampling=self.timestep_sampling,
                                    logit_mean=self.logit_mean, logit_std=self.logit_std, mode_scale=self.mode_scale,
                                    generator=generator, device=latents.device)
        sigmas = shift_sigmas(sigmas, self.shift_for(latents))
        sigma = sigmas.view(-1, *[1] * (latents.ndim - 1))
        noisy = (1 - sigma.to(latents.dtype)) * latents + sigma.to(latents.dtype) * noise
        pred = predict(noisy, sigmas * self.num_train_timesteps)
        if self.precondition_outputs:
            pred, target = pred.float() * -sigma + noisy.float(), latents
        else:
            target = noise - latents
        return (flow_loss_weights(sigmas, self.loss_weighting) * _per_sample_mse(pred, target)).mean()


def _ddpm(spec, comps) -> DDPMObjective:
    train = spec.train
    return DDPMObjective(comps.noise_scheduler, snr_gamma=train.snr_gamma, noise_offset=train.noise_offset,
                         input_perturbation=train.input_perturbation)


def _flow_matching(spec, comps) -> FlowMatchingObjective:
    flow, family, config = spec.train.flow, comps.family, comps.noise_scheduler.config
    resolution_shift = flow.resolution_shift if flow.resolution_shift is not None else family.flow_shift == "auto"
    if resolution_shift:
        shift: float | str = "auto"
    else:
        shift = flow.shift or (family.flow_shift if isinstance(family.flow_shift, (int, float)) else 1.0)
    return FlowMatchingObjective(
        num_train_timesteps=config.num_train_timesteps, timestep_sampling=flow.timestep_sampling,
        logit_mean=flow.logit_mean, logit_std=flow.logit_std, mode_scale=flow.mode_scale, shift=shift,
        loss_weighting=flow.loss_weighting, precondition_outputs=flow.precondition_outputs,
        base_image_seq_len=config.get("base_image_seq_len") or 256,
        max_image_seq_len=config.get("max_image_seq_len") or 4096,
        base_shift=config.get("base_shift") or 0.5, max_shift=config.get("max_shift") or 1.15,
        noise_offset=spec.train.noise_offset)


# A model family's ``objective`` names its training objective; each is made from the job's settings.
OBJECTIVES = {"ddpm": _ddpm, "flow_matching": _flow_matching}


def objective_for(spec, comps) -> Objective:
    """The training objective of a denoiser job (``JobSpec``) on ``comps``: its family's, with the job's
    knobs (``train.snr_gamma`` …, or ``train.flow``) and the family's published defaults where unset."""
    return OBJECTIVES[comps.family.objective](spec, comps)
