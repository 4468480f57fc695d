"""What a run shows a person: a JSON-lines metrics file, a loss curve, labelled image grids.

Written on rank 0 into a local staging folder, then copied to ``spec.output.uri`` (local or S3). An upload
that still fails with a transient error after ``spec.storage.retries`` is logged, counted and skipped:
``metrics.jsonl`` and the loss plot are written whole at every flush, so the next one catches up.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image, ImageDraw, ImageFont  # noqa: E402

from sdray import storage  # noqa: E402
from sdray.spec import S3Settings  # noqa: E402
from sdray.train.tracking import Trackers  # noqa: E402

log = logging.getLogger("sdray.train")


def image_grid(rows: list[list[Image.Image]], labels: list[str], cell: int = 64) -> Image.Image:
    """One row per label: the label on the left, then the row's images scaled to ``cell`` px."""
    font = ImageFont.load_default()
    label_w = max(8 + int(font.getlength(text)) for text in labels) if labels else 0
    cols = max(len(r) for r in rows)
    grid = Image.new("RGB", (label_w + cols * (cell + 4) + 4, len(rows) * (cell + 4) + 4), "white")
    draw = ImageDraw.Draw(grid)
    for r, (images, text) in enumerate(zip(rows, labels)):
        y = 4 + r * (cell + 4)
        draw.text((4, y + cell // 2 - 6), text, fill="black", font=font)
        for c, img in enumerate(images):
            grid.paste(img.convert("RGB").resize((cell, cell), Image.Resampling.NEAREST), (label_w + 4 + c * (cell + 4), y))
    return grid


def tensor_to_images(pixels) -> list[Image.Image]:
    """[-1, 1] NCHW tensors to PIL images."""
    arr = ((pixels.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in arr]


class RunReport:
    """Metrics history, loss plot and image grids of one run, mirrored to the output URI."""

    def __init__(self, output_uri: str, s3: S3Settings | None = None, resume_step: int = 0,
                 trackers: Trackers | None = None):
        self.output_uri = output_uri
        self.s3 = s3
        self.staging = Path(tempfile.mkdtemp(prefix="sdray-report-"))
        self.records: list[dict] = []
        self.upload_failures = 0
        self.trackers = trackers or Trackers([])  # experiment tracking (MLflow, TensorBoard, W&B) sees the same
        if resume_step:
            self._load_history(resume_step)

    def _load_history(self, resume_step: int) -> None:
        uri = storage.join(self.output_uri, "metrics.jsonl")
        if storage.exists(uri, self.s3):
            lines = storage.read_bytes(uri, self.s3).decode().splitlines()
            self.records = [r for r in map(json.loads, filter(None, lines)) if r.get("step", 0) <= resume_step]

    def log(self, record: dict) -> None:
        self.records.append(record)
        self.trackers.log(record)

    def _upload(self, name: str, data: bytes) -> str | None:
        """Write ``data`` to ``name`` under the output URI and return its URI; None when the storage kept
        failing (logged and counted); a permanent error (access refused, no bucket) is raised."""
        uri = storage.join(self.output_uri, name)
        try:
            storage.write_bytes(uri, data, self.s3)
        except storage.StorageError as exc:
            if not exc.transient:
                raise
            self.upload_failures += 1
            log.warning("%s; the run goes on without it", exc)
            return None
        return uri

    def save_image(self, name: str, image: Image.Image) -> str | None:
        """Save ``image`` as ``name`` under the output URI; its URI, or None if it could not be uploaded."""
        path = self.staging / name
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
        if name.startswith("samples/"):  # sample grids; the loss plot is the trackers' own charts
            self.trackers.log_image("samples", image, self.records[-1]["step"] if self.records else 0)
        return self._upload(name, path.read_bytes())

    def flush(self) -> None:
        """Write metrics.jsonl and loss.png to the output URI; the trackers flush too."""
        text = "".join(json.dumps(r) + "\n" for r in self.records)
        self._upload("metrics.jsonl", text.encode())
        self.save_image("loss.png", self.loss_plot())
        self.trackers.flush()

    def finish_tracking(self, status: str, summary: dict) -> None:
        """End the tracker runs with the run's outcome (its summary: the exported pipeline's URI…)."""
        self.trackers.finish(status, summary)

    def loss_plot(self) -> Image.Image:
        fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
        for key, style in (("loss", "-"), ("val_loss", "o-")):
            pts = [(r["step"], r[key]) for r in self.records if key in r]
            if pts:
                steps, values = zip(*pts)
                ax.plot(steps, values, style, label=key, markersize=3)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
        fig.tight_layout()
        fig.canvas.draw()
        image = Image.fromarray(np.asarray(fig.canvas.buffer_rgba())).convert("RGB")
        plt.close(fig)
        return image
