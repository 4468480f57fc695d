"""Object storage: one way to reach a local path or an ``s3://`` URI (pyarrow filesystems, as Ray uses).

Credentials are never part of a job document. Without a named secret, the AWS SDK's default chain finds
them (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN``, web identity as IRSA sets it,
SSO, the instance profile); a named secret (``credentials_secret``) is a folder of files, as a Kubernetes
Secret volume mounts it. Buckets are never created here: a write to a missing one is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from urllib.parse import urlparse

import pyarrow.fs as pafs

from sdray.spec import DNS_SUBDOMAIN, S3Settings

DEFAULT_SECRETS_DIR = "/var/run/secrets/sdray"


class StorageError(RuntimeError):
    """A URI that cannot be reached or read; the message names it."""


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a local path or URI with '/'."""
    return "/".join([uri.rstrip("/"), *(p.strip("/") for p in parts)])


def _secret_credentials(name: str) -> dict[str, str | None]:
    """The keys in the secret ``name``: files under ``$SDRAY_SECRETS_DIR/<name>/``. The job model checks the
    name already; it is checked again here, where it becomes a path, and the folder must stay inside."""
    if not (len(name) <= 253 and re.fullmatch(DNS_SUBDOMAIN, name)):
        raise StorageError(f"credentials_secret {name[:100]!r}: expected a Kubernetes Secret name (a DNS-1123 "
                           "subdomain: lower-case letters, digits, '-' and '.')")
    base = Path(os.environ.get("SDRAY_SECRETS_DIR", DEFAULT_SECRETS_DIR)).resolve()
    root = (base / name).resolve()
    if root.parent != base:
        raise StorageError(f"credentials_secret {name!r}: {base / name} leads outside {base}")
    try:
        key = (root / "AWS_ACCESS_KEY_ID").read_text().strip()
        secret = (root / "AWS_SECRET_ACCESS_KEY").read_text().strip()
    except OSError:
        raise StorageError(
            f"credentials_secret {name!r}: expected files AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
            f"in {root} (set SDRAY_SECRETS_DIR or mount the secret there)"
        ) from None
    token = root / "AWS_SESSION_TOKEN"  # temporary (STS) credentials come with one
    return {"access_key": key, "secret_key": secret,
            "session_token": token.read_text().strip() if token.is_file() else None}


def s3_options(settings: S3Settings | None) -> dict:
    """Resolved endpoint, region and keys for S3, from the spec's settings then the environment. Keys come
    only from a named secret; without one they are None and the AWS SDK's default chain finds them."""
    settings = settings or S3Settings()
    opts = {
        "endpoint": settings.endpoint or os.environ.get("AWS_ENDPOINT_URL"),
        "region": (settings.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
                   or "us-east-1"),
        "access_key": None, "secret_key": None, "session_token": None,
    }
    if settings.credentials_secret:
        opts.update(_secret_credentials(settings.credentials_secret))
    return opts


def filesystem(uri: str, settings: S3Settings | None = None) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem for ``uri`` and the path inside it."""
    if not is_s3(uri):
        return pafs.LocalFileSystem(), str(Path(uri).expanduser().absolute())
    opts = s3_options(settings)
    # allow_bucket_creation=False: a typo in a bucket name must not create that bucket.
    kwargs: dict = {"region": opts["region"], "allow_bucket_creation": False}
    if opts["access_key"]:
        kwargs.update(access_key=opts["access_key"], secret_key=opts["secret_key"])
        if opts["session_token"]:
            kwargs["session_token"] = opts["session_token"]
    if opts["endpoint"]:
        parsed = urlparse(opts["endpoint"])
        kwargs.update(endpoint_override=parsed.netloc or parsed.path, scheme=parsed.scheme or "https")
    return pafs.S3FileSystem(**kwargs), uri.removeprefix("s3://").rstrip("/")


_BUCKETS_FOUND: set[tuple[str, str]] = set()  # (endpoint, bucket): looked up once per process


def _bucket_of(uri: str, settings: S3Settings | None) -> tuple[str, str]:
    """The bucket of an ``s3://`` URI and the server it is on (for messages)."""
    opts = s3_options(settings)
    return uri.removeprefix("s3://").split("/", 1)[0], opts["endpoint"] or f"AWS S3 ({opts['region']})"


def _no_bucket(uri: str, bucket: str, where: str) -> StorageError:
    return StorageError(f"no such bucket {bucket!r} at {where}: create it first ({uri} is written into it; "
                        "sdray never creates buckets)")


def require_bucket(uri: str, settings: S3Settings | None = None) -> None:
    """Raise StorageError when the bucket of an ``s3://`` URI does not exist (nothing to check for a local
    path). Writers call it first: AWS refuses a write to a missing bucket, but some S3 servers (SeaweedFS)
    create it, and a typo would become a bucket. A lookup the credentials may not make (HeadBucket needs
    s3:ListBucket) leaves the decision to the write itself."""
    if not is_s3(uri):
        return
    bucket, where = _bucket_of(uri, settings)
    if (where, bucket) in _BUCKETS_FOUND:
        return
    fs, _ = filesystem(uri, settings)
    try:
        found = fs.get_file_info(bucket).type != pafs.FileType.NotFound
    except OSError:
        return
    if not found:
        raise _no_bucket(uri, bucket, where)
    _BUCKETS_FOUND.add((where, bucket))


def _write_error(uri: str, exc: OSError, settings: S3Settings | None) -> StorageError:
    if "NO_SUCH_BUCKET" in str(exc) or "NoSuchBucket" in str(exc):
        return _no_bucket(uri, *_bucket_of(uri, settings))
    return StorageError(f"cannot write {uri}: {exc}")


def exists(uri: str, settings: S3Settings | None = None) -> bool:
    fs, path = filesystem(uri, settings)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def _file_infos(fs: pafs.FileSystem, path: str, uri: str) -> list[pafs.FileInfo]:
    """Every file under ``path``, sorted by path."""
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    except FileNotFoundError:
        raise StorageError(f"nothing found at {uri}") from None
    except OSError as exc:
        raise StorageError(f"cannot list {uri}: {exc}") from None
    return sorted((i for i in infos if i.type == pafs.FileType.File), key=lambda i: i.path)


def list_files(uri: str, settings: S3Settings | None = None) -> list[str]:
    """Every file under ``uri``, as paths inside its filesystem, sorted."""
    fs, path = filesystem(uri, settings)
    return [i.path for i in _file_infos(fs, path, uri)]


def read_bytes(uri: str, settings: S3Settings | None = None) -> bytes:
    fs, path = filesystem(uri, settings)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except (FileNotFoundError, OSError) as exc:
        raise StorageError(f"cannot read {uri}: {exc}") from None


def write_bytes(uri: str, data: bytes, settings: S3Settings | None = None) -> None:
    """Write a whole object; locally through a temporary file and a rename, so readers never see half."""
    fs, path = filesystem(uri, settings)
    if not is_s3(uri):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=Path(path).parent, prefix=".tmp-")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        return
    require_bucket(uri, settings)
    try:
        with fs.open_output_stream(path) as f:  # an S3 PUT is atomic: the object appears whole or not at all
            f.write(data)
    except OSError as exc:
        raise _write_error(uri, exc, settings) from None


def upload_dir(local_dir: str | Path, uri: str, settings: S3Settings | None = None) -> None:
    """Copy a local directory tree to ``uri`` (replacing files of the same name)."""
    fs, path = filesystem(uri, settings)
    if not is_s3(uri):
        shutil.copytree(local_dir, path, dirs_exist_ok=True)
        return
    require_bucket(uri, settings)
    try:
        fs.create_dir(path, recursive=True)
        pafs.copy_files(str(local_dir), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    except OSError as exc:
        raise _write_error(uri, exc, settings) from None


def download_dir(uri: str, local_dir: str | Path, settings: S3Settings | None = None) -> Path:
    """Copy the tree under ``uri`` into ``local_dir``; returns ``local_dir``."""
    fs, path = filesystem(uri, settings)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        raise StorageError(f"nothing found at {uri}")
    Path(local_dir).mkdir(parents=True, exist_ok=True)
    pafs.copy_files(path, str(local_dir), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return Path(local_dir)


def cache_root() -> Path:
    """Where downloaded models live on this node: ``$SDRAY_CACHE_DIR`` or ``~/.cache/sdray``."""
    return Path(os.environ.get("SDRAY_CACHE_DIR") or Path.home() / ".cache" / "sdray")


def _fingerprint(fs: pafs.FileSystem, path: str, uri: str) -> str:
    """A digest of every object under ``path`` (name, size, modification time): it changes when they do."""
    files = [(i.path, i.size, str(i.mtime)) for i in _file_infos(fs, path, uri)]
    if not files:
        raise StorageError(f"nothing found at {uri}")
    return hashlib.sha256(json.dumps([uri, files]).encode()).hexdigest()[:20]


def local_copy(uri: str, settings: S3Settings | None = None) -> Path:
    """A local directory holding what ``uri`` holds: the path itself when local, else a downloaded copy.

    Downloads are cached per node under ``cache_root()/downloads``, keyed by the URI and a fingerprint of
    its objects: every worker of a node, and every later job, reuses one copy until the objects change.
    A copy is downloaded beside its final name and renamed into place, so a reader never sees half of one.
    """
    if not is_s3(uri):
        path = Path(uri).expanduser()
        if not path.exists():
            raise StorageError(f"nothing found at {uri}")
        return path
    fs, path = filesystem(uri, settings)
    name = uri.removeprefix("s3://").strip("/").replace("/", "_")
    final = cache_root() / "downloads" / f"{name}-{_fingerprint(fs, path, uri)}"
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        download_dir(uri, staging, settings)
        staging.rename(final)
    except OSError:
        if not final.is_dir():  # not a lost race with another process of this node: a real failure
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final
