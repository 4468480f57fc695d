"""Prometheus metrics of the service (requests, validation failures, jobs, queue) and of the training it
runs (step, loss, images/s, data wait, checkpoint time, GPU memory, skipped images).

Training metrics reach the service without a pushgateway: each job's driver posts its rank-0 progress to
the service (``/internal/v1/jobs/{id}/progress``), and the service exports the latest values, labelled by
``job_id``, ``tenant`` and ``job_name`` (not ``job``, which is Prometheus's own target label).
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily

from sdray.states import STATES, JobState
from sdray.service.store import JobStore

# Finished jobs keep their last training values this long, so a scrape after the end still sees them.
FINISHED_KEPT_S = 3600.0

TRAINING = (
    # (metric, progress key, help)
    ("sdray_train_step", "step", "Optimizer steps done."),
    ("sdray_train_max_steps", "max_steps", "Steps the run will take."),
    ("sdray_train_loss", "loss", "Training loss (mean over the last logging window and the workers)."),
    ("sdray_train_val_loss", "val_loss", "Loss on the held-out split at the last checkpoint."),
    ("sdray_train_images_per_second", "images_per_s", "Training images per second, all workers."),
    ("sdray_train_step_seconds", "step_s", "Seconds per optimizer step."),
    ("sdray_train_data_wait_seconds_per_step", "data_wait_per_step", "Seconds per step spent waiting for data."),
    ("sdray_train_data_wait_share", "data_wait_share", "Share of step time spent waiting for data (0..1)."),
    ("sdray_train_checkpoint_seconds", "checkpoint_s", "Seconds the last checkpoint took."),
    ("sdray_train_gpu_memory_bytes", "gpu_memory_bytes", "Peak GPU memory allocated on rank 0."),
    ("sdray_train_skipped_images", "skipped_images", "Unreadable images skipped so far."),
    ("sdray_train_last_progress_timestamp_seconds", "time", "When the driver last reported (Unix time)."),
)


class ServiceMetrics:
    def __init__(self, store: JobStore):
        self.registry = CollectorRegistry()
        self.requests = Counter("sdray_http_requests", "HTTP requests by route, method and status.",
                                ["route", "method", "status"], registry=self.registry)
        self.latency = Histogram("sdray_http_request_duration_seconds", "HTTP request latency.", ["route", "method"],
                                 buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
                                 registry=self.registry)
        self.validation_failures = Counter("sdray_validation_failures", "Refused job documents by field.",
                                           ["field"], registry=self.registry)
        self.policy_refusals = Counter("sdray_policy_refusals", "Fields the tenant policy refused, by rule.",
                                       ["rule"], registry=self.registry)
        self.transitions = Counter("sdray_job_transitions", "Jobs entering a state.", ["state", "tenant"],
                                   registry=self.registry)
        self.registry.register(_JobCollector(store))

    def transition(self, state: str, tenant: str) -> None:
        for each in STATES:  # every series of the tenant exists from 0, so increase() sees its first failure
            self.transitions.labels(each, tenant)
        self.transitions.labels(state, tenant).inc()


class _JobCollector:
    """Jobs by state and tenant, the queue, and each job's latest training values, read from the store at
    scrape time (so they are right after a restart too)."""

    def __init__(self, store: JobStore):
        self.store = store

    def describe(self):
        return []

    def collect(self):
        jobs = GaugeMetricFamily("sdray_jobs", "Jobs by state and tenant.", labels=["state", "tenant"])
        counts = self.store.counts()
        tenants = sorted({t for _, t in counts})
        for tenant in tenants:
            for state in STATES:
                jobs.add_metric([state, tenant], counts.get((state, tenant), 0))
        yield jobs
        queue = GaugeMetricFamily("sdray_queue_depth", "Jobs waiting for resources.", labels=["tenant"])
        depth = {**dict.fromkeys(tenants, 0), **self.store.queue_depth()}
        families = {name: GaugeMetricFamily(name, doc, labels=["job_id", "tenant", "job_name"])
                    for name, _, doc in TRAINING}
        running = GaugeMetricFamily("sdray_train_running", "1 while the job runs, 0 after.",
                                    labels=["job_id", "tenant", "job_name"])
        # Only jobs that run or finished lately, and only their progress column: a scrape costs the same
        # however many jobs the store has ever held.
        for job_id, tenant, name, state, progress in self.store.recent_progress(time.time() - FINISHED_KEPT_S):
            labels = [job_id, tenant, name]
            values = dict(progress)
            if "step_s" in values and "data_wait_share" in values:
                values["data_wait_per_step"] = values["data_wait_share"] * values["step_s"]
            for name, key, _ in TRAINING:
                if isinstance(values.get(key), (int, float)):
                    families[name].add_metric(labels, float(values[key]))
            running.add_metric(labels, 1.0 if state == JobState.RUNNING else 0.0)
        for tenant, n in depth.items():
            queue.add_metric([tenant], n)
        yield queue
        yield from families.values()
        yield running
