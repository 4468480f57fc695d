"""What the per-worker loop needs from whatever runs it, and the plain-process runner.

The loop (``sdray.train.loop``) only talks to a ``WorkerContext``: it never imports Ray. Ray Train
provides one (``sdray.train.ray_trainer``); ``LocalContext`` runs the same loop as one ordinary
process, with checkpoints in a local folder renamed into place (atomic).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from sdray.data.buckets import bucket_batches
from sdray.progress import Progress
from sdray.train.checkpoint import read_manifest


def _tensor(array: np.ndarray, copy: bool = False) -> torch.Tensor:
    dtype = np.float32 if array.dtype.kind == "f" else np.int64
    return torch.from_numpy(np.array(array, dtype=dtype) if copy else np.ascontiguousarray(array, dtype=dtype))


def to_torch(batch: dict[str, np.ndarray]) -> dict:
    """A numpy batch from Ray Data as tensors: float columns (pixels, or a latent cache's latents and
    embeddings, whatever their stored precision) as float32, integer columns as int64; ``key`` stays a
    list of strings. A variable-shaped column (rows of several aspect-ratio buckets, not regrouped by
    ``bucket_batches``) becomes a list of tensors, one per row (copies: Ray hands out read-only views)."""
    out: dict = {"key": [str(k) for k in batch["key"]]}
    for name, column in batch.items():
        if name != "key":
            column = np.asarray(column)
            out[name] = [_tensor(np.asarray(row), copy=True) for row in column] if column.dtype == object else _tensor(column)
    return out


def iterate(dataset_or_iterator, *, batch_size: int, shuffle: bool, bucketed: bool = False) -> Iterator[dict]:
    """One epoch of torch batches from a Ray Dataset or a Ray Train dataset shard; ``bucketed``: each
    batch holds rows of one aspect-ratio bucket (``sdray.data.buckets``)."""
    batches = dataset_or_iterator.iter_batches(
        batch_size=batch_size,
        drop_last=not bucketed,
        batch_format="numpy",
        local_shuffle_buffer_size=batch_size * 8 if shuffle else None,
        prefetch_batches=2,
    )
    for batch in bucket_batches(batches, batch_size) if bucketed else batches:
        yield to_torch(batch)


class WorkerContext(Protocol):
    rank: int
    world_size: int
    device: torch.device
    num_threads: int

    def train_batches(self) -> Iterator[dict]:
        """One epoch of this worker's share of the training data."""

    def validation_batches(self) -> Iterator[dict] | None:
        """The held-out split (read by rank 0), or None."""

    def restored_checkpoint(self) -> Path | None:
        """A local directory holding the checkpoint to resume from, if the runner has one."""

    def save_checkpoint(self, directory: Path, metrics: dict) -> None:
        """Persist this rank's checkpoint files (every rank calls this at the same step). A checkpoint that
        could not be stored raises ``sdray.storage.StorageError`` on every rank and leaves the previous one
        the latest."""

    def progress(self, progress: Progress) -> None:
        """Live progress from rank 0 (step, loss, images/s) for whoever watches the run."""


class LocalContext:
    """Runs the loop as one process: rank 0 of 1, checkpoints under ``run_dir/checkpoint_<step>``."""

    rank = 0
    world_size = 1

    def __init__(self, *, train, validation, batch_size: int, shuffle: bool, run_dir: Path, keep_last: int,
                 device: str = "cpu", num_threads: int = 1, bucketed: bool = False, on_progress=None):
        self.train = train
        self.validation = validation
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.bucketed = bucketed
        self.run_dir = Path(run_dir)
        self.keep_last = keep_last
        self.device = torch.device(device)
        self.num_threads = num_threads
        self.last_progress: Progress | None = None
        self.on_progress = on_progress

    def train_batches(self) -> Iterator[dict]:
        return iterate(self.train, batch_size=self.batch_size, shuffle=self.shuffle, bucketed=self.bucketed)

    def validation_batches(self) -> Iterator[dict] | None:
        if self.validation is None:
            return None
        return iterate(self.validation, batch_size=self.batch_size, shuffle=False)

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first (a folder is complete once renamed into place)."""
        found = [p for p in self.run_dir.glob("checkpoint_*") if read_manifest(p) is not None]
        return sorted(found, key=lambda p: read_manifest(p)["step"])

    def restored_checkpoint(self) -> Path | None:
        done = self.checkpoints()
        return done[-1] if done else None

    def save_checkpoint(self, directory: Path, metrics: dict) -> None:
        step = read_manifest(directory)["step"]
        final = self.run_dir / f"checkpoint_{step:08d}"
        staging = self.run_dir / f".tmp-checkpoint_{step:08d}"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(directory, staging)
        shutil.rmtree(final, ignore_errors=True)
        staging.rename(final)  # atomic: a crash before this line leaves the previous checkpoint latest
        for old in self.checkpoints()[: -self.keep_last]:
            shutil.rmtree(old)

    def progress(self, progress: Progress) -> None:
        self.last_progress = progress
        if self.on_progress is not None:
            self.on_progress(progress)
