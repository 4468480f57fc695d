"""The Ray Data pipeline of a job: read → split → decode/augment/tokenize, streamed to the workers.

Ray Train splits the ``train`` dataset across workers (``streaming_split`` with equal shares, so every
worker runs the same number of steps and DDP never waits on a missing peer); ``validation`` is read
whole by rank 0.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from functools import partial

import ray
import ray.data

from sdray.data.augment import BucketPreprocess, Preprocess, SkipCounter, split_filter
from sdray.data.buckets import buckets_for
from sdray.data.formats import DataError, read_dataset
from sdray.spec import JobSpec


def quiet_ray_data() -> None:
    """No Ray Data progress bars or per-dataset INFO lines: they garble the job's own progress display
    (``SDRAY_VERBOSE=1`` keeps Ray Data's logging as configured)."""
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    if not os.environ.get("SDRAY_VERBOSE"):
        logging.getLogger("ray.data").setLevel(logging.WARNING)


@dataclass
class JobData:
    train: ray.data.Dataset
    validation: ray.data.Dataset | None
    skip_counter: ray.actor.ActorHandle

    def skipped(self) -> int:
        return ray.get(self.skip_counter.count.remote())


def build_datasets(spec: JobSpec, *, resolution: int, tokenizers=()) -> JobData:
    """Lazy train/validation datasets for ``spec.data``; fails early with a clear error when the data
    cannot be read or holds no readable image."""
    quiet_ray_data()
    data = spec.data
    raw = read_dataset(data, spec.data_s3)
    if data.shuffle:
        raw = raw.randomize_block_order()
    counter = SkipCounter.remote()
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
        # Stateless tasks (a callable instance, not an actor pool): no CPU stays reserved between epochs.
        step = Preprocess(**common, split="validation") if validation else train_step
        return rows.map_batches(step, batch_format="numpy", batch_size=64)

    train = side(False)
    validation = side(True) if frac > 0 else None
    try:
        first = train.take(1)
    except Exception as exc:  # a reader failing on the storage itself (missing bucket, refused keys)
        raise DataError(f"spec.data.uri: cannot read {data.uri}: {_root_cause(exc)}") from None
    if not first:
        skipped = ray.get(counter.count.remote())
        raise DataError(
            f"spec.data.uri: no readable image in {data.uri} ({skipped} unreadable or corrupt files skipped"
            + (f"; validation_fraction={data.validation_fraction} left none for training" if not skipped else "")
            + ")"
        )
    return JobData(train, validation, counter)


def _root_cause(exc: BaseException) -> str:
    while exc.__cause__ is not None:
        exc = exc.__cause__
    text = str(exc).strip().splitlines()
    return text[-1] if text else type(exc).__name__
