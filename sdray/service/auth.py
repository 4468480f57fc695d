"""Bearer tokens, tenants, roles and quotas, from one tokens file.

``sdray token create`` prints a new token once and stores only its SHA-256. Tokens are 32 random bytes,
so a fast hash is enough (no password stretching needed: there is nothing to guess). The file also holds
per-tenant quotas::

    {"tokens": [{"id": "…", "sha256": "…", "tenant": "alice", "role": "user", "created": "…"}],
     "quotas": {"default": {"max_concurrent_jobs": 4, "max_workers": 8, "max_gpus": 8},
                "alice": {"max_concurrent_jobs": 1}}}
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

TENANT_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
log = logging.getLogger("sdray.service")


class AuthFileError(ValueError):
    """The tokens file cannot be used; the message names the file and the problem."""


class Quota(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_concurrent_jobs: int | None = Field(default=None, ge=0, description="Pending plus running jobs.")
    max_workers: int | None = Field(default=None, ge=0, description="Workers of all running and pending jobs.")
    max_gpus: int | None = Field(default=None, ge=0, description="GPUs of all running and pending jobs.")


class TokenEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    tenant: str = Field(pattern=TENANT_PATTERN, max_length=63)
    role: str = Field(default="user", pattern=r"^(user|admin)$")
    created: str | None = None


class TokensFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tokens: list[TokenEntry] = Field(default_factory=list)
    quotas: dict[str, Quota] = Field(default_factory=dict)


@dataclass(frozen=True)
class Principal:
    tenant: str
    role: str
    token_id: str

    @property
    def admin(self) -> bool:
        return self.role == "admin"


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def load_tokens(path: str | Path) -> TokensFile:
    path = Path(path)
    if not path.exists():
        return TokensFile()
    try:
        return TokensFile.model_validate(json.loads(path.read_text()))
    except json.JSONDecodeError as exc:
        raise AuthFileError(f"{path}: not valid JSON: {exc}") from None
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise AuthFileError(f"{path}: {where}: {first['msg']}") from None


def create_token(path: str | Path, tenant: str, role: str = "user") -> str:
    """Add a token for ``tenant`` to the file (created if missing, rewritten atomically, mode 600) and
    return it: the only time it is shown."""
    if not re.fullmatch(TENANT_PATTERN, tenant) or len(tenant) > 63:
        raise AuthFileError(f"--tenant: expected a DNS-1123 label (lower-case letters, digits, '-'), got {tenant!r}")
    if role not in ("user", "admin"):
        raise AuthFileError(f"--role: expected user or admin, got {role!r}")
    path = Path(path)
    data = load_tokens(path)
    token_id = secrets.token_hex(4)
    token = f"sdr_{token_id}_{secrets.token_urlsafe(32)}"
    data.tokens.append(TokenEntry(id=token_id, sha256=hash_token(token), tenant=tenant, role=role,
                                  created=datetime.now(timezone.utc).isoformat(timespec="seconds")))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(data.model_dump_json(indent=2, exclude_none=True))
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
    return token


class Authenticator:
    """Maps a bearer token to its tenant and role; reads the tokens file again when it changes."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._mtime: float | None = None
        self._by_hash: dict[str, TokenEntry] = {}
        self._quotas: dict[str, Quota] = {}
        self._loaded = False
        self._reload()

    def _reload(self) -> None:
        """Read the file again when it changed. A file that no longer parses (half written, edited by hand)
        keeps the tokens read last, and the problem is logged once per change: requests keep working."""
        try:
            mtime = self.path.stat().st_mtime if self.path.exists() else None
        except OSError:
            return
        if self._loaded and mtime == self._mtime:
            return
        try:
            data = load_tokens(self.path)
        except AuthFileError as exc:
            if not self._loaded:
                raise  # at start: refuse to run on a broken file
            log.error("%s; keeping the tokens and quotas read before", exc)
            self._mtime = mtime
            return
        self._by_hash = {t.sha256: t for t in data.tokens}
        self._quotas = data.quotas
        self._mtime = mtime
        self._loaded = True

    def principal(self, authorization: str | None) -> Principal | None:
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():  # RFC 7235: the scheme is case-insensitive
            return None
        self._reload()
        entry = self._by_hash.get(hash_token(token.strip()))
        return Principal(entry.tenant, entry.role, entry.id) if entry else None

    def quota(self, tenant: str) -> Quota:
        self._reload()
        default = self._quotas.get("default", Quota())
        own = self._quotas.get(tenant, Quota())
        return default.model_copy(update=own.model_dump(exclude_none=True))
