"""The README's first command, end to end, for each model family (slow: ~9 minutes on 2 cores for sd; sd3 and
flux not yet measured), and the job documents it runs (fast)."""

import subprocess
import sys

import pytest
from diffusers import DiffusionPipeline

from sdray.demo import RECIPES, demo_jobs, grid_name, stage_names
from sdray.models.build import check_job
from sdray.models.families import family_named
from sdray.spec import parse_job


def _demo(out, *args):
    result = subprocess.run([sys.executable, "-m", "sdray.cli", "demo", "--out", str(out), *args],
                            capture_output=True, text=True, timeout=2400)
    assert result.returncode == 0, result.stderr[-3000:]
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("digit_accuracy=")
    return float(last.split("=")[1]), result.stdout


@pytest.mark.slow
def test_demo_draws_the_digits_it_is_asked_for(tmp_path):
    accuracy, stdout = _demo(tmp_path)
    assert accuracy >= 0.95, stdout[-2000:]
    assert (tmp_path / "digits-grid.png").exists() and (tmp_path / "unet" / "loss.png").exists()


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_demo_of_a_flow_family_draws_the_digits_it_is_asked_for(tmp_path, family):
    accuracy, stdout = _demo(tmp_path, "--family", family)
    assert accuracy >= 0.90, stdout[-2000:]
    _, denoiser = stage_names(family)
    assert (tmp_path / grid_name(family)).exists() and (tmp_path / denoiser / "loss.png").exists()
    pipe = DiffusionPipeline.from_pretrained(tmp_path / denoiser / "pipeline")
    assert type(pipe) is family_named(family).pipeline_class


def test_the_sd_demo_keeps_its_names_and_settings(tmp_path):
    jobs = demo_jobs(tmp_path)
    assert list(jobs) == ["vae", "unet"] and grid_name("sd") == "digits-grid.png"
    vae, unet = jobs["vae"], jobs["unet"]
    assert (vae["metadata"]["name"], unet["metadata"]["name"]) == ("digits-vae", "digits-unet")
    assert vae["spec"]["output"]["uri"] == str(tmp_path / "vae") and unet["spec"]["output"]["uri"] == str(tmp_path / "unet")
    assert unet["spec"]["model"] == {"preset": "tiny", "vae": {"pretrained": str(tmp_path / "vae")}}
    train = unet["spec"]["train"]
    assert (train["max_steps"], train["learning_rate"], train["warmup_steps"]) == (3000, 1e-3, 100)
    assert demo_jobs(tmp_path, denoiser_steps=50)["unet"]["spec"]["train"]["max_steps"] == 50


@pytest.mark.parametrize("family", list(RECIPES))
def test_each_familys_demo_jobs_are_valid_and_train_its_tiny_preset(tmp_path, family):
    jobs = demo_jobs(tmp_path, family=family)
    vae_name, denoiser_name = stage_names(family)
    assert list(jobs) == [vae_name, denoiser_name]
    vae, denoiser = (parse_job(jobs[name]).spec for name in (vae_name, denoiser_name))
    assert vae.stage == "autoencoder" and denoiser.stage == "denoiser"
    assert vae.model.preset == denoiser.model.preset == RECIPES[family].preset
    assert denoiser.model.vae.pretrained == vae.output.uri == str(tmp_path / vae_name)
    assert denoiser.output.uri == str(tmp_path / denoiser_name)
    assert check_job(vae).name == family
    family_named(family).check_job(denoiser)  # settings the family accepts (its VAE is not trained yet)
    assert denoiser.train.max_steps == RECIPES[family].denoiser_steps and denoiser.train.ema is not None
    # every family's outputs have their own names, so demos of several families share one --out
    if family != "sd":
        assert vae_name.startswith(family) and denoiser_name == f"{family}-{family_named(family).denoiser}"
        assert grid_name(family).startswith(family)
