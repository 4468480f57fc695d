"""The DiffusionJob CRD: generated from the job model, structural, committed in sync, and it accepts what
the model accepts (and refuses what the API server would)."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
from conftest import make_job
from k8s_checks import REPO, check, schemas

from sdray.k8s.crd import crd, crd_yaml, openapi_schema, structural_problems
from sdray.k8s.kube import diffusionjob_object
from sdray.k8s.validate import InvalidObjects
from sdray.spec import load_job, parse_job


def _schema() -> dict:
    return crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def test_committed_crd_is_the_generated_one():
    committed = (REPO / "k8s" / "crd.yaml").read_text()
    assert committed == crd_yaml(), "k8s/crd.yaml is stale: run `sdray k8s crd > k8s/crd.yaml`"
    chart = REPO / "helm" / "sdray" / "crds" / "diffusionjobs.sdray.io.yaml"
    assert chart.read_text() == committed, f"{chart} is stale: copy k8s/crd.yaml there"


def test_crd_command_prints_it():
    result = subprocess.run([sys.executable, "-m", "sdray.cli", "k8s", "crd"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout == crd_yaml()


def test_crd_is_structural_and_a_valid_crd():
    assert structural_problems(_schema()) == []
    check([crd()])  # the CustomResourceDefinition itself, against Kubernetes' own schema (strict)
    version = crd()["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    assert [c["name"] for c in version["additionalPrinterColumns"]] == ["State", "Step", "Loss", "RayJob", "Age"]
    assert crd()["spec"]["names"]["shortNames"] == ["dj"]
    status = _schema()["properties"]["status"]["properties"]
    assert {"state", "step", "loss", "rayJobName", "startTime", "completionTime", "observedGeneration",
            "conditions"} <= set(status)


@pytest.mark.parametrize("schema, problem", [
    ({"type": "object", "properties": {"a": {"$ref": "#/$defs/A"}}}, ".a: unknown key '$ref'"),
    ({"type": "object", "properties": {"a": {"description": "no type"}}}, ".a: no type"),
    ({"type": "object", "additionalProperties": False}, "additionalProperties: false"),
    ({"type": "object", "properties": {"a": {"anyOf": [{"type": "string"}, {"type": "null"}]}}},
     ".a.anyOf[0]: ['type'] inside anyOf"),
    ({"type": "number", "exclusiveMinimum": 0}, "exclusiveMinimum must be a boolean"),
    ({"type": "object", "patternProperties": {"^a$": {"type": "string"}}}, "patternProperties is not supported"),
])
def test_structural_check_finds_what_the_api_server_refuses(schema, problem):
    assert any(problem in p for p in structural_problems(schema)), structural_problems(schema)


def test_conversion_of_pydantic_shapes():
    spec = _schema()["properties"]["spec"]["properties"]
    assert spec["model"]["properties"]["preset"]["nullable"] is True  # Literal | None
    assert set(spec["model"]["properties"]["overrides"]["properties"]) == {
        "unet", "transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3", "scheduler"}  # a Literal
    assert spec["train"]["properties"]["optimizer"]["properties"]["betas"] == {
        "type": "array", "items": {"type": "number"}, "minItems": 2, "maxItems": 2}  # a tuple
    assert spec["cluster"]["properties"]["worker"]["properties"]["cpu"]["x-kubernetes-int-or-string"] is True
    lr = spec["train"]["properties"]["learning_rate"]
    assert (lr["minimum"], lr["exclusiveMinimum"]) == (0.0, True)
    assert "default" not in _keys(_schema())  # the API server would write defaults into every object
    # dicts with patterned keys are maps of their values (the model checks the keys)
    assert spec["cluster"]["properties"]["env"]["additionalProperties"] == {"type": "string"}
    resources = spec["distributed"]["properties"]["resources_per_worker"]
    assert resources["additionalProperties"] == {"type": "number", "minimum": 0.0, "maximum": 1e15}
    assert resources["maxProperties"] == 64


def _keys(node) -> set[str]:
    if isinstance(node, dict):
        return set(node) | {k for v in node.values() for k in _keys(v)}
    if isinstance(node, list):
        return {k for v in node for k in _keys(v)}
    return set()


def _objects_of_examples():
    paths = sorted((REPO / "examples").glob("*.yaml")) + sorted((REPO / "k8s" / "examples").glob("diffusionjob*.yaml"))
    return [pytest.param(p, id=p.name) for p in paths]


@pytest.mark.parametrize("path", _objects_of_examples())
def test_example_documents_are_valid_diffusionjobs(path):
    check([diffusionjob_object(load_job(path), "ml")])


def _dj(**spec) -> dict:
    return diffusionjob_object(parse_job(make_job("crd-test", "s3://out/x", "s3://data/x", **spec)), "ml")


def test_a_document_written_with_stage_unet_still_applies():
    old = _dj()
    old["spec"]["stage"] = "unet"  # the denoiser stage's earlier name: stored documents keep it
    check([old])
    old["spec"]["stage"] = "transformer"
    with pytest.raises(InvalidObjects, match="spec.stage: 'transformer' is not one of"):
        check([old])


def test_the_schema_refuses_what_the_model_refuses():
    ok = _dj(cluster={"worker": {"cpu": 8, "memory": "32Gi"}}, tune={"search_space": {
        "train.learning_rate": {"loguniform": [1e-5, 1e-3]}, "train.batch_size": {"choice": [8, 16]}},
        "metric": "loss"})
    check([ok])
    for path, value, message in [
        (("spec", "train", "learning_rate"), -1, "spec.train.learning_rate: -1 is less than or equal to the minimum"),
        (("spec", "train", "learning_rat"), 1, "'learning_rat' was unexpected"),
        (("spec", "distributed", "strategy"), "horovod", "spec.distributed.strategy: 'horovod' is not one of"),
        (("spec", "cluster", "worker", "cpu"), 1.5, "spec.cluster.worker.cpu"),
        (("spec", "model", "overrides", "text_encoder_4"), {}, "'text_encoder_4' was unexpected"),
        (("spec", "distributed", "resources_per_worker"), {"GPU": -100},
         "spec.distributed.resources_per_worker.GPU: -100 is less than the minimum of 0"),
        (("spec", "train", "seed"), 2**70, "spec.train.seed: 1180591620717411303424 is greater than the maximum"),
        (("spec", "storage", "credentials_secret"), "../other-tenant-secret",
         "spec.storage.credentials_secret: '../other-tenant-secret' does not match"),
    ]:
        bad = copy.deepcopy(ok)
        node = bad
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
        with pytest.raises(InvalidObjects) as err:
            check([bad])
        assert any(message in p for p in err.value.problems), err.value.problems


def test_openapi_conversion_refuses_unions_it_cannot_express():
    with pytest.raises(ValueError, match=r"\.x: a union of 2 types"):
        openapi_schema({"type": "object", "properties": {"x": {"anyOf": [{"type": "string"}, {"type": "array"}]}}})


def test_schemas_are_loaded_once():
    assert schemas() is schemas()


def test_bare_names_are_a_typeless_node_that_checks_strings_by_pattern():
    """A structural schema has no "string or object" type. The one escape that keeps the object form's fields
    (checked, pruned) is a node without a type that preserves unknown fields; its `pattern` applies to strings
    only, so a bare name must be one of the names. (x-kubernetes-int-or-string admits no object.)"""
    scheduler = _schema()["properties"]["spec"]["properties"]["tune"]["properties"]["scheduler"]
    assert "type" not in scheduler and scheduler["x-kubernetes-preserve-unknown-fields"] is True
    assert scheduler["pattern"] == "^(fifo|asha|pbt)$"
    assert scheduler["properties"]["reduction_factor"]["type"] == "number"
    assert structural_problems(scheduler, ".scheduler") == []
    search = {"search_space": {"train.learning_rate": {"loguniform": [1e-5, 1e-3]}}, "metric": "loss"}
    for value in ("asha", "pbt", {"name": "asha", "grace_period": 10}):
        check([_dj(tune={**search, "scheduler": value}, train={"optimizer": "adamw"})])
    for value, message in [("ahsa", "spec.tune.scheduler: 'ahsa' does not match '^(fifo|asha|pbt)$'"),
                           ({"name": "sgd"}, "spec.tune.scheduler.name: 'sgd' is not one of"),
                           ({"name": "asha", "reduction_factor": "2"}, "spec.tune.scheduler.reduction_factor")]:
        bad = _dj(tune=search)
        bad["spec"]["tune"]["scheduler"] = value
        with pytest.raises(InvalidObjects) as err:
            check([bad])
        assert any(message in p for p in err.value.problems), err.value.problems
    bad = _dj()
    bad["spec"]["train"]["optimizer"] = "sgd"
    with pytest.raises(InvalidObjects, match=r"spec.train.optimizer: 'sgd' does not match '\^\(adamw\)\$'"):
        check([bad])
