"""The helm chart, rendered and linted with the Helm v4 SDK (helm-python-sdk: no helm binary here), every
object it renders checked against the real schemas."""

from __future__ import annotations

import functools

import helm_python
import pytest
import yaml
from conftest import make_job
from k8s_checks import REPO, check, load_all

from sdray.k8s.defaults import PodDefaults
from sdray.k8s.render import RenderSettings, render
from sdray.service.policy import Policy, PolicyFile, policy_schema
from sdray.spec import parse_job

CHART = REPO / "helm" / "sdray"
VALUES = {"default": {}, **{p.name.removesuffix("-values.yaml"): yaml.safe_load(p.read_text())
                            for p in sorted((CHART / "ci").glob("*-values.yaml"))}}
RELEASE, NAMESPACE = "sdray", "ml-platform"


@functools.cache
def rendered(values_name: str) -> tuple[dict, ...]:
    with helm_python.Chart.load(CHART) as chart:
        files = chart.render(VALUES[values_name], name=RELEASE, namespace=NAMESPACE)
        crds = [yaml.safe_load(c["data"]) for c in chart.crds]
    objects = [o for path, text in sorted(files.items()) if not path.endswith("NOTES.txt") for o in load_all(text)]
    return tuple(crds + objects)


def of_kind(objects, kind) -> list[dict]:
    return [o for o in objects if o["kind"] == kind]


def named(objects, kind, name) -> dict:
    return next(o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name)


def pod_defaults(objects) -> PodDefaults:
    """The controller's --pod-defaults file, as the chart writes it into its ConfigMap."""
    return PodDefaults.model_validate(yaml.safe_load(
        named(objects, "ConfigMap", "sdray-pod-defaults")["data"]["pod-defaults.yaml"]))


def test_lint_strict_finds_nothing():
    report = helm_python.lint(CHART, strict=True, kube_version="v1.33.0")
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


@pytest.mark.parametrize("values_name", sorted(VALUES))
def test_every_rendered_object_is_valid(values_name):
    objects = check(rendered(values_name))
    assert of_kind(objects, "CustomResourceDefinition")[0]["metadata"]["name"] == "diffusionjobs.sdray.io"
    for deployment in of_kind(objects, "Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        for container in pod["containers"]:
            security = container["securityContext"]
            assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False
            assert security["capabilities"] == {"drop": ["ALL"]}
            assert container["resources"]["limits"] and container["resources"]["requests"]
            assert container["livenessProbe"] and container["readinessProbe"]
            assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]  # writable under a read-only root


def test_default_install():
    objects = rendered("default")
    service = named(objects, "Deployment", "sdray-service")["spec"]["template"]["spec"]
    assert service["containers"][0]["args"] == [
        "serve", "--host", "0.0.0.0", "--port", "8000", "--tokens", "/etc/sdray/tokens/tokens.json",
        "--db", "/var/lib/sdray/jobs.db", "--backend", "kuberay", "--namespace", NAMESPACE,
        "--public-url", f"http://sdray.{NAMESPACE}.svc:80", "--policy", "/etc/sdray/policy/policy.yaml",
        "--metrics-port", "9090"]
    # /metrics on its own port, which the API's Service (and so any Ingress to it) does not carry
    assert [p["name"] for p in named(objects, "Service", "sdray")["spec"]["ports"]] == ["http"]
    assert named(objects, "Service", "sdray-service-metrics")["spec"]["ports"][0]["targetPort"] == "svc-metrics"
    volumes = {v["name"]: v for v in service["volumes"]}
    assert volumes["policy"]["configMap"]["name"] == "sdray-policy"
    assert Policy(PolicyFile.model_validate(yaml.safe_load(
        named(objects, "ConfigMap", "sdray-policy")["data"]["policy.yaml"]))).for_tenant("x").images == []
    assert volumes["tokens"]["secret"]["secretName"] == "sdray-tokens"
    assert volumes["data"]["persistentVolumeClaim"]["claimName"] == "sdray-data"
    assert named(objects, "Deployment", "sdray-service")["spec"]["strategy"] == {"type": "Recreate"}  # one SQLite writer
    controller = named(objects, "Deployment", "sdray-controller")["spec"]["template"]["spec"]["containers"][0]
    assert controller["args"] == ["controller", "--lease-name=sdray-controller", "--health-port=8081",
                                  f"--namespace={NAMESPACE}", "--pod-defaults=/etc/sdray/pod-defaults/pod-defaults.yaml"]
    # The chart's defaults for the job pods are the renderer's own: a plain install changes no RayJob.
    assert pod_defaults(objects) == PodDefaults()
    env = {e["name"]: e.get("value") for e in controller["env"]}
    assert (env["SDRAY_IMAGE"], env["SDRAY_RAY_OPERATOR_NAMESPACE"]) == ("sdray:0.1.0", "kuberay-system")
    # No shared job ServiceAccount: the controller gives each job its own (sdray/k8s/render.py).
    assert "SDRAY_JOB_SERVICE_ACCOUNT" not in env
    assert [a["metadata"]["name"] for a in of_kind(objects, "ServiceAccount")] == ["sdray-service", "sdray-controller"]
    # No Prometheus operator API in a plain `helm template`: "auto" renders no ServiceMonitor/PrometheusRule.
    assert not of_kind(objects, "ServiceMonitor") and not of_kind(objects, "PrometheusRule")
    assert not of_kind(objects, "Ingress") and not of_kind(objects, "LocalQueue")


def _rules(objects, kind, name, namespace=None) -> dict[tuple, set]:
    role = next(o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name
                and o["metadata"].get("namespace") == namespace)
    return {(tuple(r["apiGroups"]), tuple(r["resources"]), tuple(r.get("resourceNames", ()))): set(r["verbs"])
            for r in role["rules"]}


CONTROLLER_RULES = {
    (("sdray.io",), ("diffusionjobs",), ()): {"get", "list", "watch"},
    (("sdray.io",), ("diffusionjobs/status",), ()): {"patch"},
    (("ray.io",), ("rayjobs",), ()): {"get", "list", "watch", "create", "delete"},
    (("",), ("configmaps",), ()): {"get", "create", "update"},
    (("",), ("serviceaccounts",), ()): {"get", "create"},
    (("rbac.authorization.k8s.io",), ("roles", "rolebindings"), ()): {"get", "create"},
    (("networking.k8s.io",), ("networkpolicies",), ()): {"get", "create"},
    (("events.k8s.io",), ("events",), ()): {"create", "patch"},
}


def test_rbac_is_least_privilege():
    objects = rendered("full")
    for role in of_kind(objects, "Role") + of_kind(objects, "ClusterRole"):
        for rule in role["rules"]:
            assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"], role["metadata"]["name"]
    assert not of_kind(objects, "ClusterRole")  # the namespaces are known: Roles only
    for ns in ("team-a", "team-b"):
        assert _rules(objects, "Role", "sdray-controller", ns) == CONTROLLER_RULES
    # Only the controller may write DiffusionJob status namespace-wide; the shared job ServiceAccount ("ray-pods"
    # here) is bound to nothing: each job's own ServiceAccount gets a Role naming its job (tests/test_k8s_*.py).
    writers = {r["metadata"]["name"] for r in of_kind(objects, "Role")
               for rule in r["rules"] if "diffusionjobs/status" in rule["resources"]}
    assert writers == {"sdray-controller"}
    assert [a["metadata"]["namespace"] for a in of_kind(objects, "ServiceAccount") if a["metadata"]["name"] == "ray-pods"
            ] == ["team-a", "team-b"]
    assert not [s for b in of_kind(objects, "RoleBinding") for s in b["subjects"] if s["name"] == "ray-pods"]
    for ns in ("team-a", "team-b"):
        binding = named([o for o in objects if o["metadata"].get("namespace") == ns], "RoleBinding", "sdray-controller")
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "sdray-controller", "namespace": NAMESPACE}]
    assert _rules(objects, "Role", "sdray-controller-lease", NAMESPACE) == {
        (("coordination.k8s.io",), ("leases",), ()): {"create"},
        (("coordination.k8s.io",), ("leases",), ("sdray-controller",)): {"get", "update"}}
    assert _rules(objects, "Role", "sdray-service", "team-a") == {
        (("sdray.io",), ("diffusionjobs",), ()): {"get", "list", "create", "delete"},
        (("",), ("secrets",), ()): {"create"},
        (("",), ("pods",), ()): {"list"}, (("",), ("pods/log",), ()): {"get"}}


def test_every_namespace_needs_a_cluster_role():
    objects = rendered("cluster-wide")
    assert _rules(objects, "ClusterRole", "sdray-controller") == CONTROLLER_RULES
    args = named(objects, "Deployment", "sdray-controller")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert not any(a.startswith("--namespace") for a in args)
    assert named(objects, "LocalQueue", "sdray")["apiVersion"] == "kueue.x-k8s.io/v1beta1"


def test_full_install():
    objects = rendered("full")
    controller = named(objects, "Deployment", "sdray-controller")
    assert controller["spec"]["replicas"] == 2  # the Lease picks the one that acts
    args = controller["spec"]["template"]["spec"]["containers"][0]["args"]
    assert [a for a in args if a.startswith("--namespace")] == ["--namespace=team-a", "--namespace=team-b"]
    ingress = named(objects, "Ingress", "sdray")
    for path in ingress["spec"]["rules"][0]["http"]["paths"]:
        assert path["backend"]["service"] == {"name": "sdray", "port": {"name": "http"}}
    env = {e["name"]: e.get("value") for e in controller["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert (env["SDRAY_JOB_SERVICE_ACCOUNT"], env["SDRAY_RAY_OPERATOR_NAMESPACE"]) == ("ray-pods", "ray-system")
    monitor = named(objects, "ServiceMonitor", "sdray")
    assert [(e["port"], e["relabelings"][0]["replacement"]) for e in monitor["spec"]["endpoints"]] == [
        ("svc-metrics", "sdray"), ("metrics", "sdray-controller")]  # job="sdray", as examples/alerts.yml selects
    rule = named(objects, "PrometheusRule", "sdray")
    shipped = [yaml.safe_load((CHART / "files" / f).read_text())["groups"] for f in ("alerts.yml", "controller-alerts.yml")]
    assert rule["spec"]["groups"] == shipped[0] + shipped[1]
    assert named(objects, "LocalQueue", "team-a")["spec"] == {"clusterQueue": "shared-gpus"}
    assert named(objects, "LocalQueue", "team-a")["metadata"]["namespace"] == "team-a"


def _ingress_routes(paths: list[dict], request: str) -> bool:
    """Whether an Ingress's paths send ``request`` to a backend (networking.k8s.io/v1 path matching: Exact
    is the whole path, Prefix whole path elements; ImplementationSpecific is up to the controller: any
    such path counts as matching everything)."""
    for rule in paths:
        kind, path = rule["pathType"], rule["path"]
        if kind == "Exact" and request == path:
            return True
        if kind == "Prefix":
            want, got = [e for e in path.split("/") if e], [e for e in request.split("/") if e]
            if got[:len(want)] == want:
                return True
        if kind == "ImplementationSpecific":
            return True
    return False


@pytest.mark.parametrize("values", [{"ingress": {"enabled": True}}, VALUES["full"]], ids=["default-ingress", "full"])
def test_the_ingress_routes_no_path_to_metrics_or_internal_endpoints(values):
    with helm_python.Chart.load(CHART) as chart:
        files = chart.render(values, name=RELEASE, namespace=NAMESPACE)
    [ingress] = of_kind(check(load_all(files["sdray/templates/ingress.yaml"])), "Ingress")
    paths = [p for rule in ingress["spec"]["rules"] for p in rule["http"]["paths"]]
    # What a caller outside the cluster tries: the metrics (tenant and job names in labels), the probes, and
    # the drivers' progress endpoint.
    for request in ("/metrics", "/metrics/", "/metrics?name[]=x", "/healthz", "/readyz",
                    "/internal/v1/jobs/x/progress", "/v1metrics", "/docs/../metrics"):
        assert not _ingress_routes(paths, request.split("?")[0]), request
    for request in ("/", "/v1/jobs", "/v1/jobs/abc/logs", "/v1/jobs/abc/samples/latest.png", "/docs",
                    "/openapi.json"):
        assert _ingress_routes(paths, request), request


def test_the_charts_alert_rules_are_the_repositorys():
    # helm reads files inside the chart only: files/alerts.yml is a copy of examples/alerts.yml (promtool-tested).
    assert (CHART / "files" / "alerts.yml").read_text() == (REPO / "examples" / "alerts.yml").read_text(), (
        "helm/sdray/files/alerts.yml is stale: cp examples/alerts.yml helm/sdray/files/alerts.yml")


def test_controller_only_install():
    objects = rendered("controller-only")
    assert [d["metadata"]["name"] for d in of_kind(objects, "Deployment")] == ["sdray-controller"]
    env = named(objects, "Deployment", "sdray-controller")["spec"]["template"]["spec"]["containers"][0]["env"]
    assert "SDRAY_JOB_SERVICE_ACCOUNT" not in {e["name"] for e in env}
    assert not [o for o in objects if o["metadata"]["name"].endswith("-job")]


@pytest.mark.parametrize("values, where", [
    ({"controller": {"replicas": "two"}}, "/controller/replicas"),
    ({"image": {"repository": "sdray", "pullPolicy": "Sometimes"}}, "/image/pullPolicy"),
    ({"servce": {"enabled": True}}, "additional properties 'servce' not allowed"),
    ({"metrics": {"serviceMonitor": {"enabled": "yes"}}}, "/metrics/serviceMonitor/enabled"),
    ({"controller": {"watchNamespaces": ["Team_A"]}}, "/controller/watchNamespaces/0"),
    ({"service": {"resources": {"limits": {"memory": "2 GB"}}}}, "/service/resources/limits/memory"),
    ({"jobServiceAccount": {"name": "sdray-job-alpha"}}, "/jobServiceAccount/name"),  # a job's own identity
    ({"kuberay": {"operatorNamespace": "Ray System"}}, "/kuberay/operatorNamespace"),
    ({"policy": {"tenants": {"alice": {"imagez": []}}}}, "/policy/tenants/alice"),
    ({"policy": {"default": {"max_workers": 0}}}, "/policy/default/max_workers"),
    ({"policy": {"default": {"volume_claims": ["team-a:rw"]}}}, "/policy/default/volume_claims/0"),
    ({"jobServiceAccount": {"annotations": {"eks.amazonaws.com/role-arn": 7}}},
     "/jobServiceAccount/annotations/eks.amazonaws.com~1role-arn"),
    ({"jobServiceAccount": {"annotations": {"bad key!": "x"}}}, "invalid propertyName 'bad key!'"),
    ({"controller": {"allowedVolumeClaims": ["Team_A"]}}, "/controller/allowedVolumeClaims/0"),
    ({"controller": {"allowedConfigMaps": "team-a"}}, "/controller/allowedConfigMaps"),
    ({"jobPods": {"imagePullSecrets": ["regcred"]}}, "/jobPods/imagePullSecrets/0"),
    ({"jobPods": {"labels": {"team": "a b"}}}, "/jobPods/labels/team"),
    ({"jobPods": {"annotations": {"note": ["x"]}}}, "/jobPods/annotations/note"),
    ({"jobPods": {"affinity": {"nodeAfinity": {}}}}, "/jobPods/affinity"),
    ({"jobPods": {"topologySpreadConstraints": [{"maxSkew": 0, "topologyKey": "zone",
                                                 "whenUnsatisfiable": "ScheduleAnyway"}]}},
     "/jobPods/topologySpreadConstraints/0/maxSkew"),
    ({"jobPods": {"topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "zone"}]}},
     "/jobPods/topologySpreadConstraints/0"),
    ({"jobPods": {"volumes": [{"name": "dshm", "emptyDir": {}}]}}, "/jobPods/volumes/0/name"),
    ({"jobPods": {"volumeMounts": [{"name": "cache", "mountPath": "cache"}]}}, "/jobPods/volumeMounts/0/mountPath"),
    ({"jobPods": {"acceleratorResource": "gpu"}}, "/jobPods/acceleratorResource"),
    ({"jobPods": {"acceleratorResource": "kubernetes.io/gpu"}}, "/jobPods/acceleratorResource"),
    ({"jobPods": {"runtimeClassName": "Nvidia"}}, "/jobPods/runtimeClassName"),
    ({"jobPods": {"schedulerName": 3}}, "/jobPods/schedulerName"),
    ({"jobPods": {"priorityClassName": "high priority"}}, "/jobPods/priorityClassName"),
    ({"jobPods": {"tolerations": []}}, "additional properties 'tolerations' not allowed"),
])
def test_values_schema_refuses_bad_values(values, where):
    with helm_python.Chart.load(CHART) as chart:
        chart.validate_schema(VALUES["full"])
        with pytest.raises(helm_python.HelmValuesError, match=where):
            chart.validate_schema(values)


def test_the_tenant_policy_reaches_the_service_and_its_namespaces_get_roles():
    """values.policy becomes the service's --policy file; every tenant namespace it names gets the service's
    Role (to create that tenant's DiffusionJobs there) and is watched by the controller."""
    values = {"policy": {"default": {"max_workers": 4},
                         "tenants": {"alice": {"namespace": "team-a", "secrets": ["team-a-s3"]},
                                     "bob": {"namespace": "team-b"}}}}
    with helm_python.Chart.load(CHART) as chart:
        files = chart.render(values, name=RELEASE, namespace=NAMESPACE)
    objects = check([o for path, text in sorted(files.items()) if not path.endswith("NOTES.txt")
                     for o in load_all(text)])
    loaded = Policy(PolicyFile.model_validate(yaml.safe_load(
        named(objects, "ConfigMap", "sdray-policy")["data"]["policy.yaml"])))
    assert loaded.for_tenant("alice").secrets == ["team-a-s3"] and loaded.for_tenant("alice").max_workers == 4
    roles = {(o["metadata"]["namespace"], o["metadata"]["name"]) for o in of_kind(objects, "Role")}
    assert {(ns, "sdray-service") for ns in (NAMESPACE, "team-a", "team-b")} <= roles
    assert {(ns, "sdray-controller") for ns in (NAMESPACE, "team-a", "team-b")} <= roles
    bindings = {(o["metadata"]["namespace"], o["metadata"]["name"]) for o in of_kind(objects, "RoleBinding")}
    assert {(ns, "sdray-service") for ns in ("team-a", "team-b")} <= bindings
    # a changed policy restarts the service (the pod template carries its checksum)
    with helm_python.Chart.load(CHART) as chart:
        other = chart.render({"policy": {"default": {"max_workers": 2}}}, name=RELEASE, namespace=NAMESPACE)
    annotation = "sdray.io/policy-checksum"
    changed = [o for path, text in other.items() if not path.endswith("NOTES.txt") for o in load_all(text)
               if o["kind"] == "Deployment"
               and o["metadata"]["name"] == "sdray-service"][0]["spec"]["template"]["metadata"]["annotations"]
    assert changed[annotation] != named(objects, "Deployment", "sdray-service")["spec"]["template"]["metadata"][
        "annotations"][annotation]


def test_the_charts_policy_schema_is_the_models():
    import json

    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["properties"]["policy"] == policy_schema(), "stale: run python k8s/generate.py"


def test_the_job_pod_values_reach_every_ray_pod_through_the_controllers_settings(tmp_path):
    """values.jobPods and jobServiceAccount.annotations → the controller's --pod-defaults ConfigMap, read as the
    controller reads it (PodDefaults.load) with the --allow-* flags the chart passes → a GPU job's RayJob,
    valid against the real schemas, with every value on the head and the workers."""
    objects = rendered("full")
    deployment = named(objects, "Deployment", "sdray-controller")["spec"]["template"]
    args = deployment["spec"]["containers"][0]["args"]
    path = tmp_path / "pod-defaults.yaml"
    path.write_text(named(objects, "ConfigMap", "sdray-pod-defaults")["data"]["pod-defaults.yaml"])
    assert "--pod-defaults=/etc/sdray/pod-defaults/pod-defaults.yaml" in args
    assert {"name": "pod-defaults", "mountPath": "/etc/sdray/pod-defaults", "readOnly": True} in deployment["spec"][
        "containers"][0]["volumeMounts"]

    def flag(name):
        return tuple(a.split("=", 1)[1] for a in args if a.startswith(f"--{name}="))
    settings = RenderSettings(image="registry.example.com/ml/sdray:0.1.0-cuda", pods=PodDefaults.load(path),
                              allowed_volume_claims=flag("allow-volume-claim"),
                              allowed_config_maps=flag("allow-config-map"))
    assert (settings.allowed_volume_claims, settings.allowed_config_maps) == (("team-a-data", "hf-cache"),
                                                                             ("team-a-prompts",))
    job = parse_job(make_job("full", "s3://o/x", "s3://d/x", distributed={"num_workers": 2, "use_gpu": True},
                             cluster={"volumes": [{"name": "data", "mount_path": "/data",
                                                   "persistent_volume_claim": "team-a-data"}]}))
    rayjob = check(render(job, settings, namespace="team-a"))[-1]
    values = VALUES["full"]["jobPods"]
    cluster = rayjob["spec"]["rayClusterSpec"]
    for pod in (cluster["headGroupSpec"]["template"], cluster["workerGroupSpecs"][0]["template"]):
        spec = pod["spec"]
        assert pod["metadata"]["labels"]["cost-center"] == "ml-research"
        assert pod["metadata"]["annotations"] == {"sidecar.istio.io/inject": "false"}
        assert spec["imagePullSecrets"] == [{"name": "job-registry-pull"}]
        assert spec["affinity"] == values["affinity"]
        assert spec["topologySpreadConstraints"][0]["labelSelector"] == {"matchLabels": {"sdray.io/job": "full"}}
        assert (spec["runtimeClassName"], spec["schedulerName"], spec["priorityClassName"]) == (
            "rocm", "volcano", "training-default")
        mounts = {m["mountPath"] for m in spec["containers"][0]["volumeMounts"]}
        assert {"/cache/huggingface", "/data"} <= mounts
    worker = cluster["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["amd.com/gpu"] == "1" and "nvidia.com/gpu" not in worker["resources"]["limits"]
    # The shared job ServiceAccount the chart makes carries the cloud identity.
    for account in (a for a in of_kind(objects, "ServiceAccount") if a["metadata"]["name"] == "ray-pods"):
        assert account["metadata"]["annotations"] == {
            "eks.amazonaws.com/role-arn": "arn:aws:iam::111122223333:role/sdray-jobs"}
    # A changed default restarts the controller (its pod template carries the file's checksum).
    with helm_python.Chart.load(CHART) as chart:
        other = chart.render({**VALUES["full"], "jobPods": {**values, "schedulerName": "kai-scheduler"}},
                             name=RELEASE, namespace=NAMESPACE)
    changed = named([o for path, text in other.items() if not path.endswith("NOTES.txt") for o in load_all(text)],
                    "Deployment", "sdray-controller")["spec"]["template"]["metadata"]["annotations"]
    key = "sdray.io/pod-defaults-checksum"
    assert changed[key] != deployment["metadata"]["annotations"][key]


def test_the_job_pods_take_the_charts_pull_secrets_unless_told_otherwise():
    with helm_python.Chart.load(CHART) as chart:
        files = chart.render({"imagePullSecrets": [{"name": "registry-pull"}]}, name=RELEASE, namespace=NAMESPACE)
    objects = [o for path, text in sorted(files.items()) if not path.endswith("NOTES.txt") for o in load_all(text)]
    assert pod_defaults(objects).image_pull_secrets[0].name == "registry-pull"
    assert pod_defaults(rendered("full")).image_pull_secrets[0].name == "job-registry-pull"
