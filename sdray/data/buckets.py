"""Aspect-ratio bucketing (NovelAI, kohya, SDXL): train on images at their own shape, not a square crop.

- ``compute_buckets``: for every width ``w`` (a multiple of ``step`` in ``[min_size, max_size]``) the
  tallest height ``h`` (also a multiple of ``step``, at most ``max_size``) with ``w·h ≤ resolution²``,
  plus the transposes, within ``max_aspect``. At SDXL's settings (1024, step 64, 512–2048) this gives
  buckets of SDXL's published list.
- ``nearest_bucket``: each image goes to the bucket nearest its aspect ratio (log-ratio distance);
  ``sdray.data.augment.BucketPreprocess`` resizes it to cover the bucket and crops it (center or random),
  recording ``original_size``, ``crop_top_left`` (in the resized image, as SDXL trains) and
  ``target_size`` (the bucket's ``(height, width)``). Rows of different buckets leave Ray Data as
  variable-shaped tensors.
- ``bucket_batches``: regroups a worker's rows into batches of one bucket each. Any row that carries a
  ``target_size`` can be grouped, whether it holds pixels or precomputed latents.

No Ray here: the training loop imports ``bucket_batches``.

Leftovers: a bucket's rows that do not fill a batch by the end of an epoch are dropped (each epoch
shuffles again, so other rows are left out next time).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator

import numpy as np

from sdray.spec import BucketingSpec

Bucket = tuple[int, int]  # (width, height) in pixels


def bucket_bounds(spec: BucketingSpec, resolution: int) -> tuple[int, int]:
    """``(min_size, max_size)``: the spec's, or half and twice the resolution."""
    return spec.min_size or resolution // 2, spec.max_size or resolution * 2


def compute_buckets(resolution: int, *, step: int, min_size: int, max_size: int, max_aspect: float) -> list[Bucket]:
    """The buckets (width, height) for images of about ``resolution²`` pixels, sorted by aspect ratio."""
    area = resolution * resolution
    found: set[Bucket] = set()
    for w in range(math.ceil(min_size / step) * step, max_size + 1, step):
        h = min(max_size, area // w // step * step)
        if h < min_size or h < step or max(w, h) / min(w, h) > max_aspect:
            continue
        found.update({(w, h), (h, w)})
    return sorted(found, key=lambda b: (b[0] / b[1], b[0]))


def buckets_for(spec: BucketingSpec, resolution: int) -> list[Bucket]:
    """``compute_buckets`` for a job's ``data.bucketing``; a clear error when the settings leave none."""
    low, high = bucket_bounds(spec, resolution)
    if low > high:
        raise ValueError(f"spec.data.bucketing: min_size {low} is larger than max_size {high} "
                         f"(defaults: half and twice the model's resolution, {resolution})")
    buckets = compute_buckets(resolution, step=spec.step, min_size=low, max_size=high, max_aspect=spec.max_aspect)
    if not buckets:
        raise ValueError(f"spec.data.bucketing.step: no side that is a multiple of {spec.step} lies between "
                         f"min_size {low} and max_size {high} with an area up to {resolution}² px; "
                         "use a smaller step or a wider size range")
    return buckets


def nearest_bucket(width: int, height: int, buckets: list[Bucket]) -> Bucket:
    """The bucket whose aspect ratio is nearest the image's (distance of log ratios; ties: the larger)."""
    aspect = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - aspect), -b[0] * b[1]))


def _rows(batch: dict[str, np.ndarray]) -> Iterator[dict]:
    names = list(batch)
    for i in range(len(batch[names[0]])):
        yield {name: batch[name][i] for name in names}


def bucket_batches(batches: Iterable[dict[str, np.ndarray]], batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Batches of ``batch_size`` rows of one bucket each (keyed by ``target_size``), in the order the
    buckets fill up; the rows left in partly filled buckets at the end are dropped."""
    waiting: dict[tuple[int, int], list[dict]] = {}
    for batch in batches:
        for row in _rows(batch):
            rows = waiting.setdefault(tuple(int(v) for v in row["target_size"]), [])
            rows.append(row)
            if len(rows) == batch_size:
                yield {name: np.stack([r[name] for r in rows]) for name in rows[0]}
                rows.clear()
