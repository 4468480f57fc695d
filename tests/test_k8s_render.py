"""Rendering a document as a ConfigMap, the job's own ServiceAccount/Role/RoleBinding and NetworkPolicy, and a
KubeRay RayJob: one test per shape of job, every object checked against the real schemas (Kubernetes 1.33 for
core kinds, KubeRay v1.7.0's RayJob CRD)."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys

import pytest
import yaml
from conftest import make_job
from k8s_checks import REPO, check, load_all, network_allows

from sdray.k8s.defaults import PodDefaults, PodDefaultsError
from sdray.k8s.render import RenderError, RenderSettings, render, render_yaml
from sdray.spec import SpecError, load_job, parse_job

SETTINGS = RenderSettings(image="registry.example/sdray:0.1.0", ray_operator_namespace="kuberay-system")


def _objects(name="shape", namespace="ml", settings=SETTINGS, **spec) -> dict[str, dict]:
    """The rendered objects by kind (one of each), checked against the schemas."""
    job = parse_job(make_job(name, "s3://models/out", "s3://datasets/digits", **spec))
    objects = check(render(job, settings, namespace=namespace))
    kinds = [o["kind"] for o in objects]
    assert len(set(kinds)) == len(kinds) and kinds[0] == "ConfigMap" and kinds[-1] == "RayJob", kinds
    return {o["kind"]: o for o in objects}


def _render(name="shape", namespace="ml", **spec):
    job = parse_job(make_job(name, "s3://models/out", "s3://datasets/digits", **spec))
    objects = _objects(name, namespace, **spec)
    return job, objects["ConfigMap"], objects["RayJob"]


def _pods(rayjob) -> dict[str, dict]:
    """The pod templates of a RayJob: head, workers and the job submitter."""
    return {"head": rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"],
            "worker": rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"],
            "submitter": rayjob["spec"]["submitterPodTemplate"]}


def _head(rayjob):
    return rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]


def _workers(rayjob):
    return rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]


def test_cpu_job():
    job, configmap, rayjob = _render(distributed={"num_workers": 2, "resources_per_worker": {"CPU": 2}})
    spec = rayjob["spec"]
    assert spec["entrypoint"] == "sdray train /etc/sdray/job.yaml --address auto"
    assert spec["shutdownAfterJobFinishes"] is True
    assert (spec["ttlSecondsAfterFinished"], spec["backoffLimit"]) == (600, 0)
    assert "suspend" not in spec and "activeDeadlineSeconds" not in spec
    # The document travels as a file from the ConfigMap, read back exactly as written.
    assert yaml.safe_load(configmap["data"]["job.yaml"])["spec"] == job.model_dump(mode="json", exclude_unset=True)["spec"]
    head = _head(rayjob)
    mount = next(m for m in head["containers"][0]["volumeMounts"] if m["name"] == "job")
    assert mount == {"name": "job", "mountPath": "/etc/sdray", "readOnly": True}
    assert next(v for v in head["volumes"] if v["name"] == "job")["configMap"]["name"] == configmap["metadata"]["name"]
    [group] = _workers(rayjob)
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == 2
    worker = group["template"]["spec"]["containers"][0]
    # Two CPUs per Ray Train worker plus one for Ray Data's readers; requests equal limits.
    assert worker["resources"]["limits"] == worker["resources"]["requests"] == {"cpu": "3", "memory": "8Gi"}
    assert worker["image"] == head["containers"][0]["image"] == "registry.example/sdray:0.1.0"
    for pod in (head, group["template"]["spec"], rayjob["spec"]["submitterPodTemplate"]["spec"]):
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["containers"][0]["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert head["serviceAccountName"] == group["template"]["spec"]["serviceAccountName"] == "sdray-job-shape"
    env = {e["name"]: e for e in head["containers"][0]["env"]}
    assert env["SDRAY_DIFFUSIONJOB"]["value"] == "shape"
    assert env["SDRAY_NAMESPACE"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}


def test_eight_gpu_job_on_one_node():
    _, _, rayjob = _render(
        distributed={"num_workers": 8, "use_gpu": True, "resources_per_worker": {"CPU": 6, "GPU": 1},
                     "strategy": "fsdp"},
        train={"mixed_precision": "bf16"},
        cluster={"workers_per_pod": 8, "node_selector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
                 "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                 "priority_class": "training-high", "head": {"cpu": 4, "memory": "16Gi"}})
    [group] = _workers(rayjob)
    assert group["replicas"] == 1
    pod = group["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"] == {"cpu": "49", "memory": "256Gi", "nvidia.com/gpu": "8"}
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert pod["priorityClassName"] == _head(rayjob)["priorityClassName"] == "training-high"
    assert _head(rayjob)["containers"][0]["resources"]["limits"] == {"cpu": "4", "memory": "16Gi"}  # no GPU on the head


def test_gpu_job_one_pod_per_worker():
    _, _, rayjob = _render(distributed={"num_workers": 4, "use_gpu": True},
                           cluster={"worker": {"cpu": 8, "memory": "64Gi"}})
    [group] = _workers(rayjob)
    assert group["replicas"] == 4
    assert group["template"]["spec"]["containers"][0]["resources"]["limits"] == {
        "cpu": "8", "memory": "64Gi", "nvidia.com/gpu": "1"}


def test_queued_kueue_job():
    _, _, rayjob = _render(cluster={"queue": "team-a", "active_deadline_seconds": 86400, "backoff_limit": 2,
                                    "ttl_seconds_after_finished": 60})
    assert rayjob["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    spec = rayjob["spec"]
    assert spec["suspend"] is True  # Kueue admits the whole cluster at once, then unsuspends it
    assert (spec["activeDeadlineSeconds"], spec["backoffLimit"], spec["ttlSecondsAfterFinished"]) == (86400, 2, 60)


def test_job_with_credentials_secrets():
    objects = _objects("creds", data={"uri": "s3://datasets/digits", "credentials_secret": "data-reader"},
                       storage={"credentials_secret": "model-writer", "endpoint": "http://minio:9000"},
                       cluster={"env_secrets": ["aws-keys"], "env": {"AWS_REGION": "eu-west-1"}})
    configmap, rayjob = objects["ConfigMap"], objects["RayJob"]
    # The secrets' names never stand in for the job's (issue #13: the head mounted "model-writer-job" and
    # reported to DiffusionJob "model-writer"): the ConfigMap, the driver's job and every label are the job's.
    assert configmap["metadata"]["name"] == "creds-job"
    assert next(v for v in _head(rayjob)["volumes"] if v["name"] == "job")["configMap"]["name"] == "creds-job"
    env = {e["name"]: e.get("value") for e in _head(rayjob)["containers"][0]["env"]}
    assert env["SDRAY_DIFFUSIONJOB"] == "creds"
    for pod in _pods(rayjob).values():
        assert pod["metadata"]["labels"]["sdray.io/job"] == "creds"
    assert {o["metadata"]["labels"]["sdray.io/job"] for o in objects.values()} == {"creds"}
    for pod in (_head(rayjob), _workers(rayjob)[0]["template"]["spec"]):
        container = pod["containers"][0]
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        secrets = {v["name"]: v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
        # Mounted where storage.py reads credentials_secret files: $SDRAY_SECRETS_DIR/<name>/.
        assert {path: secrets[vol] for path, vol in mounts.items() if vol in secrets} == {
            "/var/run/secrets/sdray/data-reader": "data-reader", "/var/run/secrets/sdray/model-writer": "model-writer"}
        assert container["envFrom"] == [{"secretRef": {"name": "aws-keys"}}]
        assert {"name": "AWS_REGION", "value": "eu-west-1"} in container["env"]
    assert "AWS_SECRET_ACCESS_KEY" not in render_yaml([configmap, rayjob])  # no key is ever written out


def test_a_hub_token_secret_reaches_every_ray_pod_from_the_jobs_own_namespace():
    """The tenant's Secret, in the job's namespace, mounted where sdray reads HF_TOKEN; no token of the platform's
    (no HF_TOKEN variable, no other secret) is put on the pods, and a job without one mounts none."""
    objects = _objects("hub", namespace="team-a",
                       model={"pretrained": "hf://team-a-org/model@v1", "hub": {"credentials_secret": "team-a-hf"}})
    rayjob = objects["RayJob"]
    assert rayjob["metadata"]["namespace"] == "team-a"
    for pod in (_head(rayjob), _workers(rayjob)[0]["template"]["spec"]):
        container = pod["containers"][0]
        secrets = {v["name"]: v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
        mounts = {m["mountPath"]: secrets[m["name"]] for m in container["volumeMounts"] if m["name"] in secrets}
        assert mounts == {"/var/run/secrets/sdray/team-a-hf": "team-a-hf"}
        assert all(m["readOnly"] for m in container["volumeMounts"] if m["name"] in secrets)
        assert "HF_TOKEN" not in {e["name"] for e in container.get("env", [])} and "envFrom" not in container
    plain = _objects("hub-public", namespace="team-a", model={"pretrained": "hf://team-a-org/model"})["RayJob"]
    for pod in (_head(plain), _workers(plain)[0]["template"]["spec"]):
        assert not [v for v in pod["volumes"] if "secret" in v]


def test_the_example_with_credentials_runs_under_its_own_name():
    configmap, *_, rayjob = check(render(load_job(REPO / "k8s" / "examples" / "diffusionjob.yaml"), SETTINGS,
                                         namespace="sdray"))
    assert configmap["metadata"]["name"] == "sd15-pokemon-job"
    head = _head(rayjob)
    # The head mounted "s3-models-job", named after the storage secret, and reported to DiffusionJob "s3-models".
    assert next(v for v in head["volumes"] if v["name"] == "job")["configMap"]["name"] == "sd15-pokemon-job"
    assert {"name": "SDRAY_DIFFUSIONJOB", "value": "sd15-pokemon"} in head["containers"][0]["env"]
    assert {p["metadata"]["labels"]["sdray.io/job"] for p in _pods(rayjob).values()} == {"sd15-pokemon"}


def test_each_job_runs_as_its_own_identity_that_may_write_only_its_own_status():
    objects = _objects("alpha")
    account, role, binding = objects["ServiceAccount"], objects["Role"], objects["RoleBinding"]
    assert account["metadata"]["name"] == role["metadata"]["name"] == binding["metadata"]["name"] == "sdray-job-alpha"
    assert role["rules"] == [{"apiGroups": ["sdray.io"], "resources": ["diffusionjobs/status"],
                              "resourceNames": ["alpha"], "verbs": ["patch"]}]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "sdray-job-alpha"}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "sdray-job-alpha", "namespace": "ml"}]
    pods = _pods(objects["RayJob"])
    assert pods["head"]["spec"]["serviceAccountName"] == pods["worker"]["spec"]["serviceAccountName"] == "sdray-job-alpha"
    assert "serviceAccountName" not in pods["submitter"]["spec"]  # it only talks to the Ray dashboard


@pytest.mark.parametrize("how", ["document", "settings"])
def test_a_named_service_account_gets_no_grant_from_sdray(how):
    if how == "document":
        objects = _objects("s3-bound", cluster={"service_account": "s3-reader"})
    else:
        objects = _objects("shared", settings=RenderSettings(image="img:1", job_service_account="s3-reader"))
    assert {"ServiceAccount", "Role", "RoleBinding"}.isdisjoint(objects)
    pods = _pods(objects["RayJob"])
    assert pods["head"]["spec"]["serviceAccountName"] == pods["worker"]["spec"]["serviceAccountName"] == "s3-reader"


def test_without_a_namespace_there_is_no_identity_to_bind():
    job = parse_job(make_job("nowhere", "s3://o/x", "s3://d/x"))
    kinds = [o["kind"] for o in check(render(job, SETTINGS))]
    assert kinds == ["ConfigMap", "NetworkPolicy", "RayJob"]  # a RoleBinding must name its subject's namespace
    assert "serviceAccountName" not in _head(render(job, SETTINGS)[-1])


def test_a_document_cannot_run_as_another_jobs_identity():
    # The attack: name the victim's per-job ServiceAccount, whose Role may patch the victim's status.
    job = parse_job(make_job("thief", "s3://o/x", "s3://d/x", cluster={"service_account": "sdray-job-victim"}))
    with pytest.raises(RenderError, match=r"spec.cluster.service_account: 'sdray-job-victim': .*belong to sdray's jobs"):
        render(job, SETTINGS, namespace="ml")


def test_ray_is_closed_to_everything_but_the_job_itself_and_the_kuberay_operator():
    alpha, beta = _objects("alpha"), _objects("beta")
    assert alpha["RayJob"]["spec"]["rayClusterSpec"]["authOptions"] == {"mode": "token"}  # Ray's own token auth
    policies = [alpha["NetworkPolicy"], beta["NetworkPolicy"]]
    assert alpha["NetworkPolicy"]["metadata"]["name"] == "alpha-ray"
    pods = {k: ("ml", v["metadata"]["labels"]) for k, v in _pods(alpha["RayJob"]).items()}
    others = {k: ("ml", v["metadata"]["labels"]) for k, v in _pods(beta["RayJob"]).items()}
    operator = ("kuberay-system", {"app.kubernetes.io/name": "kuberay-operator",
                                   "app.kubernetes.io/component": "kuberay-operator"})
    # Attackers: another job's pods, a pod of another namespace labelled as the job's own, the operator's labels
    # on a pod outside the operator's namespace, and any unlabelled pod of the namespace.
    attackers = [*others.values(), ("team-b", dict(pods["head"][1])), ("ml", operator[1]), ("ml", {"app": "x"})]
    ray_ports = (6379, 8265, 10001, 8080, 52365, 10002, 19999)  # GCS, dashboard, client, metrics, agent, workers
    for port in ray_ports:
        assert network_allows(policies, pods["worker"], pods["head"], port), port
        assert network_allows(policies, pods["head"], pods["worker"], port), port
        for attacker in attackers:
            assert not network_allows(policies, attacker, pods["head"], port), (attacker, port)
            assert not network_allows(policies, attacker, pods["worker"], port), (attacker, port)
    assert network_allows(policies, pods["submitter"], pods["head"], 8265)  # `ray job submit`
    assert network_allows(policies, operator, pods["head"], 8265)  # KubeRay asks the dashboard about the job
    assert not network_allows(policies, operator, pods["head"], 6379)
    assert not network_allows(policies, operator, pods["head"], 10001)


def test_tune_job_runs_sdray_tune_on_a_cluster_for_its_trials():
    _, _, rayjob = _render(data={"uri": "s3://datasets/digits", "validation_fraction": 0.1},
                           distributed={"num_workers": 2},
                           tune={"search_space": {"train.learning_rate": {"loguniform": [1e-4, 1e-2]}},
                                 "num_samples": 8, "max_concurrent_trials": 3})
    assert rayjob["spec"]["entrypoint"] == "sdray tune /etc/sdray/job.yaml --address auto --resume-if-exists"
    assert _workers(rayjob)[0]["replicas"] == 6  # 3 trials side by side × 2 workers each


def test_owned_objects_point_at_their_diffusionjob():
    job = parse_job(make_job("owned", "s3://o/x", "s3://d/x"))
    owner = {"metadata": {"name": "owned", "uid": "6f1c8a52-0d7e-4a3b-9f3c-2d1e0b9a7c55"}}
    objects = check(render(job, SETTINGS, namespace="ml", owner=owner))
    assert [o["kind"] for o in objects] == ["ConfigMap", "ServiceAccount", "Role", "RoleBinding", "NetworkPolicy",
                                            "RayJob"]
    for obj in objects:
        assert obj["metadata"]["ownerReferences"] == [{
            "apiVersion": "sdray.io/v1alpha1", "kind": "DiffusionJob", "name": "owned", "uid": owner["metadata"]["uid"],
            "controller": True, "blockOwnerDeletion": True}]


@pytest.mark.parametrize("name", ["a" * 48, "9lives"])
def test_names_kuberay_refuses_are_refused_naming_the_field(name):
    job = parse_job(make_job(name, "s3://o/x", "s3://d/x"))
    with pytest.raises(RenderError, match=r"metadata.name: .*at most 47 characters, starting with a letter"):
        render(job, SETTINGS)


def test_render_command_prints_objects_kubectl_applies(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(make_job("cli-render", "s3://o/x", "s3://d/x", cluster={"queue": "team-a"})))
    result = subprocess.run([sys.executable, "-m", "sdray.cli", "render", str(path), "-n", "ml", "--image", "img:1"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    objects = check(load_all(result.stdout))
    assert [o["kind"] for o in objects] == ["ConfigMap", "ServiceAccount", "Role", "RoleBinding", "NetworkPolicy",
                                            "RayJob"]
    rayjob = objects[-1]
    assert {o["metadata"]["namespace"] for o in objects} == {"ml"}
    assert "&id" not in result.stdout  # no YAML anchors: each object reads on its own
    assert _head(rayjob)["containers"][0]["image"] == "img:1"
    long = tmp_path / "long.yaml"
    long.write_text(yaml.safe_dump(make_job("x" * 50, "s3://o/x", "s3://d/x")))
    refused = subprocess.run([sys.executable, "-m", "sdray.cli", "render", str(long)], capture_output=True, text=True,
                             timeout=60)
    assert refused.returncode == 2 and "metadata.name" in refused.stderr and "Traceback" not in refused.stderr


def test_ray_pods_hear_a_preemption_notice_and_get_the_jobs_grace_period():
    """Kubernetes signals only a container's first process (Ray): the preStop hook passes the notice to the
    run and waits while it checkpoints, within the job's grace period."""
    _, _, rayjob = _render(checkpoint={"grace_period_s": 300})
    pods = _pods(rayjob)
    for role in ("head", "worker"):
        spec = pods[role]["spec"]
        assert spec["terminationGracePeriodSeconds"] == 300
        assert spec["containers"][0]["lifecycle"]["preStop"]["exec"]["command"] == [
            "sdray", "preemption-notice", "--timeout", "295"]
    assert "lifecycle" not in pods["submitter"]["spec"]["containers"][0]
    _, _, rayjob = _render(checkpoint={"on_preemption": False})
    for pod in _pods(rayjob).values():
        assert "terminationGracePeriodSeconds" not in pod["spec"] and "lifecycle" not in pod["spec"]["containers"][0]


# -- the platform's pod defaults (the chart's jobPods) and a document's own pod fields ----------------------------

PODS = PodDefaults.model_validate({
    "serviceAccountAnnotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::111122223333:role/sdray-jobs"},
    "imagePullSecrets": [{"name": "registry-pull"}],
    "annotations": {"sidecar.istio.io/inject": "false"},
    "labels": {"cost-center": "ml"},
    "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "node-pool", "operator": "In", "values": ["gpu-a", "gpu-b"]}]},
        {"matchExpressions": [{"key": "node-pool", "operator": "In", "values": ["reserved"]}]}]}},
        "podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{"weight": 10, "podAffinityTerm": {
            "topologyKey": "kubernetes.io/hostname", "labelSelector": {"matchLabels": {"app": "noisy"}}}}]}},
    "topologySpreadConstraints": [
        {"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone", "whenUnsatisfiable": "ScheduleAnyway"},
        {"maxSkew": 2, "topologyKey": "kubernetes.io/hostname", "whenUnsatisfiable": "DoNotSchedule",
         "labelSelector": {"matchLabels": {"app.kubernetes.io/component": "ray-worker"}}}],
    "volumes": [{"name": "hf-cache", "persistentVolumeClaim": {"claimName": "hf-cache", "readOnly": True}}],
    "volumeMounts": [{"name": "hf-cache", "mountPath": "/cache/huggingface", "readOnly": True}],
    "acceleratorResource": "amd.com/gpu",
    "runtimeClassName": "rocm",
    "schedulerName": "volcano",
    "priorityClassName": "training-default",
})
PLATFORM = RenderSettings(image="registry.example/sdray:0.1.0", ray_operator_namespace="kuberay-system", pods=PODS)
GPU_JOB = {"distributed": {"num_workers": 2, "use_gpu": True}}


def test_the_platforms_pod_defaults_reach_the_head_and_every_worker():
    objects = _objects("platform", settings=PLATFORM, **GPU_JOB)
    assert objects["ServiceAccount"]["metadata"]["annotations"] == {
        "eks.amazonaws.com/role-arn": "arn:aws:iam::111122223333:role/sdray-jobs"}
    pods = _pods(objects["RayJob"])
    for role in ("head", "worker"):
        meta, spec = pods[role]["metadata"], pods[role]["spec"]
        assert meta["labels"]["cost-center"] == "ml" and meta["labels"]["sdray.io/job"] == "platform"
        assert meta["annotations"] == {"sidecar.istio.io/inject": "false"}
        assert spec["imagePullSecrets"] == [{"name": "registry-pull"}]
        assert (spec["runtimeClassName"], spec["schedulerName"], spec["priorityClassName"]) == (
            "rocm", "volcano", "training-default")
        assert spec["affinity"] == PODS.affinity
        # A constraint without a selector spreads this job's pods; one with a selector is the platform's as written.
        assert spec["topologySpreadConstraints"] == [
            {**PODS.topology_spread_constraints[0], "labelSelector": {"matchLabels": {"sdray.io/job": "platform"}}},
            PODS.topology_spread_constraints[1]]
        assert {"name": "hf-cache", "persistentVolumeClaim": {"claimName": "hf-cache", "readOnly": True}} in spec["volumes"]
        assert {"name": "hf-cache", "mountPath": "/cache/huggingface", "readOnly": True} in spec["containers"][0][
            "volumeMounts"]
    # The GPUs are asked as the platform's accelerator resource, on the workers only.
    assert pods["worker"]["spec"]["containers"][0]["resources"]["limits"] == {"cpu": "2", "memory": "32Gi",
                                                                            "amd.com/gpu": "1"}
    assert "amd.com/gpu" not in pods["head"]["spec"]["containers"][0]["resources"]["limits"]
    assert "nvidia.com/gpu" not in render_yaml([objects["RayJob"]])
    # The submitter pulls the same image through the same secret and goes through the same scheduler, but runs
    # no Ray: no GPU runtime, volumes or spreading.
    submitter = pods["submitter"]["spec"]
    assert submitter["imagePullSecrets"] == [{"name": "registry-pull"}] and submitter["schedulerName"] == "volcano"
    assert pods["submitter"]["metadata"]["labels"]["cost-center"] == "ml"
    assert {"runtimeClassName", "affinity", "topologySpreadConstraints", "volumes"}.isdisjoint(submitter)


def test_a_documents_pod_fields_add_to_the_platforms():
    objects = _objects("own", settings=PLATFORM, distributed={"num_workers": 2, "use_gpu": True}, cluster={
        "pod_labels": {"team": "a"}, "pod_annotations": {"example.com/owner": "alice"},
        "priority_class": "team-a-high", "scheduler_name": "kai-scheduler", "accelerator_resource": "nvidia.com/gpu",
        "node_affinity": {"required": [{"match_expressions": [{"key": "zone", "operator": "In", "values": ["eu-1"]}]}],
                          "preferred": [{"weight": 50, "match_expressions": [{"key": "gpu.memory", "operator": "Gt",
                                                                              "values": ["40000"]}]}]},
        "volumes": [{"name": "data", "mount_path": "/data", "persistent_volume_claim": "team-a-data"},
                    {"name": "out", "mount_path": "/scratch", "persistent_volume_claim": "team-a-scratch",
                     "read_only": False},
                    {"name": "prompts", "mount_path": "/prompts", "config_map": "team-a-prompts"}]})
    pods = _pods(objects["RayJob"])
    for role in ("head", "worker"):
        meta, spec = pods[role]["metadata"], pods[role]["spec"]
        assert {"team": "a", "cost-center": "ml"}.items() <= meta["labels"].items()
        assert meta["annotations"] == {"sidecar.istio.io/inject": "false", "example.com/owner": "alice"}
        assert (spec["priorityClassName"], spec["schedulerName"]) == ("team-a-high", "kai-scheduler")
        node = spec["affinity"]["nodeAffinity"]
        # Kubernetes ORs terms: each of the platform's two terms now also needs the document's zone.
        zone = {"key": "zone", "operator": "In", "values": ["eu-1"]}
        assert [t["matchExpressions"] for t in node["requiredDuringSchedulingIgnoredDuringExecution"][
            "nodeSelectorTerms"]] == [[{"key": "node-pool", "operator": "In", "values": ["gpu-a", "gpu-b"]}, zone],
                                      [{"key": "node-pool", "operator": "In", "values": ["reserved"]}, zone]]
        assert node["preferredDuringSchedulingIgnoredDuringExecution"] == [{"weight": 50, "preference": {
            "matchExpressions": [{"key": "gpu.memory", "operator": "Gt", "values": ["40000"]}]}}]
        assert spec["affinity"]["podAntiAffinity"] == PODS.affinity["podAntiAffinity"]
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert volumes["vol-data"]["persistentVolumeClaim"] == {"claimName": "team-a-data", "readOnly": True}
        assert volumes["vol-out"]["persistentVolumeClaim"] == {"claimName": "team-a-scratch"}
        assert volumes["vol-prompts"]["configMap"] == {"name": "team-a-prompts"}
        mounts = {m["mountPath"]: m for m in spec["containers"][0]["volumeMounts"]}
        assert mounts["/data"] == {"name": "vol-data", "mountPath": "/data", "readOnly": True}
        assert mounts["/scratch"] == {"name": "vol-out", "mountPath": "/scratch"}
        assert mounts["/prompts"]["readOnly"] is True and "/cache/huggingface" in mounts
    assert pods["worker"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert "volumes" not in pods["submitter"]["spec"]


def test_without_platform_defaults_nothing_extra_is_rendered():
    pods = _pods(_objects("plain", **GPU_JOB)["RayJob"])
    for pod in pods.values():
        assert {"imagePullSecrets", "schedulerName", "runtimeClassName", "affinity", "topologySpreadConstraints",
                "priorityClassName"}.isdisjoint(pod["spec"]) and "annotations" not in pod["metadata"]
    assert pods["worker"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"


@pytest.mark.parametrize("key", ["sdray.io/job", "kueue.x-k8s.io/queue-name", "kueue.x-k8s.io/priority-class",
                                 "app.kubernetes.io/instance", "ray.io/node-type", "scheduling.x-k8s.io/pod-group",
                                 "volcano.sh/queue-name"])
@pytest.mark.parametrize("field", ["pod_labels", "pod_annotations"])
def test_a_document_cannot_set_the_platforms_label_or_annotation_keys(field, key):
    """The attacks: a pod labelled sdray.io/job: victim passes the victim's NetworkPolicy (to its GCS and
    dashboard); a Kueue or Volcano queue label moves the pods to another team's queue; app.kubernetes.io/*
    is what the chart's Services select."""
    job = parse_job(make_job("jumper", "s3://o/x", "s3://d/x", cluster={field: {key: "victim"}}))
    with pytest.raises(RenderError, match=rf"spec\.cluster\.{field}\.{key}: the key is reserved to the platform"):
        render(job, PLATFORM, namespace="ml")


def test_the_controller_mounts_only_the_claims_and_config_maps_it_allows():
    settings = dataclasses.replace(PLATFORM, allowed_volume_claims=("team-a-data",),
                                   allowed_config_maps=("team-a-prompts",))
    # The attack: mount the service's own job database (the chart's sdray-data claim) read-write.
    steal = parse_job(make_job("steal", "s3://o/x", "s3://d/x", cluster={"volumes": [
        {"name": "db", "mount_path": "/db", "persistent_volume_claim": "sdray-data", "read_only": False}]}))
    with pytest.raises(RenderError, match=r"spec\.cluster\.volumes\[0\]: PersistentVolumeClaim 'sdray-data' is not "
                                          r"among .*\(team-a-data: the controller's --allow-volume-claim\)"):
        render(steal, settings, namespace="ml")
    policy = parse_job(make_job("peek", "s3://o/x", "s3://d/x", cluster={"volumes": [
        {"name": "p", "mount_path": "/p", "config_map": "sdray-policy"}]}))
    with pytest.raises(RenderError, match=r"ConfigMap 'sdray-policy' is not among .*--allow-config-map"):
        render(policy, settings, namespace="ml")
    over = parse_job(make_job("over", "s3://o/x", "s3://d/x", cluster={"volumes": [
        {"name": "c", "mount_path": "/cache/huggingface", "persistent_volume_claim": "team-a-data"}]}))
    with pytest.raises(RenderError, match=r"volumes\[0\]\.mount_path: /cache/huggingface is where the platform mounts"):
        render(over, settings, namespace="ml")
    ok = parse_job(make_job("ok", "s3://o/x", "s3://d/x", cluster={"volumes": [
        {"name": "d", "mount_path": "/data", "persistent_volume_claim": "team-a-data"}]}))
    check(render(ok, settings, namespace="ml"))


@pytest.mark.parametrize("volume, message", [
    ({"name": "node", "mount_path": "/host", "host_path": "/"}, "hostPath volumes are never allowed"),
    ({"name": "node", "mount_path": "/host", "hostPath": {"path": "/var/run/docker.sock"}},
     "hostPath volumes are never allowed"),
    # The job document the driver runs is /etc/sdray/job.yaml: a ConfigMap there would run one the policy never saw.
    ({"name": "doc", "mount_path": "/etc/sdray", "config_map": "my-own-job"}, "would cover /etc/sdray"),
    ({"name": "doc", "mount_path": "/etc", "config_map": "my-own-job"}, "would cover /etc/sdray"),
    ({"name": "cred", "mount_path": "/var/run/secrets/sdray/team-b-s3", "persistent_volume_claim": "x"},
     "would cover /var/run/secrets/sdray"),
    ({"name": "up", "mount_path": "/data/../etc/sdray", "persistent_volume_claim": "x"}, "normalised path"),
    ({"name": "two", "mount_path": "/d", "persistent_volume_claim": "x", "config_map": "y"}, "exactly one of"),
    ({"name": "rw", "mount_path": "/d", "config_map": "y", "read_only": False}, "always mounted read-only"),
])
def test_a_document_volume_is_a_claim_or_config_map_away_from_sdrays_mounts(volume, message):
    with pytest.raises(SpecError, match=r"spec\.cluster\.volumes\.0.*" + re.escape(message)):
        parse_job(make_job("vol", "s3://o/x", "s3://d/x", cluster={"volumes": [volume]}))


@pytest.mark.parametrize("resource", ["gpu", "kubernetes.io/gpu", "cpu", "requests.nvidia.com/gpu", "a/b/c"])
def test_an_accelerator_resource_must_be_an_extended_resource(resource):
    with pytest.raises(SpecError, match=r"spec\.cluster\.accelerator_resource"):
        parse_job(make_job("acc", "s3://o/x", "s3://d/x", cluster={"accelerator_resource": resource}))
    with pytest.raises(ValueError, match="acceleratorResource"):
        PodDefaults.model_validate({"acceleratorResource": resource})


def test_render_command_takes_the_platforms_pod_defaults(tmp_path):
    defaults = tmp_path / "pod-defaults.yaml"
    defaults.write_text(yaml.safe_dump(PODS.model_dump(by_alias=True)))
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(make_job("cli-pods", "s3://o/x", "s3://d/x", **GPU_JOB)))
    result = subprocess.run([sys.executable, "-m", "sdray.cli", "render", str(path), "-n", "ml", "--pod-defaults",
                             str(defaults)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    rayjob = check(load_all(result.stdout))[-1]
    worker = _workers(rayjob)[0]["template"]["spec"]
    assert worker["schedulerName"] == "volcano" and worker["containers"][0]["resources"]["limits"]["amd.com/gpu"] == "1"
    defaults.write_text("volumes: [{name: dshm, emptyDir: {}}]\n")
    refused = subprocess.run([sys.executable, "-m", "sdray.cli", "render", str(path), "--pod-defaults", str(defaults)],
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "volumes[0].name: 'dshm' is taken" in " ".join(refused.stderr.split())


@pytest.mark.parametrize("text, where", [
    ("acceleratorResource: gpu\n", "acceleratorResource"),
    ("labels: {team: 'a b'}\n", "labels.team"),
    ("volumeMounts: [{name: nowhere, mountPath: /x}]\n", "volumeMounts[0]: needs the name of one of volumes"),
    ("volumes: [{name: c, emptyDir: {}}]\nvolumeMounts: [{name: c, mountPath: /etc/sdray}]\n",
     "volumeMounts[0].mountPath: /etc/sdray is where sdray mounts"),
    ("topologySpreadConstraints: [{maxSkew: 1}]\n", "topologySpreadConstraints[0]: needs maxSkew"),
    ("schedulerName: Volcano\n", "schedulerName"),
    ("imagePullSecrets: [regcred]\n", "imagePullSecrets.0"),
    ("tolerations: []\n", "tolerations: Extra inputs are not permitted"),
    ("[", "not valid YAML"),
])
def test_a_broken_pod_defaults_file_is_refused_with_its_field(tmp_path, text, where):
    path = tmp_path / "pod-defaults.yaml"
    path.write_text(text)
    with pytest.raises(PodDefaultsError, match=re.escape(f"{path}: ") + ".*" + re.escape(where)):
        PodDefaults.load(path)
