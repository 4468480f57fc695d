"""The DiffusionJob CustomResourceDefinition, generated from the pydantic job model.

Kubernetes wants a *structural* OpenAPI v3 schema (apiextensions.k8s.io/v1): no ``$ref``, a type on every
node, nothing but value checks inside ``anyOf``, no ``additionalProperties: false`` (unknown fields are
pruned, or refused under kubectl's default strict field validation). pydantic writes JSON Schema 2020-12,
so ``openapi_schema`` rewrites it: references inlined, ``anyOf [X, null]`` as ``nullable``, tuples as
bounded arrays, free-form values as ``x-kubernetes-preserve-unknown-fields``, ``int | str`` as
``x-kubernetes-int-or-string``, maps with patterned keys as maps of their values (the API server refuses
``patternProperties``; the job model checks such keys). Defaults are left out on purpose: the API server would write them into
every stored object, and the job model tells a field set to its default from a field left out (a stage's
settings are refused on the other stage).
"""

from __future__ import annotations

import copy
import re
from typing import Any

import yaml

from sdray.k8s import API_VERSION, GROUP, KIND, PLURAL, VERSION
from sdray.spec import json_schema
from sdray.states import STATES

SHORT_NAMES = ["dj"]
CONDITION_TYPES = ["Admitted", "Running", "Succeeded", "Failed"]

# The keys apiextensions.k8s.io/v1 JSONSchemaProps has; anything else is refused by the API server.
OPENAPI_KEYS = frozenset({
    "description", "type", "format", "title", "default", "maximum", "exclusiveMaximum", "minimum",
    "exclusiveMinimum", "maxLength", "minLength", "pattern", "maxItems", "minItems", "uniqueItems", "multipleOf",
    "enum", "maxProperties", "minProperties", "required", "items", "allOf", "oneOf", "anyOf", "not", "properties",
    "additionalProperties", "patternProperties", "dependencies", "additionalItems", "externalDocs", "example",
    "nullable", "x-kubernetes-preserve-unknown-fields", "x-kubernetes-embedded-resource",
    "x-kubernetes-int-or-string", "x-kubernetes-list-map-keys", "x-kubernetes-list-type", "x-kubernetes-map-type",
    "x-kubernetes-validations",
})
# Inside anyOf/allOf/oneOf/not a structural schema may only restrict values, not declare shape.
_JUNCTOR_FORBIDDEN = frozenset({"type", "description", "default", "additionalProperties", "nullable"})
_INT_OR_STRING = [{"type": "integer"}, {"type": "string"}]
_DROPPED = frozenset({"title", "default", "$defs"})


class SchemaConversionError(ValueError):
    """A part of the job model that has no structural OpenAPI form; the message names its path."""


def openapi_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """The structural OpenAPI v3 form of a pydantic JSON Schema (its ``$defs`` inlined)."""
    return _convert(schema, schema.get("$defs", {}), "")


def _convert(node: dict[str, Any], defs: dict[str, Any], path: str) -> dict[str, Any]:
    node = dict(node)
    if "$ref" in node:
        target = defs[node.pop("$ref").rsplit("/", 1)[-1]]
        # The field's own keys (its description) win over the referenced model's.
        node = {**target, **node}
    if "anyOf" in node and (names := _bare_names(node["anyOf"], defs)):
        # An object also written as its bare name (sdray.spec.by_name: `scheduler: asha`). A structural schema
        # has no "string or object" type; its one escape that keeps the object's fields (so they are still
        # checked and pruned) is a node without a type that preserves unknown fields. `pattern` applies to
        # strings only: a bare name must be one of the names, and an object is checked by its properties.
        branches = node.pop("anyOf")
        target = next(b for b in branches if b.get("type") != "string")
        out = _convert({**target, **node}, defs, path)
        out.pop("type", None)
        return {**out, "x-kubernetes-preserve-unknown-fields": True,
                "pattern": f"^({'|'.join(re.escape(n) for n in names)})$"}
    if "anyOf" in node:
        node = _merge_union(node, path)
        if "x-kubernetes-int-or-string" in node:
            return {k: v for k, v in node.items() if k not in _DROPPED}
        return _convert(node, defs, path)
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROPPED:
            continue
        if key == "const":
            out["enum"] = [value]
        elif key == "exclusiveMinimum":
            out["minimum"], out["exclusiveMinimum"] = value, True
        elif key == "exclusiveMaximum":
            out["maximum"], out["exclusiveMaximum"] = value, True
        elif key == "properties":
            out["properties"] = {name: _convert(sub, defs, f"{path}.{name}") for name, sub in value.items()}
        elif key == "prefixItems":
            items = [_convert(sub, defs, f"{path}[]") for sub in value]
            if any(item != items[0] for item in items):
                raise SchemaConversionError(f"{path}: a tuple of mixed types has no OpenAPI form")
            out["items"] = items[0]
        elif key == "items":
            out["items"] = _convert(value, defs, f"{path}[]")
        elif key == "additionalProperties":
            if value is True:
                out["x-kubernetes-preserve-unknown-fields"] = True
            elif isinstance(value, dict) and "enum" not in node.get("propertyNames", {}):
                out["additionalProperties"] = _convert(value, defs, f"{path}.*")
            # False: left out; structural schemas prune (or, strictly, refuse) unknown fields by themselves.
        elif key == "patternProperties":
            # The API server refuses patternProperties: a dict whose keys have a pattern (cluster.env,
            # distributed.resources_per_worker) is a map of its values here, and the job model checks the keys.
            if len(value) != 1:
                raise SchemaConversionError(f"{path}: {len(value)} key patterns have no structural form")
            out["additionalProperties"] = _convert(next(iter(value.values())), defs, f"{path}.*")
        elif key == "propertyNames":
            # A dict keyed by an enum (model.overrides) becomes an object with those properties. Other key
            # constraints (a length) have no structural form either: the job model checks them.
            if "enum" in value:
                sub = _convert(node.get("additionalProperties") or {}, defs, f"{path}.*")
                out["properties"] = {name: copy.deepcopy(sub) for name in value["enum"]}
        else:
            out[key] = value
    if not out.get("type") and not out.get("x-kubernetes-preserve-unknown-fields"):
        if set(out) - {"description"}:
            raise SchemaConversionError(f"{path}: no type for {sorted(out)}")
        out["x-kubernetes-preserve-unknown-fields"] = True  # Any: every JSON value
    return out


def _bare_names(branches: list[dict[str, Any]], defs: dict[str, Any]) -> list[str] | None:
    """The names of a union of a string enum and an object with a ``name`` property (the bare-name form of
    that object), or None for any other union."""
    strings = [b for b in branches if b.get("type") == "string" and ("enum" in b or "const" in b)]
    objects = [defs[b["$ref"].rsplit("/", 1)[-1]] if "$ref" in b else b for b in branches if b not in strings]
    if len(branches) != 2 or len(strings) != 1 or len(objects) != 1 or objects[0].get("type") != "object" \
            or "name" not in objects[0].get("properties", {}):
        return None
    return list(strings[0]["enum"]) if "enum" in strings[0] else [strings[0]["const"]]


def _merge_union(node: dict[str, Any], path: str) -> dict[str, Any]:
    branches = node.pop("anyOf")
    others = [b for b in branches if b.get("type") != "null"]
    if len(others) < len(branches):
        node["nullable"] = True
    if others == _INT_OR_STRING or [{"type": b.get("type")} for b in others] == _INT_OR_STRING:
        return {**node, "x-kubernetes-int-or-string": True, "anyOf": copy.deepcopy(_INT_OR_STRING)}
    if len(others) != 1:
        raise SchemaConversionError(f"{path}: a union of {len(others)} types has no structural form")
    return {**others[0], **node}


def status_schema() -> dict[str, Any]:
    """What the controller reports: the RayJob's progress, the training's step and loss, conditions."""
    time = {"type": "string", "format": "date-time"}
    condition = {
        "type": "object",
        "required": ["type", "status"],
        "properties": {
            "type": {"type": "string", "enum": CONDITION_TYPES},
            "status": {"type": "string", "enum": ["True", "False", "Unknown"]},
            "reason": {"type": "string"},
            "message": {"type": "string"},
            "lastTransitionTime": time,
            "observedGeneration": {"type": "integer", "format": "int64"},
        },
    }
    return {
        "type": "object",
        "description": "Written by the sdray controller and the training driver.",
        "properties": {
            "state": {"type": "string", "enum": list(STATES),
                      "description": "Queued (waiting for Kueue), Pending (the Ray cluster is starting), Running, "
                                     "Preempted (checkpointed; resumes once admitted again), Succeeded or Failed: "
                                     "the states the sdray REST API says too."},
            "message": {"type": "string", "description": "Why the job is in its state."},
            "step": {"type": "integer", "description": "Last optimizer step the training reported."},
            "loss": {"type": "number", "description": "Training loss at that step."},
            "rayJobName": {"type": "string"},
            "startTime": time,
            "completionTime": time,
            "observedGeneration": {"type": "integer", "format": "int64",
                                   "description": "The last spec generation the controller has seen and acted on: "
                                                  "applied, or refused (then refusedGeneration says so)."},
            "appliedGeneration": {"type": "integer", "format": "int64",
                                  "description": "The generation of the spec the RayJob was made from."},
            "refusedGeneration": {"type": "integer", "format": "int64",
                                  "description": "The last spec generation refused because the job had started."},
            "conditions": {"type": "array", "items": condition, "x-kubernetes-list-type": "map",
                           "x-kubernetes-list-map-keys": ["type"]},
        },
    }


def _name_override_components(overrides: dict) -> None:
    """``model.overrides`` keys are any family's component names (the document model checks only their
    shape, the family refuses another family's at launch): the CRD lists them, so the API server refuses an
    unknown one at apply time. A CRD schema has no ``propertyNames``, hence named properties."""
    from sdray.models.families import FAMILIES

    names = sorted({name for family in FAMILIES.values() for name in family.components})
    overrides["properties"] = {name: copy.deepcopy(overrides["additionalProperties"]) for name in names}
    del overrides["additionalProperties"]


def crd() -> dict[str, Any]:
    """The DiffusionJob CustomResourceDefinition (``diffusionjobs.sdray.io``)."""
    spec = openapi_schema(json_schema())["properties"]["spec"]
    _name_override_components(spec["properties"]["model"]["properties"]["overrides"])
    schema = {
        "type": "object",
        "description": "A text-to-image diffusion training job (one validated sdray document), run as a KubeRay "
                       "RayJob by the sdray controller.",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": spec,
            "status": status_schema(),
        },
    }
    columns = [
        {"name": "State", "type": "string", "jsonPath": ".status.state"},
        {"name": "Step", "type": "integer", "jsonPath": ".status.step"},
        {"name": "Loss", "type": "number", "jsonPath": ".status.loss"},
        {"name": "RayJob", "type": "string", "jsonPath": ".status.rayJobName", "priority": 1},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ]
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{PLURAL}.{GROUP}", "labels": {"app.kubernetes.io/name": "sdray"}},
        "spec": {
            "group": GROUP,
            "names": {"kind": KIND, "listKind": f"{KIND}List", "plural": PLURAL, "singular": KIND.lower(),
                      "shortNames": SHORT_NAMES, "categories": ["sdray"]},
            "scope": "Namespaced",
            "versions": [{
                "name": VERSION, "served": True, "storage": True,
                "schema": {"openAPIV3Schema": schema},
                "subresources": {"status": {}},
                "additionalPrinterColumns": columns,
            }],
        },
    }


def crd_yaml() -> str:
    """The CRD as the YAML committed in ``k8s/crd.yaml`` and the helm chart."""
    header = (f"# Generated by `sdray k8s crd` from the pydantic model (sdray/spec.py) for {API_VERSION} {KIND}.\n"
              "# Do not edit: change the model and regenerate (tests fail when this file is stale).\n")
    return header + yaml.dump(crd(), Dumper=_Dumper, sort_keys=False, width=120)


class _Dumper(yaml.SafeDumper):
    """Writes a part of the schema that several fields share (an enum, a model's required list) in full at each
    place, not as an anchor and aliases: each field of the CRD reads on its own."""

    def ignore_aliases(self, data) -> bool:
        return True


def structural_problems(schema: dict[str, Any], path: str = "", in_junctor: bool = False) -> list[str]:
    """Why ``schema`` is not a structural schema the API server accepts (empty when it is).

    Checks the rules of apiextensions.k8s.io/v1: only JSONSchemaProps keys; a type on every node unless it
    preserves unknown fields or is int-or-string; ``properties`` and ``additionalProperties`` apart;
    no ``additionalProperties: false``, ``uniqueItems: true`` or ``patternProperties``; only value checks
    inside junctors.
    """
    problems = [f"{path or '<root>'}: unknown key {key!r}" for key in schema if key not in OPENAPI_KEYS]
    where = path or "<root>"
    if in_junctor:
        shape = sorted(_JUNCTOR_FORBIDDEN & set(schema)) + sorted(k for k in schema if k.startswith("x-kubernetes"))
        if shape:
            problems.append(f"{where}: {shape} inside anyOf/allOf/oneOf/not")
    elif not schema.get("type") and not (schema.get("x-kubernetes-preserve-unknown-fields")
                                         or schema.get("x-kubernetes-int-or-string")):
        problems.append(f"{where}: no type")
    if "properties" in schema and "additionalProperties" in schema:
        problems.append(f"{where}: properties and additionalProperties together")
    if schema.get("additionalProperties") is False:
        problems.append(f"{where}: additionalProperties: false")
    if "patternProperties" in schema:
        problems.append(f"{where}: patternProperties is not supported")
    if schema.get("uniqueItems") is True:
        problems.append(f"{where}: uniqueItems: true")
    if "exclusiveMinimum" in schema and not isinstance(schema["exclusiveMinimum"], bool):
        problems.append(f"{where}: exclusiveMinimum must be a boolean in OpenAPI v3.0")
    for name, sub in schema.get("properties", {}).items():
        problems += structural_problems(sub, f"{path}.{name}", in_junctor)
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            problems += structural_problems(schema[key], f"{path}.{key}", in_junctor)
    for key in ("anyOf", "allOf", "oneOf"):
        for i, sub in enumerate(schema.get(key, [])):
            if schema.get("x-kubernetes-int-or-string") and key == "anyOf" and sub in _INT_OR_STRING:
                continue  # the one shape Kubernetes allows for int-or-string
            problems += structural_problems(sub, f"{path}.{key}[{i}]", True)
    if isinstance(schema.get("not"), dict):
        problems += structural_problems(schema["not"], f"{path}.not", True)
    return problems
