"""The service across restarts, and a cluster that is still starting: jobs found again in the store and
followed, one submitted but not recorded before the service died adopted (never submitted twice), lost ones
failed with a reason, a followed log that continues; no job refused while the cluster lists no node yet,
and ``/readyz`` not ready until it does.

The local backend runs here against a fake of Ray's job API and node list (``FakeRay``), shared by the
services one after another as a Ray cluster outlives the service; ``test_service_ray.py`` does it for real
(a service SIGKILLed mid-job on the session's Ray cluster, slow).
"""

from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace

import httpx
import pytest

from conftest import make_job, wait_for
from service_helpers import ServiceProcess, ThreadedService, tokens  # noqa: F401
from sdray.service.backends.local import LocalRayBackend
from sdray.service.client import Client
from sdray.service.store import JobStore

FINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class FakeRay:
    """Ray's job submission client and state API node list, as far as the local backend asks them: jobs
    by submission id, their logs, and the nodes the head has registered (none until ``register``)."""

    def __init__(self):
        self.jobs: dict[str, str] = {}  # submission id -> Ray's job status
        self.logs: dict[str, str] = {}
        self.submitted: list[str] = []
        self.nodes: list = []
        self.node_lists = 0  # how often the node list was read
        self.changed = threading.Event()  # a job's log or status changed (what a log follower waits for)

    def register(self, **resources: float) -> None:
        self.nodes.append(SimpleNamespace(resources_total=resources))

    def list_nodes(self, **kwargs) -> list:
        self.node_lists += 1
        return list(self.nodes)

    def log(self, submission_id: str, line: str) -> None:
        self.logs[submission_id] = self.logs.get(submission_id, "") + line + "\n"
        self.changed.set()

    def finish(self, submission_id: str, status: str) -> None:
        self.jobs[submission_id] = status
        self.changed.set()

    def get_version(self) -> str:
        return "2.60.0"

    def submit_job(self, *, submission_id: str, **kwargs) -> str:
        if submission_id in self.jobs:
            raise RuntimeError(f"Request failed with status code 500: Job with submission_id {submission_id} "
                               "already exists.")
        self.submitted.append(submission_id)
        self.jobs[submission_id] = "RUNNING"
        self.log(submission_id, f"{submission_id} started")
        return submission_id

    def get_job_info(self, submission_id: str):
        if submission_id not in self.jobs:
            raise RuntimeError(f"Request failed with status code 404: Job {submission_id} does not exist.")
        return SimpleNamespace(status=SimpleNamespace(value=self.jobs[submission_id]), message="",
                               driver_exit_code=None)

    def get_job_logs(self, submission_id: str) -> str:
        return self.logs.get(submission_id, "")

    def stop_job(self, submission_id: str) -> bool:
        self.finish(submission_id, "STOPPED")
        return True

    async def tail_job_logs(self, submission_id: str):
        """The log from its first line, then what it gains, until the job ends (Ray's log websocket)."""
        sent = 0
        while True:
            self.changed.clear()  # (before reading: a change after the read sets it again)
            text = self.logs.get(submission_id, "")
            if len(text) > sent:
                yield text[sent:]
                sent = len(text)
            if self.jobs.get(submission_id) in FINAL:
                return
            await asyncio.to_thread(self.changed.wait, 1.0)  # until the log or the job changes


@pytest.fixture
def ray(monkeypatch):
    fake = FakeRay()
    monkeypatch.setattr("ray.util.state.list_nodes", fake.list_nodes)
    return fake


def local_backend(ray: FakeRay, tmp_path) -> LocalRayBackend:
    backend = LocalRayBackend(address="http://127.0.0.1:8265", data_dir=tmp_path)
    backend._client = ray  # the job client the backend would make for the dashboard
    return backend


def job_doc(tmp_path, name: str, workers: int = 1) -> dict:
    return make_job(name, tmp_path / "out" / name, str(tmp_path / "data"), distributed={"num_workers": workers})


def test_a_restarted_service_follows_its_jobs_adopts_an_unrecorded_one_and_fails_lost_ones(tmp_path, tokens, ray):
    ray.register(CPU=8.0)
    first = ThreadedService(tmp_path, local_backend(ray, tmp_path), tokens[0])
    alice = first.client(tokens[1]["alice"])
    ids = {name: alice.post("/v1/jobs", json=job_doc(tmp_path, name)).json()["id"] for name in ("kept", "cut", "lost")}
    state = lambda name: alice.get(f"/v1/jobs/{ids[name]}").json()  # noqa: E731
    wait_for(lambda: all(state(n)["state"] == "Running" for n in ids), 30, "the three jobs to run")
    handle = {name: state(name)["backend_handle"] for name in ids}
    chunks: list[str] = []
    retries: list[str] = []
    follower = Client(first.url, tokens[1]["alice"])

    def follow() -> None:
        for chunk in follower.follow_logs(ids["kept"], reconnect_s=60, on_reconnect=retries.append):
            chunks.append(chunk)

    reader = threading.Thread(target=follow, daemon=True)
    reader.start()
    wait_for(lambda: chunks, 30, "the followed log's first line")
    first.stop()
    # While the service is away: "cut" is as a service killed between submitting it and recording its handle
    # left it, and "lost"'s Ray job is gone (a new cluster); "kept" runs on and logs.
    store = JobStore(tmp_path / "jobs.db")
    store.update(ids["cut"], handle=None, state="Queued", attempts=0)
    store.close()
    del ray.jobs[handle["lost"]]
    ray.log(handle["kept"], "a line written while the service was down")
    wait_for(lambda: retries, 30, "the follower to notice the service went away")

    again = ThreadedService(tmp_path, local_backend(ray, tmp_path), tokens[0], port=first.port)
    try:
        alice = again.client(tokens[1]["alice"])
        lost = wait_for(lambda: (j := state("lost"))["state"] == "Failed" and j, 30, "the lost job to fail")
        assert [c["reason"] for c in lost["conditions"] if c["type"] == "Failed"] == ["BackendLost"]
        assert f"no longer knows {handle['lost']}" in lost["conditions"][-1]["message"]
        cut = wait_for(lambda: (j := state("cut"))["state"] == "Running" and j, 30, "the cut job to be adopted")
        assert (cut["backend_handle"], cut["attempts"]) == (handle["cut"], 1)
        admitted = [c for c in cut["conditions"] if c["type"] == "Admitted"][0]
        assert "found running on the local backend" in admitted["message"]
        assert sorted(ray.submitted) == sorted(handle.values()), "a job was submitted twice"
        kept = state("kept")
        assert (kept["state"], kept["attempts"], kept["backend_handle"]) == ("Running", 1, handle["kept"])

        ray.log(handle["kept"], "the last line")
        ray.finish(handle["kept"], "SUCCEEDED")
        wait_for(lambda: state("kept")["state"] == "Succeeded", 30, "the kept job to succeed")
        reader.join(timeout=30)
        assert not reader.is_alive(), "the followed log ends when the job does"
        assert "".join(chunks) == ray.logs[handle["kept"]]  # every line once, in order, across the restart
    finally:
        again.stop()


def test_jobs_wait_while_the_cluster_registers_its_nodes_and_readyz_says_why(tmp_path, tokens, ray):
    """Right after a Ray head starts its dashboard answers but lists no node (then a node without its
    resources): capacity is unknown, so jobs wait instead of failing as unschedulable, and the service is
    not ready. Once the node is registered both follow."""
    svc = ThreadedService(tmp_path, local_backend(ray, tmp_path), tokens[0])
    try:
        alice = svc.client(tokens[1]["alice"])
        ready = httpx.get(svc.url + "/readyz", timeout=30)
        assert ready.status_code == 503
        assert "has not registered its nodes yet (0 listed" in ready.json()["checks"]["backend"]["message"]
        job_id = alice.post("/v1/jobs", json=job_doc(tmp_path, "early", workers=2)).json()["id"]
        job = lambda: alice.get(f"/v1/jobs/{job_id}").json()  # noqa: E731
        waiting = wait_for(lambda: (j := job())["conditions"][0]["reason"] == "CapacityUnknown" and j, 30,
                           "the job to wait for the cluster")
        assert waiting["state"] == "Queued"
        assert "capacity unknown, waiting" in waiting["conditions"][0]["message"]
        ray.register()  # listed, its resources not yet
        seen = ray.node_lists
        wait_for(lambda: ray.node_lists >= seen + 3, 30, "three more looks at the cluster")
        assert job()["state"] == "Queued" and httpx.get(svc.url + "/readyz", timeout=30).status_code == 503
        ray.nodes[0].resources_total = {"CPU": 4.0, "GPU": 0.0}
        ready = wait_for(lambda: (r := httpx.get(svc.url + "/readyz", timeout=30)).status_code == 200 and r, 30,
                         "the service to be ready")
        assert ready.json()["checks"]["backend"]["message"].endswith("(4 CPU, 0 GPU)")
        wait_for(lambda: job()["state"] == "Running", 30, "the waiting job to start")
        # Against a cluster that has registered its nodes, a job that can never fit still fails at once.
        huge = alice.post("/v1/jobs", json=job_doc(tmp_path, "huge", workers=8)).json()["id"]
        failed = wait_for(lambda: (j := alice.get(f"/v1/jobs/{huge}").json())["state"] == "Failed" and j, 30,
                          "the job larger than the cluster to fail")
        assert "asks for 9 CPU but the cluster has 4 CPU in all" in failed["conditions"][-1]["message"]
    finally:
        svc.stop()


def test_sdray_serve_killed_with_sigkill_finds_its_jobs_in_the_store(tmp_path, tokens):
    """A real ``sdray serve`` process, SIGKILLed: the store (SQLite, WAL) has every job and its state when
    the next one starts on it."""
    path, made = tokens
    svc = ServiceProcess(tmp_path, path, "--backend", "dry-run")
    http = httpx.Client(base_url=svc.url, headers={"Authorization": f"Bearer {made['alice']}"}, timeout=30)
    job_id = http.post("/v1/jobs", json=job_doc(tmp_path, "durable")).json()["id"]
    done = wait_for(lambda: (j := http.get(f"/v1/jobs/{job_id}").json())["state"] == "Succeeded" and j, 30,
                    "the dry-run job to end")
    svc.proc.kill()
    assert svc.proc.wait(timeout=30) == -9
    again = ServiceProcess(tmp_path, path, "--backend", "dry-run", port=svc.port)
    try:
        found = http.get(f"/v1/jobs/{job_id}").json()
        assert {k: found[k] for k in ("state", "conditions", "attempts", "name")} == \
               {k: done[k] for k in ("state", "conditions", "attempts", "name")}
    finally:
        again.stop()
