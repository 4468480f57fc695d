"""The Ray Data pipeline of a job: read → split → decode/augment/tokenize, streamed to the workers.

Ray Train splits the ``train`` dataset across workers (``streaming_split`` with equal shares, so every
worker runs the same number of steps and DDP never waits on a missing peer); ``validation`` is read
whole by rank 0.

A latent cache (``data.format: latents``) is checked against the job first (``sdray.data.latents``), then
its rows are read as they are: they were decoded, transformed and encoded when the cache was made.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from dataclasses import dataclass
from functools import partial

import ray
import ray.data

from sdray import storage
from sdray.data.augment import BucketPreprocess, Preprocess, SkipCounter, split_filter
from sdray.data.buckets import buckets_for
from sdray.data.formats import DataError, read_dataset
from sdray.data.latents import check_cache
from sdray.spec import JobSpec


def quiet_ray_data() -> None:
    """No Ray Data progress bars or per-dataset INFO lines: they garble the job's own progress display
    (``SDRAY_VERBOSE=1`` keeps Ray Data's logging as configured)."""
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    if not os.environ.get("SDRAY_VERBOSE"):
        logging.getLogger("ray.data").setLevel(logging.WARNING)


def retry_storage_faults() -> None:
    """Ray Data retries a read that fails with one of sdray's transient storage errors too (on top of the
    AWS SDK's attempts, ``spec.storage.retries``): its own list lacks throttling and other 5xx answers."""
    ctx = ray.data.DataContext.get_current()
    patterns = [re.escape(words) for words in storage.TRANSIENT_ERRORS]  # regexes, as Ray Data will require
    with warnings.catch_warnings():  # Ray Data warns of any change to the list, regexes or not
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.retried_io_errors = list(dict.fromkeys([*ctx.retried_io_errors, *patterns]))


@dataclass
class JobData:
    train: ray.data.Dataset
    validation: ray.data.Dataset | None
    skip_counter: ray.actor.ActorHandle | None
    cached_skips: int = 0  # images a latent cache's precompute skipped

    def skipped(self) -> int:
        if self.skip_counter is None:
            return self.cached_skips
        return ray.get(self.skip_counter.count.remote())

    def close(self) -> None:
        """End the skip counter, keeping its count. It is an actor (a worker process) that the datasets'
        reference cycles would otherwise keep alive until a garbage collection happens to find them: one
        per dataset built, piling up in a process that builds many (a test session, a notebook)."""
        if self.skip_counter is not None:
            self.cached_skips = self.skipped()
            ray.kill(self.skip_counter)
            self.skip_counter = None

    def __enter__(self) -> "JobData":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _cache_rows(spec: JobSpec) -> tuple[ray.data.Dataset, int]:
    manifest = check_cache(spec)
    fs, _ = storage.filesystem(spec.data.uri, spec.data_s3)
    files = [f for f in storage.list_files(spec.data.uri, spec.data_s3) if f.endswith(".parquet")]
    if not files:
        raise DataError(f"spec.data.uri: the latent cache at {spec.data.uri} holds no .parquet files")
    rows = ray.data.read_parquet(files, filesystem=fs, shuffle="files" if spec.data.shuffle else None)
    return rows, manifest["skipped_images"]


def build_datasets(spec: JobSpec, *, resolution: int, tokenizers=()) -> JobData:
    """Lazy train/validation datasets for ``spec.data``; fails early with a clear error when the data
    cannot be read or holds no readable image. Close the result (or use it in ``with``) when done."""
    quiet_ray_data()
    retry_storage_faults()
    data = spec.data
    cached = data.format == "latents"
    counter, cached_skips = None, 0
    if cached:
        raw, cached_skips = _cache_rows(spec)
    else:
        raw = read_dataset(data, spec.data_s3)
        counter = SkipCounter.remote()
    if data.shuffle:
        raw = raw.randomize_block_order()
    common = dict(resolution=resolution, resize=data.resize, crop=data.crop, random_flip=data.random_flip,
                  tokenizers=tokenizers, skip_counter=counter)
    frac = data.validation_fraction
    train_step = Preprocess(**common, split="train")
    if data.bucketed:  # validation stays square: comparable losses, the sample grid's shape
        try:
            buckets = buckets_for(data.bucketing, resolution)
        except ValueError as exc:
            raise DataError(str(exc)) from None
        train_step = BucketPreprocess(**common, split="train", buckets=buckets)

    def side(validation: bool) -> ray.data.Dataset:
        rows = raw.filter(partial(split_filter, fraction=frac, validation=validation)) if frac > 0 else raw
        if cached:
            return rows
        # Stateless tasks (a callable instance, not an actor pool): no CPU stays reserved between epochs.
        step = Preprocess(**common, split="validation") if validation else train_step
        return rows.map_batches(step, batch_format="numpy", batch_size=64)

    train = side(False)
    validation = side(True) if frac > 0 else None
    job_data = JobData(train, validation, counter, cached_skips)
    try:
        first = train.take(1)
    except Exception as exc:  # a reader failing on the storage itself (missing bucket, refused keys)
        job_data.close()
        raise DataError(f"spec.data.uri: cannot read {data.uri}: {_root_cause(exc)}") from None
    if not first:
        job_data.close()
        skipped = job_data.skipped()
        raise DataError(
            f"spec.data.uri: no readable image in {data.uri} ({skipped} unreadable or corrupt files skipped"
            + (f"; validation_fraction={data.validation_fraction} left none for training" if not skipped else "")
            + ")"
        )
    return job_data


def _root_cause(exc: BaseException) -> str:
    while exc.__cause__ is not None:
        exc = exc.__cause__
    text = str(exc).strip().splitlines()
    return text[-1] if text else type(exc).__name__
