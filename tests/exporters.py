"""Real scrapes of every Prometheus exporter sdray has, for tests/test_metrics.py (``promtool check metrics``)
and tests/test_dashboard.py (the names the dashboard may query).

- ``scrape_service(tmp)``: ``create_app`` under uvicorn (real HTTP) with the dry-run backend and a 2-CPU
  pretend cluster. Two tenants submit jobs (one runs, one queues behind it), one document fails validation
  and one the tenant policy; the running job's driver posts its progress through the driver's own
  ``ProgressReporter``, with every field the training loop sets (``gpu_memory_bytes`` included, which only a
  GPU run reports), and a checkpoint; then the first job ends and the queued one starts. The training
  metrics are exported by the service from those posts: that is sdray's training exporter.
- ``scrape_controller()``: a ``Controller`` against the fake API server (tests/fake_kube.py), one
  DiffusionJob reconciled after one failed API call, ``/metrics`` read from ``serve_health`` over HTTP.

Each returns the exposition text as Prometheus reads it.
"""

from __future__ import annotations

import urllib.request
from pathlib import Path

import httpx
from k8s_cluster import NS, running, submit
from service_helpers import ThreadedService, free_port

from conftest import make_job, wait_for
from fake_kube import FakeKube
from sdray.k8s.controller import serve_health
from sdray.k8s.kube import Clients
from sdray.progress import Progress
from sdray.service.auth import create_token
from sdray.service.backends.dryrun import DryRunBackend
from sdray.service.progress import ProgressReporter

_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))

# What rank 0 tells its driver during a run (sdray/train/loop.py: the logged window, a checkpoint, the
# validation loss, the peak GPU memory on a GPU).
FULL_PROGRESS = Progress(
    step=120, max_steps=400, epoch=3, loss=0.21, val_loss=0.24, lr=8e-4, images_per_s=512.0, step_s=0.125,
    data_wait_s=0.6, data_wait_share=0.12, images_seen=3840, elapsed_s=15.0, gpu_memory_bytes=3 << 30,
    skipped_images=2, checkpoint_step=100, checkpoint_s=1.5, curve={"loss": [(115, 0.22), (120, 0.21)]})


def scrape_service(tmp: Path) -> str:
    tmp.mkdir(parents=True, exist_ok=True)
    tokens = tmp / "tokens.json"
    made = {name: create_token(tokens, name) for name in ("alice", "bob")}
    backend = DryRunBackend(hold=True, capacity={"CPU": 2, "GPU": 0})  # one 1-worker job at a time
    svc = ThreadedService(tmp, backend, tokens)
    try:
        alice, bob = svc.client(made["alice"]), svc.client(made["bob"])

        def doc(name: str, **spec) -> dict:
            return make_job(name, tmp / "out" / name, str(tmp / "data"), **spec)

        first = alice.post("/v1/jobs", json=doc("digits"))
        assert first.status_code == 201, first.text
        second = bob.post("/v1/jobs", json=doc("queued"))
        assert second.status_code == 201, second.text
        assert alice.post("/v1/validate", json=doc("bad", train={"learning_rate": -1})).status_code == 422
        assert alice.post("/v1/jobs", json=doc("refused", cluster={"image": "attacker/miner"})).status_code == 403
        assert alice.get("/v1/jobs/no-such-job").status_code == 404

        job_id = first.json()["id"]
        job = wait_for(lambda: (j := alice.get(f"/v1/jobs/{job_id}").json())["state"] == "running" and j, 30,
                       "the first job to run")
        env = backend.env[job["backend_handle"]]
        reporter = ProgressReporter(env["SDRAY_PROGRESS_URL"], env["SDRAY_PROGRESS_TOKEN"], min_interval_s=0)
        try:
            reporter(FULL_PROGRESS, final=True)
        finally:
            reporter.close()
        assert alice.get(f"/v1/jobs/{job_id}").json()["step"] == FULL_PROGRESS.step

        backend.finish(job["backend_handle"])  # the first ends; bob's job, queued until now, starts
        wait_for(lambda: bob.get(f"/v1/jobs/{second.json()['id']}").json()["state"] == "running", 30,
                 "the queued job to start")
        response = httpx.get(svc.url + "/metrics")
        assert response.status_code == 200
        return response.text
    finally:
        svc.stop()


def scrape_controller() -> str:
    kube = FakeKube().start()
    user = Clients.connect(host=kube.url, user_agent="kubectl")
    try:
        kube.fail("POST", "rayjobs", code=500, times=1)  # one reconcile fails and is retried
        with running(kube) as ctl:
            port = free_port()
            server = serve_health(ctl, port, host="127.0.0.1")
            try:
                submit(user, "digits")
                kube.wait(lambda: kube.get("rayjobs", NS, "digits"), 10, "the RayJob after one error")
                with _NO_PROXY.open(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
                    assert response.status == 200
                    return response.read().decode()
            finally:
                server.shutdown()
                server.server_close()
    finally:
        user.close()
        kube.stop()


def sample_names(text: str) -> dict[str, str]:
    """{sample name: its family's type} of an exposition (``foo_bucket`` → histogram, ``foo_total`` →
    counter …), parsed by prometheus_client's own parser."""
    from prometheus_client.parser import text_string_to_metric_families

    return {sample.name: family.type for family in text_string_to_metric_families(text) for sample in family.samples}

