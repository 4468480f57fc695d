"""A Hugging Face Hub cache laid out as huggingface_hub lays it out, from a folder the test saved:
``models--<org>--<name>/blobs/<hash>`` (a git blob id for small files, the sha256 of an LFS file's content),
``snapshots/<commit>/<path>`` (a relative symbolic link to its blob) and ``refs/<branch or tag>`` (the commit).
Nothing is fetched: tests run with HF_HUB_OFFLINE=1 and read it through huggingface_hub itself."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

LFS_SUFFIXES = (".safetensors", ".bin", ".model")  # what the Hub keeps in LFS (named by sha256)


def _blob_id(path: Path, data: bytes) -> str:
    if path.suffix in LFS_SUFFIXES:
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()  # git's object id


def add_snapshot(cache: Path, repo: str, folder: Path, refs: tuple[str, ...] = ("main",), salt: str = "") -> str:
    """Put ``folder``'s files into ``cache`` as one commit of ``repo``, pointed at by each of ``refs``;
    returns the commit (40 hex digits, made from the files and ``salt``: one folder can be two commits)."""
    org, name = repo.split("/")
    root = cache / f"models--{org}--{name}"
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    tree = hashlib.sha1(salt.encode())
    for path in files:
        data = path.read_bytes()
        blob = root / "blobs" / _blob_id(path, data)
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        tree.update(path.relative_to(folder).as_posix().encode() + b"\0" + blob.name.encode())
    commit = tree.hexdigest()
    snapshot = root / "snapshots" / commit
    for path in files:
        link = snapshot / path.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(root / "blobs" / _blob_id(path, path.read_bytes()), link.parent))
    for ref in refs:
        (root / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (root / "refs" / ref).write_text(commit)  # as the hub writes it: no newline
    return commit
