"""Prometheus metrics of the service (requests, validation failures, jobs, the queue) and of the training it
runs (step, loss, images/s, data wait, checkpoints, GPU memory, skipped images).

Training metrics reach the service without a pushgateway: each job's driver posts its rank-0 progress to
the service (``/internal/v1/jobs/{id}/progress``), and the service exports the latest values, labelled by
``job_id``, ``tenant`` and ``job_name`` (not ``job``, which is Prometheus's own target label).

Names follow Prometheus's conventions (``promtool check metrics`` passes, tests/test_metrics.py): base units
in the name (``_seconds``, ``_bytes``), ``_ratio`` for a 0..1 fraction, ``_total`` for counters (a counter
family is named without it: prometheus_client adds it), ``_timestamp_seconds`` for a Unix time. The
Grafana dashboard (``helm/sdray/files/dashboard.json``) queries these names only.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from sdray.states import STATES, JobState
from sdray.service.store import JobStore

# Finished jobs keep their last training values this long, so a scrape after the end still sees them.
FINISHED_KEPT_S = 3600.0

TRAINING_LABELS = ["job_id", "tenant", "job_name"]

TRAINING = (
    # (metric, progress key, help): gauges, the latest value the driver reported
    ("sdray_train_step", "step", "Optimizer steps done."),
    ("sdray_train_max_steps", "max_steps", "Steps the run will take."),
    ("sdray_train_loss", "loss", "Training loss (mean over the last logging window and the workers)."),
    ("sdray_train_val_loss", "val_loss", "Loss on the held-out split at the last checkpoint."),
    ("sdray_train_learning_rate", "lr", "Learning rate at the last logged step."),
    ("sdray_train_images_per_second", "images_per_s", "Training images per second, all workers."),
    ("sdray_train_step_duration_seconds", "step_s", "Seconds per optimizer step."),
    ("sdray_train_step_data_wait_seconds", "data_wait_per_step", "Seconds of each step spent waiting for data."),
    ("sdray_train_data_wait_ratio", "data_wait_share", "Fraction of step time spent waiting for data (0..1)."),
    ("sdray_train_checkpoint_step", "checkpoint_step", "Step of the last checkpoint."),
    ("sdray_train_checkpoint_duration_seconds", "checkpoint_s", "Seconds the last checkpoint took."),
    ("sdray_train_last_checkpoint_timestamp_seconds", "checkpoint_time",
     "When the service learnt of the last checkpoint (Unix time)."),
    ("sdray_train_gpu_memory_bytes", "gpu_memory_bytes", "Peak GPU memory allocated on rank 0."),
    ("sdray_train_last_progress_timestamp_seconds", "time", "When the driver last reported (Unix time)."),
)

TRAINING_COUNTERS = (
    # (metric without _total, progress key, help): they only grow during a run
    ("sdray_train_skipped_images", "skipped_images", "Unreadable images skipped so far."),
    ("sdray_train_images_seen", "images_seen", "Training images seen, all workers."),
)

DEMAND = (
    # (metric, demand key, help): what the job holds while it runs (from its document)
    ("sdray_train_workers", "workers", "Ray Train workers of the job (a search: times its concurrent trials)."),
    ("sdray_train_gpus", "GPU", "GPUs the job's workers hold."),
)

# From a few seconds (a free cluster) to a day (a queue behind long jobs).
QUEUE_WAIT_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400, 43200, 86400)


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
        self.queue_wait = Histogram("sdray_job_queue_wait_seconds",
                                    "Seconds from a job's submission to its start (the service's queue, and the "
                                    "backend's own: Kueue, the Ray cluster starting).", ["tenant"],
                                    buckets=QUEUE_WAIT_BUCKETS, registry=self.registry)
        self.registry.register(_JobCollector(store))

    def transition(self, state: str, tenant: str, waited_s: float | None = None) -> None:
        """A job of ``tenant`` entered ``state``; ``waited_s``: how long it waited to start (when it starts)."""
        for each in STATES:  # every series of the tenant exists from 0, so increase() sees its first failure
            self.transitions.labels(each, tenant)
        self.transitions.labels(state, tenant).inc()
        self.queue_wait.labels(tenant)  # the tenant's histogram exists from its first submission
        if waited_s is not None:
            self.queue_wait.labels(tenant).observe(max(0.0, waited_s))


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


class _JobCollector:
    """Jobs by state and tenant, the queue, and each job's latest training values, read from the store at
    scrape time (so they are right after a restart too)."""

    def __init__(self, store: JobStore):
        self.store = store

    def describe(self):
        return []

    def collect(self):
        now = time.time()
        jobs = GaugeMetricFamily("sdray_jobs", "Jobs by state and tenant.", labels=["state", "tenant"])
        counts = self.store.counts()
        tenants = sorted({t for _, t in counts})
        for tenant in tenants:
            for state in STATES:
                jobs.add_metric([state, tenant], counts.get((state, tenant), 0))
        yield jobs
        queue = GaugeMetricFamily("sdray_queue_depth", "Jobs waiting for resources.", labels=["tenant"])
        for tenant, n in {**dict.fromkeys(tenants, 0), **self.store.queue_depth()}.items():
            queue.add_metric([tenant], n)
        yield queue
        oldest = GaugeMetricFamily("sdray_queue_oldest_wait_seconds",
                                   "How long the tenant's oldest pending job has waited to start (0: none waits).",
                                   labels=["tenant"])
        for tenant, created in {**dict.fromkeys(tenants), **self.store.oldest_pending()}.items():
            oldest.add_metric([tenant], max(0.0, now - created) if created is not None else 0.0)
        yield oldest

        gauges = {name: GaugeMetricFamily(name, doc, labels=TRAINING_LABELS) for name, _, doc in TRAINING + DEMAND}
        counters = {name: CounterMetricFamily(name, doc, labels=TRAINING_LABELS) for name, _, doc in TRAINING_COUNTERS}
        running = GaugeMetricFamily("sdray_train_running", "1 while the job runs, 0 after.", labels=TRAINING_LABELS)
        # Only jobs that run or finished lately, and only their progress and demand columns: a scrape costs
        # the same however many jobs the store has ever held.
        for job_id, tenant, name, state, progress, demand in self.store.recent_progress(now - FINISHED_KEPT_S):
            labels = [job_id, tenant, name]
            values = dict(progress)
            if _number(values.get("step_s")) is not None and _number(values.get("data_wait_share")) is not None:
                values["data_wait_per_step"] = values["data_wait_share"] * values["step_s"]
            for families, table, source in ((gauges, TRAINING, values), (counters, TRAINING_COUNTERS, values),
                                            (gauges, DEMAND, demand)):
                for metric, key, _ in table:
                    if (value := _number(source.get(key))) is not None:
                        families[metric].add_metric(labels, value)
            running.add_metric(labels, 1.0 if state == JobState.RUNNING else 0.0)
        yield from gauges.values()
        yield from counters.values()
        yield running
