"""The page at ``/`` in headless Chromium (Debian's ``chromium``), against the service over real HTTP with the
dry-run backend: the job row, its sample grid (fetched with the token, shown through a blob: URL), the loss
curve, a search's trials, and the token form when there is no token or a refused one. A screenshot check
finds the sample's magenta block on the rendered page."""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from conftest import make_job, wait_for
from service_helpers import ThreadedService
from sdray.service.auth import create_token
from sdray.service.backends.dryrun import DryRunBackend
from tools import require_binary

MAGENTA = (255, 0, 255)
CHROMIUM_TIMEOUT_S = 60


def chromium(binary: str, profile: Path, url: str, *args: str) -> str:
    """Run headless Chromium on ``url`` with a fresh profile; return its stdout. Killed (its whole process
    group, by its id) if it outlives ``CHROMIUM_TIMEOUT_S``."""
    cmd = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", "--no-default-browser-check",
           "--no-proxy-server", "--disable-dev-shm-usage", f"--user-data-dir={profile}",
           "--window-size=1280,900", "--virtual-time-budget=10000", *args, url]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=CHROMIUM_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=30)
        raise AssertionError(f"chromium did not finish within {CHROMIUM_TIMEOUT_S} s: {' '.join(cmd)}") from None
    assert proc.returncode == 0, f"chromium exited {proc.returncode}: {err.decode(errors='replace')[-2000:]}"
    return out.decode(errors="replace")


def png(color: tuple[int, int, int], size: int = 64) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def browser() -> str:
    return require_binary("chromium")


@pytest.fixture
def page(tmp_path, browser):
    """A service holding one running training job with progress, a loss curve and a magenta sample grid, and
    an older running search with two trials; yields (service, token, train job id, search job id)."""
    tokens = tmp_path / "tokens.json"
    token = create_token(tokens, "alice")
    svc = ThreadedService(tmp_path, DryRunBackend(hold=True), tokens)
    try:
        http = svc.client(token)
        search_doc = make_job("page-search", tmp_path / "search", str(tmp_path / "data"),
                              data={"validation_fraction": 0.1})
        search_doc["spec"]["tune"] = {"search_space": {"train.learning_rate": {"grid": [1e-3, 3e-3]}}}
        search = http.post("/v1/jobs", json=search_doc)
        assert search.status_code == 201, search.text
        # Submitted last: the newest running job, which the page shows in detail unless told otherwise.
        train = http.post("/v1/jobs", json=make_job("page-job", tmp_path / "out", str(tmp_path / "data")))
        assert train.status_code == 201, train.text
        train_id, search_id = train.json()["id"], search.json()["id"]
        for job_id in (train_id, search_id):
            wait_for(lambda: http.get(f"/v1/jobs/{job_id}").json()["state"] == "Running", 30, "the job to run")

        def driver(job_id: str) -> tuple[str, httpx.Client]:
            env = svc.backend.env[http.get(f"/v1/jobs/{job_id}").json()["backend_handle"]]
            return env["SDRAY_PROGRESS_URL"], httpx.Client(
                headers={"Authorization": f"Bearer {env['SDRAY_PROGRESS_TOKEN']}"}, timeout=30)

        url, client = driver(train_id)
        r = client.post(url + "/progress", json={"step": 15, "max_steps": 20, "loss": 0.3, "images_per_s": 123.4,
                                                 "curve": {"loss": [[5, 0.9], [10, 0.5], [15, 0.3]],
                                                           "val_loss": [[10, 0.6]]}})
        assert r.status_code == 200, r.text
        assert client.put(url + "/samples/latest.png", content=png(MAGENTA)).status_code == 200
        url, client = driver(search_id)
        trials = [{"trial": "t-0001", "params": {"train.learning_rate": 0.001}, "state": "terminated",
                   "metric": 0.4321, "step": 20},
                  {"trial": "t-0002", "params": {"train.learning_rate": 0.003}, "state": "running",
                   "metric": None, "step": 10}]
        r = client.post(url + "/progress", json={"trials_ended": 1, "trials_total": 2, "best": 0.4321,
                                                 "trials": trials})
        assert r.status_code == 200, r.text
        yield svc, token, train_id, search_id
        server_errors = [line for line in httpx.get(svc.url + "/metrics").text.splitlines()
                         if line.startswith("sdray_http_requests_total") and re.search(r'status="5\d\d"', line)]
        assert not server_errors, server_errors
    finally:
        svc.stop()


def job_row(dom: str, job_id: str) -> str:
    match = re.search(rf'<tr[^>]*data-job-id="{job_id}"[^>]*>.*?</tr>', dom, re.S)
    assert match, f"no row for job {job_id} in the page:\n{dom[-3000:]}"
    return match.group(0)


def test_the_page_shows_the_job_row_curve_and_sample_grid(page, browser, tmp_path):
    svc, token, train_id, search_id = page
    dom = chromium(browser, tmp_path / "profile-dom", f"{svc.url}/#token={token}", "--dump-dom")
    row = job_row(dom, train_id)
    assert "page-job" in row and "Running" in row and "15 / 20" in row and "0.3000" in row
    assert 'class="selected"' in row  # the newest running job is shown in detail
    img = re.search(r'<img[^>]*id="sample"[^>]*>', dom).group(0)
    assert 'data-loaded="true"' in img and 'src="blob:' in img
    assert re.search(r'<svg[^>]*id="chart".*?<path[^>]*d="M', dom, re.S), "no loss curve drawn"
    assert token not in dom  # taken out of the address and not written into the page
    assert "Sign in" in dom and 'id="token-form" class="card"' in dom  # the form is there, not shown

    shot = tmp_path / "page.png"
    chromium(browser, tmp_path / "profile-shot", f"{svc.url}/#token={token}&job={train_id}", f"--screenshot={shot}")
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert pixels.shape == (900, 1280, 3)
    magenta = int((np.abs(pixels - MAGENTA).max(axis=2) <= 10).sum())
    assert magenta >= 1000, f"only {magenta} magenta pixels: the sample grid is not on the screenshot ({shot})"


def test_a_search_shows_its_trials(page, browser, tmp_path):
    svc, token, train_id, search_id = page
    dom = chromium(browser, tmp_path / "profile", f"{svc.url}/#token={token}&job={search_id}", "--dump-dom")
    assert "page-search" in job_row(dom, search_id) and "1 / 2 trials" in job_row(dom, search_id)
    trials = re.search(r'<table id="trials">.*?</table>', dom, re.S).group(0)
    assert "t-0001" in trials and "train.learning_rate=0.001" in trials and "0.4321" in trials
    assert "t-0002" in trials and "running" in trials
    assert "No sample grid yet" in dom  # the search drew none: the placeholder shows


def test_without_a_token_or_with_a_refused_one_the_page_asks_for_one(page, browser, tmp_path):
    svc, token, train_id, search_id = page
    dom = chromium(browser, tmp_path / "profile-none", f"{svc.url}/", "--dump-dom")
    assert 'id="token-form" class="card show"' in dom
    assert "Enter a bearer token" in dom
    assert f'data-job-id="{train_id}"' not in dom
    dom = chromium(browser, tmp_path / "profile-bad", f"{svc.url}/#token=sdr_nope_nope", "--dump-dom")
    assert 'id="token-form" class="card show"' in dom
    assert re.search(r'<div id="banner" class="banner show"[^>]*>[^<]*refused the token \(401\)', dom), dom[-3000:]
    assert f'data-job-id="{train_id}"' not in dom


def test_a_linked_job_older_than_the_newest_200_is_still_shown(page, browser, tmp_path):
    svc, token, train_id, search_id = page
    http = svc.client(token)
    for i in range(199):  # with the training job, the 200 newest jobs the table lists: the search is older
        assert http.post("/v1/jobs", json=make_job(f"filler-{i}", tmp_path / "f", str(tmp_path / "data"))).status_code == 201
    dom = chromium(browser, tmp_path / "profile", f"{svc.url}/#token={token}&job={search_id}", "--dump-dom")
    assert f'data-job-id="{search_id}"' not in dom and f'data-job-id="{train_id}"' in dom
    assert "Showing the 200 newest of 200+ jobs." in dom
    assert re.search(r'id="d-name"[^>]*>page-search<', dom), "the linked search is not the job in detail"
    assert "t-0001" in re.search(r'<table id="trials">.*?</table>', dom, re.S).group(0)
