"""The Grafana dashboard (helm/sdray/files/dashboard.json, its one source): it loads in Grafana's own model
(grafana-foundation-sdk), every panel's PromQL parses (promtool, as recording rules), every metric an
expression names is one a real scrape of sdray's exporters holds, each query answers a real Prometheus
scraping a busy service with series that carry the labels its legend names, and it ships as a ConfigMap
labelled ``grafana_dashboard: "1"`` both from the chart and from ``kubectl kustomize k8s/``."""

from __future__ import annotations

import copy
import json
import re
import subprocess

import helm_python
import promql_parser
import pytest
import yaml
from exporters import BusyService, sample_names, scrape_controller, scrape_service
from k8s_checks import REPO, check, load_all
from test_kustomize import K8S, kustomize

from tools import require_binary, start_prometheus

CHART = REPO / "helm" / "sdray"
DASHBOARD = CHART / "files" / "dashboard.json"
# What Grafana puts in for its built-in variables when it runs a query (any valid duration parses).
BUILTIN = {"$__rate_interval": "1m", "$__interval": "30s", "$__range": "6h"}


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels(dash: dict) -> list[dict]:
    """Every panel, those inside collapsed rows too."""
    out = []
    for panel in dash["panels"]:
        out.append(panel)
        out += panel.get("panels", [])
    return out


def queries(dash: dict) -> dict[str, str]:
    """{"<panel id>:<refId>" or "var:<name>": PromQL}, with the template variables put in as Grafana does
    (a variable with "All" selected becomes its allValue) and ``label_values(metric, label)`` as its metric."""
    variables = {f"${v['name']}": v.get("allValue", ".*") for v in dash["templating"]["list"]}
    out = {}
    for panel in panels(dash):
        for target in panel.get("targets", []):
            out[f"{panel['id']}:{target['refId']}"] = target["expr"]
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            call = re.fullmatch(r"label_values\((.+),\s*\w+\)", var["query"]["query"])
            assert call, f"variable {var['name']}: expected label_values(<selector>, <label>)"
            out[f"var:{var['name']}"] = call.group(1)
    for key, expr in out.items():
        for name, value in sorted({**BUILTIN, **variables}.items(), key=lambda kv: -len(kv[0])):
            expr = expr.replace(name, value)
        assert "$" not in expr, f"{key}: a variable the dashboard does not define: {expr}"
        out[key] = expr
    return out


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects, from its syntax tree (promql-parser)."""
    names = set()

    def visit(node):
        if isinstance(node, promql_parser.VectorSelector) and node.name:
            names.add(node.name)

    promql_parser.walk(promql_parser.parse(expr), visit)
    return names


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> set[str]:
    """Every sample name a real scrape of the service (training metrics included) and the controller holds."""
    return set(sample_names(scrape_service(tmp_path_factory.mktemp("dashboard-scrape")))) | set(
        sample_names(scrape_controller()))


# --- the JSON ------------------------------------------------------------------------------------------

def _lost(original, loaded, path="$") -> list[str]:
    """The keys and values of ``original`` that ``loaded`` lacks or changed."""
    if isinstance(original, dict):
        if not isinstance(loaded, dict):
            return [path]
        return [p for k, v in original.items()
                for p in ([f"{path}.{k}"] if k not in loaded else _lost(v, loaded[k], f"{path}.{k}"))]
    if isinstance(original, list):
        if not isinstance(loaded, list) or len(original) != len(loaded):
            return [path]
        return [p for i, (a, b) in enumerate(zip(original, loaded)) for p in _lost(a, b, f"{path}[{i}]")]
    return [] if original == loaded else [f"{path}: {original!r} became {loaded!r}"]


def grafana_round_trip(dash: dict) -> list[str]:
    """Load the dashboard into Grafana's generated model and write it back: what it does not know is lost."""
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.cog.plugins import register_default_plugins
    from grafana_foundation_sdk.models.dashboard import Dashboard

    register_default_plugins()
    return _lost(dash, json.loads(json.dumps(Dashboard.from_json(dash), cls=JSONEncoder)))


def test_the_dashboard_loads_in_grafanas_model():
    dash = dashboard()
    assert grafana_round_trip(dash) == []
    broken = copy.deepcopy(dash)  # the control: a misspelt key is lost, and the check says where
    broken["panels"][1]["gridpos"] = broken["panels"][1].pop("gridPos")
    assert grafana_round_trip(broken) == ["$.panels[1].gridpos"]


def test_the_data_source_and_the_tenant_are_variables():
    dash = dashboard()
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert (variables["datasource"]["type"], variables["datasource"]["query"]) == ("datasource", "prometheus")
    tenant = variables["tenant"]
    assert tenant["type"] == "query" and tenant["multi"] and tenant["includeAll"]
    source = {"type": "prometheus", "uid": "${datasource}"}
    assert tenant["datasource"] == source
    exprs = queries(dash)
    for panel in panels(dash):
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == source, panel["title"]
        assert panel["targets"] and all(t["datasource"] == source for t in panel["targets"]), panel["title"]
        for target in panel["targets"]:  # a query of per-tenant series follows the tenant variable
            names = metric_names(exprs[f"{panel['id']}:{target['refId']}"])
            if any(n.startswith(("sdray_train_", "sdray_job", "sdray_queue_")) for n in names):
                assert 'tenant=~"$tenant"' in target["expr"], (panel["title"], target["expr"])


def test_panels_have_unique_ids_and_do_not_overlap():
    cells = {}
    for panel in panels(dashboard()):
        pos = panel["gridPos"]
        assert 0 <= pos["x"] and pos["x"] + pos["w"] <= 24, panel["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]
    ids = [p["id"] for p in panels(dashboard())]
    assert len(ids) == len(set(ids))


# --- the queries ---------------------------------------------------------------------------------------

def promtool_check_rules(exprs: dict[str, str], tmp_path) -> subprocess.CompletedProcess:
    """``promtool check rules`` on one recording rule per expression: Prometheus's own PromQL parser."""
    rules = [{"record": "dashboard:" + re.sub(r"[^a-zA-Z0-9_]", "_", key), "expr": expr} for key, expr in exprs.items()]
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}, sort_keys=False))
    return subprocess.run([require_binary("promtool"), "check", "rules", str(path)], capture_output=True,
                          text=True, timeout=60)


def test_every_query_parses_in_prometheus(tmp_path):
    exprs = queries(dashboard())
    proc = promtool_check_rules(exprs, tmp_path)
    assert proc.returncode == 0 and f"SUCCESS: {len(exprs)} rules found" in proc.stdout, proc.stdout + proc.stderr
    bad = promtool_check_rules({"control": "sum by (le (rate(sdray_jobs[1m]))"}, tmp_path)  # a missing bracket
    assert bad.returncode != 0 and "parse error" in bad.stdout + bad.stderr, bad.stdout + bad.stderr


def test_every_metric_a_query_names_is_exported(exported):
    used = {key: metric_names(expr) for key, expr in queries(dashboard()).items()}
    unknown = {key: sorted(names - exported) for key, names in used.items() if names - exported}
    assert unknown == {}, f"metrics no sdray exporter has: {unknown}"
    # The control: the names before the renames are not exported any more, and would be caught.
    assert {"sdray_train_data_wait_share", "sdray_train_skipped_images"}.isdisjoint(exported)
    # What the dashboard is for (issue #16): each of these is queried by some panel.
    everything = set().union(*used.values())
    for metric in ("sdray_jobs", "sdray_job_queue_wait_seconds_bucket", "sdray_queue_oldest_wait_seconds",
                   "sdray_train_loss", "sdray_train_val_loss", "sdray_train_images_per_second", "sdray_train_gpus",
                   "sdray_train_data_wait_ratio", "sdray_train_gpu_memory_bytes",
                   "sdray_train_last_checkpoint_timestamp_seconds", "sdray_http_requests_total",
                   "sdray_http_request_duration_seconds_bucket"):
        assert metric in everything, metric


def test_every_query_answers_a_real_prometheus_with_its_legends_labels(tmp_path):
    """The service-side panels against a real Prometheus scraping a busy service (the controller's panels
    are left out: no controller runs here). A query whose legend names a label its result lacks (one-to-one
    matching ``on (…)`` keeps only those labels, say) shows an empty legend in Grafana: caught here."""
    dash = dashboard()
    legends = {f"{p['id']}:{t['refId']}": (p["title"], t.get("legendFormat", "")) for p in panels(dash)
               for t in p.get("targets", [])}
    exprs = {k: e.replace(BUILTIN["$__rate_interval"], "15s") for k, e in queries(dash).items()
             if k in legends and not any(n.startswith("sdray_controller_") for n in metric_names(e))}
    service = BusyService(tmp_path / "service").start()
    try:
        prom = start_prometheus(tmp_path, [service.svc.url.removeprefix("http://")], scrape_interval="1s")
        answered = set()

        def ask_all() -> None:
            for key, expr in exprs.items():
                title, legend = legends[key]
                rows = prom.query(expr)
                answered.update([key] if rows else [])
                for row in rows:
                    for label in re.findall(r"\{\{\s*(\w+)\s*\}\}", legend):
                        assert label in row["metric"], f"{title}: legend {legend!r}, but {expr} gives {row['metric']}"

        try:  # while alice's GPU job runs, then while bob's CPU job runs
            prom.wait_for('count_over_time(sdray_train_step{tenant="alice"}[1m]) >= 3', timeout=30)
            ask_all()
            service.second()  # bob's job starts (and its queue wait is observed) while Prometheus watches
            prom.wait_for('count_over_time(sdray_train_step{tenant="bob"}[1m]) >= 3', timeout=30)
            ask_all()
        finally:
            prom.stop()
    finally:
        service.stop()
    empty = [f"{legends[k][0]}: {e}" for k, e in exprs.items() if k not in answered]
    assert empty == [], "queries without a result on a busy service:\n" + "\n".join(empty)


# --- shipped: the chart and kustomize ------------------------------------------------------------------

def _render(values: dict) -> list[dict]:
    with helm_python.Chart.load(CHART) as chart:
        files = chart.render(values, name="sdray", namespace="ml-platform")
    return [o for path, text in sorted(files.items()) if not path.endswith("NOTES.txt") for o in load_all(text)]


def _dashboards(objects: list[dict]) -> list[dict]:
    return [o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["labels"].get("grafana_dashboard") == "1"]


def test_the_chart_ships_the_dashboard_as_a_configmap():
    (default,) = check(_dashboards(_render({})))
    assert default["metadata"]["name"] == "sdray-dashboard" and default["metadata"]["namespace"] == "ml-platform"
    assert json.loads(default["data"]["sdray.json"]) == dashboard()
    values = {"metrics": {"grafanaDashboard": {"namespace": "monitoring", "labels": {"team": "ml"},
                                               "annotations": {"grafana_folder": "ML"}}}}
    (moved,) = check(_dashboards(_render(values)))
    assert moved["metadata"]["namespace"] == "monitoring"
    assert moved["metadata"]["labels"]["team"] == "ml" and moved["metadata"]["annotations"] == {"grafana_folder": "ML"}
    assert _dashboards(_render({"metrics": {"grafanaDashboard": {"enabled": False}}})) == []


@pytest.mark.parametrize("bad", [{"enabled": "yes"}, {"namespace": "Not_A_Namespace"}, {"labels": {"a": 1}},
                                 {"folder": "ML"}], ids=["enabled", "namespace", "labels", "unknown-key"])
def test_the_values_schema_refuses_bad_dashboard_values(bad):
    with helm_python.Chart.load(CHART) as chart, pytest.raises(Exception) as refused:
        chart.validate_schema({"metrics": {"grafanaDashboard": bad}})
    assert "grafanaDashboard" in str(refused.value), refused.value


def test_kustomize_output_includes_the_dashboard():
    (shipped,) = check(_dashboards(kustomize(K8S)))
    assert shipped["metadata"]["namespace"] == "sdray"
    assert json.loads(shipped["data"]["sdray.json"]) == dashboard()
