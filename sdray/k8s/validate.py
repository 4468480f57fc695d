"""Check Kubernetes objects offline, as an API server with strict field validation would.

Core kinds go through ``kubernetes-validate`` (the upstream OpenAPI schemas, strict: unknown fields fail);
a kind it does not know is an error, never a warning. Custom resources (RayJob, Kueue queues, the
Prometheus operator's kinds, DiffusionJob) are checked with ``jsonschema`` against the ``openAPIV3Schema``
of their CRD, read from CRD YAML files. Unknown fields fail there too: the API server would prune them
silently (or refuse them under kubectl's default ``--validate=strict``), so a typo in a rendered object
would otherwise go unnoticed. CEL rules (``x-kubernetes-validations``) are not evaluated.

Needs the ``test`` extra (``kubernetes-validate``, ``jsonschema``).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

KUBE_VERSION = "1.33"
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")


class InvalidObjects(ValueError):
    """Objects that would be refused; ``problems`` holds one line per problem, naming kind/name and field."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


@functools.cache
def _load_yaml(path: Path) -> dict:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the RayJob CRD is 1.4 MB: C loader, once
    with open(path) as f:
        return yaml.load(f, Loader=loader)


class CRDSchemas:
    """The ``openAPIV3Schema`` of every served version of the CRDs given, by (apiVersion, kind)."""

    def __init__(self, crds: Iterable[dict]):
        self._schemas: dict[tuple[str, str], dict] = {}
        self._validators: dict[tuple[str, str], object] = {}
        for crd in crds:
            spec = crd["spec"]
            for version in spec["versions"]:
                if version.get("served", True):
                    key = (f"{spec['group']}/{version['name']}", spec["names"]["kind"])
                    self._schemas[key] = version["schema"]["openAPIV3Schema"]

    @classmethod
    def from_dirs(cls, *dirs: Path, extra: Iterable[dict] = ()) -> CRDSchemas:
        """Every ``*.yaml`` CRD under ``dirs`` (recursively), plus the CRD objects in ``extra``."""
        files = sorted(p for d in dirs for p in Path(d).rglob("*.yaml"))
        crds = [_load_yaml(p) for p in files]
        return cls([c for c in crds if isinstance(c, dict) and c.get("kind") == "CustomResourceDefinition"]
                   + list(extra))

    def knows(self, api_version: str, kind: str) -> bool:
        return (api_version, kind) in self._schemas

    def validator(self, api_version: str, kind: str):
        """The jsonschema validator of a kind (made once: the RayJob's schema is large)."""
        from jsonschema import Draft4Validator  # OpenAPI v3.0 schema objects follow draft 4 (boolean exclusiveMinimum)

        key = (api_version, kind)
        if key not in self._validators:
            self._validators[key] = Draft4Validator(openapi_to_jsonschema(self._schemas[key]))
        return self._validators[key]


def openapi_to_jsonschema(node: dict[str, Any], strict: bool = True) -> dict[str, Any]:
    """A draft-4 JSON Schema for a structural OpenAPI schema: ``nullable`` as a null type, Kubernetes
    extensions dropped, and (``strict``) objects with declared properties closed to other fields unless
    they preserve unknown fields."""
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key.startswith("x-kubernetes-") or key == "nullable":
            continue
        if key in ("properties", "patternProperties"):
            out[key] = {name: openapi_to_jsonschema(sub, strict) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not") and isinstance(value, dict):
            out[key] = openapi_to_jsonschema(value, strict)
        elif key in ("anyOf", "allOf", "oneOf"):
            out[key] = [openapi_to_jsonschema(sub, strict) for sub in value]
        else:
            out[key] = value
    if node.get("nullable"):
        if "type" in out:
            out["type"] = [out["type"], "null"]
        if "enum" in out:
            out["enum"] = [*out["enum"], None]
    if (strict and "properties" in node and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


def _metadata_problems(obj: dict) -> list[str]:
    """Name and label syntax, which the OpenAPI schemas leave to the API server's own checks."""
    meta = obj.get("metadata") or {}
    problems = []
    name = meta.get("name", "")
    if not (name and len(name) <= 253 and _DNS_SUBDOMAIN.match(name)):
        problems.append(f"metadata.name: {name!r} is not a DNS-1123 subdomain")
    for key, value in (meta.get("labels") or {}).items():
        short = key.rsplit("/", 1)[-1]
        if not (len(short) <= 63 and _LABEL_NAME.match(short)):
            problems.append(f"metadata.labels: {key!r} is not a valid label key")
        if not (isinstance(value, str) and len(value) <= 63 and _LABEL_VALUE.match(value)):
            problems.append(f"metadata.labels.{key}: {value!r} is not a valid label value")
    return problems


def object_problems(obj: dict, schemas: CRDSchemas, kube_version: str = KUBE_VERSION) -> list[str]:
    """Everything wrong with one object; a kind no schema covers is a problem too."""
    import kubernetes_validate

    api_version, kind = obj.get("apiVersion", ""), obj.get("kind", "")
    where = f"{kind or '<no kind>'}/{(obj.get('metadata') or {}).get('name', '<no name>')}"
    problems = _metadata_problems(obj)
    if schemas.knows(api_version, kind):
        validator = schemas.validator(api_version, kind)
        for error in sorted(validator.iter_errors(obj), key=lambda e: list(e.absolute_path)):
            problems.append(f"{'.'.join(map(str, error.absolute_path)) or '<root>'}: {error.message}")
        # A custom resource's metadata is plain ObjectMeta, which its CRD leaves open: check it as such.
        meta_only = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": obj.get("metadata") or {}}
        objects = [(meta_only, "metadata of ")]
    else:
        objects = [(obj, "")]
    for candidate, prefix in objects:
        try:
            kubernetes_validate.validate(candidate, kube_version, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            problems.append(f"no schema for {api_version} {kind} (not a Kubernetes {kube_version} kind, no CRD given)")
        except kubernetes_validate.ValidationError as exc:
            problems.append(f"{prefix}{'.'.join(map(str, exc.path)) or '<root>'}: {exc.message}")
    return [f"{where}: {p}" for p in problems]


def check_objects(objects: Iterable[dict], schemas: CRDSchemas, kube_version: str = KUBE_VERSION) -> None:
    """Raise ``InvalidObjects`` naming every problem of every object (and any object given twice)."""
    problems, seen = [], set()
    for obj in objects:
        key = (obj.get("apiVersion"), obj.get("kind"), (obj.get("metadata") or {}).get("namespace"),
               (obj.get("metadata") or {}).get("name"))
        if key in seen:
            problems.append(f"{key[1]}/{key[3]}: given twice")
        seen.add(key)
        problems += object_problems(obj, schemas, kube_version)
    if problems:
        raise InvalidObjects(problems)
