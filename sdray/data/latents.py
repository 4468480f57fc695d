"""The latent cache: its layout, its manifest, and the check that a job may train on it.

A cache (written by ``sdray data precompute``, ``sdray.data.precompute``) is a folder, local or ``s3://``:

- ``*.parquet``: one row per readable image: ``key``, ``latent_dist`` (and ``latent_dist_flipped`` when
  made with ``random_flip``), ``prompt_embeds`` (and SDXL's ``pooled_prompt_embeds``), ``original_size``,
  ``crop_top_left``; fixed-shape tensor columns (``sdray.models.encoding`` says what they hold). A cache
  made with ``data.bucketing`` holds each image at its own bucket's shape: its latent columns are
  variable-shaped tensors and each row carries the bucket as ``target_size`` (height, width) in pixels;
- ``unconditional.safetensors``: the embeddings a dropped caption is replaced by (classifier-free guidance);
- ``manifest.json``, written last: the model family, the encoders (source and content fingerprints), the
  transforms, the VAE's scaling (and shift) factor, dtype, row and skipped-image counts, sdray version and creation time.

A job with ``data.format: latents`` is checked against the manifest on the driver, before any worker
starts: another model family (refused first), another VAE, text encoder or tokenizer, another resolution, resize, flip or bucketing setting makes
the cache stale, and the job is refused with the fields that differ. (A manifest written before bucketing
existed has no ``bucketing`` entry and reads as an unbucketed cache.)
"""

from __future__ import annotations

import json

import torch
from safetensors.torch import load as load_safetensors

from sdray import storage
from sdray.data.buckets import bucket_bounds
from sdray.data.formats import DataError
from sdray.models.build import data_requirements, frozen_fingerprints, model_family
from sdray.models.encoding import CachedEncoder
from sdray.spec import JobSpec

MANIFEST = "manifest.json"
UNCONDITIONAL = "unconditional.safetensors"
KIND = "sdray-latent-cache"
VERSION = 1


class StaleCacheError(DataError):
    """A latent cache made for other encoders or transforms than the job's."""


def transform_settings(spec: JobSpec, resolution: int) -> dict:
    """The image transforms a job's data settings apply before encoding (resolved defaults). With
    bucketing, the settings that make the bucket list (``resize`` does not apply there)."""
    data = spec.data
    bucketing = None
    if data.bucketed:
        low, high = bucket_bounds(data.bucketing, resolution)
        bucketing = {"min_size": low, "max_size": high, "step": data.bucketing.step,
                     "max_aspect": data.bucketing.max_aspect}
    return {"resolution": resolution, "resize": None if data.bucketed else data.resize or resolution,
            "crop": data.crop, "random_flip": data.random_flip, "bucketing": bucketing}


def read_manifest(uri: str, settings) -> dict:
    """The manifest of the cache at ``uri``; a clear error when there is none or it is not one."""
    where = storage.join(uri, MANIFEST)
    if not storage.exists(where, settings):
        raise DataError(f"spec.data.uri: no {MANIFEST} in {uri}: not a latent cache, or an incomplete one "
                        "(run `sdray data precompute` to make it)")
    try:
        manifest = json.loads(storage.read_bytes(where, settings))
    except ValueError:
        manifest = None
    if not isinstance(manifest, dict) or manifest.get("kind") != KIND:
        raise DataError(f"spec.data.uri: {where} is not an sdray latent-cache manifest")
    return manifest


_FIELDS = {"resolution": "spec.model.resolution", "resize": "spec.data.resize", "crop": "spec.data.crop",
           "random_flip": "spec.data.random_flip", "bucketing": "spec.data.bucketing"}


def check_cache(spec: JobSpec) -> dict:
    """The manifest of the job's cache, after checking that the job's model and transforms would
    produce the same rows; raises ``StaleCacheError`` naming each field that differs."""
    uri = spec.data.uri
    manifest = read_manifest(uri, spec.data_s3)
    if manifest.get("version") != VERSION:
        raise StaleCacheError(f"spec.data.uri: the latent cache at {uri} has format version "
                              f"{manifest.get('version')}, this sdray reads {VERSION}; rerun `sdray data precompute`")
    resolution, _ = data_requirements(spec.model, s3=spec.storage)
    family = model_family(spec.model, spec.storage).name
    made_for = manifest.get("family")  # (caches made before families: the fingerprints tell)
    if made_for is not None and made_for != family:
        raise StaleCacheError(f"spec.data.uri: the latent cache at {uri} was made for a {made_for} model, this job "
                              f"trains a {family} model (spec.model.family); precompute a cache with this job")
    differences = []
    made = manifest["transform"]
    ours = transform_settings(spec, resolution)
    for key, value in ours.items():
        if key == "resize" and made.get("bucketing") != ours["bucketing"]:
            continue  # resize applies to square caches only: the bucketing line says what differs
        if made.get(key) != value:
            differences.append(f"{_FIELDS[key]} is {json.dumps(value)} here, {json.dumps(made.get(key))} in the cache")
    ours = frozen_fingerprints(spec.model, s3=spec.storage, seed=spec.train.seed)
    theirs = manifest["fingerprints"]
    for slot in [*ours, *(s for s in theirs if s not in ours)]:
        if ours.get(slot) != theirs.get(slot):
            differences.append(f"the {slot} differs from the one that encoded the cache")
    if differences:
        raise StaleCacheError(f"spec.data.uri: the latent cache at {uri} is stale: " + "; ".join(differences)
                              + ". Rerun `sdray data precompute` with this job")
    return manifest


def cached_encoder(spec: JobSpec, device: torch.device) -> CachedEncoder:
    """What a training step needs from the job's cache: its scaling factor and unconditional embeddings."""
    uri, settings = spec.data.uri, spec.data_s3
    manifest = read_manifest(uri, settings)
    unconditional = load_safetensors(storage.read_bytes(storage.join(uri, UNCONDITIONAL), settings))
    return CachedEncoder(scaling_factor=manifest["scaling_factor"], shift_factor=manifest.get("shift_factor"),
                         unconditional=unconditional, device=device)
