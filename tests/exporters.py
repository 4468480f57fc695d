"""Real scrapes of every Prometheus exporter sdray has, for tests/test_metrics.py (``promtool check metrics``)
and tests/test_dashboard.py (the names the dashboard may query).

- ``scrape_service(tmp)``: ``BusyService``: ``create_app`` under uvicorn (real HTTP) with the dry-run backend
  and a pretend cluster. Two tenants submit jobs (one runs, one queues behind it), one document fails
  validation and one the tenant policy; each running job's driver posts its progress through the driver's
  own ``ProgressReporter``, with every field the training loop sets (``gpu_memory_bytes`` included, which
  only a GPU run reports), and a checkpoint; the first job ends and the queued one starts. The training
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


class BusyService:
    """The service with two tenants' jobs on a pretend cluster of 2 CPUs and 1 GPU: alice's GPU job runs at
    once, bob's CPU job queues behind it; a document fails validation, one the tenant policy, a read 404s.
    ``start()`` leaves alice's job running with its driver's progress posted; ``second()`` ends it, so bob's
    starts (its queue wait observed), and posts bob's progress. ``stop()`` stops the service."""

    def __init__(self, tmp: Path):
        tmp.mkdir(parents=True, exist_ok=True)
        self.tmp = tmp
        tokens = tmp / "tokens.json"
        made = {name: create_token(tokens, name) for name in ("alice", "bob")}
        self.backend = DryRunBackend(hold=True, capacity={"CPU": 2, "GPU": 1})  # one 1-worker job at a time
        self.svc = ThreadedService(tmp, self.backend, tokens)
        self.alice, self.bob = self.svc.client(made["alice"]), self.svc.client(made["bob"])

    def _doc(self, name: str, **spec) -> dict:
        return make_job(name, self.tmp / "out" / name, str(self.tmp / "data"), **spec)

    def _submit(self, client, name: str, **spec) -> str:
        response = client.post("/v1/jobs", json=self._doc(name, **spec))
        assert response.status_code == 201, response.text
        return response.json()["id"]

    def _report(self, client, job_id: str, progress: Progress) -> str:
        """Wait for the job to run, post ``progress`` as its driver does; the backend's handle of the job."""
        job = wait_for(lambda: (j := client.get(f"/v1/jobs/{job_id}").json())["state"] == "Running" and j, 30,
                       f"job {job_id} to run")
        env = self.backend.env[job["backend_handle"]]
        reporter = ProgressReporter(env["SDRAY_PROGRESS_URL"], env["SDRAY_PROGRESS_TOKEN"], min_interval_s=0)
        try:
            reporter(progress, final=True)
        finally:
            reporter.close()
        assert client.get(f"/v1/jobs/{job_id}").json()["step"] == progress.step
        return job["backend_handle"]

    def start(self) -> BusyService:
        self.first = self._submit(self.alice, "digits", distributed={"use_gpu": True})
        self.second_id = self._submit(self.bob, "queued")
        assert self.alice.post("/v1/validate", json=self._doc("bad", train={"learning_rate": -1})).status_code == 422
        refused = self.alice.post("/v1/jobs", json=self._doc("refused", cluster={"image": "attacker/miner"}))
        assert refused.status_code == 403, refused.text
        assert self.alice.get("/v1/jobs/no-such-job").status_code == 404
        self.first_handle = self._report(self.alice, self.first, FULL_PROGRESS)
        return self

    def second(self) -> None:
        self.backend.finish(self.first_handle)  # alice's ends; bob's, queued until now, starts
        self._report(self.bob, self.second_id, FULL_PROGRESS.updated(step=40, gpu_memory_bytes=None))

    def scrape(self) -> str:
        response = httpx.get(self.svc.url + "/metrics")
        assert response.status_code == 200
        return response.text

    def stop(self) -> None:
        self.svc.stop()


def scrape_service(tmp: Path) -> str:
    service = BusyService(tmp).start()
    try:
        service.second()
        return service.scrape()
    finally:
        service.stop()


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

