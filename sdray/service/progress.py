"""A job driver's side of the service: post rank 0's progress and the latest sample grid to the service.

The service starts each driver with ``SDRAY_PROGRESS_URL`` (``…/internal/v1/jobs/<id>``) and a token good
for that job only. Reports are best effort: a service that is down or restarting loses a few updates,
never the training. Posts are at most one a second, except the last one.
"""

from __future__ import annotations

import json
import logging
import os
import time

import httpx

from sdray import storage
from sdray.spec import S3Settings

log = logging.getLogger("sdray.progress")


class ProgressReporter:
    def __init__(self, url: str, token: str, s3: S3Settings | None = None, min_interval_s: float = 1.0):
        self.url = url.rstrip("/")
        self.s3 = s3
        self.min_interval_s = min_interval_s
        self._client = httpx.Client(headers={"Authorization": f"Bearer {token}"}, timeout=10.0)
        self._last_post = 0.0
        self._sample: str | None = None
        # Loss-curve points not yet delivered: kept until a post succeeds, so neither the rate limit nor a
        # restarting service loses a point.
        self._curve: dict[str, dict[int, float]] = {}

    @classmethod
    def from_env(cls, s3: S3Settings | None = None) -> ProgressReporter | None:
        url, token = os.environ.get("SDRAY_PROGRESS_URL"), os.environ.get("SDRAY_PROGRESS_TOKEN")
        return cls(url, token, s3) if url and token else None

    def __call__(self, metrics: dict, final: bool = False) -> None:
        for name, step, value in metrics.get("recent_curve", ()):
            self._curve.setdefault(name, {})[int(step)] = float(value)
        now = time.monotonic()
        if not final and now - self._last_post < self.min_interval_s:
            return
        self._last_post = now
        body = json.loads(json.dumps({k: v for k, v in metrics.items() if k != "recent_curve"}, default=str))
        body["curve"] = {k: sorted(v.items()) for k, v in self._curve.items()}
        if self._post("POST", "/progress", json=body):
            self._curve.clear()
        sample = metrics.get("sample")
        if isinstance(sample, str) and sample != self._sample:
            try:
                png = storage.read_bytes(sample, self.s3)
            except Exception as exc:  # a sample the service misses is not worth failing the run for
                log.warning("cannot read sample grid %s: %s", sample, exc)
                return
            if self._post("PUT", "/samples/latest.png", content=png, headers={"Content-Type": "image/png"}):
                self._sample = sample

    def _post(self, method: str, path: str, **kwargs) -> bool:
        try:
            response = self._client.request(method, self.url + path, **kwargs)
        except httpx.HTTPError as exc:
            log.warning("progress report to %s failed: %s", self.url, exc)
            return False
        if response.status_code >= 300:
            log.warning("progress report to %s refused: %s %s", self.url, response.status_code, response.text[:200])
        return response.status_code < 300

    def close(self) -> None:
        self._client.close()
