"""Assemble, load and sample the stock diffusers pipeline of the family that sdray trains and exports."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from PIL import Image

from sdray import storage
from sdray.models.build import Components
from sdray.models.families import family_of_pipeline
from sdray.spec import S3Settings


def assemble_pipeline(comps: Components, denoiser=None) -> DiffusionPipeline:
    """The family's stock pipeline around trained components (``denoiser`` replaces ``comps.denoiser``
    when given): ``StableDiffusionPipeline``, ``StableDiffusionXLPipeline``, … (``ModelFamily.assemble_pipeline``)."""
    return comps.family.assemble_pipeline(comps, denoiser)


def pipeline_dir(path: Path) -> Path:
    """The pipeline folder at ``path``: the folder itself, or the ``pipeline/`` of a job's output."""
    if (path / "model_index.json").exists():
        return path
    if (path / "pipeline" / "model_index.json").exists():
        return path / "pipeline"
    raise FileNotFoundError(f"{path}: no diffusers pipeline here (model_index.json), nor in pipeline/")


def load_pipeline(uri: str, s3: S3Settings | None = None) -> DiffusionPipeline:
    """Load an exported pipeline (or a job's output folder) from a local path or S3; diffusers picks the
    pipeline class from its model_index.json."""
    path = pipeline_dir(storage.local_copy(uri, s3))
    # A component saved as absent (``[null, null]``: SD3 exported without T5) must be passed as None, or
    # diffusers refuses every component its pipeline class does not list as optional.
    index = json.loads((path / "model_index.json").read_text())
    absent = {name: None for name, value in index.items() if value == [None, None]}
    return DiffusionPipeline.from_pretrained(path, **absent)


@torch.no_grad()
def generate(pipe: DiffusionPipeline, prompts: list[str], *, images_per_prompt: int = 1,
             num_inference_steps: int = 25, guidance_scale: float = 5.0, seed: int = 0,
             resolution: int | None = None, **kwargs) -> list[list[Image.Image]]:
    """``images_per_prompt`` images for each prompt (one list per prompt), reproducible from ``seed``, with
    classifier-free guidance at ``guidance_scale`` as the pipeline's family asks for it
    (``ModelFamily.cfg_kwargs``: a Flux model without guidance embeddings gets ``true_cfg_scale``) and the family's own arguments read from the
    pipeline (T5's ``max_sequence_length``, Flux's size: ``ModelFamily.pipeline_sampling_kwargs``), at
    ``resolution`` px when given; ``kwargs`` go to the pipeline and override all of these."""
    family = family_of_pipeline(type(pipe).__name__)
    call = ({**family.pipeline_sampling_kwargs(pipe), **family.cfg_kwargs(guidance_scale, len(prompts), pipe)}
            if family is not None else {"guidance_scale": guidance_scale})
    if resolution is not None:
        call.update(height=resolution, width=resolution)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    out = pipe(prompts, num_images_per_prompt=images_per_prompt, num_inference_steps=num_inference_steps,
               generator=generator, output_type="pil", **{**call, **kwargs}).images
    return [out[i * images_per_prompt:(i + 1) * images_per_prompt] for i in range(len(prompts))]
