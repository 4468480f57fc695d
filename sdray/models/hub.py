"""Model sources on the Hugging Face Hub: ``hf://org/name[@revision]``, or a bare ``org/name[@revision]``
where no such local path exists (``sdray.spec.hub_source`` parses both).

A source is fetched with ``huggingface_hub.snapshot_download`` into the hub's own cache (``HF_HUB_CACHE``,
else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``), which every later job of the node, and every other
Hugging Face tool, reuses. Only what a job loads is fetched: ``model_index.json`` and ``config.json`` first,
then, for a pipeline, the folders of its family's components (denoiser, VAE, text encoders, tokenizers,
scheduler: no safety checker, no single-file checkpoints), and weights as safetensors only, without the
fp16/bf16/non-EMA variants. The second fetch names the commit the first one resolved, so both read one
revision even while a branch moves.

``HF_HUB_OFFLINE=1``: nothing is fetched, the cache alone answers (a branch or tag through its
``refs/`` file). The token comes from the job's ``spec.model.hub.credentials_secret`` (the file
``HF_TOKEN`` of a Secret volume), else from huggingface_hub's own lookup (``HF_TOKEN``, ``hf auth login``);
it goes to the Hub and nowhere else: never into a message, a log, a summary or an export.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import constants, snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from sdray import storage
from sdray.models.families import family_of_pipeline
from sdray.spec import HubSettings, HubSource, hub_source

log = logging.getLogger("sdray.models.hub")

TOKEN_KEY = "HF_TOKEN"  # the secret's key (a file of its volume), named as huggingface_hub's variable
_INDEX_FILES = ["model_index.json", "config.json"]
_TOKENIZER_FILES = ("*.json", "*.txt", "*.model")  # tokenizer.json, vocab.json, merges.txt, spiece.model …
_MODEL_FILES = (*_TOKENIZER_FILES, "*.safetensors")
# Variants a job never loads: half-precision copies, a UNet's non-EMA weights.
_VARIANTS = ["*.fp16.*", "*.fp16-*", "*.bf16.*", "*.bf16-*", "*non_ema*"]


class HubError(ValueError):
    """A Hub source that cannot be had; the caller prefixes the field it came from."""


@dataclass(frozen=True)
class Snapshot:
    """A revision of a Hub repository in the local cache: ``path`` is its ``snapshots/<commit>`` folder."""

    source: HubSource
    commit: str
    path: Path

    def fingerprint(self, directory: Path) -> str:
        """What names the files of ``directory`` (inside ``path``) for good: the repository, the resolved
        commit and the folder. A cache made from another revision has another one."""
        return f"hub:{self.source.repo}@{self.commit}/{directory.relative_to(self.path).as_posix()}"


def model_source(uri: str) -> HubSource | None:
    """The Hub repository a model source names, or None for a local path or a URI of another scheme. A bare
    ``org/name`` that exists as a local path is that path."""
    source = hub_source(uri)
    if source is not None and not source.explicit and Path(uri).expanduser().exists():
        return None
    return source


def offline() -> bool:
    """Whether the Hub may not be asked (``HF_HUB_OFFLINE``, as set now or when huggingface_hub was loaded)."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.upper() in constants.ENV_VARS_TRUE_VALUES or constants.HF_HUB_OFFLINE


def cache_dir() -> Path:
    """The hub cache of this node, read from the environment as it is now."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path(constants.HF_HUB_CACHE)


def _token(settings: HubSettings | None) -> str | None:
    """The job's own token (its secret's HF_TOKEN file); None: huggingface_hub looks for one itself."""
    name = settings.credentials_secret if settings is not None else None
    if not name:
        return None
    try:
        root = storage.secret_dir(name)
    except storage.StorageError as exc:
        raise HubError(f"spec.model.hub.{exc}") from None
    try:
        token = (root / TOKEN_KEY).read_text().strip()
    except OSError:
        token = ""
    if not token:
        raise HubError(f"spec.model.hub.credentials_secret {name!r}: expected a file {TOKEN_KEY} holding the token "
                       f"in {root} (set SDRAY_SECRETS_DIR or mount the secret there)")
    return token


def _cached_revisions(repo_dir: Path) -> list[str]:
    refs = repo_dir / "refs"
    return sorted(p.relative_to(refs).as_posix() for p in refs.rglob("*") if p.is_file()) if refs.is_dir() else []


def _failure(source: HubSource, exc: Exception, token_from: str) -> HubError:
    """One line saying why ``source`` cannot be had, and what to do."""
    revision = source.revision or constants.DEFAULT_REVISION
    cache = cache_dir()
    if isinstance(exc, RevisionNotFoundError):
        return HubError(f"{source}: revision {revision!r} not found in {source.repo} (give a branch, tag or commit "
                        "of the repository)")
    if isinstance(exc, GatedRepoError):
        return HubError(f"{source}: {source.repo} is gated: accept its conditions on the Hub with the account of the "
                        f"job's token ({token_from}), then retry")
    if isinstance(exc, RepositoryNotFoundError):
        return HubError(f"{source}: {source.repo} not found on the Hub, or private and the job's token ({token_from}) "
                        "cannot read it")
    if isinstance(exc, LocalEntryNotFoundError):
        repo_dir = cache / constants.REPO_ID_SEPARATOR.join(["models", *source.repo.split("/")])
        if offline():
            if repo_dir.is_dir():
                cached = ", ".join(_cached_revisions(repo_dir)) or "no branch or tag"
                return HubError(f"{source}: revision {revision!r} of {source.repo} is not in the Hugging Face cache at "
                                f"{cache} (cached: {cached}); run online once or unset HF_HUB_OFFLINE")
            return HubError(f"{source}: {source.repo} is not in the Hugging Face cache at {cache}; run online once or "
                            "unset HF_HUB_OFFLINE")
        endpoint = os.environ.get("HF_ENDPOINT") or constants.ENDPOINT
        return HubError(f"{source}: cannot reach the Hugging Face Hub at {endpoint}, and {source.repo}@{revision} is "
                        f"not in the cache at {cache}: {str(exc).splitlines()[0]}")
    if isinstance(exc, HfHubHTTPError):
        return HubError(f"{source}: the Hub refused {source.repo}: {str(exc).splitlines()[0]}")
    return HubError(f"{source}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")


def _patterns(root: Path, wants: str) -> list[str]:
    """What a job loads from the snapshot at ``root`` (its index files already there), for a ``model``
    source (a pipeline or one component), a ``vae`` or a ``tokenizer``."""
    files = _TOKENIZER_FILES if wants == "tokenizer" else _MODEL_FILES
    index = root / "model_index.json"
    if not index.is_file():
        return list(files)  # one component (or a tokenizer) at the repository's root
    if wants != "model":
        folders = [wants]
    else:
        family = family_of_pipeline(json.loads(index.read_text()).get("_class_name", ""))
        if family is None:
            return []  # the model_index.json is all the builder needs to name the pipeline it cannot train
        folders = [family.denoiser, "vae", "scheduler",
                   *(name for slot in family.text_slots for name in (slot.encoder, slot.tokenizer))]
    return [f"{folder}/{pattern}" for folder in folders
            for pattern in (_TOKENIZER_FILES if folder.startswith("tokenizer") or folder == "scheduler" else files)]


def snapshot(source: HubSource, wants: str = "model", settings: HubSettings | None = None) -> Snapshot:
    """The local snapshot of ``source`` holding what a job loads as ``wants`` (``model``, ``vae`` or
    ``tokenizer``), fetched into the hub cache unless it is there; HubError when it cannot be had."""
    token = _token(settings)
    token_from = (f"spec.model.hub.credentials_secret {settings.credentials_secret!r}" if token
                  else "HF_TOKEN, or none")
    common = {"repo_id": source.repo, "cache_dir": cache_dir(), "token": token, "local_files_only": offline(),
              "endpoint": os.environ.get("HF_ENDPOINT") or None}
    try:
        first = Path(snapshot_download(revision=source.revision, allow_patterns=_INDEX_FILES, **common))
        patterns = _patterns(first, wants)
        path = first if not patterns else Path(snapshot_download(
            revision=first.name, allow_patterns=patterns, ignore_patterns=_VARIANTS, **common))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as exc:
        raise _failure(source, exc, token_from) from None
    log.info("%s: commit %s in %s", source, path.name, path)
    return Snapshot(source, path.name, path)
