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


def _selects(selector: dict | None, labels: dict) -> bool:
    """A LabelSelector (matchLabels, matchExpressions) against labels; an empty selector selects everything."""
    selector = selector or {}
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        if not {"In": key in labels and labels[key] in values, "NotIn": labels.get(key) not in values,
                "Exists": key in labels, "DoesNotExist": key not in labels}[op]:
            return False
    return True


def network_allows(policies: list[dict], source: tuple[str, dict], target: tuple[str, dict], port: int) -> bool:
    """Whether NetworkPolicies let a TCP connection from pod ``source`` to pod ``target`` on ``port``, as the
    NetworkPolicy API defines it (a pod is (namespace, labels); a namespace's labels are its
    ``kubernetes.io/metadata.name``). No policy selecting the target for Ingress: allowed; otherwise only a
    rule of one of them that admits both the source (a peer) and the port. ipBlock peers admit no pod."""
    src_ns, src_labels = source
    dst_ns, dst_labels = target
    selecting = [p for p in policies if p["metadata"].get("namespace") == dst_ns
                 and _selects(p["spec"]["podSelector"], dst_labels)
                 and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])]
    if not selecting:
        return True

    def peer_admits(peer: dict) -> bool:
        if "ipBlock" in peer:
            return False
        if "namespaceSelector" in peer:
            in_namespace = _selects(peer["namespaceSelector"], {"kubernetes.io/metadata.name": src_ns})
        else:
            in_namespace = src_ns == dst_ns
        return in_namespace and _selects(peer.get("podSelector"), src_labels)

    def port_admits(rule_port: dict) -> bool:
        if rule_port.get("protocol", "TCP") != "TCP":
            return False
        if "port" not in rule_port:
            return True
        return rule_port["port"] <= port <= rule_port.get("endPort", rule_port["port"])

    for policy in selecting:
        for rule in policy["spec"].get("ingress") or []:
            peers, ports = rule.get("from") or [], rule.get("ports") or []
            if (not peers or any(peer_admits(p) for p in peers)) and (not ports or any(port_admits(p) for p in ports)):
                return True
    return False
