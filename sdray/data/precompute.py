"""``sdray data precompute``: encode a job's dataset once with its frozen VAE and text encoder(s) and
write a latent cache (``sdray.data.latents``) to a local path or object storage.

Ray Data reads ``spec.data`` through the same reader and ``Preprocess`` step as training (same resize,
crop and tokenizers; unreadable images skipped and counted), then a pool of ``Encode`` actors (one GPU
each when ``distributed.use_gpu``; ``distributed.num_workers`` of them unless told otherwise) runs the
encoders, and ``write_parquet`` writes the rows. The manifest goes last, so a cache without one is
known to be incomplete.

Random crops are refused: a crop baked into a cache would be the same every epoch. A random flip is
kept whole instead: the mirrored image is encoded too, and training picks one of the two per step.

With ``data.bucketing`` each image is resized and center-cropped to its aspect-ratio bucket
(``BucketPreprocess``, as in training); each ``Encode`` call groups its rows by bucket and runs the VAE once
per group, and the rows keep their bucket as ``target_size``, which training regroups batches by.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from importlib.metadata import version

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import ray.data
from ray.data.extensions import ArrowTensorArray, ArrowVariableShapedTensorArray
import torch
from safetensors.torch import save as save_safetensors

from sdray import storage
from sdray.data.augment import BucketPreprocess, Preprocess, SkipCounter
from sdray.data.buckets import buckets_for
from sdray.data.formats import DataError, read_dataset
from sdray.data.latents import KIND, MANIFEST, UNCONDITIONAL, VERSION, transform_settings
from sdray.data.pipeline import quiet_ray_data
from sdray.models.build import build_components, check_job, data_requirements, frozen_fingerprints
from sdray.models.conditioning import encode_prompts, token_ids, unconditional_prompts
from sdray.models.encoding import LATENT_DIST, LATENT_DIST_FLIPPED, latent_distribution
from sdray.progress import Progress
from sdray.spec import DiffusionJob, JobSpec, ModelSpec, S3Settings

DTYPES = ("float32", "float16")


class Encode:
    """A Ray Data actor: Preprocess rows (pixels, token ids, sizes) → latent-cache rows."""

    def __init__(self, *, model: ModelSpec, s3: S3Settings, seed: int, flip: bool, dtype: str, use_gpu: bool,
                 threads: int, counter=None):
        torch.set_num_threads(threads)
        self.counter = counter  # told each batch's size: the driver's progress
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.comps = build_components(model, s3=s3, seed=seed, denoiser=False)
        for frozen in self.comps.frozen_modules().values():
            frozen.requires_grad_(False).eval().to(self.device)
        self.flip = flip
        self.dtype = np.dtype(dtype)

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray] | pa.Table:
        if len(batch["key"]) == 0:  # (Ray 2.60 drops empty blocks before this step; nothing to encode)
            return {}
        if self.counter is not None:
            self.counter.add_done.remote(len(batch["key"]))
        out = {"key": batch["key"], **self.latents(batch)}
        ids = {k: torch.from_numpy(v) for k, v in token_ids(self.comps, batch).items()}
        out.update({k: self.to_numpy(v) for k, v in encode_prompts(self.comps, ids, device=self.device).items()})
        out.update({k: batch[k] for k in ("original_size", "crop_top_left", "target_size") if k in batch})
        if "target_size" not in batch:
            return out
        # Bucketed: the latent columns are variable-shaped in every file, even where one batch holds a single
        # bucket (Ray would store that batch's column as a fixed-shape tensor, and files of one cache would
        # then disagree on the column's type, which pyarrow readers of the whole folder refuse).
        return pa.table({name: pa.array([str(k) for k in column]) if name == "key"
                         else ArrowVariableShapedTensorArray.from_numpy(column) if name in self.columns
                         else ArrowTensorArray.from_numpy(np.ascontiguousarray(column))
                         for name, column in out.items()})

    def to_numpy(self, tensor: torch.Tensor) -> np.ndarray:
        return tensor.float().cpu().numpy().astype(self.dtype)

    def latents(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The latent columns: one tensor of the batch when its rows share a shape; with bucketing, each
        bucket's rows encoded as one group and returned as a variable-shaped column in row order."""
        pixels = batch["pixel_values"]
        if "target_size" not in batch:
            return {k: self.to_numpy(v) for k, v in self.encode(torch.from_numpy(pixels)).items()}
        groups: dict[tuple[int, int], list[int]] = {}
        for i, size in enumerate(batch["target_size"]):
            groups.setdefault(tuple(int(v) for v in size), []).append(i)
        columns = {k: np.empty(len(pixels), dtype=object) for k in self.columns}
        for rows in groups.values():
            encoded = self.encode(torch.from_numpy(np.stack([pixels[i] for i in rows])))
            for name, tensor in encoded.items():
                for i, array in zip(rows, self.to_numpy(tensor)):
                    columns[name][i] = array  # one by one: numpy would stack equal shapes
        return columns

    @property
    def columns(self) -> tuple[str, ...]:
        return (LATENT_DIST, LATENT_DIST_FLIPPED) if self.flip else (LATENT_DIST,)

    def encode(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        pixels = pixels.to(self.device)
        encoded = {LATENT_DIST: latent_distribution(self.comps.vae, pixels)}
        if self.flip:
            encoded[LATENT_DIST_FLIPPED] = latent_distribution(self.comps.vae, pixels.flip(-1))
        return encoded


def default_destination(spec: JobSpec) -> str:
    """Where a cache goes when no ``--out`` is given: beside the dataset, ``<data.uri>-latents``."""
    return spec.data.uri.rstrip("/") + "-latents"


def _refuse_uncacheable(spec: JobSpec) -> None:
    if spec.stage != "denoiser":
        raise DataError("spec.stage: a latent cache feeds the UNet stage; this job has stage: autoencoder")
    if spec.data.format == "latents":
        raise DataError("spec.data.format: this job already reads a latent cache; precompute from the images")
    if spec.data.crop == "random":
        raise DataError("spec.data.crop: a random crop cannot be cached (every epoch would see the same "
                        "crop); use crop: center to precompute, or train on the images")


def _prepare_destination(out: str, settings: S3Settings, overwrite: bool) -> None:
    storage.require_bucket(out, settings)  # Ray Data's writes would create a mistyped bucket
    if not storage.exists(out, settings):
        return
    fs, path = storage.filesystem(out, settings)
    if not overwrite:
        if storage.list_files(out, settings):
            raise DataError(f"--out: {out} is not empty; choose another destination or pass --overwrite")
        return
    fs.delete_dir_contents(path, missing_dir_ok=True)


def _count_rows(out: str, settings: S3Settings) -> tuple[list[str], int]:
    fs, _ = storage.filesystem(out, settings)
    files = [f for f in storage.list_files(out, settings) if f.endswith(".parquet")]
    return files, sum(pq.read_metadata(f, filesystem=fs).num_rows for f in files)


def precompute(job: DiffusionJob, out: str | None = None, *, batch_size: int = 64, concurrency: int | None = None,
               dtype: str = "float32", overwrite: bool = False, progress: bool = False,
               on_progress: Callable[[Progress], None] | None = None) -> dict:
    """Encode ``job``'s dataset into a latent cache at ``out`` (default ``<data.uri>-latents``), on the
    current Ray cluster; returns the manifest written. ``progress``: Ray Data's bars (a terminal);
    ``on_progress`` gets the images encoded so far (``images_done``, ``skipped_images``) every second."""
    spec = job.spec
    out = out or default_destination(spec)
    if dtype not in DTYPES:
        raise ValueError(f"--dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}")
    _refuse_uncacheable(spec)
    check_job(spec)
    settings = spec.data_s3
    _prepare_destination(out, settings, overwrite)
    start = time.perf_counter()
    resolution, tokenizers = data_requirements(spec.model, s3=spec.storage)
    fingerprints = frozen_fingerprints(spec.model, s3=spec.storage, seed=spec.train.seed)
    quiet_ray_data()
    ray.data.DataContext.get_current().enable_progress_bars = progress
    counter = SkipCounter.remote()
    try:
        with _reporting(counter, on_progress):
            return _encode_and_write(spec, out, counter, resolution, tokenizers, fingerprints, start,
                                     batch_size=batch_size, concurrency=concurrency, dtype=dtype)
    finally:
        ray.kill(counter)  # its worker process would otherwise live as long as this one


@contextlib.contextmanager
def _reporting(counter, on_progress: Callable[[Progress], None] | None, interval_s: float = 1.0):
    """While the body runs, hand ``on_progress`` the counter's state every ``interval_s`` s, and once at the end."""
    if on_progress is None:
        yield
        return
    done = threading.Event()

    def report() -> None:
        images, skipped = ray.get(counter.progress.remote())
        on_progress(Progress(images_done=images, skipped_images=skipped))

    def poll() -> None:
        while not done.wait(interval_s):
            report()

    thread = threading.Thread(target=poll, daemon=True, name="sdray-precompute-progress")
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
    report()


def _encode_and_write(spec, out, counter, resolution, tokenizers, fingerprints, start, *, batch_size,
                      concurrency, dtype) -> dict:
    """``precompute``'s Ray Data run: encode every readable image and write the cache and its manifest."""
    settings = spec.data_s3
    transform = dict(resolution=resolution, resize=spec.data.resize, crop="center", random_flip=False,
                     tokenizers=tokenizers, skip_counter=counter)
    if spec.data.bucketed:  # each image at its bucket's shape; the manifest records the bucket settings
        try:
            buckets = buckets_for(spec.data.bucketing, resolution)
        except ValueError as exc:
            raise DataError(str(exc)) from None
        step = BucketPreprocess(**transform, buckets=buckets)
    else:
        step = Preprocess(**transform)
    rows = read_dataset(spec.data, settings).map_batches(step, batch_format="numpy", batch_size=64)
    use_gpu = spec.distributed.use_gpu
    encoded = rows.map_batches(
        Encode, batch_format="numpy", batch_size=batch_size,
        fn_constructor_kwargs={"model": spec.model, "s3": spec.storage, "seed": spec.train.seed,
                               "flip": spec.data.random_flip, "dtype": dtype, "use_gpu": use_gpu,
                               "threads": max(1, int(spec.distributed.cpus_per_worker)), "counter": counter},
        compute=ray.data.ActorPoolStrategy(size=concurrency or spec.distributed.num_workers),
        num_cpus=spec.distributed.cpus_per_worker, num_gpus=1 if use_gpu else None)
    fs, path = storage.filesystem(out, settings)
    encoded.write_parquet(path, filesystem=fs)
    files, n_rows = _count_rows(out, settings)
    skipped = ray.get(counter.count.remote())
    if n_rows == 0:
        raise DataError(f"spec.data.uri: no readable image in {spec.data.uri} ({skipped} unreadable or corrupt "
                        "files skipped); nothing was cached")

    comps = build_components(spec.model, s3=spec.storage, seed=spec.train.seed, denoiser=False)
    unconditional = {k: v.contiguous() for k, v in unconditional_prompts(comps).items()}
    storage.write_bytes(storage.join(out, UNCONDITIONAL), save_safetensors(unconditional), settings)
    columns = pq.read_schema(files[0], filesystem=fs)
    model = spec.model
    manifest = {
        "kind": KIND,
        "version": VERSION,
        "sdray_version": version("sdray"),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": {"uri": spec.data.uri, "format": spec.data.format, "image_column": spec.data.image_column,
                   "caption_column": spec.data.caption_column},
        "model": {"family": model.family, "preset": model.preset, "pretrained": model.pretrained,
                  "vae": model.vae.pretrained if model.vae else None, "tokenizer": model.tokenizer,
                  "overrides": model.overrides, "seed": spec.train.seed},
        "fingerprints": fingerprints,
        "transform": transform_settings(spec, resolution),
        "family": comps.family.name,
        "scaling_factor": float(comps.vae.config.scaling_factor),
        "shift_factor": getattr(comps.vae.config, "shift_factor", None),
        "dtype": dtype,
        "columns": [name for name in columns.names if not name.startswith("__")],
        "files": [f.rsplit("/", 1)[-1] for f in files],
        "rows": n_rows,
        "skipped_images": skipped,
        "skipped_examples": ray.get(counter.examples.remote()),
        "elapsed_s": round(time.perf_counter() - start, 2),
    }
    storage.write_bytes(storage.join(out, MANIFEST), json.dumps(manifest, indent=2).encode(), settings)
    return {**manifest, "uri": out}
