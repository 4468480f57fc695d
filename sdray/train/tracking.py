"""Experiment tracking: rank 0's metrics, parameters, sample grids and outcome in MLflow, TensorBoard and
Weights & Biases, as ``spec.tracking`` asks (``sdray.spec.TrackingSpec``).

Each tracker follows its library's conventions: MLflow reads ``MLFLOW_TRACKING_URI`` and
``MLFLOW_EXPERIMENT_NAME`` (and its auth variables: ``MLFLOW_TRACKING_TOKEN``…), W&B reads ``WANDB_*``
(``WANDB_MODE=offline`` included), and TensorBoard writes event files under ``<output.uri>/tensorboard``.
"The job's environment" is the process's environment with ``spec.cluster.env`` on top: what the Ray
containers see on Kubernetes, and what a local run is told.

A run that resumes continues its tracker runs: MLflow finds its run by the ``sdray.run`` tag, W&B by an id
derived from the output URI and run name, TensorBoard purges the steps after the checkpoint. Runs with the
same ``tracking.group`` (a search's trials) are grouped: children of one MLflow parent run, one W&B group.

Tracking never ends a run: a tracker whose server fails is logged once, counted in ``summary.json``
(``tracking_failures``) and dropped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml
from PIL import Image

from sdray import storage
from sdray.spec import DiffusionJob, TrackingSpec

log = logging.getLogger("sdray.train")

STATUS = {"succeeded": "FINISHED", "failed": "FAILED", "preempted": "KILLED"}  # sdray → MLflow run status
MLFLOW_PARAM_LIMIT = 6000  # characters of one MLflow parameter value


def job_environment(job: DiffusionJob) -> dict[str, str]:
    """The environment the job's trackers read: the process's, with ``spec.cluster.env`` on top."""
    return {**os.environ, **job.spec.cluster.env}


def flat_params(doc: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, str]]:
    """``spec.train.learning_rate``-style keys and their values as text, for trackers' flat parameters."""
    for key, value in doc.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            yield from flat_params(value, name + ".")
        else:
            yield name, value if isinstance(value, str) else json.dumps(value)


def scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """The numeric metrics of a metrics.jsonl record, ``step`` left out."""
    return {k: float(v) for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


class Tracker:
    """One tracking backend of one run. Subclasses override what their backend records."""

    name = "tracker"

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_image(self, key: str, image: Image.Image, step: int) -> None:
        pass

    def flush(self) -> None:
        pass

    def finish(self, status: str, summary: dict) -> None:
        pass


class MLflowTracker(Tracker):
    name = "mlflow"

    def __init__(self, job: DiffusionJob, env: Mapping[str, str], run_name: str, resume_step: int):
        from mlflow import MlflowClient

        spec = job.spec.tracking
        self.uri = spec.mlflow.tracking_uri or env.get("MLFLOW_TRACKING_URI")
        if not self.uri:
            raise ValueError("spec.tracking.mlflow.enabled is true but no tracking URI is known: set "
                             "spec.tracking.mlflow.tracking_uri or MLFLOW_TRACKING_URI")
        self.client = MlflowClient(tracking_uri=self.uri)
        name = spec.mlflow.experiment or env.get("MLFLOW_EXPERIMENT_NAME") or spec.group or job.metadata.name
        self.experiment_id = experiment_id(self.client, name)
        tags = {"sdray.run": run_name, "sdray.job": job.metadata.name}
        if spec.group:
            tags["sdray.group"] = spec.group
            tags["mlflow.parentRunId"] = group_run(self.client, self.experiment_id, spec.group)
        self.run_id = self._resumed(run_name) if resume_step else None
        if self.run_id is None:
            self.run_id = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags).info.run_id
            self._log_document(job)
        else:
            self.client.update_run(self.run_id, status="RUNNING")

    def _resumed(self, run_name: str) -> str | None:
        runs = self.client.search_runs([self.experiment_id], f"tags.`sdray.run` = '{_quoted(run_name)}'",
                                       order_by=["attributes.start_time DESC"], max_results=1)
        return runs[0].info.run_id if runs else None

    def _log_document(self, job: DiffusionJob) -> None:
        from mlflow.entities import Param

        doc = job.model_dump(mode="json", exclude_none=True)
        params = [Param(k, v[:MLFLOW_PARAM_LIMIT]) for k, v in flat_params(doc["spec"], "spec.")]
        for start in range(0, len(params), 100):  # MLflow takes up to 100 parameters per batch
            self.client.log_batch(self.run_id, params=params[start:start + 100])
        self.client.log_text(self.run_id, yaml.safe_dump(doc, sort_keys=False), "job.yaml")

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    def log_image(self, key: str, image: Image.Image, step: int) -> None:
        self.client.log_image(self.run_id, image, key=key.replace("/", "_"), step=step)

    def finish(self, status: str, summary: dict) -> None:
        for key in ("pipeline", "lora", "vae", "checkpoint"):
            if summary.get(key):
                self.client.set_tag(self.run_id, f"sdray.{key}", str(summary[key]))
        self.client.set_tag(self.run_id, "sdray.status", status)
        self.client.set_terminated(self.run_id, STATUS.get(status, "FAILED"))


def _quoted(text: str) -> str:
    return text.replace("\\", "\\\\").replace("'", "\\'")


def experiment_id(client, name: str) -> str:
    """The id of the experiment ``name``, created when missing (by another process meanwhile: found)."""
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name)
    except MlflowException:
        return client.get_experiment_by_name(name).experiment_id


def group_run(client, experiment: str, group: str) -> str:
    """The parent run of ``group`` in ``experiment`` (``open_group`` makes it before a search's trials)."""
    runs = client.search_runs([experiment], f"tags.`sdray.group_parent` = '{_quoted(group)}'",
                              order_by=["attributes.start_time ASC"], max_results=1)
    if runs:
        return runs[0].info.run_id
    return client.create_run(experiment, run_name=group, tags={"sdray.group_parent": group}).info.run_id


class TensorBoardTracker(Tracker):
    """Event files written with tensorboardX into a staging folder, copied to ``<output.uri>/tensorboard``."""

    name = "tensorboard"

    def __init__(self, job: DiffusionJob, staging: Path, resume_step: int):
        from tensorboardX import SummaryWriter

        self.folder = staging / "tensorboard"
        self.uri = storage.join(job.spec.output.uri, "tensorboard")
        self.s3 = job.spec.storage
        # A resumed run hides what the interrupted one logged after its checkpoint (TensorBoard purges the steps
        # from purge_step on; the checkpoint's own step stays).
        self.writer = SummaryWriter(logdir=str(self.folder), purge_step=resume_step + 1 if resume_step else None,
                                    flush_secs=3600)
        if not resume_step:
            doc = yaml.safe_dump(job.model_dump(mode="json", exclude_none=True), sort_keys=False)
            self.writer.add_text("job", f"```\n{doc}\n```", 0)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def log_image(self, key: str, image: Image.Image, step: int) -> None:
        import numpy as np

        self.writer.add_image(key, np.asarray(image.convert("RGB")), step, dataformats="HWC")

    def flush(self) -> None:
        self.writer.flush()
        for path in sorted(self.folder.iterdir()):
            storage.write_bytes(storage.join(self.uri, path.name), path.read_bytes(), self.s3)

    def finish(self, status: str, summary: dict) -> None:
        if summary.get("pipeline"):
            self.writer.add_text("pipeline", str(summary["pipeline"]), int(summary.get("step", 0)))
        self.writer.close()
        self.flush()


class WandbTracker(Tracker):
    name = "wandb"

    def __init__(self, job: DiffusionJob, env: Mapping[str, str], staging: Path, run_name: str, resume_step: int):
        import wandb

        spec = job.spec.tracking.wandb
        self.mode = spec.mode or env.get("WANDB_MODE") or "online"
        self.folder = staging / "wandb-files"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.uri = storage.join(job.spec.output.uri, "wandb")
        self.s3 = job.spec.storage
        # one id per (output, run): a resumed run continues the same W&B run
        run_id = hashlib.sha256(f"{job.spec.output.uri}|{run_name}".encode()).hexdigest()[:16]
        self.run = wandb.init(
            project=spec.project or env.get("WANDB_PROJECT") or "sdray", entity=spec.entity or env.get("WANDB_ENTITY"),
            name=run_name, id=run_id, resume="allow", group=job.spec.tracking.group, tags=spec.tags or None,
            mode=self.mode, dir=str(self.folder), job_type="train", reinit="create_new",
            config=job.model_dump(mode="json", exclude_none=True),
            settings=wandb.Settings(console="off", silent=True, x_disable_stats=True))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def log_image(self, key: str, image: Image.Image, step: int) -> None:
        import wandb

        self.run.log({key: wandb.Image(image)}, step=step)

    def finish(self, status: str, summary: dict) -> None:
        for key in ("pipeline", "lora", "vae"):
            if summary.get(key):
                self.run.summary[key] = str(summary[key])
        self.run.summary["status"] = status
        self.run.finish(exit_code=0 if status == "succeeded" else 1)
        if self.mode == "offline":  # the pod's disk goes with the pod: keep the run for `wandb sync`
            for path in sorted(p for p in self.folder.rglob("*") if p.is_file()):
                storage.write_bytes(storage.join(self.uri, path.relative_to(self.folder).as_posix()),
                                    path.read_bytes(), self.s3)


class Trackers:
    """The run's enabled trackers; each call reaches every one, and one that fails is dropped."""

    def __init__(self, trackers: list[Tracker]):
        self.trackers = trackers
        self.failures = 0

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.trackers]

    def _each(self, what: str, *args) -> None:
        for tracker in list(self.trackers):
            try:
                getattr(tracker, what)(*args)
            except Exception as exc:  # noqa: BLE001 - a tracking server's failure must not end training
                self.failures += 1
                self.trackers.remove(tracker)
                log.warning("tracking: %s failed (%s: %s); the run goes on without it", tracker.name,
                            type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")

    def log(self, record: Mapping[str, Any]) -> None:
        metrics = scalars(record)
        if metrics and "step" in record:
            self._each("log_metrics", metrics, int(record["step"]))

    def log_image(self, key: str, image: Image.Image, step: int) -> None:
        self._each("log_image", key, image, step)

    def flush(self) -> None:
        self._each("flush")

    def finish(self, status: str, summary: dict) -> None:
        self._each("finish", status, summary)
        self.trackers = []


def enabled(spec: TrackingSpec, env: Mapping[str, str]) -> dict[str, bool]:
    """Which trackers run: each one's ``enabled``, or, when null, what the environment says."""
    return {
        "mlflow": spec.mlflow.enabled if spec.mlflow.enabled is not None
        else bool(spec.mlflow.tracking_uri or env.get("MLFLOW_TRACKING_URI")),
        "tensorboard": spec.tensorboard.enabled,
        "wandb": spec.wandb.enabled if spec.wandb.enabled is not None
        else bool(env.get("WANDB_API_KEY") or (spec.wandb.mode or env.get("WANDB_MODE")) == "offline"),
    }


def open_trackers(job: DiffusionJob, run_name: str, resume_step: int = 0, staging: Path | None = None) -> Trackers:
    """The trackers ``job`` asks for, each started (resumed when ``resume_step``); one that cannot start
    is logged, counted and left out."""
    env = job_environment(job)
    on = enabled(job.spec.tracking, env)
    staging = staging or Path(tempfile.mkdtemp(prefix="sdray-tracking-"))
    makers = {
        "mlflow": lambda: MLflowTracker(job, env, run_name, resume_step),
        "tensorboard": lambda: TensorBoardTracker(job, staging, resume_step),
        "wandb": lambda: WandbTracker(job, env, staging, run_name, resume_step),
    }
    trackers, failures = [], 0
    for name, make in makers.items():
        if not on[name]:
            continue
        try:
            trackers.append(make())
        except Exception as exc:  # noqa: BLE001 - see Trackers
            failures += 1
            log.warning("tracking: %s could not start (%s: %s); the run goes on without it", name,
                        type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
    opened = Trackers(trackers)
    opened.failures = failures
    return opened


def open_group(job: DiffusionJob) -> None:
    """Before a search's trials start: its MLflow parent run (trials find it by its tag)."""
    env = job_environment(job)
    if not enabled(job.spec.tracking, env)["mlflow"]:
        return
    try:
        from mlflow import MlflowClient

        spec = job.spec.tracking
        client = MlflowClient(tracking_uri=spec.mlflow.tracking_uri or env.get("MLFLOW_TRACKING_URI"))
        group = spec.group or job.metadata.name
        name = spec.mlflow.experiment or env.get("MLFLOW_EXPERIMENT_NAME") or group
        group_run(client, experiment_id(client, name), group)
    except Exception as exc:  # noqa: BLE001 - see Trackers
        log.warning("tracking: mlflow could not record the search (%s); its trials try again", exc)

