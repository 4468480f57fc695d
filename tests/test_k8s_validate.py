"""The offline object checks themselves: they must fail where an API server would refuse."""

from __future__ import annotations

import hashlib

import pytest
from k8s_checks import REPO, SCHEMA_DIR, check

from sdray.k8s.validate import InvalidObjects, openapi_to_jsonschema

SHARED = REPO.parent / "shared" / "schemas"


def _problems(obj) -> list[str]:
    with pytest.raises(InvalidObjects) as err:
        check([obj])
    return err.value.problems


def test_unknown_kind_fails_instead_of_warning():
    problems = _problems({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}})
    assert problems == ["Widget/w: no schema for example.com/v1 Widget (not a Kubernetes 1.33 kind, no CRD given)"]


def test_core_kinds_are_strict():
    cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": {"a": "b"}}
    check([cm])
    assert "ConfigMap/c: <root>: Additional properties are not allowed ('dta' was unexpected)" in _problems(
        {**cm, "dta": {}})


def test_custom_resources_are_strict_and_typed():
    queue = {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "LocalQueue",
             "metadata": {"name": "team-a", "namespace": "ml"}, "spec": {"clusterQueue": "gpus"}}
    check([queue])
    assert any("'clusterqueue' was unexpected" in p for p in _problems({**queue, "spec": {"clusterqueue": "gpus"}}))
    assert any("spec.clusterQueue: 3 is not of type 'string'" in p for p in _problems({**queue, "spec": {"clusterQueue": 3}}))
    # A custom resource's metadata is checked as ObjectMeta, which its CRD leaves open.
    assert any("metadata of metadata: Additional properties" in p
               for p in _problems({**queue, "metadata": {"name": "team-a", "lables": {}}}))


def test_names_and_labels_are_checked():
    cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "Bad_Name", "labels": {"a": "x" * 64}}}
    problems = _problems(cm)
    assert "ConfigMap/Bad_Name: metadata.name: 'Bad_Name' is not a DNS-1123 subdomain" in problems
    assert any("metadata.labels.a:" in p and "not a valid label value" in p for p in problems)


def test_the_same_object_twice_is_refused():
    cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}}
    with pytest.raises(InvalidObjects, match="ConfigMap/c: given twice"):
        check([cm, cm])


def test_nullable_becomes_a_null_type():
    schema = openapi_to_jsonschema({"type": "object", "properties": {
        "a": {"type": "string", "nullable": True, "enum": ["x"]},
        "b": {"type": "object", "x-kubernetes-preserve-unknown-fields": True, "properties": {"c": {"type": "integer"}}}}})
    assert schema["properties"]["a"] == {"type": ["string", "null"], "enum": ["x", None]}
    assert schema["additionalProperties"] is False  # closed, like the API server with strict field validation
    assert "additionalProperties" not in schema["properties"]["b"]  # preserves unknown fields: open


@pytest.mark.skipif(not SHARED.is_dir(), reason="no ../shared/schemas beside this clone")
def test_schema_copies_match_the_shared_ones():
    copies = sorted(p for p in SCHEMA_DIR.rglob("*.yaml"))
    assert len(copies) == 6
    for copy in copies:
        original = SHARED / copy.relative_to(SCHEMA_DIR)
        assert hashlib.sha256(copy.read_bytes()).digest() == hashlib.sha256(original.read_bytes()).digest(), copy
