"""Test helpers for the external tools some tests run for real: Debian's `prometheus`/`promtool` and
`chromium`.

Import from a test module as ``from tools import require_binary, start_prometheus`` (tests/ is not a
package; pytest's default "prepend" import mode puts tests/ on sys.path, as for conftest.py).

- ``require_binary(name) -> str``: the binary's path, or skip the test with the apt-get command that
  installs it; with ``SDRAY_REQUIRE_TOOLS=1`` in the environment (CI: .ci/run) a missing tool FAILS the
  test instead, so CI never skips silently.
- ``start_prometheus(tmp_path, targets, scrape_interval="1s", ...) -> Prometheus``: a real Prometheus on
  127.0.0.1 (free port) scraping ``targets`` ("127.0.0.1:PORT", path /metrics), ready to query. Stop it
  with ``.stop()`` (or use it as a context manager)::

      prom = start_prometheus(tmp_path, [f"127.0.0.1:{port}"])
      try:
          rows = prom.wait_for('sdray_train_step{job_id="%s"}' % job_id, timeout=60)
          assert rows[0]["metric"]["tenant"] == "acme"
      finally:
          prom.stop()
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from conftest import wait_for
from sdray.processes import stop_process

# The Debian package that brings each binary.
DEBIAN_PACKAGES = {"prometheus": "prometheus", "promtool": "prometheus", "chromium": "chromium"}

REQUIRE_ENV = "SDRAY_REQUIRE_TOOLS"

# Talks to 127.0.0.1 only: never through an http_proxy from the environment.
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def require_binary(name: str) -> str:
    """Return the path of executable ``name`` on PATH. When it is missing: skip the calling test (or module,
    if called at import time) with the command that installs it, or fail if ``SDRAY_REQUIRE_TOOLS=1``."""
    path = shutil.which(name)
    if path:
        return path
    package = DEBIAN_PACKAGES.get(name, name)
    message = (f"`{name}` is not installed; install it with: "
               f"sudo apt-get install -y --no-install-recommends {package}")
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{message} ({REQUIRE_ENV}=1: required tools must not be skipped)", pytrace=False)
    pytest.skip(message, allow_module_level=True)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrometheusError(AssertionError):
    """Prometheus did not start, answered an error, or a wait timed out (message includes its log tail)."""


class Prometheus:
    """A running Prometheus process started by :func:`start_prometheus`."""

    def __init__(self, proc: subprocess.Popen, port: int, workdir: Path, log_path: Path):
        self.proc = proc
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.workdir = workdir
        self.log_path = log_path

    # --- HTTP API ------------------------------------------------------------------------------------
    def api(self, path: str, params: dict | None = None, timeout: float = 10.0):
        """GET ``/api/v1/<path>`` and return its ``data`` (raises PrometheusError on an API error)."""
        url = f"{self.url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with _HTTP.open(url, timeout=timeout) as resp:
                body = json.load(resp)
        except urllib.error.HTTPError as e:  # 400/422: bad PromQL etc., with a JSON error body
            try:
                body = json.load(e)
            except ValueError:
                raise PrometheusError(f"GET {url}: HTTP {e.code}\n{self.log_tail()}") from e
        if body.get("status") != "success":
            raise PrometheusError(f"GET {url}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, promql: str) -> list[dict]:
        """Evaluate an instant query now: the result list, each ``{"metric": {labels}, "value": [ts, "v"]}``
        (a scalar or string result comes back as one such dict with empty labels)."""
        data = self.api("query", {"query": promql})
        if data["resultType"] in ("vector", "matrix"):
            return data["result"]
        return [{"metric": {}, "value": data["result"]}]

    def wait_for(self, promql: str, timeout: float = 30.0, interval: float = 0.25) -> list[dict]:
        """Poll ``query(promql)`` until it returns a non-empty result and return it; on timeout raise
        PrometheusError with the last result, the scrape targets' health and the Prometheus log tail."""
        def result() -> list[dict]:
            found = self.query(promql)
            if not found:
                self._check_alive(f"waiting for {promql!r}")
            return found

        return wait_for(result, timeout, f"a result for {promql!r}", interval=interval,
                        timed_out=lambda: PrometheusError(f"no result for {promql!r} within {timeout:g} s\n"
                                                          f"targets: {self.targets_summary()}\n{self.log_tail()}"))

    def alerts(self) -> list[dict]:
        """The alerts Prometheus currently holds (pending and firing), from ``/api/v1/alerts``."""
        return self.api("alerts")["alerts"]

    def targets_summary(self) -> list[dict]:
        """Each active scrape target's URL, health and last error (for failure messages)."""
        try:
            targets = self.api("targets")["activeTargets"]
        except Exception as e:  # noqa: BLE001 - diagnostics only
            return [{"error": repr(e)}]
        return [{"url": t.get("scrapeUrl"), "health": t.get("health"), "lastError": t.get("lastError")}
                for t in targets]

    # --- process -------------------------------------------------------------------------------------
    def log_tail(self, chars: int = 3000) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no prometheus log)"
        return "prometheus log (tail):\n" + text[-chars:]

    def _check_alive(self, what: str) -> None:
        if self.proc.poll() is not None:
            raise PrometheusError(f"prometheus exited ({self.proc.returncode}) while {what}\n{self.log_tail()}")

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the process by PID, SIGKILL it if it has not exited after ``timeout`` s. Idempotent."""
        stop_process(self.proc, grace_s=timeout)

    def __enter__(self) -> "Prometheus":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def write_config(path: Path, targets: list[str], scrape_interval: str = "1s", job_name: str = "sdray",
                 rule_files: list[str | Path] = ()) -> Path:
    """Write a Prometheus config scraping ``targets`` on /metrics under ``job_name``."""
    config = {
        "global": {"scrape_interval": scrape_interval, "evaluation_interval": scrape_interval},
        "scrape_configs": [{
            "job_name": job_name,
            "metrics_path": "/metrics",
            "static_configs": [{"targets": list(targets)}],
        }],
    }
    if rule_files:
        config["rule_files"] = [str(Path(f).resolve()) for f in rule_files]
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def start_prometheus(tmp_path: Path, targets: list[str], scrape_interval: str = "1s", *,
                     job_name: str = "sdray", rule_files: list[str | Path] = (),
                     ready_timeout: float = 30.0) -> Prometheus:
    """Start a real Prometheus on 127.0.0.1 (a free port) scraping ``targets`` ("HOST:PORT", /metrics)
    every ``scrape_interval``, its config, data and log under ``tmp_path/prometheus``; return it once
    ``/-/ready`` answers 200. ``rule_files`` (e.g. examples/alerts.yml) are loaded and evaluated every
    ``scrape_interval``. Skips (or fails, see :func:`require_binary`) when prometheus is not installed."""
    binary = require_binary("prometheus")
    workdir = Path(tmp_path) / "prometheus"
    workdir.mkdir(parents=True, exist_ok=True)
    config = write_config(workdir / "prometheus.yml", targets, scrape_interval, job_name, rule_files)
    log_path = workdir / "prometheus.log"
    last_error = ""
    for _attempt in range(3):  # a free port can be taken between choosing it and binding it: retry
        port = free_port()
        with open(log_path, "wb") as log:  # this attempt's log only
            proc = subprocess.Popen(
                [binary, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
                 f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn",
                 "--storage.tsdb.retention.time=1h"],
                cwd=workdir, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)
        prom = Prometheus(proc, port, workdir, log_path)
        try:
            _wait_ready(prom, ready_timeout)
            return prom
        except PrometheusError as e:
            prom.stop()
            last_error = str(e)
            if "address already in use" not in last_error:
                raise
    raise PrometheusError(f"prometheus could not bind a port after 3 tries\n{last_error}")


def _wait_ready(prom: Prometheus, timeout: float) -> None:
    def ready() -> bool:
        prom._check_alive("starting")
        try:
            with _HTTP.open(f"{prom.url}/-/ready", timeout=2) as resp:
                return resp.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False  # not listening yet, or 503 while it starts

    wait_for(ready, timeout, f"prometheus at {prom.url}", interval=0.1,
             timed_out=lambda: PrometheusError(f"prometheus not ready at {prom.url} within {timeout:g} s\n"
                                               f"{prom.log_tail()}"))
