"""The training objectives compute what the reference code computes."""

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from sdray.models.presets import SD_NOISE_SCHEDULE
from sdray.train.losses import diffusion_loss
from sdray.train.objectives import DDPMObjective, diffusion_target, min_snr_weights, sample_noise

SHAPE = (6, 4, 8, 8)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# -- DDPM: the same numbers as before the move ------------------------------------------------------------

def pre_objectives_diffusion_loss(unet, scheduler, latents, cond, *, snr_gamma=None, noise_offset=0.0,
                                  input_perturbation=0.0, generator=None):
    """``sdray.train.losses.diffusion_loss`` as it was before ``sdray.train.objectives`` (commit ed1fcd9)."""
    noise = sample_noise(latents.shape, noise_offset=noise_offset, generator=generator, device=latents.device,
                         dtype=latents.dtype)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],),
                              generator=generator, device=latents.device).long()
    input_noise = noise
    if input_perturbation:
        input_noise = noise + input_perturbation * torch.randn(noise.shape, generator=generator, device=noise.device,
                                                               dtype=noise.dtype)
    noisy = scheduler.add_noise(latents, input_noise, timesteps)
    pred = unet(noisy, timesteps, **cond).sample
    target = diffusion_target(scheduler, latents, noise, timesteps)
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=list(range(1, pred.ndim)))
    if snr_gamma:
        per_sample = per_sample * min_snr_weights(scheduler, timesteps, snr_gamma).to(per_sample.device)
    return per_sample.mean()


class UNetLike(torch.nn.Module):
    """Depends on its input, its timesteps and a conditioning keyword, and answers with ``.sample``."""

    def forward(self, noisy, timesteps, *, scale):
        return type("Output", (), {"sample": torch.tanh(noisy) * scale * timesteps.float().view(-1, 1, 1, 1) / 1000})


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("options", [{}, {"snr_gamma": 5.0}, {"noise_offset": 0.1, "input_perturbation": 0.2},
                                     {"snr_gamma": 1.0, "noise_offset": 0.05, "input_perturbation": 0.1}])
def test_ddpm_objective_keeps_the_old_losses_bit_for_bit(prediction_type, options):
    scheduler = DDPMScheduler.from_config({**SD_NOISE_SCHEDULE, "prediction_type": prediction_type})
    latents, unet, cond = torch.randn(SHAPE, generator=gen(0)), UNetLike(), {"scale": 0.7}
    old = pre_objectives_diffusion_loss(unet, scheduler, latents, cond, generator=gen(9), **options)
    new = DDPMObjective(scheduler, **options).loss(lambda x, t: unet(x, t, **cond).sample, latents, generator=gen(9))
    assert torch.equal(old, new)
    assert torch.equal(old, diffusion_loss(unet, scheduler, latents, cond, generator=gen(9), **options))


def test_ddpm_input_perturbation_only_in_training():
    scheduler = DDPMScheduler.from_config(SD_NOISE_SCHEDULE)
    latents, unet = torch.randn(SHAPE, generator=gen(0)), UNetLike()

    def predict(x, t):
        return unet(x, t, scale=1.0).sample

    plain = DDPMObjective(scheduler).loss(predict, latents, generator=gen(3))
    perturbed = DDPMObjective(scheduler, input_perturbation=0.5)
    assert torch.equal(perturbed.loss(predict, latents, generator=gen(3), training=False), plain)
    assert not torch.equal(perturbed.loss(predict, latents, generator=gen(3)), plain)
