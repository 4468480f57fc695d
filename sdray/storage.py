"""Object storage: one way to reach a local path or an ``s3://`` URI (pyarrow filesystems, as Ray uses).

Credentials are never part of a job document. Without a named secret, the AWS SDK's default chain finds
them (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN``, web identity as IRSA sets it,
SSO, the instance profile); a named secret (``credentials_secret``) is a folder of files, as a Kubernetes
Secret volume mounts it. Buckets are never created here: a write to a missing one is refused.

Faults (``spec.storage.retries``): every S3 request is retried by the AWS SDK on a transient error
(connection refused or reset, timeout, HTTP 5xx, SlowDown/throttling), with exponential backoff and full
jitter, in every process that uses a filesystem made here (Ray Train and Ray Data included). An operation of
this module that still fails with one is retried whole (``retrying``) for up to ``max_elapsed_s``. A
permanent error (access denied, no such bucket, nothing at the URI) is not retried: the StorageError names
the URI and what to check.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlparse

import pyarrow.fs as pafs

from sdray.spec import DNS_SUBDOMAIN, S3Settings, StorageRetries

log = logging.getLogger("sdray.storage")

DEFAULT_SECRETS_DIR = "/var/run/secrets/sdray"
# How the AWS SDK (through pyarrow) words an error that a later attempt may not meet: the server was
# unreachable, overloaded or failed inside. Ray Data retries its reads on the same words
# (DataContext.retried_io_errors; sdray.data.pipeline adds these).
TRANSIENT_ERRORS = (
    "AWS Error NETWORK_CONNECTION", "AWS Error SLOW_DOWN", "AWS Error SERVICE_UNAVAILABLE",
    "AWS Error INTERNAL_FAILURE", "AWS Error THROTTLING", "AWS Error REQUEST_TIMEOUT",
    "(HTTP status 5", "(HTTP status 429)",
)
_REFUSED = ("AWS Error ACCESS_DENIED", "AWS Error INVALID_ACCESS_KEY_ID", "AWS Error SIGNATURE_DOES_NOT_MATCH",
            "(HTTP status 403)")
T = TypeVar("T")


class StorageError(RuntimeError):
    """A URI that cannot be reached or read; the message names it. ``transient``: the storage kept failing
    until the retries ran out (it may work later), rather than refusing (access, bucket, nothing there)."""

    def __init__(self, message: str, transient: bool = False):
        super().__init__(message)
        self.transient = transient


def transient(exc: BaseException) -> bool:
    """Whether a later attempt may succeed where ``exc`` failed (see ``TRANSIENT_ERRORS``)."""
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    return (isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError)
            and any(words in str(exc) for words in TRANSIENT_ERRORS))


def retry_settings(settings: S3Settings | None) -> StorageRetries:
    """``spec.storage.retries`` (the defaults for settings without them, as ``spec.data``'s own)."""
    return getattr(settings, "retries", None) or StorageRetries()


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a local path or URI with '/'."""
    return "/".join([uri.rstrip("/"), *(p.strip("/") for p in parts)])


def secret_dir(name: str) -> Path:
    """The folder of the secret ``name``: ``$SDRAY_SECRETS_DIR/<name>/``, where a Secret volume puts its keys as
    files. The job model checks the name already; it is checked again here, where it becomes a path, and the
    folder must stay inside."""
    if not (len(name) <= 253 and re.fullmatch(DNS_SUBDOMAIN, name)):
        raise StorageError(f"credentials_secret {name[:100]!r}: expected a Kubernetes Secret name (a DNS-1123 "
                           "subdomain: lower-case letters, digits, '-' and '.')")
    base = Path(os.environ.get("SDRAY_SECRETS_DIR", DEFAULT_SECRETS_DIR)).resolve()
    root = (base / name).resolve()
    if root.parent != base:
        raise StorageError(f"credentials_secret {name!r}: {base / name} leads outside {base}")
    return root


def _secret_credentials(name: str) -> dict[str, str | None]:
    """The S3 keys in the secret ``name`` (``secret_dir``)."""
    root = secret_dir(name)
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
    retries = retry_settings(settings)
    # allow_bucket_creation=False: a typo in a bucket name must not create that bucket.
    kwargs: dict = {"region": opts["region"], "allow_bucket_creation": False,
                    "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=retries.max_attempts),
                    "connect_timeout": retries.connect_timeout_s}
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


def _bucket_missing(uri: str, settings: S3Settings | None) -> bool:
    """Whether the bucket of an ``s3://`` URI is known not to exist; False when the lookup itself fails
    (HeadBucket needs s3:ListBucket, which the credentials may lack)."""
    bucket, where = _bucket_of(uri, settings)
    if (where, bucket) in _BUCKETS_FOUND:
        return False
    fs, _ = filesystem(uri, settings)
    try:
        found = fs.get_file_info(bucket).type != pafs.FileType.NotFound
    except OSError:
        return False
    if found:
        _BUCKETS_FOUND.add((where, bucket))
    return not found


def require_bucket(uri: str, settings: S3Settings | None = None) -> None:
    """Raise StorageError when the bucket of an ``s3://`` URI does not exist (nothing to check for a local
    path). Writers call it first: AWS refuses a write to a missing bucket, but some S3 servers (SeaweedFS)
    create it, and a typo would become a bucket. A lookup that fails leaves the decision to the write."""
    if is_s3(uri) and _bucket_missing(uri, settings):
        raise _no_bucket(uri, *_bucket_of(uri, settings))


def _missing_bucket(what: str, uri: str, settings: S3Settings | None) -> StorageError:
    """The bucket of ``uri`` does not exist: create it first (a write), or check its name (a read)."""
    bucket, where = _bucket_of(uri, settings)
    if what == "write":
        return _no_bucket(uri, bucket, where)
    return StorageError(f"no such bucket {bucket!r} at {where}: nothing to {what} at {uri} (check the bucket's "
                        "name and the endpoint)")


def _not_found(what: str, uri: str, settings: S3Settings | None) -> StorageError:
    """Nothing at ``uri``: because its bucket does not exist, when that is the reason."""
    if is_s3(uri) and _bucket_missing(uri, settings):
        return _missing_bucket(what, uri, settings)
    return StorageError(f"nothing found at {uri}")


def _error(what: str, uri: str, exc: OSError, settings: S3Settings | None, elapsed: float) -> StorageError:
    """The StorageError of an operation that failed for good: what happened to which URI, and what to do."""
    text = str(exc)
    if isinstance(exc, FileNotFoundError):
        return _not_found(what, uri, settings)
    if is_s3(uri) and ("NO_SUCH_BUCKET" in text or "NoSuchBucket" in text):
        return _missing_bucket(what, uri, settings)
    if any(words in text for words in _REFUSED):
        return StorageError(f"cannot {what} {uri}: {text} (refused, not retried: check the keys (credentials_secret "
                            "or AWS_ACCESS_KEY_ID) and what the bucket's policy lets them do)")
    if transient(exc):
        where = _bucket_of(uri, settings)[1] if is_s3(uri) else "the storage"
        attempts = retry_settings(settings).max_attempts
        return StorageError(f"cannot {what} {uri}: {text} (still failing after {attempts} attempts per request and "
                            f"{elapsed:.0f} s of retries: check that {where} is up, or retry for longer with "
                            "spec.storage.retries.max_elapsed_s)", transient=True)
    return StorageError(f"cannot {what} {uri}: {text}")


def retrying(operation: Callable[[], T], what: str, uri: str, settings: S3Settings | None = None) -> T:
    """``operation()``, run again while it fails with a transient error, for up to ``retries.max_elapsed_s``
    (waits from 1 s, doubling up to 20 s, each between half and all of that). A permanent error, or a
    transient one past that time, becomes a StorageError: "cannot ``what`` ``uri``: …", saying what to do."""
    limit = retry_settings(settings).max_elapsed_s
    started = time.monotonic()
    delay = 1.0
    while True:
        try:
            return operation()
        except StorageError:
            raise
        except OSError as exc:
            elapsed = time.monotonic() - started
            if not transient(exc) or elapsed >= limit:
                raise _error(what, uri, exc, settings, elapsed) from None
            wait = min(delay * random.uniform(0.5, 1.0), limit - elapsed)
            log.warning("cannot %s %s, retrying in %.1f s: %s", what, uri, wait, exc)
            time.sleep(wait)  # backoff between attempts, bounded by max_elapsed_s
            delay = min(2 * delay, 20.0)


def exists(uri: str, settings: S3Settings | None = None) -> bool:
    fs, path = filesystem(uri, settings)
    return retrying(lambda: fs.get_file_info(path).type != pafs.FileType.NotFound, "look up", uri, settings)


def _file_infos(fs: pafs.FileSystem, path: str, uri: str, settings: S3Settings | None) -> list[pafs.FileInfo]:
    """Every file under ``path``, sorted by path."""
    infos = retrying(lambda: fs.get_file_info(pafs.FileSelector(path, recursive=True)), "list", uri, settings)
    return sorted((i for i in infos if i.type == pafs.FileType.File), key=lambda i: i.path)


def list_files(uri: str, settings: S3Settings | None = None) -> list[str]:
    """Every file under ``uri``, as paths inside its filesystem, sorted."""
    fs, path = filesystem(uri, settings)
    return [i.path for i in _file_infos(fs, path, uri, settings)]


def read_bytes(uri: str, settings: S3Settings | None = None) -> bytes:
    fs, path = filesystem(uri, settings)

    def read() -> bytes:
        with fs.open_input_stream(path) as f:
            return f.read()

    return retrying(read, "read", uri, settings)


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

    def write() -> None:
        with fs.open_output_stream(path) as f:  # an S3 PUT is atomic: the object appears whole or not at all
            f.write(data)

    retrying(write, "write", uri, settings)


def upload_dir(local_dir: str | Path, uri: str, settings: S3Settings | None = None) -> None:
    """Copy a local directory tree to ``uri`` (replacing files of the same name)."""
    fs, path = filesystem(uri, settings)
    if not is_s3(uri):
        shutil.copytree(local_dir, path, dirs_exist_ok=True)
        return
    require_bucket(uri, settings)

    def upload() -> None:  # all of it again after a failure: the objects of a first try may be incomplete
        fs.create_dir(path, recursive=True)
        pafs.copy_files(str(local_dir), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)

    retrying(upload, "write", uri, settings)


def download_dir(uri: str, local_dir: str | Path, settings: S3Settings | None = None) -> Path:
    """Copy the tree under ``uri`` into ``local_dir``; returns ``local_dir``."""
    fs, path = filesystem(uri, settings)
    if not exists(uri, settings):
        raise _not_found("read", uri, settings)
    Path(local_dir).mkdir(parents=True, exist_ok=True)
    retrying(lambda: pafs.copy_files(path, str(local_dir), source_filesystem=fs,
                                     destination_filesystem=pafs.LocalFileSystem()), "read", uri, settings)
    return Path(local_dir)


def cache_root() -> Path:
    """Where downloaded models live on this node: ``$SDRAY_CACHE_DIR`` or ``~/.cache/sdray``."""
    return Path(os.environ.get("SDRAY_CACHE_DIR") or Path.home() / ".cache" / "sdray")


def _fingerprint(fs: pafs.FileSystem, path: str, uri: str, settings: S3Settings | None) -> str:
    """A digest of every object under ``path`` (name, size, modification time): it changes when they do."""
    files = [(i.path, i.size, str(i.mtime)) for i in _file_infos(fs, path, uri, settings)]
    if not files:
        raise _not_found("read", uri, settings)
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
    final = cache_root() / "downloads" / f"{name}-{_fingerprint(fs, path, uri, settings)}"
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
