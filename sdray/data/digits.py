"""scikit-learn's handwritten digits (1,797 real 8×8 scans) as an image–caption dataset.

Each scan is upscaled to the chosen resolution (white ink on black, RGB PNG) and captioned
``"a handwritten digit 7"``. Written in any of the three formats, to a local path or S3.
"""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from sklearn.datasets import load_digits

from sdray import storage
from sdray.spec import S3Settings

CAPTION = "a handwritten digit {}"


def digit_images(resolution: int = 16) -> tuple[list[bytes], list[int]]:
    """PNG bytes of every digit at ``resolution`` px, and their labels."""
    digits = load_digits()
    pngs = []
    for scan in digits.images:
        img = Image.fromarray(np.uint8(np.round(scan * 255 / 16)), "L")
        img = img.resize((resolution, resolution), Image.Resampling.BILINEAR).convert("RGB")
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        pngs.append(buf.getvalue())
    return pngs, [int(t) for t in digits.target]


def _tar(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def write_dataset(uri: str, pngs: list[bytes], captions: list[str], fmt: str = "imagefolder",
                  s3: S3Settings | None = None, shard_size: int = 500) -> int:
    """Write images and captions to ``uri`` in ``fmt``; returns the number of files written."""
    shards = [range(i, min(i + shard_size, len(pngs))) for i in range(0, len(pngs), shard_size)]
    if fmt == "imagefolder":
        lines = []
        for i, data in enumerate(pngs):
            name = f"images/{i:05d}.png"
            storage.write_bytes(storage.join(uri, name), data, s3)
            lines.append(json.dumps({"file_name": name, "text": captions[i]}))
        storage.write_bytes(storage.join(uri, "metadata.jsonl"), ("\n".join(lines) + "\n").encode(), s3)
        return len(pngs) + 1
    if fmt == "webdataset":
        for n, shard in enumerate(shards):
            members = []
            for i in shard:
                members += [(f"{i:05d}.png", pngs[i]), (f"{i:05d}.txt", captions[i].encode())]
            storage.write_bytes(storage.join(uri, f"shard-{n:05d}.tar"), _tar(members), s3)
        return len(shards)
    if fmt == "parquet":
        for n, shard in enumerate(shards):
            table = pa.table({"image": pa.array([pngs[i] for i in shard], pa.binary()),
                              "text": [captions[i] for i in shard]})
            buf = io.BytesIO()
            pq.write_table(table, buf)
            storage.write_bytes(storage.join(uri, f"part-{n:05d}.parquet"), buf.getvalue(), s3)
        return len(shards)
    raise ValueError(f"format must be imagefolder, webdataset or parquet, got {fmt!r}")


def import_digits(uri: str, fmt: str = "imagefolder", resolution: int = 16, s3: S3Settings | None = None,
                  limit: int | None = None) -> int:
    """Write the digits dataset to ``uri``; returns how many images were written."""
    pngs, labels = digit_images(resolution)
    if limit is not None:
        pngs, labels = pngs[:limit], labels[:limit]
    write_dataset(uri, pngs, [CAPTION.format(t) for t in labels], fmt, s3)
    return len(pngs)
