"""The training options of the diffusion objective do what their names say."""

from types import SimpleNamespace

import pytest
import torch
from diffusers import DDPMScheduler

from sdray.models.build import build_components
from sdray.models.presets import SD_NOISE_SCHEDULE
from sdray.spec import ModelSpec
from sdray.train.losses import diffusion_loss, min_snr_weights, sample_noise


def scheduler(prediction_type="epsilon", **extra):
    return DDPMScheduler.from_config({**SD_NOISE_SCHEDULE, "prediction_type": prediction_type, **extra})


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights_follow_the_formula(prediction_type):
    s = scheduler(prediction_type)
    t = torch.tensor([0, 50, 200, 500, 999])
    alpha = s.alphas_cumprod[t]
    snr = alpha / (1 - alpha)
    expected = torch.minimum(snr, torch.tensor(5.0)) / (snr + 1 if prediction_type == "v_prediction" else snr)
    torch.testing.assert_close(min_snr_weights(s, t, 5.0), expected.float())
    w = min_snr_weights(s, t, 5.0)
    assert w[0] < 0.01  # an almost noise-free step barely counts
    if prediction_type == "epsilon":
        assert w[-1] == pytest.approx(1.0)  # a noisy step (SNR < γ) keeps full weight


def test_noise_offset_shifts_each_sample_and_channel():
    g = torch.Generator().manual_seed(0)
    plain = sample_noise((256, 4, 16, 16), generator=g)
    g = torch.Generator().manual_seed(0)
    offset = sample_noise((256, 4, 16, 16), noise_offset=0.5, generator=g)
    shift = (offset - plain).flatten(2)
    assert torch.allclose(shift, shift[..., :1].expand_as(shift), atol=1e-5)  # constant over the image
    assert shift[..., 0].std().item() == pytest.approx(0.5, rel=0.1)


class Recorder(torch.nn.Module):
    """A stand-in UNet that predicts zeros and remembers what it was fed."""

    def forward(self, noisy, timesteps, **cond):
        self.noisy = noisy
        return SimpleNamespace(sample=torch.zeros_like(noisy))


def test_input_perturbation_changes_the_input_not_the_target():
    s, latents = scheduler(), torch.randn(8, 4, 8, 8)
    a, b = Recorder(), Recorder()
    loss_a = diffusion_loss(a, s, latents, {}, generator=torch.Generator().manual_seed(1))
    loss_b = diffusion_loss(b, s, latents, {}, input_perturbation=0.3, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(a.noisy, b.noisy)
    assert loss_a.item() == pytest.approx(loss_b.item())  # zero prediction: loss = target², same target


def test_snr_gamma_reweights_the_loss():
    s, latents = scheduler(), torch.randn(8, 4, 8, 8)
    plain = diffusion_loss(Recorder(), s, latents, {}, generator=torch.Generator().manual_seed(2))
    weighted = diffusion_loss(Recorder(), s, latents, {}, snr_gamma=1.0, generator=torch.Generator().manual_seed(2))
    assert weighted.item() < plain.item()  # every weight is ≤ 1, and high-SNR steps get much less


def test_zero_terminal_snr_schedule():
    c = build_components(ModelSpec(preset="tiny", prediction_type="v_prediction", rescale_betas_zero_snr=True))
    assert c.noise_scheduler.alphas_cumprod[-1].item() == pytest.approx(0.0, abs=1e-6)
    plain = build_components(ModelSpec(preset="tiny"))
    assert plain.noise_scheduler.alphas_cumprod[-1].item() > 1e-3


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        c = build_components(ModelSpec(preset="tiny"), seed=5)
        if checkpointing:
            c.unet.enable_gradient_checkpointing()
        c.unet.train()
        out = c.unet(torch.ones(2, 4, 8, 8), torch.tensor([10, 500]), torch.ones(2, 16, 32)).sample
        out.square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in c.unet.parameters()]))
        assert c.unet.is_gradient_checkpointing == checkpointing
    torch.testing.assert_close(grads[0], grads[1])


def test_attention_runs_through_fused_sdpa_by_default():
    from diffusers.models.attention_processor import AttnProcessor2_0

    c = build_components(ModelSpec(preset="tiny"))
    processors = list(c.unet.attn_processors.values())
    assert processors and all(isinstance(p, AttnProcessor2_0) for p in processors)  # F.scaled_dot_product_attention
