"""Decode, resize, crop, flip and tokenize on the fly, as a Ray Data ``map_batches`` step.

A row whose image cannot be decoded is dropped and its key is reported to a ``SkipCounter`` actor, so
a job reports how many files it skipped (each file counted once, however many epochs read it).
``BucketPreprocess`` crops each image to its aspect-ratio bucket (``sdray.data.buckets``) instead of a square.
"""

from __future__ import annotations

import io
import zlib

import numpy as np
import ray
from PIL import Image, UnidentifiedImageError

from sdray.data.buckets import Bucket, nearest_bucket


@ray.remote(num_cpus=0)
class SkipCounter:
    """Collects the keys of unreadable images, and counts the rows a data job has finished (its progress)."""

    def __init__(self):
        self.keys: set[str] = set()
        self.done = 0

    def add(self, keys: list[str]) -> None:
        self.keys.update(keys)

    def add_done(self, rows: int) -> None:
        self.done += rows

    def progress(self) -> tuple[int, int]:
        """(rows done, unreadable images skipped)."""
        return self.done, len(self.keys)

    def count(self) -> int:
        return len(self.keys)

    def examples(self, n: int = 5) -> list[str]:
        return sorted(self.keys)[:n]


def in_validation_split(key: str, fraction: float) -> bool:
    """A stable, content-independent split: the same key always lands on the same side."""
    return fraction > 0 and (zlib.crc32(key.encode()) % 10_000) < fraction * 10_000


def split_filter(row: dict, *, fraction: float, validation: bool) -> bool:
    """Ray Data ``filter`` predicate keeping one side of the train/validation split."""
    return in_validation_split(str(row["key"]), fraction) == validation


def decode_image(data: bytes) -> Image.Image | None:
    """The RGB image in ``data``, or None when it is not a readable image."""
    if not data:
        return None
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        return None


class Preprocess:
    """Turns ``{key, image, caption}`` rows into training rows: ``key``, ``pixel_values``, one
    ``input_ids`` column per tokenizer (``input_ids``, ``input_ids_2``), and each image's
    ``original_size`` and ``crop_top_left`` (SDXL conditions on them).

    ``split="validation"`` rows are center-cropped and never flipped.
    """

    def __init__(self, *, resolution: int, resize: int | None, crop: str, random_flip: bool,
                 tokenizers=(), split: str = "train", skip_counter=None):
        self.resolution = resolution
        self.resize = resize or resolution
        self.random = split == "train"
        self.crop = crop if self.random else "center"
        self.random_flip = random_flip and self.random
        self.tokenizers = list(tokenizers)
        self.skip_counter = skip_counter
        self.rng = np.random.default_rng()

    def transform(self, img: Image.Image) -> tuple[np.ndarray, tuple[int, int], tuple[int, int]]:
        """Pixels in [-1, 1] (CHW), the original (height, width), and the crop's (top, left)."""
        w, h = img.size
        original = (h, w)
        scale = self.resize / min(w, h)
        if scale != 1:
            img = img.resize((max(self.resolution, round(w * scale)), max(self.resolution, round(h * scale))),
                             Image.Resampling.BICUBIC)
        return self.crop_and_flip(img, self.resolution, self.resolution, original)

    def crop_and_flip(self, img: Image.Image, width: int, height: int, original: tuple[int, int]
                      ) -> tuple[np.ndarray, tuple[int, int], tuple[int, int]]:
        """Crop a ``width``×``height`` window (center or random) out of the resized ``img``, maybe flip it."""
        w, h = img.size
        if self.crop == "random":
            left, top = int(self.rng.integers(0, w - width + 1)), int(self.rng.integers(0, h - height + 1))
        else:
            left, top = (w - width) // 2, (h - height) // 2
        img = img.crop((left, top, left + width, top + height))
        if self.random_flip and self.rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
        return arr.transpose(2, 0, 1), original, (top, left)

    def pack_pixels(self, pixels: list[np.ndarray]) -> dict[str, np.ndarray]:
        """The pixel column(s) of an output batch."""
        r = self.resolution
        return {"pixel_values": np.stack(pixels) if pixels else np.zeros((0, 3, r, r), np.float32)}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        keys, pixels, captions, sizes, crops, skipped = [], [], [], [], [], []
        for key, data, caption in zip(batch["key"], batch["image"], batch["caption"]):
            img = decode_image(data)
            if img is None:
                skipped.append(str(key))
                continue
            array, size, corner = self.transform(img)
            keys.append(str(key))
            pixels.append(array)
            sizes.append(size)
            crops.append(corner)
            captions.append(str(caption))
        if skipped and self.skip_counter is not None:
            # Wait for the count to land: a block leaves this task only once its skips are recorded, so
            # whoever has read the data reads a complete count (a fire-and-forget call could still be
            # in flight; actor calls from different callers are not ordered).
            ray.get(self.skip_counter.add.remote(skipped))
        out = {
            "key": np.array(keys, dtype=object),
            **self.pack_pixels(pixels),
            "original_size": np.array(sizes, dtype=np.int64).reshape(-1, 2),
            "crop_top_left": np.array(crops, dtype=np.int64).reshape(-1, 2),
        }
        for i, tokenizer in enumerate(self.tokenizers):
            length = tokenizer.model_max_length
            out["input_ids" if i == 0 else f"input_ids_{i + 1}"] = (
                tokenizer(captions, padding="max_length", max_length=length, truncation=True,
                          return_tensors="np").input_ids.astype(np.int64)
                if captions else np.zeros((0, length), np.int64)
            )
        return out


class BucketPreprocess(Preprocess):
    """``Preprocess`` with each image resized and cropped to its own bucket instead of a square."""

    def __init__(self, *, buckets: list[Bucket], **common):
        super().__init__(**common)
        self.buckets = buckets

    def transform(self, img: Image.Image) -> tuple[np.ndarray, tuple[int, int], tuple[int, int]]:
        w, h = img.size
        original = (h, w)
        bw, bh = nearest_bucket(w, h, self.buckets)
        scale = max(bw / w, bh / h)  # cover the bucket, then crop the excess of one side
        size = (max(bw, round(w * scale)), max(bh, round(h * scale)))
        if size != (w, h):
            img = img.resize(size, Image.Resampling.BICUBIC)
        return self.crop_and_flip(img, bw, bh, original)

    def pack_pixels(self, pixels: list[np.ndarray]) -> dict[str, np.ndarray]:
        # A list of differently shaped arrays: Ray Data stores it as a variable-shaped tensor column.
        sizes = np.array([p.shape[1:] for p in pixels], dtype=np.int64).reshape(-1, 2)
        column = np.empty(len(pixels), dtype=object)
        for i, array in enumerate(pixels):  # (not column[:] = pixels: numpy would stack equal shapes)
            column[i] = array
        return {"pixel_values": column, "target_size": sizes}
