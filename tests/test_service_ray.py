"""The service running real jobs: the local backend on the session's Ray cluster (Ray's job submission
API, one driver per job), a real Prometheus scraping the service, a service restart mid-job, a cancel."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
import time

import httpx
import pytest
from PIL import Image

from conftest import make_job, wait_for
from service_helpers import ServiceProcess
from sdray.service.auth import create_token
from tools import require_binary, start_prometheus


def _dashboard(ray) -> str:
    return "http://" + ray._private.worker._global_node.webui_url


@pytest.mark.slow  # three jobs on the local Ray backend across a service restart (~240 s)
def test_jobs_run_on_ray_are_followed_across_a_restart_scraped_and_cancelled(ray_session, digits_s3, tmp_path):
    require_binary("prometheus")
    tokens = tmp_path / "tokens.json"
    token = create_token(tokens, "alice")
    args = ("--backend", "local", "--ray-address", _dashboard(ray_session))
    svc = ServiceProcess(tmp_path, tokens, *args)
    prom = start_prometheus(tmp_path, [f"127.0.0.1:{svc.port}"])
    http = httpx.Client(base_url=svc.url, headers={"Authorization": f"Bearer {token}"}, timeout=30)
    data = f"{digits_s3}/imagefolder"
    short = make_job("svc-short", tmp_path / "short", data, train={"max_steps": 40, "log_every_n_steps": 5},
                     validation={"prompts": ["a handwritten digit 1"], "num_inference_steps": 2})
    long = make_job("svc-long", tmp_path / "long", data, train={"max_steps": 100_000, "log_every_n_steps": 5})
    ids = {}
    try:
        for doc in (short, long):
            r = http.post("/v1/jobs", json=doc)
            assert r.status_code == 201, r.text
            ids[doc["metadata"]["name"]] = r.json()["id"]

        def job(name: str) -> dict:
            found = http.get(f"/v1/jobs/{ids[name]}").json()
            if found["state"] == "Failed":
                raise AssertionError(f"{name} failed: {found['conditions']}")
            return found

        wait_for(lambda: (job("svc-short").get("step") or 0) >= 5, 240, "the short job to report steps")

        def follow(into: list) -> None:  # (time, text) of each chunk of the job's followed log
            try:
                with http.stream("GET", f"/v1/jobs/{ids['svc-short']}/logs", params={"follow": "true"},
                                 timeout=None) as r:
                    for text in r.iter_text():
                        into.append((time.monotonic(), text))
            except httpx.HTTPError:
                pass  # the service went away mid-stream

        # The service goes away mid-job, with a log still followed, and comes back on the same store and
        # address. SIGTERM ends it in its grace period even so (not the SIGKILL 30 s later).
        cut: list = []
        early = threading.Thread(target=follow, args=(cut,), daemon=True)
        early.start()
        wait_for(lambda: cut, 60, "the followed log's first chunk")
        before = job("svc-short")["step"]
        svc.stop()
        assert svc.proc.returncode != -9, "the service waited for the followed log instead of stopping"
        early.join(timeout=10)
        assert not early.is_alive(), "the followed log did not end when the service stopped"
        svc = ServiceProcess(tmp_path, tokens, *args, port=svc.port)
        followed: list[tuple[float, str]] = []  # the log followed through Ray's log stream to the job's end
        reader = threading.Thread(target=follow, args=(followed,), daemon=True)
        reader.start()
        wait_for(lambda: job("svc-short")["step"] > before, 120, "progress to reach the restarted service")
        done = wait_for(lambda: (j := job("svc-short"))["state"] == "Succeeded" and j, 300, "the short job to end")
        ended = time.monotonic()
        reader.join(timeout=60)
        assert not reader.is_alive(), "the followed log ends when the job does"
        assert done["step"] == 40 and done["attempts"] == 1
        assert [c["type"] for c in done["conditions"] if c["status"] == "True"] == ["Admitted", "Succeeded"]
        curve = http.get(f"/v1/jobs/{ids['svc-short']}/metrics").json()["curves"]["loss"]
        assert [s for s, _ in curve] == list(range(5, 41, 5))  # every logged step, across the restart
        png = http.get(f"/v1/jobs/{ids['svc-short']}/samples/latest.png")
        assert png.status_code == 200
        assert Image.open(io.BytesIO(png.content)).size[0] > 16
        log = http.get(f"/v1/jobs/{ids['svc-short']}/logs").text
        assert "svc-short" in log
        assert "".join(text for _, text in followed) == log  # every line once, in order, up to the driver's last
        assert any(t < ended for t, _ in followed[1:]), "lines streamed while the job ran, not only at its end"
        # The S3 keys reached the job (it read s3://digits) but neither its record nor its log holds them.
        secret = os.environ["AWS_SECRET_ACCESS_KEY"]
        assert secret not in log
        assert all(secret.encode() not in p.read_bytes() for p in tmp_path.glob("jobs.db*"))
        assert secret not in json.dumps(http.get(f"/v1/jobs/{ids['svc-short']}").json())
        assert (tmp_path / "short" / "pipeline" / "model_index.json").exists()

        # Prometheus scraped the training metrics with the job's own labels.
        got = prom.wait_for(f'sdray_train_step{{job_id="{ids["svc-short"]}"}} == 40', timeout=60)
        assert got[0]["metric"]["tenant"] == "alice" and got[0]["metric"]["job_name"] == "svc-short"
        assert got[0]["metric"]["job"] == "sdray"  # Prometheus's own target label, untouched

        # Cancel the long job once it has a checkpoint: the Ray job stops, the checkpoint stays.
        wait_for(lambda: (job("svc-long").get("last_checkpoint") or {}).get("step"), 300, "a checkpoint of the long job")
        cancelled = http.delete(f"/v1/jobs/{ids['svc-long']}").json()
        assert cancelled["state"] == "Cancelled"
        from ray.job_submission import JobStatus, JobSubmissionClient

        ray_jobs = JobSubmissionClient(_dashboard(ray_session))
        wait_for(lambda: ray_jobs.get_job_status(cancelled["backend_handle"]) == JobStatus.STOPPED, 60,
                 "Ray to stop the cancelled job")
        saved = list((tmp_path / "long" / "checkpoints" / "svc-long").glob("checkpoint_*/sdray_checkpoint.json"))
        assert saved, "the cancelled job's checkpoints are kept"
        assert all((p.parent / "model" / "unet.safetensors").exists() for p in saved)
        assert prom.wait_for('sdray_jobs{state="Cancelled",tenant="alice"} == 1', timeout=60)
    finally:
        for job_id in ids.values():
            try:
                http.delete(f"/v1/jobs/{job_id}")
            except httpx.HTTPError:
                pass  # the service is down (a failure above): that failure is the one to report
        svc.stop()
        prom.stop()


@pytest.mark.slow  # a real training job on the local Ray backend across a SIGKILL of the service (~120 s)
def test_a_service_killed_mid_job_reattaches_and_sdray_logs_follow_continues(ray_session, digits_s3, tmp_path):
    """SIGKILL, not SIGTERM: no shutdown code runs. The Ray job runs on; the next service finds the job in
    its store, follows it to its end, and a `sdray logs -f` started before the kill prints the whole log
    once."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    tokens = tmp_path / "tokens.json"
    token = create_token(tokens, "alice")
    args = ("--backend", "local", "--ray-address", _dashboard(ray_session))
    svc = ServiceProcess(tmp_path, tokens, *args)
    http = httpx.Client(base_url=svc.url, headers={"Authorization": f"Bearer {token}"}, timeout=30)
    doc = make_job("svc-killed", tmp_path / "killed", f"{digits_s3}/imagefolder",
                   train={"max_steps": 60, "log_every_n_steps": 5})
    job_id = http.post("/v1/jobs", json=doc).json()["id"]
    job = lambda: http.get(f"/v1/jobs/{job_id}").json()  # noqa: E731
    env = {**os.environ, "SDRAY_SERVER": svc.url, "SDRAY_TOKEN": token}
    logs = subprocess.Popen([sys.executable, "-m", "sdray.cli", "logs", "-f", job_id], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: (job().get("step") or 0) >= 5, 240, "the job to report steps")
        before = job()["step"]
        svc.proc.kill()
        assert svc.proc.wait(timeout=30) == -9
        ray_jobs = JobSubmissionClient(_dashboard(ray_session))
        handle = f"sdray-{job_id}"
        assert ray_jobs.get_job_status(handle) == JobStatus.RUNNING, "the Ray job died with the service"
        svc = ServiceProcess(tmp_path, tokens, *args, port=svc.port)
        wait_for(lambda: job()["step"] > before, 120, "progress to reach the restarted service")
        done = wait_for(lambda: (j := job())["state"] in ("Succeeded", "Failed") and j, 300, "the job to end")
        assert done["state"] == "Succeeded", done["conditions"]
        assert (done["step"], done["attempts"], done["backend_handle"]) == (60, 1, handle)
        printed, errors = logs.communicate(timeout=120)
        assert logs.returncode == 0, errors
        assert "reconnecting" in errors
        assert printed == http.get(f"/v1/jobs/{job_id}/logs").text  # every line once, across the kill
        assert "svc-killed" in printed
    finally:
        if logs.poll() is None:
            logs.kill()
        http.delete(f"/v1/jobs/{job_id}")
        svc.stop()


@pytest.mark.slow
def test_a_search_submitted_to_the_service_lists_its_trials(ray_session, digits_s3, tmp_path):
    tokens = tmp_path / "tokens.json"
    token = create_token(tokens, "alice")
    svc = ServiceProcess(tmp_path, tokens, "--backend", "local", "--ray-address", _dashboard(ray_session))
    http = httpx.Client(base_url=svc.url, headers={"Authorization": f"Bearer {token}"}, timeout=30)
    doc = make_job("svc-search", tmp_path / "search", f"{digits_s3}/imagefolder",
                   data={"validation_fraction": 0.1}, validation={"max_batches": 2},
                   train={"max_steps": 20, "batch_size": 16, "learning_rate": 1e-3, "log_every_n_steps": 10})
    doc["spec"]["tune"] = {"search_space": {"train.learning_rate": {"grid": [1e-3, 3e-3]}},
                           "scheduler": {"name": "fifo"}, "max_concurrent_trials": 1}
    try:
        r = http.post("/v1/jobs", json=doc)
        assert r.status_code == 201, r.text
        assert r.json()["kind"] == "tune"
        job_id = r.json()["id"]
        done = wait_for(lambda: (j := http.get(f"/v1/jobs/{job_id}").json())["state"] in ("Succeeded", "Failed")
                        and j, 600, "the search to end")
        assert done["state"] == "Succeeded", done["conditions"]
        trials = done["trials"]
        assert sorted(t["params"]["train.learning_rate"] for t in trials) == [1e-3, 3e-3]
        assert all(t["state"] == "finished" and isinstance(t["metric"], float) for t in trials), trials
        assert done["best"] == min(t["metric"] for t in trials)
        assert (tmp_path / "search" / "best.yaml").exists()
    finally:
        svc.stop()


def test_the_local_backend_starts_its_own_ray_head_once_and_finds_it_again(tmp_path):
    """`sdray serve` without --ray-address: a head in its own session, recorded next to the store, reused by
    the next service on the same data dir; its capacity is what it was started with."""
    import psutil

    from sdray.service.backends.local import LocalRayBackend, stop_head

    first = LocalRayBackend(address=None, data_dir=tmp_path, num_cpus=3)
    head = first.head
    try:
        assert head["dashboard_url"].startswith("http://127.0.0.1:")
        # The dashboard answers seconds before the head's node has registered its resources: not ready
        # till then (capacity unknown, jobs wait), and ready means the node's CPUs are there.
        wait_for(lambda: first.ready()[0], 150, "the new head's node to register")
        assert first.capacity() == {"CPU": 3.0, "GPU": 0.0}
        again = LocalRayBackend(address=None, data_dir=tmp_path)
        assert again.head == head and again.address == first.address
        assert again.status("sdray-nosuchjob").state == "missing"
    finally:
        stop_head(head)
    assert not psutil.pid_exists(head["pid"])
