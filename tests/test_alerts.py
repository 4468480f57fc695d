"""The example Prometheus config and alert rules (examples/), checked and unit-tested with promtool, and
the real-Prometheus launcher of tests/tools.py checked against a tiny prometheus_client exporter."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tools import REQUIRE_ENV, free_port, require_binary, start_prometheus

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
ALERTS = EXAMPLES / "alerts.yml"
ALERTS_TEST = EXAMPLES / "alerts_test.yml"
CONFIG = EXAMPLES / "prometheus.yml"
RULES = ("SdrayJobFailed", "SdrayTrainingStalled", "SdrayDataWaitHigh", "SdrayServiceDown", "SdrayHighErrorRate")


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([require_binary("promtool"), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


def output(proc: subprocess.CompletedProcess) -> str:
    return f"promtool {' '.join(proc.args[1:])} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}"


def alert_rules(path: Path = ALERTS) -> dict[str, dict]:
    groups = yaml.safe_load(path.read_text())["groups"]
    return {r["alert"]: r for g in groups for r in g["rules"] if "alert" in r}


# --- the example files -------------------------------------------------------------------------------

def test_alert_rules_are_valid():
    proc = promtool("check", "rules", str(ALERTS))
    assert proc.returncode == 0, output(proc)
    assert f"SUCCESS: {len(RULES)} rules found" in proc.stdout, output(proc)


def test_alert_rules_have_labels_and_annotations():
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    assert [g["name"] for g in groups] == ["sdray"]
    rules = alert_rules()
    assert sorted(rules) == sorted(RULES)
    for name, rule in rules.items():
        assert rule["labels"]["severity"] in ("info", "warning", "critical"), name
        assert {"summary", "description"} <= set(rule["annotations"]), name
    for name in ("SdrayTrainingStalled", "SdrayDataWaitHigh"):  # per-job alerts name the job and tenant
        text = " ".join(rules[name]["annotations"].values())
        assert "$labels.job_id" in text and "$labels.tenant" in text, name


def test_prometheus_config_is_valid_from_any_directory(tmp_path):
    # Run from elsewhere: rule_files must resolve against the config's own directory.
    proc = promtool("check", "config", str(CONFIG), cwd=tmp_path)
    assert proc.returncode == 0, output(proc)
    assert "SUCCESS: 1 rule files found" in proc.stdout, output(proc)
    assert f"SUCCESS: {len(RULES)} rules found" in proc.stdout, output(proc)
    # The same from a copy of the two files elsewhere (how a user deploys them).
    shutil.copy(CONFIG, tmp_path / "prometheus.yml")
    shutil.copy(ALERTS, tmp_path / "alerts.yml")
    proc = promtool("check", "config", "prometheus.yml", cwd=tmp_path)
    assert proc.returncode == 0, output(proc)

    config = yaml.safe_load(CONFIG.read_text())
    assert config["rule_files"] == ["alerts.yml"]
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "sdray" and job["metrics_path"] == "/metrics"
    assert job.get("scrape_interval", config["global"]["scrape_interval"]) == "15s"
    assert job["static_configs"] == [{"targets": ["127.0.0.1:8000"]}]


def test_alert_rules_unit_tests_pass():
    proc = promtool("test", "rules", str(ALERTS_TEST))
    assert proc.returncode == 0, output(proc)
    assert "SUCCESS" in proc.stdout, output(proc)


def test_every_rule_is_tested_firing_and_not_firing():
    tests = yaml.safe_load(ALERTS_TEST.read_text())["tests"]
    checks = [c for t in tests for c in t.get("alert_rule_test", [])]
    for name in RULES:
        mine = [c for c in checks if c["alertname"] == name]
        assert any(c.get("exp_alerts") for c in mine), f"{name}: no test where it fires"
        assert any(not c.get("exp_alerts") for c in mine), f"{name}: no test where it does not fire"


# Each mutation breaks one rule the way a careless edit would; the unit tests must then fail, naming it.
MUTATIONS = [
    ("SdrayJobFailed", "expr", "> 0", "> 1"),
    ("SdrayJobFailed", "expr", 'state="Failed"', 'state=~"Failed|Succeeded"'),
    ("SdrayTrainingStalled", "expr", "[10m]", "[5m]"),
    ("SdrayTrainingStalled", "expr", "\nand on (job_id, tenant) (sdray_train_step offset 10m)", ""),
    ("SdrayTrainingStalled", "expr", "\nand on (job_id, tenant) (sdray_train_running == 1)", ""),
    ("SdrayTrainingStalled", "expr", "unless on (job_id, tenant) (sdray_train_step >= sdray_train_max_steps)",
     "unless on (job_id, tenant) (sdray_train_step > sdray_train_max_steps)"),
    ("SdrayDataWaitHigh", "expr", "> 0.5", "> 0.9"),
    ("SdrayDataWaitHigh", "expr", "\nand on (job_id, tenant) (sdray_train_running == 1)", ""),
    ("SdrayDataWaitHigh", "for", "10m", "5m"),
    ("SdrayServiceDown", "for", "2m", "0m"),
    ("SdrayHighErrorRate", "expr", "> 0.05", "> 0.1"),
    ("SdrayHighErrorRate", "expr", 'status=~"5.."', 'status=~"[45].."'),
]


def _normalise(expr: str) -> str:
    """The expression with its lines stripped of indentation (so mutations need not copy the indent)."""
    return "\n".join(line.strip() for line in expr.strip().splitlines())


@pytest.mark.parametrize(("alert", "field", "old", "new"), MUTATIONS,
                         ids=[f"{a}-{f}-{i}" for i, (a, f, _, _) in enumerate(MUTATIONS)])
def test_unit_tests_catch_a_broken_rule(tmp_path, alert, field, old, new):
    doc = yaml.safe_load(ALERTS.read_text())
    (rule,) = [r for g in doc["groups"] for r in g["rules"] if r.get("alert") == alert]
    text = _normalise(rule[field]) if field == "expr" else str(rule[field])
    assert text.count(old) == 1, f"mutation no longer applies to {alert}.{field}: {old!r} not in {text!r}"
    rule[field] = text.replace(old, new)
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(doc, sort_keys=False))
    shutil.copy(ALERTS_TEST, tmp_path / "alerts_test.yml")

    assert promtool("check", "rules", "alerts.yml", cwd=tmp_path).returncode == 0, "the mutant must still parse"
    proc = promtool("test", "rules", "alerts_test.yml", cwd=tmp_path)
    assert proc.returncode != 0, f"unit tests still pass with {alert}.{field}: {old!r} -> {new!r}\n{output(proc)}"
    report = proc.stdout + proc.stderr  # promtool prints the failures on stderr
    assert "FAILED" in report and f"alertname: {alert}" in report, output(proc)


def test_unmutated_copy_passes(tmp_path):
    """The control for the mutation tests: the same round trip through YAML without a change passes."""
    doc = yaml.safe_load(ALERTS.read_text())
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(doc, sort_keys=False))
    shutil.copy(ALERTS_TEST, tmp_path / "alerts_test.yml")
    proc = promtool("test", "rules", "alerts_test.yml", cwd=tmp_path)
    assert proc.returncode == 0, output(proc)


# --- tests/tools.py ----------------------------------------------------------------------------------

def test_require_binary_skips_or_fails_when_missing(monkeypatch):
    assert Path(require_binary("sh")).name == "sh"
    monkeypatch.setenv("PATH", str(Path(__file__).parent / "no-such-dir"))
    monkeypatch.delenv(REQUIRE_ENV, raising=False)
    with pytest.raises(pytest.skip.Exception, match="apt-get install -y --no-install-recommends prometheus"):
        require_binary("promtool")
    monkeypatch.setenv(REQUIRE_ENV, "1")  # CI: never skip
    with pytest.raises(pytest.fail.Exception, match="--no-install-recommends chromium.*SDRAY_REQUIRE_TOOLS=1"):
        require_binary("chromium")


def test_prometheus_launcher_scrapes_an_exporter(tmp_path):
    """start_prometheus: a real Prometheus scrapes a prometheus_client exporter, and a sample arrives with
    its job_id label through the HTTP API; the example alert rules load in it; stop() ends the process."""
    from prometheus_client import CollectorRegistry, Gauge, start_http_server

    registry = CollectorRegistry()
    gauge = Gauge("sdray_launcher_check", "A gauge for the launcher test.", ["job_id", "tenant"], registry=registry)
    gauge.labels(job_id="j-launch", tenant="acme").set(42)
    port = free_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    try:
        prom = start_prometheus(tmp_path, [f"127.0.0.1:{port}"], scrape_interval="1s", rule_files=[ALERTS])
        try:
            rows = prom.wait_for('sdray_launcher_check{job_id="j-launch"}', timeout=30)
            (row,) = rows
            assert row["metric"]["job_id"] == "j-launch" and row["metric"]["tenant"] == "acme", row
            assert row["metric"]["job"] == "sdray" and row["metric"]["instance"] == f"127.0.0.1:{port}", row
            assert float(row["value"][1]) == 42.0, row
            assert [float(r["value"][1]) for r in prom.query('up{job="sdray"}')] == [1.0]
            with pytest.raises(AssertionError, match="parse error"):
                prom.query("sum(")
            groups = prom.api("rules")["groups"]
            assert [g["name"] for g in groups] == ["sdray"]
            assert sorted(r["name"] for r in groups[0]["rules"]) == sorted(RULES)
            assert all(r["health"] != "err" for r in groups[0]["rules"]), groups
            assert prom.alerts() == []  # nothing failed, stalled or down here
        finally:
            prom.stop()
        assert prom.proc.poll() is not None
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
