"""Running the sdray service for tests: in a thread of the test process (real HTTP on 127.0.0.1) or as
its own ``sdray serve`` process (for tests that restart it)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest
import uvicorn

from conftest import wait_for
from sdray.processes import stop_process
from sdray.service.app import Settings, create_app
from sdray.service.auth import create_token


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def policy_for_tests(tmp: Path) -> Path:
    """A tenant policy that lets every tenant use local paths under this test session's temporary root
    (the built-in default allows none); tests of the policy itself write their own."""
    path = tmp / "policy.yaml"
    if not path.exists():
        path.write_text(f"default:\n  local_paths: [{tmp_root(tmp)}]\n")
    return path


def tmp_root(tmp: Path) -> Path:
    """pytest's base temporary directory of this session (every tmp_path is under it)."""
    tmp = tmp.resolve()
    return next((p for p in tmp.parents if p.name.startswith("pytest-") and p.parent.name.startswith("pytest-of")),
                tmp.parent)


@pytest.fixture
def tokens(tmp_path) -> tuple[Path, dict[str, str]]:
    """A tokens file with tenants alice and bob and an admin (tenant ops): (its path, {name: token})."""
    path = tmp_path / "tokens.json"
    made = {name: create_token(path, name) for name in ("alice", "bob")}
    made["root"] = create_token(path, "ops", role="admin")
    return path, made


class ThreadedService:
    """``create_app`` served by uvicorn in a thread; ``stop()`` shuts it down (its background loop too)."""

    def __init__(self, tmp: Path, backend, tokens: Path, poll_interval_s: float = 0.2, db: Path | None = None,
                 policy: Path | None = None, port: int | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.backend = backend
        settings = Settings(tokens=tokens, db=db or tmp / "jobs.db", public_url=self.url,
                            poll_interval_s=poll_interval_s, policy=policy or policy_for_tests(tmp))
        self.app = create_app(settings, backend)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    access_log=False, timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        wait_for(lambda: self.server.started, 30, "the service to start")

    @property
    def manager(self):
        return self.app.state.manager

    def client(self, token: str | None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


class ServiceProcess:
    """``sdray serve`` as its own process (stopped with SIGTERM, by PID)."""

    def __init__(self, tmp: Path, tokens: Path, *args: str, port: int | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp / f"serve-{self.port}.log"
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sdray.cli", "serve", "--port", str(self.port), "--tokens", str(tokens),
             "--db", str(tmp / "jobs.db"), "--poll-interval", "0.5", "--policy", str(policy_for_tests(tmp)), *args],
            stdout=subprocess.DEVNULL, stderr=open(self.log, "wb"), env=env, start_new_session=True)
        wait_for(self._up, 60, f"sdray serve on {self.url} (log: {self.log})", proc=self.proc)

    def _up(self) -> bool:
        try:
            return httpx.get(self.url + "/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        stop_process(self.proc, grace_s=30)
