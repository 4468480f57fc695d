"""The sdray service over real HTTP, with the dry-run backend: auth and tenants, quotas, the queue,
validation errors, malformed bodies, restarts of the store, progress from drivers, the CLI client,
/metrics, and a schemathesis run over /openapi.json. (Jobs on a real Ray cluster: test_service_ray.py.)"""

from __future__ import annotations

import io
import json
from pathlib import Path

import httpx
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from conftest import make_job, wait_for
from service_helpers import ThreadedService, tokens  # noqa: F401
from sdray.cli import app as cli_app
from sdray.service.auth import load_tokens
from sdray.service.backends.dryrun import DryRunBackend
from sdray.spec import SpecError, load_job


def write_quotas(tokens: Path, quotas: dict) -> None:
    data = json.loads(tokens.read_text())
    data["quotas"] = quotas
    tokens.write_text(json.dumps(data))


@pytest.fixture
def service(tmp_path, tokens):
    svc = ThreadedService(tmp_path, DryRunBackend(hold=True), tokens[0])
    yield svc
    svc.stop()


def job_doc(tmp_path: Path, name: str = "svc-job", **spec) -> dict:
    return make_job(name, tmp_path / "out" / name, str(tmp_path / "data"), **spec)


def test_token_file_keeps_only_hashes_and_requests_need_a_valid_token(service, tokens):
    path, made = tokens
    text = path.read_text()
    assert all(token not in text for token in made.values())
    assert {t.tenant for t in load_tokens(path).tokens} == {"alice", "bob", "ops"}
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": made["alice"]}):
        r = httpx.get(service.url + "/v1/jobs", headers=headers)
        assert r.status_code == 401, headers
        assert r.headers["www-authenticate"] == "Bearer"
    assert service.client(made["alice"]).get("/v1/jobs").json() == {"jobs": [], "next_page_token": None}


def test_tenants_see_and_cancel_only_their_own_jobs_and_admins_see_all(service, tokens, tmp_path):
    _, made = tokens
    alice, bob, root = (service.client(made[n]) for n in ("alice", "bob", "root"))
    r = alice.post("/v1/jobs", json=job_doc(tmp_path, "alices"))
    assert r.status_code == 201, r.text
    job = r.json()
    assert r.headers["location"].endswith(f"/v1/jobs/{job['id']}")
    assert bob.get(f"/v1/jobs/{job['id']}").status_code == 404
    assert bob.delete(f"/v1/jobs/{job['id']}").status_code == 404
    assert bob.get(f"/v1/jobs/{job['id']}/logs").status_code == 404
    assert bob.get("/v1/jobs").json()["jobs"] == []
    assert [j["id"] for j in root.get("/v1/jobs").json()["jobs"]] == [job["id"]]
    assert root.get(f"/v1/jobs/{job['id']}").json()["tenant"] == "alice"
    running = wait_for(lambda: (j := alice.get(f"/v1/jobs/{job['id']}").json())["state"] == "Running" and j, 30,
                       "the job to run")
    assert alice.delete(f"/v1/jobs/{job['id']}").json()["state"] == "Cancelled"
    assert service.backend.status(running["backend_handle"]).state == "Cancelled"


def test_yaml_and_json_bodies_filters_and_pages(service, tokens, tmp_path):
    alice = service.client(tokens[1]["alice"])
    ids = []
    for i in range(5):
        doc = job_doc(tmp_path, f"job-{i}")
        doc["metadata"]["labels"] = {"team": "red" if i % 2 else "blue"}
        body = yaml.safe_dump(doc) if i % 2 else json.dumps(doc)
        ctype = "application/yaml" if i % 2 else "application/json"
        r = alice.post("/v1/jobs", content=body, headers={"Content-Type": ctype})
        assert r.status_code == 201, r.text
        ids.append(r.json()["id"])
    page1 = alice.get("/v1/jobs", params={"limit": 2}).json()
    page2 = alice.get("/v1/jobs", params={"limit": 2, "page_token": page1["next_page_token"]}).json()
    page3 = alice.get("/v1/jobs", params={"limit": 2, "page_token": page2["next_page_token"]}).json()
    assert [j["id"] for j in page1["jobs"] + page2["jobs"] + page3["jobs"]] == ids
    assert page3["next_page_token"] is None
    newest = alice.get("/v1/jobs", params={"limit": 3, "order": "newest"}).json()
    older = alice.get("/v1/jobs", params={"limit": 3, "order": "newest", "page_token": newest["next_page_token"]}).json()
    assert [j["id"] for j in newest["jobs"] + older["jobs"]] == ids[::-1] and older["next_page_token"] is None
    assert alice.get("/v1/jobs", params={"order": "random"}).status_code == 400
    red = alice.get("/v1/jobs", params={"label": "team=red"}).json()["jobs"]
    assert [j["name"] for j in red] == ["job-1", "job-3"]
    alice.delete(f"/v1/jobs/{ids[0]}")
    cancelled = alice.get("/v1/jobs", params={"state": "Cancelled"}).json()["jobs"]
    assert [j["id"] for j in cancelled] == [ids[0]] and cancelled[0]["state"] == "Cancelled"
    # the states as the API wrote them before there was one set (lower case) still filter
    assert [j["id"] for j in alice.get("/v1/jobs", params={"state": "cancelled"}).json()["jobs"]] == [ids[0]]
    bogus = alice.get("/v1/jobs", params={"state": "bogus"})
    assert bogus.status_code == 400 and bogus.json()["detail"].startswith(
        "invalid request: query.state.0: Input should be 'Queued', 'Pending', 'Running', 'Succeeded', 'Failed', "
        "'Cancelled', 'Preempted', 'queued'")  # the parameter, and the states as written (the OpenAPI enum too)


def test_invalid_documents_get_422_with_the_same_lines_as_sdray_validate(service, tokens, tmp_path):
    alice = service.client(tokens[1]["alice"])
    doc = job_doc(tmp_path, train={"learning_rate": -1, "bogus": 3})
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(SpecError) as cli_errors:
        load_job(path)
    for endpoint in ("/v1/validate", "/v1/jobs"):
        r = alice.post(endpoint, content=path.read_text(), headers={"Content-Type": "application/yaml"})
        assert r.status_code == 422, r.text
        body = r.json()
        assert body["text"] == cli_errors.value.errors
        assert {e["field"] for e in body["errors"]} == {"spec.train.learning_rate", "spec.train.bogus"}
    assert alice.get("/v1/jobs").json()["jobs"] == []
    ok = alice.post("/v1/validate", json=job_doc(tmp_path))
    assert ok.status_code == 200 and ok.json()["valid"] is True
    metrics = httpx.get(service.url + "/metrics").text
    assert 'sdray_validation_failures_total{field="spec.train.learning_rate"} 2.0' in metrics
    assert 'sdray_validation_failures_total{field="spec.train"} 2.0' in metrics  # an unknown key counts at its parent


@pytest.mark.parametrize("body, ctype, status", [
    (b"{not json", "application/json", 400),
    (b"a: [unclosed", "application/yaml", 400),
    (b"[1, 2, 3]", "application/json", 422),
    (b'"just a string"', "application/json", 422),
    (b"\xff\xfe\x00bad", "application/json", 400),
    (b"<xml/>", "application/xml", 415),
    (b"[" * 100_000, "application/json", 400),
    (b"{}", "application/json", 422),
])
def test_malformed_bodies_never_give_a_server_error(service, tokens, body, ctype, status):
    r = service.client(tokens[1]["alice"]).post("/v1/jobs", content=body, headers={"Content-Type": ctype})
    assert r.status_code == status, r.text
    assert r.json()["detail"]


def test_huge_bodies_are_refused_with_413(service, tokens, tmp_path):
    doc = job_doc(tmp_path)
    doc["metadata"]["labels"] = {f"k{i}": "v" * 100 for i in range(20_000)}
    r = service.client(tokens[1]["alice"]).post("/v1/jobs", json=doc)
    assert r.status_code == 413
    assert "larger than" in r.json()["detail"]


def test_quotas_refuse_with_429_and_a_reason(service, tokens, tmp_path):
    path, made = tokens
    write_quotas(path, {"default": {"max_concurrent_jobs": 5}, "alice": {"max_concurrent_jobs": 1, "max_workers": 2}})
    alice, bob = service.client(made["alice"]), service.client(made["bob"])
    too_big = alice.post("/v1/jobs", json=job_doc(tmp_path, "big", distributed={"num_workers": 3}))
    assert too_big.status_code == 429
    assert "max_workers=2" in too_big.json()["detail"]
    first = alice.post("/v1/jobs", json=job_doc(tmp_path, "first"))
    assert first.status_code == 201
    second = alice.post("/v1/jobs", json=job_doc(tmp_path, "second"))
    assert second.status_code == 429
    assert "max_concurrent_jobs=1" in second.json()["detail"]
    assert bob.post("/v1/jobs", json=job_doc(tmp_path, "bobs")).status_code == 201  # bob has the default quota
    alice.delete(f"/v1/jobs/{first.json()['id']}")
    assert alice.post("/v1/jobs", json=job_doc(tmp_path, "third")).status_code == 201


def test_jobs_wait_for_resources_in_submission_order_per_tenant(tmp_path, tokens):
    # 6 CPUs; a job takes 1 CPU per worker plus 1 for its driver.
    backend = DryRunBackend(hold=True, capacity={"CPU": 6, "GPU": 0})
    svc = ThreadedService(tmp_path, backend, tokens[0])
    try:
        alice, bob = svc.client(tokens[1]["alice"]), svc.client(tokens[1]["bob"])

        def submit(client, name, workers):
            r = client.post("/v1/jobs", json=job_doc(tmp_path, name, distributed={"num_workers": workers}))
            assert r.status_code == 201, r.text
            return r.json()["id"]

        a1 = submit(alice, "a1", 3)   # 4 CPUs: starts
        a2 = submit(alice, "a2", 3)   # 4 more: waits
        a3 = submit(alice, "a3", 1)   # would fit (2), but alice's a2 is first in her queue
        b1 = submit(bob, "b1", 1)     # another tenant's job that fits: goes ahead
        state = lambda c, i: c.get(f"/v1/jobs/{i}").json()  # noqa: E731
        wait_for(lambda: state(bob, b1)["state"] == "Running", 30, "bob's small job to start")
        assert state(alice, a1)["state"] == "Running"
        assert [state(alice, i)["state"] for i in (a2, a3)] == ["Queued", "Queued"]
        assert state(alice, a2)["conditions"][0]["reason"] == "Queued"
        assert 'sdray_queue_depth{tenant="alice"} 2.0' in httpx.get(svc.url + "/metrics").text
        backend.finish(state(alice, a1)["backend_handle"])
        wait_for(lambda: state(alice, a2)["state"] == "Running", 30, "a2 to start once a1 is done")
        assert state(alice, a1)["state"] == "Succeeded"
        assert state(alice, a3)["state"] == "Queued"  # a2 (4) + b1 (2) fill the 6 CPUs
        huge = submit(alice, "huge", 8)
        wait_for(lambda: state(alice, huge)["state"] == "Failed", 30, "a job larger than the cluster to fail")
        assert "cluster has 6 CPU" in state(alice, huge)["conditions"][-1]["message"]
    finally:
        svc.stop()


def test_jobs_survive_a_restart_and_lost_ones_fail_with_a_reason(tmp_path, tokens):
    svc = ThreadedService(tmp_path, DryRunBackend(hold=True), tokens[0])
    alice = svc.client(tokens[1]["alice"])
    job_id = alice.post("/v1/jobs", json=job_doc(tmp_path)).json()["id"]
    wait_for(lambda: alice.get(f"/v1/jobs/{job_id}").json()["state"] == "Running", 30, "the job to run")
    svc.stop()
    # A new service on the same store with a backend that never heard of the job (a lost cluster).
    again = ThreadedService(tmp_path, DryRunBackend(hold=True), tokens[0])
    try:
        alice = again.client(tokens[1]["alice"])
        job = wait_for(lambda: (j := alice.get(f"/v1/jobs/{job_id}").json())["state"] == "Failed" and j, 30,
                       "the lost job to be marked failed")
        failed = [c for c in job["conditions"] if c["type"] == "Failed"][0]
        assert failed["reason"] == "BackendLost" and failed["status"] == "True"
        assert job["name"] == "svc-job" and job["attempts"] == 1
    finally:
        again.stop()


def test_progress_from_the_driver_feeds_status_curve_sample_and_prometheus(service, tokens, tmp_path):
    alice = service.client(tokens[1]["alice"])
    job = alice.post("/v1/jobs", json=job_doc(tmp_path, "progress")).json()
    wait_for(lambda: alice.get(f"/v1/jobs/{job['id']}").json()["state"] == "Running", 30, "the job to run")
    handle = alice.get(f"/v1/jobs/{job['id']}").json()["backend_handle"]
    env = service.backend.env[handle]
    assert env["SDRAY_PROGRESS_URL"] == f"{service.url}/internal/v1/jobs/{job['id']}"
    driver = httpx.Client(headers={"Authorization": f"Bearer {env['SDRAY_PROGRESS_TOKEN']}"})
    url = env["SDRAY_PROGRESS_URL"]
    # Another job's (or a tenant's) token does not let anyone post progress.
    assert httpx.post(url + "/progress", json={"step": 1},
                      headers={"Authorization": f"Bearer {tokens[1]['alice']}"}).status_code == 401
    for step, loss in ((5, 0.9), (10, 0.5), (15, 0.3)):
        r = driver.post(url + "/progress", json={"step": step, "loss": loss, "curve": {"loss": [[step, loss]]},
                                                 "max_steps": 20, "images_per_s": 100.0,
                                                 "step_s": 0.2, "data_wait_share": 0.25, "checkpoint_step": 10,
                                                 "checkpoint_s": 0.5, "skipped_images": 2, "bogus": "ignored"})
        assert r.status_code == 200
    png = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(png, format="PNG")
    assert driver.put(url + "/samples/latest.png", content=b"not a png").status_code == 400
    assert driver.put(url + "/samples/latest.png", content=png.getvalue()).status_code == 200
    status = alice.get(f"/v1/jobs/{job['id']}").json()
    assert (status["step"], status["loss"], status["last_checkpoint"]["step"]) == (15, 0.3, 10)
    curve = alice.get(f"/v1/jobs/{job['id']}/metrics").json()["curves"]["loss"]
    assert curve == [[5, 0.9], [10, 0.5], [15, 0.3]]
    sample = alice.get(f"/v1/jobs/{job['id']}/samples/latest.png")
    assert sample.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(sample.content)).getpixel((4, 4)) == (200, 10, 10)
    text = httpx.get(service.url + "/metrics").text
    labels = f'job_id="{job["id"]}",job_name="progress",tenant="alice"'
    assert f"sdray_train_step{{{labels}}} 15.0" in text
    assert f"sdray_train_step_data_wait_seconds{{{labels}}} 0.05" in text
    assert f"sdray_train_running{{{labels}}} 1.0" in text


def test_readyz_and_healthz(service):
    assert httpx.get(service.url + "/healthz").json() == {"status": "ok"}
    ready = httpx.get(service.url + "/readyz")
    assert ready.status_code == 200 and ready.json()["checks"]["store"]["ok"] is True


def test_readyz_is_503_when_the_backend_does_not_answer(tmp_path, tokens):
    from sdray.service.backends.local import LocalRayBackend

    dead = LocalRayBackend(address=f"http://127.0.0.1:{_closed_port()}", data_dir=tmp_path)
    svc = ThreadedService(tmp_path, dead, tokens[0])
    try:
        r = httpx.get(svc.url + "/readyz", timeout=60)  # the first look imports Ray: seconds on a loaded machine
        assert r.status_code == 503
        assert r.json()["checks"]["backend"]["ok"] is False
    finally:
        svc.stop()


def _closed_port() -> int:
    from service_helpers import free_port

    return free_port()  # bound and released: nothing listens there


def test_cli_client_submits_lists_shows_and_cancels(service, tokens, tmp_path, monkeypatch):
    monkeypatch.setenv("SDRAY_TOKEN", tokens[1]["alice"])
    monkeypatch.setenv("SDRAY_CONFIG", str(tmp_path / "none.yaml"))
    runner = CliRunner()
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job_doc(tmp_path, "from-cli")))
    result = runner.invoke(cli_app, ["submit", str(path), "--server", service.url])
    assert result.exit_code == 0, result.output
    job_id = result.stdout.strip().splitlines()[-1]
    listed = runner.invoke(cli_app, ["jobs", "--server", service.url])
    assert "from-cli" in listed.stdout
    shown = runner.invoke(cli_app, ["status", job_id, "--server", service.url, "--json"])
    assert json.loads(shown.stdout)["name"] == "from-cli"
    logs = runner.invoke(cli_app, ["logs", job_id, "--server", service.url])
    assert logs.exit_code == 0
    cancelled = runner.invoke(cli_app, ["cancel", job_id, "--server", service.url])
    assert "Cancelled" in cancelled.stdout
    missing = runner.invoke(cli_app, ["status", "nope", "--server", service.url])
    assert missing.exit_code == 2 and "no job 'nope'" in missing.output
    monkeypatch.setenv("SDRAY_TOKEN", "wrong")
    refused = runner.invoke(cli_app, ["jobs", "--server", service.url])
    assert refused.exit_code == 1 and "401" in refused.output
    monkeypatch.delenv("SDRAY_TOKEN")
    (tmp_path / "client.yaml").write_text(yaml.safe_dump({"server": service.url, "token": tokens[1]["bob"]}))
    monkeypatch.setenv("SDRAY_CONFIG", str(tmp_path / "client.yaml"))
    assert "from-cli" not in runner.invoke(cli_app, ["jobs"]).stdout  # bob's token from the config file


def test_openapi_holds_the_job_schema_and_schemathesis_finds_no_server_errors(service, tokens):
    """Generated requests to every documented operation (bounded: 40 each) never get a 5xx."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings

    spec = httpx.get(service.url + "/openapi.json").json()
    assert "DiffusionJob" in spec["components"]["schemas"]
    schema = schemathesis.openapi.from_url(service.url + "/openapi.json")
    headers = {"Authorization": f"Bearer {tokens[1]['alice']}"}
    server_errors, calls = [], []
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {f"{op.method.upper()} {op.path}" for op in operations} >= {"POST /v1/jobs", "GET /v1/jobs/{job_id}/logs"}
    for operation in operations:
        @given(case=operation.as_strategy())
        @settings(max_examples=40, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        def call(case):
            response = case.call(headers=headers)
            calls.append(response.status_code)
            if response.status_code >= 500:
                server_errors.append(f"{case.method} {case.formatted_path}: {response.status_code} {response.text[:300]}")
        call()
    assert len(calls) >= 5 * len(operations)
    assert not server_errors, "\n".join(server_errors[:10])


def test_logs_tail_and_follow_until_the_job_ends(service, tokens, tmp_path):
    import threading

    alice = service.client(tokens[1]["alice"])
    job_id = alice.post("/v1/jobs", json=job_doc(tmp_path)).json()["id"]
    running = wait_for(lambda: (j := alice.get(f"/v1/jobs/{job_id}").json())["state"] == "Running" and j, 30,
                       "the job to run")
    assert alice.get(f"/v1/jobs/{job_id}/logs", params={"tail": 0}).text == ""
    assert "accepted" in alice.get(f"/v1/jobs/{job_id}/logs").text
    chunks: list[str] = []

    def follow():
        with alice.stream("GET", f"/v1/jobs/{job_id}/logs", params={"follow": "true"}) as r:
            chunks.extend(r.iter_text())

    reader = threading.Thread(target=follow)
    reader.start()
    wait_for(lambda: chunks, 30, "the first chunk of the followed log")
    assert reader.is_alive()  # still following: the job runs
    handle = running["backend_handle"]
    service.backend.log(handle, "step 1 loss 0.5")  # a line the driver prints while it is followed
    wait_for(lambda: "step 1" in "".join(chunks), 30, "the new line to reach the follower")
    service.backend.log(handle, "step 2 loss 0.4")
    service.backend.finish(handle)  # the last line comes with the end: the final read delivers it
    reader.join(timeout=30)
    assert not reader.is_alive(), "the stream ends when the job does"
    # every line exactly once, in order: the log as the backend holds it at the end
    assert "".join(chunks) == alice.get(f"/v1/jobs/{job_id}/logs").text
    assert "".join(chunks).splitlines() == ["dry run: the job was accepted and not run", "step 1 loss 0.5",
                                             "step 2 loss 0.4", "dry run: the job ended as Succeeded"]
    tailed = alice.get(f"/v1/jobs/{job_id}/logs", params={"tail": 1, "follow": "true"}).text
    assert tailed == "dry run: the job ended as Succeeded\n"  # an ended job's stream: the tail, then the end


def test_job_store_filters_counts_and_reads_progress_in_sql():
    import time

    from sdray.service.store import JobRecord, JobStore

    store = JobStore(":memory:")
    now = time.time()

    def add(name, tenant="alice", state="Queued", labels=None, demand=None, progress=None, finished=None):
        rec = JobRecord(id=name, seq=0, tenant=tenant, name=name, kind="train", state=state, labels=labels or {},
                        document={"big": "x" * 1000}, demand=demand or {"workers": 1, "GPU": 0, "CPU": 1},
                        progress_token_hash="", created=now, updated=now, progress=progress or {},
                        finished=finished)
        return store.insert(rec)

    add("a", labels={"team.example.com/name": "red", "tier": "gold"}, demand={"workers": 2, "GPU": 1, "CPU": 2})
    add("b", labels={"team.example.com/name": "red"}, state="Running", progress={"step": 3}, demand={"workers": 4, "GPU": 2})
    add("c", labels={"team.example.com/name": "blue", "tier": "gold"}, state="Succeeded",
        progress={"step": 9}, finished=now - 60)
    add("d", state="Failed", progress={"step": 1}, finished=now - 7200)
    add("e", tenant="bob", state="Running")

    def names(**filters):
        return [r.name for r in store.list(**filters)]

    # label keys with dots and slashes; several labels must all match
    assert names(labels={"team.example.com/name": "red"}) == ["a", "b"]
    assert names(labels={"team.example.com/name": "red", "tier": "gold"}) == ["a"]
    assert names(labels={"tier": "silver"}) == []
    # a page: one more than asked says a next page exists; after_seq continues it
    first = store.list(tenant="alice", limit=2)
    assert [r.name for r in first] == ["a", "b", "c"]
    assert names(tenant="alice", after_seq=first[1].seq, limit=2) == ["c", "d"]
    # a tenant's active jobs and what they take
    assert store.active_usage("alice") == (2, 6.0, 3.0) and store.active_usage("bob") == (1, 1.0, 0.0)
    assert store.active_usage("nobody") == (0, 0.0, 0.0)
    assert store.queue_depth() == {"alice": 1}
    # what /metrics reads: jobs with progress, unfinished or finished within the window
    assert [(r[0], r[4]) for r in store.recent_progress(now - 3600)] == [("b", {"step": 3}), ("c", {"step": 9})]
    # curve points in one call; a repeated (name, step) is replaced
    store.add_points("b", [("loss", 1, 0.9), ("loss", 2, 0.8), ("val_loss", 2, 0.85)])
    store.add_points("b", [("loss", 2, 0.7)])
    assert store.points("b") == {"loss": [(1, 0.9), (2, 0.7)], "val_loss": [(2, 0.85)]}


def test_local_backend_tells_a_lost_job_from_a_failing_dashboard(tmp_path):
    """Only Ray's 404 for the job marks it missing (the service then fails it as BackendLost); any other
    failure is an error to retry later, even when its text holds "404" (here, in a port number)."""
    import http.server
    import threading

    import ray

    from sdray.service.backends.base import BackendError
    from sdray.service.backends.local import LocalRayBackend

    class Dashboard(http.server.BaseHTTPRequestHandler):  # the answers of Ray's job API that matter here
        def do_GET(self):
            if self.path == "/api/version":
                status, body = 200, json.dumps({"version": "4", "ray_version": ray.__version__, "ray_commit": "-"})
            elif self.path.startswith("/api/jobs/sdray-gone"):
                status, body = 404, "Job sdray-gone does not exist"
            else:
                status, body = 500, "cannot reach the GCS at 127.0.0.1:40404"
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body.encode())

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Dashboard)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        backend = LocalRayBackend(address=f"http://127.0.0.1:{server.server_port}", data_dir=tmp_path)
        assert backend.status("sdray-gone").state == "missing"
        with pytest.raises(BackendError, match="40404"):
            backend.status("sdray-other")
    finally:
        server.shutdown()
