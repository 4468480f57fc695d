"""A job driver's side of the service: post rank 0's progress (``sdray.progress.Progress``) and the latest
sample grid to the service.

The service starts each driver with ``SDRAY_PROGRESS_URL`` (``…/internal/v1/jobs/<id>``) and a token good
for that job only. Reports are best effort: a service that is down or restarting loses a few updates,
never the training. Posts are at most one a second, except the last one.
"""

from __future__ import annotations

import logging
import math
import os
import time

import httpx

from sdray import storage
from sdray.progress import Progress
from sdray.spec import S3Settings

log = logging.getLogger("sdray.progress")


class ProgressReporter:
    def __init__(self, url: str, token: str, s3: S3Settings | None = None, min_interval_s: float = 1.0,
                 final_patience_s: float = 120.0):
        self.url = url.rstrip("/")
        self.s3 = s3
        self.min_interval_s = min_interval_s
        self.final_patience_s = final_patience_s
        self._client = httpx.Client(headers={"Authorization": f"Bearer {token}"}, timeout=10.0)
        self._last_post = -math.inf
        self._sample: str | None = None
        # Loss-curve points not yet delivered: kept until a post succeeds, so neither the rate limit nor a
        # restarting service loses a point.
        self._curve: dict[str, dict[int, float]] = {}

    @classmethod
    def from_env(cls, s3: S3Settings | None = None) -> ProgressReporter | None:
        url, token = os.environ.get("SDRAY_PROGRESS_URL"), os.environ.get("SDRAY_PROGRESS_TOKEN")
        return cls(url, token, s3) if url and token else None

    def __call__(self, progress: Progress, final: bool = False) -> None:
        for name, points in progress.curve_points().items():
            self._curve.setdefault(name, {}).update(points)
        now = time.monotonic()
        if not final and now - self._last_post < self.min_interval_s:
            return
        self._last_post = now
        body = progress.updated(curve={k: sorted(v.items()) for k, v in self._curve.items()}).to_payload()
        if self._post("POST", "/progress", json=body, retry_for_s=self.final_patience_s if final else 0.0):
            self._curve.clear()
        sample = progress.sample
        if sample is not None and sample != self._sample:
            try:
                png = storage.read_bytes(sample, self.s3)
            except Exception as exc:  # a sample the service misses is not worth failing the run for
                log.warning("cannot read sample grid %s: %s", sample, exc)
                return
            if self._post("PUT", "/samples/latest.png", content=png, headers={"Content-Type": "image/png"},
                          retry_for_s=self.final_patience_s if final else 0.0):
                self._sample = sample

    def _post(self, method: str, path: str, retry_for_s: float = 0.0, **kwargs) -> bool:
        """One request; the last report of a run is retried with backoff for ``retry_for_s`` seconds, so
        a service that is restarting when the run ends still learns how it ended."""
        deadline, pause = time.monotonic() + retry_for_s, 0.5
        while True:
            try:
                response = self._client.request(method, self.url + path, **kwargs)
            except httpx.HTTPError as exc:
                log.warning("progress report to %s failed: %s", self.url, exc)
            else:
                if response.status_code < 300:
                    return True
                log.warning("progress report to %s refused: %s %s", self.url, response.status_code,
                            response.text[:200])
                if response.status_code < 500:
                    return False  # refused for good (a wrong token): retrying changes nothing
            if time.monotonic() + pause > deadline:
                return False
            time.sleep(pause)  # backoff between retries of a report, not synchronisation
            pause = min(pause * 2, 8.0)

    def close(self) -> None:
        self._client.close()
