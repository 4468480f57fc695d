"""The training objectives compute what diffusers' reference code computes, and a model trained on them learns."""

import math

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

from sdray.models.presets import SD_NOISE_SCHEDULE
from sdray.train.losses import diffusion_loss
from sdray.train.objectives import (DDPMObjective, FlowMatchingObjective, diffusion_target, flow_loss_weights,
                                    resolution_mu, min_snr_weights, sample_flow_sigmas, sample_noise, shift_sigmas)

SHAPE = (6, 4, 8, 8)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def flow_draws(objective: FlowMatchingObjective, latents: torch.Tensor, seed: int):
    """The noise and the shifted noise levels ``objective.loss`` draws from ``gen(seed)``: noise first."""
    g = gen(seed)
    noise = torch.randn(latents.shape, generator=g)
    sigmas = sample_flow_sigmas(latents.shape[0], timestep_sampling=objective.timestep_sampling,
                                logit_mean=objective.logit_mean, logit_std=objective.logit_std,
                                mode_scale=objective.mode_scale, generator=g)
    return noise, shift_sigmas(sigmas, objective.shift_for(latents))


# -- the pieces against diffusers -----------------------------------------------------------------------------

@pytest.mark.parametrize("scheme, mean, std, scale", [
    ("logit_normal", 0.0, 1.0, 1.29), ("logit_normal", 0.5, 1.5, 1.29), ("mode", 0.0, 1.0, 1.29),
    ("mode", 0.0, 1.0, -0.5), ("uniform", 0.0, 1.0, 1.29),
])
def test_sigmas_are_diffusers_timestep_density(scheme, mean, std, scale):
    ours = sample_flow_sigmas(4096, timestep_sampling=scheme, logit_mean=mean, logit_std=std, mode_scale=scale,
                              generator=gen(3))
    theirs = compute_density_for_timestep_sampling(scheme, 4096, logit_mean=mean, logit_std=std, mode_scale=scale,
                                                   generator=gen(3))
    assert ours.dtype == torch.float32 and torch.equal(ours, theirs)
    assert 0.0 <= ours.min() and ours.max() <= 1.0


def test_sigma_is_the_noise_share_so_a_positive_logit_mean_leans_to_noise():
    assert sample_flow_sigmas(20000, logit_mean=1.0, generator=gen(0)).mean() > 0.65
    mode = sample_flow_sigmas(20000, timestep_sampling="mode", mode_scale=1.29, generator=gen(0))
    uniform = sample_flow_sigmas(20000, timestep_sampling="uniform", generator=gen(0))
    assert (mode - 0.5).abs().mean() < (uniform - 0.5).abs().mean() - 0.05  # mode_scale > 0: towards the middle


@pytest.mark.parametrize("scheme", ["none", "sigma_sqrt", "cosmap"])
def test_loss_weights_are_diffusers_sd3_weighting(scheme):
    sigmas = torch.linspace(0.01, 1.0, 100)
    torch.testing.assert_close(flow_loss_weights(sigmas, scheme), compute_loss_weighting_for_sd3(scheme, sigmas))


def test_static_shift_is_the_schedulers():
    plain = FlowMatchEulerDiscreteScheduler(shift=1.0).sigmas
    shifted = FlowMatchEulerDiscreteScheduler(shift=3.0).sigmas
    torch.testing.assert_close(shift_sigmas(plain, 3.0), shifted)
    assert torch.equal(shift_sigmas(plain, 1.0), plain)


@pytest.mark.parametrize("tokens", [256, 1024, 4096])
def test_auto_shift_is_flux_time_shift(tokens):
    mu = resolution_mu(tokens)
    assert mu == pytest.approx(calculate_shift(tokens), abs=1e-12)
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    sigmas = torch.linspace(0.001, 1.0, 500)
    torch.testing.assert_close(shift_sigmas(sigmas, math.exp(mu)), scheduler.time_shift(mu, 1.0, sigmas))
    side = 2 * math.isqrt(tokens)  # latents of side × side pack into tokens 2×2 patches
    assert FlowMatchingObjective(shift="auto").shift_for(torch.zeros(1, 16, side, side)) == pytest.approx(
        math.exp(calculate_shift(tokens)))


def test_unknown_scheme_names_are_refused():
    with pytest.raises(ValueError, match="timestep_sampling"):
        FlowMatchingObjective(timestep_sampling="logit-normal")
    with pytest.raises(ValueError, match="loss_weighting"):
        FlowMatchingObjective(loss_weighting="sigma")
    with pytest.raises(ValueError, match="loss_weighting"):
        flow_loss_weights(torch.ones(2), "sigma")


# -- the flow-matching loss -------------------------------------------------------------------------------

@pytest.mark.parametrize("shift", [1.0, 3.0, "auto"])
def test_exact_velocity_has_zero_loss_and_the_model_sees_what_the_formulas_say(shift):
    latents = torch.randn(SHAPE, generator=gen(0))
    objective = FlowMatchingObjective(shift=shift)
    noise, sigmas = flow_draws(objective, latents, 1)
    seen = {}

    def velocity(noisy, timesteps):
        seen.update(noisy=noisy, timesteps=timesteps)
        return noise - latents

    assert objective.loss(velocity, latents, generator=gen(1)).item() == 0.0
    assert seen["timesteps"].dtype == torch.float32
    torch.testing.assert_close(seen["timesteps"], sigmas * 1000)
    s = sigmas.view(-1, 1, 1, 1)
    torch.testing.assert_close(seen["noisy"], (1 - s) * latents + s * noise)
    assert objective.loss(lambda x, t: torch.zeros_like(x), latents, generator=gen(1)).item() > 0.5


@pytest.mark.parametrize("weighting", ["none", "sigma_sqrt", "cosmap"])
@pytest.mark.parametrize("precondition", [False, True])
def test_loss_is_the_sd3_scripts_loss(weighting, precondition):
    latents = torch.randn(SHAPE, generator=gen(0))
    objective = FlowMatchingObjective(shift=3.0, timestep_sampling="mode", loss_weighting=weighting,
                                      precondition_outputs=precondition)
    noise, sigmas = flow_draws(objective, latents, 2)
    s = sigmas.view(-1, 1, 1, 1)
    noisy = (1 - s) * latents + s * noise
    pred = torch.tanh(noisy) * 0.5
    # diffusers' train_dreambooth_sd3.py, word for word after the model call
    model_pred, target = (pred * (-s) + noisy, latents) if precondition else (pred, noise - latents)
    weight = compute_loss_weighting_for_sd3(weighting, s)
    expected = torch.mean((weight.float() * (model_pred.float() - target.float()) ** 2).reshape(len(target), -1), 1)
    got = objective.loss(lambda x, t: torch.tanh(x) * 0.5, latents, generator=gen(2))
    torch.testing.assert_close(got, expected.mean())


def test_preconditioning_makes_the_target_the_clean_latents():
    latents = torch.randn(SHAPE, generator=gen(0))
    objective = FlowMatchingObjective(precondition_outputs=True)
    noise, _ = flow_draws(objective, latents, 4)
    assert objective.loss(lambda x, t: noise - latents, latents, generator=gen(4)).item() < 1e-12
    loss = objective.loss(lambda x, t: torch.zeros_like(x), latents, generator=gen(4))  # x_t - 0 against x0
    noisy_minus_clean = noise - latents
    _, sigmas = flow_draws(objective, latents, 4)
    expected = ((sigmas.view(-1, 1, 1, 1) * noisy_minus_clean) ** 2).flatten(1).mean(1).mean()
    torch.testing.assert_close(loss, expected)


@pytest.fixture
def one_thread():
    # Tensors this small gain nothing from intra-op threads, and on a busy machine their hand-offs cost
    # seconds (1 s with one thread, 14 s with two on a loaded 2-core box).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_a_small_model_learns_a_toy_distribution(one_thread):
    """A linear velocity model on 2-D points around (3, -2): the flow loss of held-out draws falls."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)

    def predict(noisy, timesteps):
        features = torch.cat([noisy.flatten(1), timesteps[:, None] / 1000], dim=1)
        return model(features).view_as(noisy)

    def points(n, g):
        return (torch.tensor([3.0, -2.0]) + 0.3 * torch.randn(n, 2, generator=g)).view(n, 2, 1, 1)

    objective = FlowMatchingObjective(shift=3.0)
    held_out = points(4096, gen(100))

    def evaluate():
        with torch.no_grad():
            return objective.loss(predict, held_out, generator=gen(101), training=False).item()

    before = evaluate()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-2)
    g = gen(5)
    for _ in range(300):
        loss = objective.loss(predict, points(256, g), generator=g)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = evaluate()
    assert after < 0.25 * before, (before, after)


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
