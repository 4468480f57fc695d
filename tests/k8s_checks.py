"""Shared by the Kubernetes tests: the CRD schemas (loaded once per process) and object checks."""

from __future__ import annotations

import functools
from pathlib import Path

import yaml

from sdray.k8s.crd import crd
from sdray.k8s.validate import CRDSchemas, check_objects

REPO = Path(__file__).resolve().parent.parent
SCHEMA_DIR = Path(__file__).resolve().parent / "schemas"


@functools.cache
def schemas() -> CRDSchemas:
    """KubeRay, Kueue and Prometheus-operator CRDs (tests/schemas/), and sdray's own DiffusionJob CRD."""
    return CRDSchemas.from_dirs(SCHEMA_DIR, extra=[crd()])


def check(objects) -> list[dict]:
    """Validate every object (raises InvalidObjects naming each problem); returns them as a list."""
    objects = list(objects)
    check_objects(objects, schemas())
    return objects


def load_all(text: str) -> list[dict]:
    """The objects of a YAML multi-document (empty documents, as helm leaves them, skipped)."""
    return [d for d in yaml.safe_load_all(text) if d]
