"""The service's kuberay backend against the fake API server, with the controller running: a job submitted
over the backend takes the same path as one applied with kubectl."""

from __future__ import annotations

import pytest
import yaml
from conftest import make_job
from k8s_cluster import NS, check_store, kube, running, status_of, user, wait_state  # noqa: F401

from sdray.k8s.kube import Clients
from sdray.service.backends import BackendError, make_backend
from sdray.service.backends.kuberay import KubeRayBackend

ENV = {"SDRAY_JOB_ID": "0a1b2c3d4e5f", "SDRAY_PROGRESS_URL": "http://sdray.ml.svc/internal/v1/jobs/0a1b2c3d4e5f",
       "SDRAY_PROGRESS_TOKEN": "not-a-real-token"}


@pytest.fixture
def backend(kube):
    clients = Clients.connect(host=kube.url, user_agent="sdray-service")
    yield KubeRayBackend(namespace=NS, clients=clients)
    clients.close()


def document(name="digits", **spec) -> dict:
    return make_job(name, "s3://models/out", "s3://datasets/digits", **spec)


def test_make_backend_builds_it():
    built = make_backend("kuberay", namespace="team-a", ray_address=None, data_dir=None, num_cpus=None)
    assert isinstance(built, KubeRayBackend) and built.namespace == "team-a" and built.capacity() is None


def test_submit_runs_through_the_controller(kube, backend):
    with running(kube):
        handle = backend.submit("0a1b2c3d4e5f", "team-a", document(), ENV)
        assert handle == f"{NS}/sdray-0a1b2c3d4e5f"
        rayjob = kube.wait(lambda: kube.get("rayjobs", NS, "sdray-0a1b2c3d4e5f"), 10, "the RayJob")
        assert backend.status(handle).state == "Pending"
        kube.update_status("rayjobs", NS, "sdray-0a1b2c3d4e5f", {"jobDeploymentStatus": "Running",
                                                                  "jobStatus": "RUNNING"})
        wait_state(kube, "sdray-0a1b2c3d4e5f", "Running")
        kube.update_status("diffusionjobs", NS, "sdray-0a1b2c3d4e5f", {"step": 40, "loss": 0.31})  # the driver
        running_status = backend.status(handle)
        kube.update_status("rayjobs", NS, "sdray-0a1b2c3d4e5f", {"jobDeploymentStatus": "Complete",
                                                                  "jobStatus": "SUCCEEDED"})
        wait_state(kube, "sdray-0a1b2c3d4e5f", "Succeeded")
        done = backend.status(handle)
    assert (running_status.state, running_status.details) == ("Running", {"step": 40, "loss": 0.31})
    assert done.state == "Succeeded"
    dj = kube.get("diffusionjobs", NS, "sdray-0a1b2c3d4e5f")
    assert dj["metadata"]["labels"]["sdray.io/service-job-id"] == "0a1b2c3d4e5f"
    assert dj["metadata"]["labels"]["sdray.io/tenant"] == "team-a"
    # The document keeps its own name (its run and checkpoints go by it); the objects take the job's.
    configmap = kube.get("configmaps", NS, "sdray-0a1b2c3d4e5f-job")
    assert yaml.safe_load(configmap["data"]["job.yaml"])["metadata"]["name"] == "digits"
    # The environment reaches the Ray pods from a Secret the job owns, never from the DiffusionJob.
    secret = kube.get("secrets", NS, "sdray-0a1b2c3d4e5f-env")
    assert secret["stringData"] == ENV
    assert secret["metadata"]["ownerReferences"][0]["uid"] == dj["metadata"]["uid"]
    assert "not-a-real-token" not in yaml.safe_dump(dj) + yaml.safe_dump(rayjob)
    head = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {"secretRef": {"name": "sdray-0a1b2c3d4e5f-env"}} in head["envFrom"]
    check_store(kube)


def test_failed_and_queued_states(kube, backend):
    with running(kube):
        queued = backend.submit("000000000001", "team-a", document("q", cluster={"queue": "team-a"}), {})
        wait_state(kube, "sdray-000000000001", "Queued")
        assert backend.status(queued).state == "Queued"
        assert kube.get("secrets", NS, "sdray-000000000001-env") is None  # no environment, no Secret
        kube.update_status("rayjobs", NS, "sdray-000000000001", {"jobDeploymentStatus": "Failed",
                                                                  "reason": "AppFailed", "message": "exit 1"})
        wait_state(kube, "sdray-000000000001", "Failed")
    assert (backend.status(queued).state, backend.status(queued).message) == ("Failed", "exit 1")
    # (the controller stopped:) a DiffusionJob Kueue preempted waits to be admitted again and resumes from its
    # checkpoint: to the service it is queued again, not a run that ended (the service's Preempted is final)
    kube.update_status("diffusionjobs", NS, "sdray-000000000001", {"state": "Preempted"})
    assert backend.status(queued).state == "Queued"


def test_cancel_deletes_the_job_and_what_it_owns(kube, backend):
    with running(kube):
        handle = backend.submit("0000000000aa", "team-a", document(), ENV)
        kube.wait(lambda: kube.get("rayjobs", NS, "sdray-0000000000aa"), 10, "the RayJob")
        backend.cancel(handle)
        kube.wait(lambda: not kube.objects("rayjobs") and not kube.objects("secrets") and not kube.objects("configmaps"),
                  10, "the cascade")
    assert backend.status(handle).state == "missing"
    backend.cancel(handle)  # a second cancel finds nothing to do


def test_logs_come_from_the_submitter_pod(kube, backend, user):
    handle = backend.submit("0000000000bb", "team-a", document(), {})
    assert backend.logs(handle) == ""  # no submitter pod yet: no log (a followed log starts at its first line)
    labels = {"sdray.io/job": "sdray-0000000000bb", "app.kubernetes.io/component": "ray-submitter"}
    user.core.create_namespaced_pod(NS, {"apiVersion": "v1", "kind": "Pod",
                                         "metadata": {"name": "sdray-0000000000bb-x7k2p", "labels": labels},
                                         "spec": {"containers": [{"name": "ray-job-submitter", "image": "sdray"}]}})
    kube.set_pod_log(NS, "sdray-0000000000bb-x7k2p", "step 10 loss 0.5\nstep 20 loss 0.4\nstep 30 loss 0.3")
    assert backend.logs(handle) == "step 10 loss 0.5\nstep 20 loss 0.4\nstep 30 loss 0.3"
    assert backend.logs(handle, tail=1) == "step 30 loss 0.3"


def test_refusals_name_the_problem(kube, backend):
    with pytest.raises(BackendError, match="spec.train.learning_rate"):
        backend.submit("0000000000cc", "team-a", document(train={"learning_rate": -1}), {})
    backend.submit("0000000000dd", "team-a", document(), {})
    with pytest.raises(BackendError, match="409"):
        backend.submit("0000000000dd", "team-a", document(), {})  # the same job id twice
    assert backend.ready() == (True, f"DiffusionJobs in namespace {NS}")
    kube.fail("GET", "diffusionjobs", code=403)
    ok, why = backend.ready()
    assert not ok and "ServiceAccount may not" in why


def test_an_unreachable_api_server_is_not_ready():
    gone = KubeRayBackend(namespace=NS, clients=Clients.connect(host="http://127.0.0.1:9"))
    ok, why = gone.ready()
    assert not ok and why
