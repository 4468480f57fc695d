"""Readers for the three dataset layouts, as Ray Data datasets of ``{key, image, caption}`` rows.

- ``imagefolder``: the Hugging Face convention: images beside a ``metadata.jsonl`` whose lines hold
  ``file_name`` and the caption column (``text`` by default); several ``metadata.jsonl`` may sit in
  sub-folders.
- ``webdataset``: ``.tar`` shards whose members share a key (``0001.png`` + ``0001.txt``).
- ``parquet``: an image column holding encoded bytes (or a Hugging Face ``{bytes, path}`` struct) and a
  caption column.

``image`` stays encoded bytes here: decoding happens in the augmentation step, where a corrupt file is
skipped and counted rather than failing the read.
"""

from __future__ import annotations

import hashlib
import json
import posixpath

import numpy as np
import pyarrow.fs as pafs
import ray.data

from sdray import storage
from sdray.spec import DataSpec, S3Settings

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp", "bmp", "gif", "tif", "tiff")


class DataError(ValueError):
    """A dataset that cannot be read as asked; the message names the URI or field."""


def _files(spec: DataSpec, s3: S3Settings, suffix: str) -> tuple[pafs.FileSystem, list[str]]:
    fs, _ = storage.filesystem(spec.uri, s3)
    try:
        files = [f for f in storage.list_files(spec.uri, s3) if f.endswith(suffix)]
    except storage.StorageError as exc:
        raise DataError(f"spec.data.uri: {exc}") from None
    if not files:
        raise DataError(f"spec.data.uri: no {suffix} files under {spec.uri} (format: {spec.format})")
    return fs, files


class _AttachImageBytes:
    """Parses each metadata.jsonl line and reads its image file (relative to that metadata.jsonl)."""

    def __init__(self, fs: pafs.FileSystem, caption_column: str):
        self.fs = fs
        self.caption_column = caption_column

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        keys, images, captions = [], [], []
        for meta_path, line in zip(batch["path"], batch["text"]):
            if not str(line).strip():
                continue
            try:
                entry = json.loads(line)
                file_name, caption = entry["file_name"], entry[self.caption_column]
            except (ValueError, KeyError, TypeError) as exc:
                raise DataError(
                    f"{meta_path}: each line needs 'file_name' and {self.caption_column!r} "
                    f"(spec.data.caption_column); bad line {str(line)[:80]!r}: {exc!r}"
                ) from None
            path = posixpath.join(posixpath.dirname(meta_path), str(file_name))
            try:
                with self.fs.open_input_stream(path) as f:
                    images.append(f.read())
            except OSError:
                images.append(b"")  # unreadable: counted as a skipped image downstream
            keys.append(path)
            captions.append(str(caption))
        return {"key": np.array(keys, dtype=object), "image": np.array(images, dtype=object),
                "caption": np.array(captions, dtype=object)}


def _imagefolder(spec: DataSpec, s3: S3Settings) -> ray.data.Dataset:
    fs, metas = _files(spec, s3, "metadata.jsonl")
    ds = ray.data.read_text(metas, filesystem=fs, include_paths=True)
    return ds.map_batches(_AttachImageBytes(fs, spec.caption_column or "text"),
                          batch_format="numpy", batch_size=64)


class _FromWebdataset:
    def __init__(self, image_key: str | None, caption_key: str):
        self.image_key = image_key
        self.caption_key = caption_key

    def __call__(self, row: dict) -> dict:
        image_key = self.image_key or next((e for e in IMAGE_EXTENSIONS if row.get(e) is not None), None)
        image = row.get(image_key) if image_key else None
        caption = row.get(self.caption_key) or b""
        if isinstance(caption, bytes):
            caption = caption.decode("utf-8", "replace")
        return {"key": f"{row.get('__url__', '')}#{row['__key__']}", "image": image or b"", "caption": caption.strip()}


def _webdataset(spec: DataSpec, s3: S3Settings) -> ray.data.Dataset:
    fs, tars = _files(spec, s3, ".tar")
    ds = ray.data.read_webdataset(tars, filesystem=fs, decoder=None, shuffle="files" if spec.shuffle else None)
    return ds.map(_FromWebdataset(spec.image_column, spec.caption_column or "txt"))


class _FromParquet:
    def __init__(self, image_column: str, caption_column: str):
        self.image_column = image_column
        self.caption_column = caption_column

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = []
        for value in batch[self.image_column]:
            if isinstance(value, dict):  # Hugging Face datasets' Image feature: {bytes, path}
                value = value.get("bytes")
            images.append(bytes(value) if value is not None else b"")
        # Parquet rows have no name: the file plus a digest of the image bytes identifies a row stably.
        keys = [f"{p}#{hashlib.sha1(b).hexdigest()[:16]}" for p, b in zip(batch["path"], images)]
        return {"key": np.array(keys, dtype=object), "image": np.array(images, dtype=object),
                "caption": np.array([str(c) for c in batch[self.caption_column]], dtype=object)}


def _parquet(spec: DataSpec, s3: S3Settings) -> ray.data.Dataset:
    fs, files = _files(spec, s3, ".parquet")
    image, caption = spec.image_column or "image", spec.caption_column or "text"
    ds = ray.data.read_parquet(files, filesystem=fs, include_paths=True,
                               shuffle="files" if spec.shuffle else None)
    columns = set(ds.schema().names)
    for field, name in (("image_column", image), ("caption_column", caption)):
        if name not in columns:
            raise DataError(f"spec.data.{field}: no column {name!r} in {spec.uri} (columns: {sorted(columns - {'path'})})")
    return ds.map_batches(_FromParquet(image, caption), batch_format="numpy", batch_size=64)


READERS = {"imagefolder": _imagefolder, "webdataset": _webdataset, "parquet": _parquet}


def read_dataset(spec: DataSpec, s3: S3Settings) -> ray.data.Dataset:
    """The raw rows of ``spec.uri`` in ``spec.format``."""
    return READERS[spec.format](spec, s3)
