"""The demo: a real, small text-to-image run on embedded Ray, judged by a digit classifier.

1. import scikit-learn's handwritten digits as an image–caption dataset (16 px);
2. train the autoencoder stage (a 2-block AutoencoderKL: 16 px RGB → 8×8×4 latents, 8×8×16 for SD3 and
   Flux) on 2 Ray workers;
3. train the denoiser stage (the family's tiny UNet or transformer) on those latents, conditioned on the
   captions through the family's frozen tiny text encoders;
4. load the exported pipeline with stock diffusers, draw "a handwritten digit 0" … "9" and ask an SVC
   trained on the real 8×8 scans which digit each drawing shows.
The job documents it runs are written beside its outputs, so each stage can be rerun with ``sdray train``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.svm import SVC

from sdray.data.digits import CAPTION
from sdray.models.families import family_named

DIGIT_PROMPTS = [CAPTION.format(d) for d in range(10)]
RESOLUTION = 16  # of the digits written, of every tiny preset, and of the drawings judged
# How the demo draws, for its sample grids and for the judge.
SAMPLING_STEPS = 20
GUIDANCE_SCALE = 4.0


@dataclass(frozen=True)
class Recipe:
    """What the demo trains for one family: its tiny preset and the denoiser stage's schedule."""

    preset: str
    denoiser_steps: int
    learning_rate: float
    # config overrides of the denoiser: the demo's Flux transformer has no guidance embeddings (it is trained
    # from scratch, not distilled), so it samples with real classifier-free guidance (Flux.cfg_kwargs)
    warmup_steps: int
    overrides: dict = field(default_factory=dict)


# sd: the settings the demo was measured with (1.00 in ~9 min). The ~1 M-parameter flow-matching transformers
# (16 image tokens) keep its peak rate, schedule, EMA and caption dropout, with a longer warmup for attention
# trained from scratch. A tiny-sd3 step costs about what a tiny UNet step does or less (0.7-1.0× in a rough
# one-thread measurement, batch 32), so SD3 gets a third more steps for margin in about the same time; a
# tiny-flux step costs more (1.2-1.9×), so Flux keeps sd's count.
RECIPES: dict[str, Recipe] = {
    "sd": Recipe("tiny", denoiser_steps=3000, learning_rate=1e-3, warmup_steps=100),
    "sd3": Recipe("tiny-sd3", denoiser_steps=4000, learning_rate=1e-3, warmup_steps=200),
    "flux": Recipe("tiny-flux", denoiser_steps=3000, learning_rate=1e-3, warmup_steps=200,
                   overrides={"transformer": {"guidance_embeds": False}}),
}
DEFAULT_FAMILY = "sd"


def _prefix(family: str) -> str:
    # sd's outputs keep the names the demo always gave them; the others' are named after their family, so
    # every family's outputs can sit side by side under one --out
    return "" if family == DEFAULT_FAMILY else f"{family}-"


def stage_names(family: str) -> tuple[str, str]:
    """The autoencoder and denoiser stages' names (their job files, output folders, and with ``digits-``
    their jobs): ``vae`` and ``unet`` for sd; ``sd3-vae`` and ``sd3-transformer`` … for the others."""
    return _prefix(family) + "vae", _prefix(family) + family_named(family).denoiser


def grid_name(family: str) -> str:
    """The file the judged drawings go to: ``digits-grid.png``, ``sd3-digits-grid.png`` …"""
    return _prefix(family) + "digits-grid.png"


def _job(name: str, spec: dict) -> dict:
    return {"apiVersion": "sdray.io/v1alpha1", "kind": "DiffusionJob",
            "metadata": {"name": name, "labels": {"demo": "digits"}}, "spec": spec}


def demo_jobs(root: Path, *, family: str = DEFAULT_FAMILY, workers: int = 2, vae_steps: int = 600,
              denoiser_steps: int | None = None) -> dict[str, dict]:
    """The two job documents of the demo of ``family`` by ``stage_names`` (autoencoder first), with every
    path under ``root``; ``denoiser_steps`` defaults to the family's recipe."""
    root = root.absolute()
    recipe = RECIPES[family]
    vae_name, denoiser_name = stage_names(family)
    common_data = {"uri": str(root / "digits"), "format": "imagefolder", "validation_fraction": 0.05}
    distributed = {"num_workers": workers, "resources_per_worker": {"CPU": 1}}
    vae = _job(f"digits-{vae_name}", {
        "stage": "autoencoder",
        "model": {"preset": recipe.preset},
        "data": common_data,
        "train": {"max_steps": vae_steps, "batch_size": 32, "learning_rate": 2e-3, "lr_scheduler": "cosine",
                  "warmup_steps": 20, "log_every_n_steps": 20},
        "distributed": distributed,
        "checkpoint": {"every_n_steps": 300, "keep_last": 2},
        "output": {"uri": str(root / vae_name)},
    })
    denoiser = _job(f"digits-{denoiser_name}", {
        "stage": "denoiser",
        "model": {"preset": recipe.preset, "vae": {"pretrained": str(root / vae_name)},
                  **({"overrides": recipe.overrides} if recipe.overrides else {})},
        "data": common_data,
        "train": {"max_steps": denoiser_steps or recipe.denoiser_steps, "batch_size": 32,
                  "learning_rate": recipe.learning_rate, "lr_scheduler": "cosine",
                  "warmup_steps": recipe.warmup_steps, "caption_dropout": 0.1, "log_every_n_steps": 25,
                  "ema": {"decay": 0.995}},
        "distributed": distributed,
        "checkpoint": {"every_n_steps": 1000, "keep_last": 2},
        "validation": {"prompts": DIGIT_PROMPTS, "every_n_steps": 1000, "num_inference_steps": SAMPLING_STEPS,
                       "guidance_scale": GUIDANCE_SCALE, "images_per_prompt": 8},
        "output": {"uri": str(root / denoiser_name)},
    })
    return {vae_name: vae, denoiser_name: denoiser}


def write_jobs(root: Path, jobs: dict[str, dict]) -> dict[str, Path]:
    (root / "jobs").mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, doc in jobs.items():
        paths[name] = root / "jobs" / f"{name}.yaml"
        paths[name].write_text(yaml.safe_dump(doc, sort_keys=False))
    return paths


def digit_classifier() -> SVC:
    """An SVC trained on all 1,797 real 8×8 scans (values 0–16), the demo's judge."""
    digits = load_digits()
    return SVC(gamma=0.001, C=10.0).fit(digits.data, digits.target)


def to_scan(image: Image.Image) -> np.ndarray:
    """A generated RGB image as an 8×8 scan in the classifier's scale (0–16, ink high)."""
    small = image.convert("L").resize((8, 8), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float64).reshape(-1) * 16.0 / 255.0


def judge(rows: list[list[Image.Image]], classifier: SVC | None = None) -> tuple[float, list[list[int]]]:
    """Share of images in row ``d`` that the classifier reads as digit ``d``, and every prediction."""
    classifier = classifier or digit_classifier()
    predictions = [classifier.predict(np.stack([to_scan(img) for img in row])).tolist() for row in rows]
    hits = sum(p == d for d, row in enumerate(predictions) for p in row)
    return hits / sum(len(r) for r in predictions), predictions
