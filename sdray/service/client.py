"""The HTTP client behind ``sdray submit``, ``jobs``, ``status``, ``logs`` and ``cancel``.

Server and token come from ``--server``/``SDRAY_SERVER`` and ``SDRAY_TOKEN``, else from the config file
(``$SDRAY_CONFIG``, default ``~/.config/sdray/client.yaml``: ``server: http://…`` and ``token: sdr_…``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import yaml

from sdray.states import FINAL

DEFAULT_SERVER = "http://127.0.0.1:8000"
# A followed log's answer says where in the whole log its first character is, so that a follower cut off by
# a restart of the service asks for the rest (``?offset=``) and prints no line twice.
LOG_OFFSET = "X-Sdray-Log-Offset"
# How long ``follow_logs`` keeps trying to reach a service that went away (a restart takes seconds).
RECONNECT_S = 120.0


class ClientError(RuntimeError):
    """The server refused or could not be reached; the message is the server's own explanation."""

    def __init__(self, message: str, status: int | None = None, errors: list[str] | None = None):
        super().__init__(message)
        self.status = status
        self.errors = errors or []


def config_path() -> Path:
    return Path(os.environ.get("SDRAY_CONFIG", Path.home() / ".config" / "sdray" / "client.yaml"))


def load_config() -> dict:
    path = config_path()
    if not path.exists():
        return {}
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ClientError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ClientError(f"{path}: expected a mapping with server and token")
    return data


class Client:
    def __init__(self, server: str | None = None, token: str | None = None, timeout: float = 30.0):
        config = load_config()
        self.server = (server or os.environ.get("SDRAY_SERVER") or config.get("server") or DEFAULT_SERVER).rstrip("/")
        token = token or os.environ.get("SDRAY_TOKEN") or config.get("token")
        if not token:
            raise ClientError(f"no token: set SDRAY_TOKEN or put `token:` in {config_path()} "
                              "(an operator makes one with `sdray token create --tenant NAME`)")
        self._http = httpx.Client(base_url=self.server, headers={"Authorization": f"Bearer {token}"}, timeout=timeout)

    def _call(self, method: str, path: str, **kwargs) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise ClientError(f"cannot reach the sdray service at {self.server}: {exc}") from None
        if response.status_code >= 400:
            try:
                body = response.json()
            except ValueError:
                body = {"detail": response.text.strip()}
            raise ClientError(f"{response.status_code}: {body.get('detail', body)}", response.status_code,
                              body.get("text"))
        return response

    def submit(self, path: Path) -> dict:
        text = path.read_bytes()
        ctype = "application/json" if path.suffix == ".json" else "application/yaml"
        return self._call("POST", "/v1/jobs", content=text, headers={"Content-Type": ctype}).json()

    def validate(self, path: Path) -> dict:
        ctype = "application/json" if path.suffix == ".json" else "application/yaml"
        return self._call("POST", "/v1/validate", content=path.read_bytes(), headers={"Content-Type": ctype}).json()

    def jobs(self, states: list[str] = (), labels: list[str] = (), limit: int = 50) -> list[dict]:
        """Every matching job, following the pages."""
        out, token = [], None
        while True:
            params = {"state": list(states), "label": list(labels), "limit": limit}
            if token:
                params["page_token"] = token
            page = self._call("GET", "/v1/jobs", params=params).json()
            out.extend(page["jobs"])
            token = page.get("next_page_token")
            if not token:
                return out

    def status(self, job_id: str) -> dict:
        return self._call("GET", f"/v1/jobs/{job_id}").json()

    def cancel(self, job_id: str) -> dict:
        return self._call("DELETE", f"/v1/jobs/{job_id}").json()

    def logs(self, job_id: str, tail: int | None = None) -> str:
        params = {} if tail is None else {"tail": tail}
        return self._call("GET", f"/v1/jobs/{job_id}/logs", params=params).text

    def follow_logs(self, job_id: str, tail: int | None = None, reconnect_s: float = RECONNECT_S,
                    on_reconnect: Callable[[str], None] | None = None) -> Iterator[str]:
        """The job's log as it grows, until the job ends. A stream cut off while the job runs (the service
        restarted) is opened again after the characters already received; ``on_reconnect`` hears why. Raises
        ClientError when the service stays unreachable for ``reconnect_s`` seconds."""
        offset: int | None = None  # where in the whole log the next character is, once an answer said
        lost_since: float | None = None
        while True:
            params: dict = {"follow": "true"}
            if offset is not None:
                params["offset"] = offset
            elif tail is not None:
                params["tail"] = tail
            try:
                with self._http.stream("GET", f"/v1/jobs/{job_id}/logs", params=params, timeout=None) as r:
                    if r.status_code >= 400:
                        r.read()
                        raise ClientError(f"{r.status_code}: {r.json().get('detail')}", r.status_code)
                    lost_since = None
                    offset = int(r.headers.get(LOG_OFFSET, 0))
                    for text in r.iter_text():
                        offset += len(text)
                        yield text
                if self.status(job_id)["state"] in FINAL:
                    return
                # The stream ended before the job did: the service is stopping. Open it again.
            except (httpx.HTTPError, ClientError) as exc:
                if isinstance(exc, ClientError) and exc.status is not None and exc.status < 500:
                    raise
                why = f"lost the log stream from {self.server}: {exc}"
                lost_since = lost_since or time.monotonic()
                if time.monotonic() - lost_since > reconnect_s:
                    raise ClientError(f"{why} (still unreachable after {reconnect_s:.0f} s)") from None
                if on_reconnect is not None:
                    on_reconnect(why)
            time.sleep(1.0)  # a restarting service: try again in a second
