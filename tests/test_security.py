"""Attacks a hostile tenant made on the service (issue #13), performed against a real service over HTTP: each
one succeeded before the fix and must be refused now. (Rendering and RBAC: test_k8s_*; checkpoints and
storage: test_checkpoint_safety.py, test_storage.py; the document model's bounds: test_spec.py.)"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml
from typer.testing import CliRunner

from conftest import make_job, wait_for
from k8s_cluster import kube  # noqa: F401
from service_helpers import ServiceProcess, ThreadedService, free_port, tokens  # noqa: F401
from sdray.cli import app as cli_app
from sdray.k8s.kube import Clients
from sdray.service.backends.dryrun import DryRunBackend
from sdray.service.backends.kuberay import KubeRayBackend
from sdray.service.store import JobRecord, JobStore


@pytest.fixture
def policy_file(tmp_path) -> Path:
    (tmp_path / "team-a").mkdir()
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump({
        "default": {"local_paths": []},
        "tenants": {"alice": {"namespace": "team-a", "local_paths": [str(tmp_path / "team-a")],
                              "secrets": ["team-a-s3", "team-a-hf"], "queues": ["team-a"],
                              "hub_repos": ["team-a-org/*", "stabilityai/stable-diffusion-2-base"]}},
    }))
    return path


@pytest.fixture
def service(tmp_path, tokens, policy_file):
    svc = ThreadedService(tmp_path, DryRunBackend(hold=True), tokens[0], policy=policy_file)
    yield svc
    svc.stop()


def alice_doc(tmp_path: Path, name: str = "alices", **spec) -> dict:
    doc = make_job(name, tmp_path / "team-a" / "out" / name, str(tmp_path / "team-a" / "data"))
    for section, values in spec.items():
        doc["spec"][section] = {**doc["spec"].get(section, {}), **values}
    return doc


# -- 1: cluster fields and the tenant policy --------------------------------------------------------------

def test_a_tenant_cannot_take_the_platforms_or_another_teams_cluster_fields(service, tokens, tmp_path):
    alice, root = service.client(tokens[1]["alice"]), service.client(tokens[1]["root"])
    attack = alice_doc(tmp_path, "attack", data={"credentials_secret": "team-b-s3"},
                       cluster={"service_account": "sdray-service", "image": "attacker/miner",
                                "priority_class": "system-cluster-critical", "queue": "team-b",
                                "env_secrets": ["team-b-s3", "sdray-tokens"]})
    for route in ("/v1/jobs", "/v1/validate"):
        r = alice.post(route, json=attack)
        assert r.status_code == 403, r.text
        refused = {e["field"]: e["rule"] for e in r.json()["errors"]}
        assert refused == {"spec.data.credentials_secret": "secrets", "spec.cluster.service_account": "service_accounts",
                           "spec.cluster.image": "images", "spec.cluster.priority_class": "priority_classes",
                           "spec.cluster.queue": "queues", "spec.cluster.env_secrets[0]": "secrets",
                           "spec.cluster.env_secrets[1]": "secrets"}
        assert "spec.cluster.image" in r.json()["detail"] and "attacker/miner" in r.json()["detail"]
    assert root.get("/v1/jobs").json()["jobs"] == []  # nothing was queued
    assert 'sdray_policy_refusals_total{rule="images"} 2.0' in httpx.get(service.url + "/metrics").text
    # What the policy gives alice is hers to use; an admin is not bound by the policy.
    own = alice.post("/v1/jobs", json=alice_doc(tmp_path, "own", data={"credentials_secret": "team-a-s3"},
                                                cluster={"queue": "team-a"}))
    assert own.status_code == 201, own.text
    assert root.post("/v1/jobs", json=attack).status_code == 201


def test_a_tenant_cannot_jump_a_queue_mount_anothers_claim_or_reach_its_node_through_pod_fields(service, tokens,
                                                                                                  tmp_path):
    """Issue #16's pod fields over HTTP: a Kueue queue label on the pods, a NetworkPolicy label of another job,
    another tenant's claim, a scheduler the tenant was not given (403, each with its rule); a hostPath, or a
    ConfigMap over the job document the driver reads (422: the job model has no such volume)."""
    alice = service.client(tokens[1]["alice"])
    attack = alice_doc(tmp_path, "pods", cluster={
        "pod_labels": {"kueue.x-k8s.io/queue-name": "team-b-urgent", "sdray.io/job": "victim"},
        "volumes": [{"name": "b", "mount_path": "/b", "persistent_volume_claim": "team-b-data"}],
        "scheduler_name": "my-scheduler"})
    for route in ("/v1/jobs", "/v1/validate"):
        r = alice.post(route, json=attack)
        assert r.status_code == 403, r.text
        assert {e["field"]: e["rule"] for e in r.json()["errors"]} == {
            "spec.cluster.pod_labels.kueue.x-k8s.io/queue-name": "reserved_keys",
            "spec.cluster.pod_labels.sdray.io/job": "reserved_keys",
            "spec.cluster.volumes[0]": "volume_claims", "spec.cluster.scheduler_name": "scheduler_names"}
    for volume, message in (({"name": "n", "mount_path": "/n", "host_path": "/var/run"}, "hostPath volumes are never"),
                            ({"name": "d", "mount_path": "/etc/sdray", "config_map": "mine"}, "would cover /etc/sdray")):
        r = alice.post("/v1/jobs", json=alice_doc(tmp_path, "node", cluster={"volumes": [volume]}))
        assert r.status_code == 422, r.text
        [error] = r.json()["errors"]
        assert error["field"].startswith("spec.cluster.volumes") and message in error["message"], error
    assert service.client(tokens[1]["root"]).get("/v1/jobs").json()["jobs"] == []  # nothing was queued


def test_a_tenant_cannot_read_or_write_outside_its_paths(service, tokens, tmp_path):
    bob, alice = service.client(tokens[1]["bob"]), service.client(tokens[1]["alice"])
    escapes = [{"output": {"uri": str(tmp_path / "team-a" / ".." / "team-b" / "out")}},
               {"data": {"uri": "/etc"}},
               {"model": {"preset": "tiny", "vae": {"pretrained": str(tmp_path / "tokens.json")}}},
               {"checkpoint": {"resume": str(tmp_path / "other" / "ckpt"), "every_n_steps": 10}},
               {"storage": {"endpoint": "http://169.254.169.254"}}]
    for spec in escapes:
        r = alice.post("/v1/jobs", json=alice_doc(tmp_path, **spec))
        assert r.status_code == 403, (spec, r.text)
    # bob has the default block: no local path at all
    r = bob.post("/v1/jobs", json=alice_doc(tmp_path, "bobs"))
    assert r.status_code == 403 and {e["field"] for e in r.json()["errors"]} == {"spec.data.uri", "spec.output.uri"}


def test_a_tenant_loads_only_its_hub_repositories_with_only_its_own_token(service, tokens, tmp_path):
    """Another organisation's Hub repository (private models the platform's or another team's token could read),
    another team's token secret, a bare org/name that would be a local path where the job runs: refused."""
    alice = service.client(tokens[1]["alice"])
    attacks = [({"pretrained": "hf://team-b-org/private-model"}, {"spec.model.pretrained": "hub_repos"}),
               ({"preset": "tiny", "vae": {"pretrained": "hf://stabilityai/sd-vae-ft-mse"}},
                {"spec.model.vae.pretrained": "hub_repos"}),
               ({"preset": "tiny", "tokenizer": "team-a-org/tok"}, {"spec.model.tokenizer": "local_paths"}),
               ({"pretrained": "hf://team-a-org/model", "hub": {"credentials_secret": "team-b-hf"}},
                {"spec.model.hub.credentials_secret": "secrets"})]
    for model, refused in attacks:
        r = alice.post("/v1/jobs", json=alice_doc(tmp_path, model=model))
        assert r.status_code == 403, (model, r.text)
        assert {e["field"]: e["rule"] for e in r.json()["errors"]} == refused
    detail = alice.post("/v1/jobs", json=alice_doc(tmp_path, model={"pretrained": "hf://team-b-org/x"})).json()["detail"]
    assert "'team-b-org/x' is not allowed" in detail and "tenants.alice.hub_repos" in detail
    r = alice.post("/v1/jobs", json=alice_doc(tmp_path, model={"pretrained": "hf://team-a-org/../x"}))
    assert r.status_code == 422 and "spec.model.pretrained" in {e["field"] for e in r.json()["errors"]}
    own = alice.post("/v1/jobs", json=alice_doc(tmp_path, "own-hub", model={
        "pretrained": "hf://Team-A-Org/model@v1", "hub": {"credentials_secret": "team-a-hf"}}))
    assert own.status_code == 201, own.text
    listed = alice.post("/v1/jobs", json=alice_doc(tmp_path, "sd2", model={
        "pretrained": "hf://stabilityai/stable-diffusion-2-base"}))
    assert listed.status_code == 201, listed.text


def test_the_kuberay_backend_runs_a_tenants_jobs_in_its_policys_namespace(tmp_path, tokens, policy_file, kube):
    clients = Clients.connect(host=kube.url, user_agent="sdray-service")
    svc = ThreadedService(tmp_path, KubeRayBackend(namespace="sdray-jobs", clients=clients), tokens[0],
                          policy=policy_file)
    try:
        alice = svc.client(tokens[1]["alice"])
        job = alice.post("/v1/jobs", json=alice_doc(tmp_path)).json()
        done = wait_for(lambda: (j := alice.get(f"/v1/jobs/{job['id']}").json())["backend_handle"] and j, 30,
                        "the job to be submitted")
        assert done["backend_handle"] == f"team-a/sdray-{job['id']}"
        assert kube.get("diffusionjobs", "team-a", f"sdray-{job['id']}") is not None
        assert kube.objects("diffusionjobs", "sdray-jobs") == []
    finally:
        svc.stop()
        clients.close()


# -- 3: documents that expand, repeat keys or flood the errors ---------------------------------------------

ALIAS_BOMB = """apiVersion: sdray.io/v1alpha1
kind: DiffusionJob
metadata: {name: bomb}
spec:
  model:
    preset: tiny
    overrides:
      unet:
        a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
        b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
        c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
        d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
        e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
        f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
  data: {uri: DATA}
  output: {uri: OUT}
"""


def test_yaml_alias_bombs_are_refused_before_they_expand(service, tokens, tmp_path):
    alice = service.client(tokens[1]["alice"])
    body = ALIAS_BOMB.replace("DATA", str(tmp_path / "team-a" / "d")).replace("OUT", str(tmp_path / "team-a" / "o"))
    assert len(body) < 1000
    start = time.perf_counter()
    r = alice.post("/v1/jobs", content=body, headers={"Content-Type": "application/yaml"})
    assert r.status_code == 400, r.text[:300]
    assert "anchors and aliases" in r.json()["detail"]
    assert len(r.content) < 2000
    invalid = body.replace("preset: tiny", "preset: bogus")  # an invalid one must not echo the expansion either
    r = alice.post("/v1/validate", content=invalid, headers={"Content-Type": "application/yaml"})
    assert r.status_code == 400 and len(r.content) < 2000
    assert time.perf_counter() - start < 10
    assert alice.get("/v1/jobs").json()["jobs"] == []


def test_duplicate_keys_are_refused_in_the_api_and_the_cli(service, tokens, tmp_path):
    alice = service.client(tokens[1]["alice"])
    doc = yaml.safe_dump(alice_doc(tmp_path)) + "metadata: {name: other}\n"  # a second metadata
    r = alice.post("/v1/jobs", content=doc, headers={"Content-Type": "application/yaml"})
    assert r.status_code == 400 and "duplicate key 'metadata'" in r.json()["detail"], r.text
    as_json = json.dumps(alice_doc(tmp_path))[:-1] + ', "kind": "DiffusionJob"}'
    r = alice.post("/v1/jobs", content=as_json, headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "duplicate key 'kind'" in r.json()["detail"], r.text
    path = tmp_path / "dup.yaml"
    path.write_text(doc)
    result = CliRunner().invoke(cli_app, ["validate", str(path)])
    assert result.exit_code != 0 and "duplicate key 'metadata'" in result.output


def test_a_flood_of_errors_is_answered_briefly(service, tokens, tmp_path):
    doc = alice_doc(tmp_path)
    doc["spec"]["train"].update({f"bogus_{i}": "x" * 5000 for i in range(200)})
    r = service.client(tokens[1]["alice"]).post("/v1/jobs", json=doc)
    assert r.status_code == 422
    assert len(r.json()["errors"]) <= 50 and len(r.content) < 64_000


# -- 5: numbers without bounds -------------------------------------------------------------------------------

@pytest.mark.parametrize("spec, field", [
    ({"train": {"learning_rate": float("inf")}}, "spec.train.learning_rate"),
    ({"train": {"seed": 2 ** 70}}, "spec.train.seed"),
    ({"distributed": {"resources_per_worker": {"GPU": -100}}}, "spec.distributed.resources_per_worker.GPU"),
    ({"distributed": {"resources_per_worker": {"CPU": float("nan")}}}, "spec.distributed.resources_per_worker.CPU"),
])
def test_numbers_out_of_bounds_are_refused_with_their_field(service, tokens, tmp_path, spec, field):
    alice = service.client(tokens[1]["alice"])
    body = yaml.safe_dump(alice_doc(tmp_path, **spec))  # YAML writes .inf and .nan as plain numbers
    r = alice.post("/v1/jobs", content=body, headers={"Content-Type": "application/yaml"})
    assert r.status_code == 422, r.text
    assert field in {e["field"] for e in r.json()["errors"]}
    as_json = json.dumps(alice_doc(tmp_path, **spec))  # json.dumps writes Infinity and NaN, which JSON has not
    r = alice.post("/v1/jobs", content=as_json, headers={"Content-Type": "application/json"})
    assert r.status_code in (400, 422), r.text
    assert alice.get("/v1/jobs").json()["jobs"] == []  # and the list still answers, with nothing stored


def test_a_negative_gpu_request_cannot_defeat_the_gpu_quota(service, tokens, tmp_path):
    path, made = tokens
    data = json.loads(path.read_text())
    data["quotas"] = {"alice": {"max_gpus": 1}}
    path.write_text(json.dumps(data))
    alice = service.client(made["alice"])
    negative = alice.post("/v1/jobs", json=alice_doc(tmp_path, "neg", distributed={
        "use_gpu": True, "resources_per_worker": {"GPU": -100}}))
    assert negative.status_code == 422
    one = alice.post("/v1/jobs", json=alice_doc(tmp_path, "one", distributed={"use_gpu": True}))
    assert one.status_code == 201, one.text
    two = alice.post("/v1/jobs", json=alice_doc(tmp_path, "two", distributed={"use_gpu": True}))
    assert two.status_code == 429


# -- 6: a job the cluster refuses fails instead of being retried forever ------------------------------------

def test_a_job_the_api_server_refuses_fails_with_its_message_and_frees_the_quota(tmp_path, tokens, kube):
    """The API server answers 422 (an invalid object): the job fails at once with that message, instead of
    staying pending, retried five times a second, holding the tenant's quota."""
    path, made = tokens
    data = json.loads(path.read_text())
    data["quotas"] = {"alice": {"max_concurrent_jobs": 1}}
    path.write_text(json.dumps(data))
    clients = Clients.connect(host=kube.url, user_agent="sdray-service")
    svc = ThreadedService(tmp_path, KubeRayBackend(namespace="ml", clients=clients), path)
    try:
        alice = svc.client(made["alice"])
        kube.fail("POST", "diffusionjobs", code=422, times=1)
        job = alice.post("/v1/jobs", json=alice_doc(tmp_path)).json()
        failed = wait_for(lambda: (j := alice.get(f"/v1/jobs/{job['id']}").json())["state"] == "Failed" and j, 30,
                          "the job to fail")
        reason = next(c for c in failed["conditions"] if c["type"] == "Failed")
        assert reason["reason"] == "SubmitRefused" and "422" in reason["message"]
        assert kube.objects("diffusionjobs") == []
        assert alice.post("/v1/jobs", json=alice_doc(tmp_path, "next")).status_code == 201  # the quota is free
    finally:
        svc.stop()
        clients.close()


def test_a_passing_submission_failure_is_retried_with_backoff(tmp_path, tokens, kube):
    clients = Clients.connect(host=kube.url, user_agent="sdray-service")
    svc = ThreadedService(tmp_path, KubeRayBackend(namespace="ml", clients=clients), tokens[0], poll_interval_s=0.05)
    try:
        alice = svc.client(tokens[1]["alice"])
        kube.fail("POST", "diffusionjobs", code=503, times=3)
        started = time.monotonic()
        job = alice.post("/v1/jobs", json=alice_doc(tmp_path)).json()
        pending = wait_for(lambda: (j := alice.get(f"/v1/jobs/{job['id']}").json())["conditions"][0]["reason"]
                           == "SubmitFailed" and j, 30, "a failed try")
        assert pending["state"] == "Queued" and "trying again in" in pending["conditions"][0]["message"]
        wait_for(lambda: kube.get("diffusionjobs", "ml", f"sdray-{job['id']}"), 30, "the fourth try to create it")
        # three failures wait 1 + 2 + 4 s; without backoff the loop (20 looks a second) is done in 0.2 s
        assert time.monotonic() - started > 6.0
    finally:
        svc.stop()
        clients.close()


def test_invalid_labels_are_refused_at_submit_as_the_api_server_would(service, tokens, tmp_path):
    alice = service.client(tokens[1]["alice"])
    for labels in ({"bad key!": "x"}, {"team": "a" * 64}, {"a/b/c": "x"}, {"-lead": "x"}):
        doc = alice_doc(tmp_path)
        doc["metadata"]["labels"] = labels
        r = alice.post("/v1/jobs", json=doc)
        assert r.status_code == 422, (labels, r.text)
        assert any(e["field"].startswith("metadata.labels") for e in r.json()["errors"])
    doc = alice_doc(tmp_path)
    doc["metadata"]["labels"] = {"example.com/team": "a-b_c.d", "empty": ""}
    assert alice.post("/v1/jobs", json=doc).status_code == 201


# -- 7: credentials_secret as a path --------------------------------------------------------------------------

@pytest.mark.parametrize("secret", ["../team-b-s3", "/etc/sdray", "a/../../b", "UPPER"])
def test_a_credentials_secret_must_be_a_secret_name(service, tokens, tmp_path, secret):
    r = service.client(tokens[1]["root"]).post("/v1/jobs", json=alice_doc(tmp_path, data={"credentials_secret": secret}))
    assert r.status_code == 422 and "spec.data.credentials_secret" in {e["field"] for e in r.json()["errors"]}


# -- 12: the job store under concurrent writers -----------------------------------------------------------------

def test_two_writers_never_share_a_sequence_number(tmp_path):
    path = tmp_path / "jobs.db"
    stores = [JobStore(path), JobStore(path)]  # two connections: what two service replicas would be

    def insert(store: JobStore, n: int) -> None:
        for i in range(n):
            now = time.time()
            store.insert(JobRecord(id=f"{id(store)}-{i}", seq=0, tenant="t", name="n", kind="train", state="Pending",
                                   labels={}, document={}, demand={}, progress_token_hash="", created=now, updated=now))

    threads = [threading.Thread(target=insert, args=(s, 60)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seqs = [r.seq for r in stores[0].list()]
    assert len(seqs) == 120 and len(set(seqs)) == 120
    with pytest.raises(sqlite3.IntegrityError):  # and the database itself refuses a duplicate
        stores[0]._db.execute("UPDATE jobs SET seq = 1")


def test_a_store_with_duplicate_sequence_numbers_is_renumbered_on_open(tmp_path):
    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    from sdray.service.store import SCHEMA

    db.executescript(SCHEMA)
    for i in range(3):
        db.execute("INSERT INTO jobs (id, seq, tenant, name, kind, state, labels, document, demand, "
                   "progress_token_hash, created, updated) VALUES (?, 1, 't', 'n', 'train', 'Pending', '{}', '{}', "
                   "'{}', '', 0, 0)", (f"j{i}",))
    db.commit()
    db.close()
    assert [(r.id, r.seq) for r in JobStore(path).list()] == [("j0", 1), ("j1", 2), ("j2", 3)]


# -- 13: the small ones -------------------------------------------------------------------------------------

def test_too_many_label_filters_are_a_400_not_a_500(service, tokens):
    params = [("label", f"k{i}=v") for i in range(1100)]
    r = service.client(tokens[1]["alice"]).get("/v1/jobs", params=params)
    assert r.status_code == 400 and "at most 20" in r.json()["detail"]


def test_a_truncated_tokens_file_keeps_the_service_answering(service, tokens):
    path, made = tokens
    alice = service.client(made["alice"])
    assert alice.get("/v1/jobs").status_code == 200
    text = path.read_text()
    path.write_text(text[: len(text) // 2])  # an editor or a full disk left half of it
    assert alice.get("/v1/jobs").status_code == 200
    assert service.client("sdr_nope").get("/v1/jobs").status_code == 401
    path.write_text(text)


def test_sdray_serve_refuses_to_start_on_a_broken_tokens_file(tmp_path, tokens):
    path, _ = tokens
    path.write_text(path.read_text()[:40])
    result = CliRunner().invoke(cli_app, ["serve", "--tokens", str(path), "--db", str(tmp_path / "x.db"),
                                          "--backend", "dry-run"])
    said = " ".join(result.output.split())  # the console wraps long lines
    assert result.exit_code == 2 and "tokens.json: not valid JSON" in said and "Traceback" not in said


def test_the_bearer_scheme_is_case_insensitive(service, tokens):
    for scheme in ("bearer", "BEARER", "Bearer"):
        r = httpx.get(service.url + "/v1/jobs", headers={"Authorization": f"{scheme} {tokens[1]['alice']}"})
        assert r.status_code == 200, scheme


@pytest.mark.parametrize("tenant", ["alice\n", "Alice", "a b", "-x", "x" * 64])
def test_token_create_refuses_a_bad_tenant_name_without_a_traceback(tmp_path, tenant):
    result = CliRunner().invoke(cli_app, ["token", "create", "--tenant", tenant, "--tokens", str(tmp_path / "t.json")])
    assert result.exit_code == 2 and "--tenant: expected a DNS-1123 label" in " ".join(result.output.split())
    assert isinstance(result.exception, SystemExit)  # a clean exit, not an exception's traceback
    assert not (tmp_path / "t.json").exists()


def test_internal_endpoints_refuse_big_bodies_before_reading_them(service, tokens, tmp_path):
    alice = service.client(tokens[1]["alice"])
    job_id = alice.post("/v1/jobs", json=alice_doc(tmp_path)).json()["id"]
    wait_for(lambda: alice.get(f"/v1/jobs/{job_id}").json()["state"] == "Running", 30, "the job to run")
    token = service.backend.env[alice.get(f"/v1/jobs/{job_id}").json()["backend_handle"]]["SDRAY_PROGRESS_TOKEN"]
    driver = httpx.Client(base_url=service.url, headers={"Authorization": f"Bearer {token}"}, timeout=30)
    sent = 0

    def endless():  # a chunked body without a length: the service must stop reading it
        nonlocal sent
        for _ in range(10_000):
            sent += 1 << 16
            yield b"x" * (1 << 16)

    r = driver.post(f"/internal/v1/jobs/{job_id}/progress", content=endless())
    assert r.status_code == 413
    r = driver.put(f"/internal/v1/jobs/{job_id}/samples/latest.png", content=b"\x89PNG\r\n\x1a\n" + b"0" * (17 << 20))
    assert r.status_code == 413
    assert driver.post(f"/internal/v1/jobs/{job_id}/progress", json={"step": 3, "loss": "nan"}).status_code == 200
    assert alice.get("/v1/jobs").status_code == 200  # a NaN from a driver is not stored to break the list
    assert alice.get(f"/v1/jobs/{job_id}").json()["loss"] is None


# -- 11: /metrics on a port of its own -----------------------------------------------------------------------

def test_metrics_can_leave_the_api_port_for_their_own(tmp_path, tokens):
    """`sdray serve --metrics-port`: the API no longer answers /metrics (so no ingress or job that reaches
    the API reads tenant and job names there); Prometheus scrapes the other port."""
    metrics_port = free_port()
    svc = ServiceProcess(tmp_path, tokens[0], "--backend", "dry-run", "--metrics-port", str(metrics_port))
    try:
        assert httpx.get(svc.url + "/metrics").status_code == 404
        assert "/metrics" not in httpx.get(svc.url + "/openapi.json").json()["paths"]
        scraped = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics")
        assert scraped.status_code == 200 and "sdray_http_requests_total" in scraped.text
    finally:
        svc.stop()
