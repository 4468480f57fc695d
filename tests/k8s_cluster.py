"""Shared by the tests that run the controller against the fake API server: fixtures and waits."""

from __future__ import annotations

import contextlib

import pytest
import yaml
from conftest import make_job
from fake_kube import FakeKube
from k8s_checks import check

from sdray.k8s.controller import Controller, ControllerConfig
from sdray.k8s.kube import Clients, create_diffusionjob
from sdray.k8s.render import RenderSettings
from sdray.spec import parse_job

NS = "ml"
# No shared job ServiceAccount: every job's Ray pods run as its own (sdray-job-<name>).
SETTINGS = RenderSettings(image="registry.example/sdray:0.1.0", ray_operator_namespace="kuberay-system")
# Short lease and watch times, so that a test sees a takeover or a re-watch within a second or two.
FAST = dict(lease_duration=1.0, renew_every=0.2, retry_every=0.1, watch_timeout=1, backoff_base=0.05, backoff_cap=0.5)


@pytest.fixture
def kube():
    server = FakeKube().start()
    yield server
    server.stop()


@pytest.fixture
def user(kube):
    clients = Clients.connect(host=kube.url, user_agent="kubectl")
    yield clients
    clients.close()


def connect(kube, agent: str, token: str | None = None) -> Clients:
    """Clients of the fake API server; with ``token`` (``kube.token_for``), as that ServiceAccount, under RBAC."""
    clients = Clients.connect(host=kube.url, user_agent=agent)
    if token:
        clients.api_client.set_default_header("Authorization", f"Bearer {token}")
    return clients


@contextlib.contextmanager
def running(kube, identity="a", token=None, **config):
    clients = connect(kube, f"controller/{identity}", token)
    ctl = Controller(clients, ControllerConfig(namespaces=[NS], lease_namespace=NS, identity=identity,
                                               **{"render": SETTINGS, **FAST, **config})).start()
    try:
        yield ctl
    finally:
        ctl.stop(timeout=10, watches=False)  # a watch in flight ends at its 1 s timeout by itself
        clients.close()


def submit(user, name, **spec) -> dict:
    return create_diffusionjob(user, parse_job(make_job(name, "s3://models/out", "s3://datasets/digits", **spec)), NS)


def status_of(kube, name) -> dict:
    return (kube.get("diffusionjobs", NS, name) or {}).get("status") or {}


def wait_state(kube, name, state, timeout=10.0) -> dict:
    return kube.wait(lambda: status_of(kube, name).get("state") == state and status_of(kube, name),
                     timeout, f"{name} to be {state} (now {status_of(kube, name)})")


def conditions(status) -> dict:
    return {c["type"]: (c["status"], c["reason"]) for c in status.get("conditions", [])}


def events(kube, name) -> list[tuple[str, str, str]]:
    """(type, reason, note) of the events.k8s.io/v1 Events regarding DiffusionJob ``name``, oldest first."""
    stored = sorted(kube.objects("events.events.k8s.io", NS), key=lambda e: int(e["metadata"]["resourceVersion"]))
    return [(e["type"], e["reason"], e["note"]) for e in stored if e["regarding"]["name"] == name]


def check_store(kube):
    """Everything stored (what the controller wrote included) passes the real schemas."""
    check([o for plural in ("diffusionjobs", "rayjobs", "configmaps", "events.events.k8s.io", "leases", "serviceaccounts", "roles",
                            "rolebindings", "networkpolicies") for o in kube.objects(plural)])


def chart_objects(namespace: str, values: dict | None = None) -> list[dict]:
    """The helm chart rendered as release "sdray" in ``namespace`` (the Helm v4 SDK, as tests/test_helm.py)."""
    import helm_python
    from k8s_checks import REPO, load_all

    with helm_python.Chart.load(REPO / "helm" / "sdray") as chart:
        files = chart.render(values or {}, name="sdray", namespace=namespace)
    return [o for path, text in sorted(files.items()) if not path.endswith("NOTES.txt") for o in load_all(text)]


def write_kubeconfig(path, url: str):
    """A kubeconfig for the fake API server (plain HTTP, no credentials)."""
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "fake",
        "clusters": [{"name": "fake", "cluster": {"server": url}}],
        "users": [{"name": "nobody", "user": {}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "nobody"}}]}))
    return path
