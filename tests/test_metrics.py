"""Every exporter sdray has, scraped for real, passes ``promtool check metrics`` (Debian's prometheus package):
the service over HTTP (its own metrics, and the training metrics it exports from the drivers' progress) and
the controller's ``/metrics``. Names follow Prometheus's conventions: counters end in ``_total``, fractions
in ``_ratio``, base units in the name."""

from __future__ import annotations

import subprocess

import pytest
from exporters import FULL_PROGRESS, sample_names, scrape_controller, scrape_service

from sdray.service.metrics import DEMAND, TRAINING, TRAINING_COUNTERS
from tools import require_binary


@pytest.fixture(scope="module")
def service_text(tmp_path_factory) -> str:
    return scrape_service(tmp_path_factory.mktemp("service-scrape"))


@pytest.fixture(scope="module")
def controller_text() -> str:
    return scrape_controller()


def promtool_check(text: str) -> subprocess.CompletedProcess:
    return subprocess.run([require_binary("promtool"), "check", "metrics"], input=text, capture_output=True,
                          text=True, timeout=60)


def test_promtool_finds_the_problems_it_is_asked_about():
    """The control: promtool flags a counter without ``_total`` and a gauge that pretends to be one."""
    bad = ("# HELP sdray_skipped Skipped.\n# TYPE sdray_skipped counter\nsdray_skipped 3\n"
           "# HELP sdray_done_total Done.\n# TYPE sdray_done_total gauge\nsdray_done_total 1\n")
    proc = promtool_check(bad)
    report = proc.stdout + proc.stderr
    assert proc.returncode != 0, report
    assert "sdray_skipped" in report and "sdray_done_total" in report, report


@pytest.mark.parametrize("exporter", ["service", "controller"])
def test_each_exporter_passes_promtool_check_metrics(exporter, request):
    text = request.getfixturevalue(f"{exporter}_text")
    proc = promtool_check(text)
    assert proc.returncode == 0 and not (proc.stdout + proc.stderr).strip(), (
        f"promtool check metrics on the {exporter}'s /metrics:\n{proc.stdout}{proc.stderr}\n---\n{text}")


def test_the_service_exports_every_training_metric_with_samples(service_text):
    names = sample_names(service_text)
    for metric, _, _ in TRAINING + DEMAND:
        assert names.get(metric) == "gauge", metric
    for metric, _, _ in TRAINING_COUNTERS:
        assert names.get(f"{metric}_total") == "counter", metric
    assert not [n for n in names if n.endswith("_share")]  # Prometheus says _ratio
    lines = service_text.splitlines()
    assert f'sdray_train_skipped_images_total{{job_id="{_job_id(lines)}",job_name="digits",tenant="alice"}} ' \
           f"{float(FULL_PROGRESS.skipped_images)}" in lines
    assert any(line.startswith("sdray_train_data_wait_ratio{") and line.endswith(f" {FULL_PROGRESS.data_wait_share}")
               for line in lines)


def test_queue_metrics_follow_the_jobs(service_text):
    names = sample_names(service_text)
    assert names["sdray_job_queue_wait_seconds_bucket"] == "histogram"
    lines = service_text.splitlines()
    # Both jobs started: one at once, bob's after the first ended. Nothing waits now.
    assert 'sdray_job_queue_wait_seconds_count{tenant="alice"} 1.0' in lines
    assert 'sdray_job_queue_wait_seconds_count{tenant="bob"} 1.0' in lines
    assert 'sdray_queue_oldest_wait_seconds{tenant="bob"} 0.0' in lines
    assert 'sdray_jobs{state="Running",tenant="bob"} 1.0' in lines
    waited = float(next(line.split()[-1] for line in lines if line.startswith('sdray_job_queue_wait_seconds_sum{tenant="bob"}')))
    assert waited > 0  # bob's job waited for alice's to end


def test_the_controller_counts_reconciles_and_errors_with_prometheus_client(controller_text):
    names = sample_names(controller_text)
    assert names["sdray_controller_reconciles_total"] == names["sdray_controller_reconcile_errors_total"] == "counter"
    assert names["sdray_controller_reconcile_duration_seconds_bucket"] == "histogram"
    lines = controller_text.splitlines()
    assert "sdray_controller_reconcile_errors_total 1.0" in lines
    assert "sdray_controller_leader 1.0" in lines
    reconciles = float(next(line.split()[-1] for line in lines if line.startswith("sdray_controller_reconciles_total")))
    assert reconciles >= 2  # the failed one and its retry


def _job_id(lines: list[str]) -> str:
    line = next(line for line in lines if line.startswith("sdray_train_step{"))
    return line.split('job_id="', 1)[1].split('"', 1)[0]
