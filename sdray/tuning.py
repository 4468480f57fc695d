"""Hyperparameter search: ``spec.tune`` run with Ray Tune, one full Ray Train run per trial.

Each trial is the job document with the trial's values put in at their dotted paths (and the learning rate
rescaled with the batch when ``scale_lr_with_batch`` says so), its own output folder
``<output.uri>/trials/<trial>`` and its own Ray Train run under ``<checkpoint.uri>/<name>-tune/train``. Its
workers report at every checkpoint, with the validation loss measured on fixed images, noise and timesteps.

Ray Train V2 runs inside Tune as a function trainable that builds and fits a ``TorchTrainer`` (V2 has no
``Tuner(trainer)``). A Train callback hands each report to the trainable, which reports it to Tune together
with a small Tune checkpoint naming the Ray Train checkpoint of that step. That is what lets PBT copy a
strong trial into a weak one (the weak trial restarts from the named checkpoint with perturbed values), and
what lets ``sdray tune --resume`` continue unfinished trials from where they were, through
``Tuner.restore``, without rerunning finished ones.

At the end: a results table, ``results.parquet`` and ``tune.png`` (the metric against the learning rate,
coloured by batch size) in ``output.uri``, the best trial's pipeline copied to ``<output.uri>/pipeline``,
and ``best.yaml``: the document with the best values, ready for ``sdray train``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from ray.tune import Callback

from sdray import storage
from sdray.progress import Progress, Trial
from sdray.spec import DiffusionJob, TuneSpec, parse_job
from sdray.train.tracking import open_group

POINTER = "sdray_train_checkpoint.json"


class TuneError(RuntimeError):
    """A search that cannot start or that produced no usable trial; the message says what to do."""


# -- the search space --------------------------------------------------------------------------------

def search_space(tune_spec: TuneSpec) -> dict[str, Any]:
    """``spec.tune.search_space`` as Ray Tune domains, keyed by the dotted path."""
    from ray import tune

    space = {}
    for key, dist in tune_spec.search_space.items():
        if dist.loguniform is not None:
            space[key] = tune.loguniform(*dist.loguniform)
        elif dist.uniform is not None:
            space[key] = tune.uniform(*dist.uniform)
        elif dist.choice is not None:
            space[key] = tune.choice(dist.choice)
        else:
            space[key] = tune.grid_search(dist.grid)
    return space


def global_batch(doc: dict) -> int:
    spec = doc["spec"]
    train, dist = spec.get("train", {}), spec.get("distributed", {})
    return train.get("batch_size", 16) * train.get("gradient_accumulation_steps", 1) * dist.get("num_workers", 1)


def apply_params(job: DiffusionJob, params: dict[str, Any]) -> dict:
    """The job document with ``params`` (dotted path → value) put in, and the learning rate rescaled with
    the global batch when ``scale_lr_with_batch`` asks for it. The ``tune`` section is dropped."""
    doc = job.model_dump(mode="json", exclude_unset=True)
    base_batch = global_batch(doc)
    rule = job.spec.tune.scale_lr_with_batch if job.spec.tune else "none"
    doc["spec"].pop("tune", None)
    for key, value in params.items():
        node = doc["spec"]
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    if rule != "none":
        train = doc["spec"].setdefault("train", {})
        ratio = global_batch(doc) / base_batch
        lr = train.get("learning_rate", job.spec.train.learning_rate)
        train["learning_rate"] = lr * (ratio if rule == "linear" else math.sqrt(ratio))
    return doc


def trial_slug(trial_id: str) -> str:
    """A trial id as a DNS-label-friendly name part."""
    return re.sub(r"[^a-z0-9-]", "-", trial_id.lower()).strip("-")


def experiment_uri(job: DiffusionJob) -> str:
    return storage.join(job.spec.checkpoint_uri, f"{job.metadata.name}-tune")


SEARCH_FILE = "sdray-search.json"  # beside Tune's own state: which document started the search


def search_fingerprint(job: DiffusionJob) -> str:
    """A hash of the job's whole spec (search space, scheduler, training settings): the same search or not."""
    spec = job.model_dump(mode="json", exclude_unset=True)["spec"]
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def _same_search(job: DiffusionJob) -> bool:
    """Whether the search stored at the job's experiment path was started by this very spec."""
    where = storage.join(experiment_uri(job), SEARCH_FILE)
    try:
        recorded = json.loads(storage.read_bytes(where, job.spec.storage)).get("fingerprint")
    except (storage.StorageError, ValueError, AttributeError):
        return False
    return recorded == search_fingerprint(job)


def trial_job(job: DiffusionJob, params: dict[str, Any], trial_id: str, resume_from: str | None = None
              ) -> DiffusionJob:
    """The document one trial runs: its values, its own output folder and run name."""
    doc = apply_params(job, params)
    slug = trial_slug(trial_id)
    doc["metadata"]["name"] = f"{job.metadata.name}-{slug}"[:63].rstrip("-")
    spec = doc["spec"]
    spec["output"] = {"uri": storage.join(job.spec.output.uri, "trials", slug)}
    spec["checkpoint"] = {**spec.get("checkpoint", {}), "uri": storage.join(experiment_uri(job), "train"),
                          "resume": resume_from or "auto"}
    if job.spec.tune.scheduler.name == "pbt":  # a weaker trial may copy any of them later: keep them all
        spec["checkpoint"]["keep_last"] = job.spec.train.max_steps // job.spec.checkpoint.every_n_steps + 1
    spec.setdefault("validation", {})["prompts"] = []  # no sample grids per trial: the best is exported once
    tracking = spec.setdefault("tracking", {})
    tracking.setdefault("group", job.spec.tracking.group or job.metadata.name)  # the trials of one search together
    return parse_job(doc, f"trial {trial_id}")


# -- one trial ---------------------------------------------------------------------------------------

class _ToTrainable:
    """A Ray Train callback that hands each report (rank 0's metrics, the checkpoint's path) to the
    trainable through a Ray queue."""

    def __init__(self, channel):
        self.channel = channel

    def after_report(self, run_context, metrics, checkpoint):
        self.channel.put({"metrics": metrics[0], "checkpoint": checkpoint.path if checkpoint else None})


def _callback(channel):
    from ray.train.v2.api.callback import UserCallback

    class ToTrainable(_ToTrainable, UserCallback):
        pass

    return ToTrainable(channel)


def _finite(value: float, mode: str) -> float:
    """A diverged trial's NaN/inf metric as the worst value, so schedulers rank it last."""
    if isinstance(value, (int, float)) and math.isfinite(value):
        return value
    return math.inf if mode == "min" else -math.inf


def run_trial(config: dict, *, job_doc: dict) -> None:
    """The Tune function trainable: one Ray Train run of the job with ``config``'s values."""
    import ray.tune

    from sdray.train.launch import prepare_data

    job = parse_job(job_doc)
    tune_spec = job.spec.tune
    context = ray.tune.get_context()
    trial_id = context.get_trial_id()
    restored = ray.tune.get_checkpoint()
    resume_from, copied_from, pointer = None, None, None
    if restored is not None:
        with restored.as_directory() as where:
            pointer = json.loads((Path(where) / POINTER).read_text())
        # another trial's checkpoint: PBT copied it here; this trial's own: a restart (keep what it copied)
        resume_from = pointer["checkpoint"]
        copied_from = pointer["trial"] if pointer["trial"] != trial_id else pointer.get("copied_from")
    trial = trial_job(job, config, trial_id, resume_from)
    with prepare_data(trial) as data:
        _fit_trial(trial, data, tune_spec, trial_id, copied_from, pointer, config)


def _fit_trial(trial: DiffusionJob, data, tune_spec, trial_id: str, copied_from, pointer, config: dict) -> None:
    """``run_trial``'s Ray Train run of ``trial`` on ``data``, its results reported to Tune as they come."""
    import ray.tune
    from ray.tune import Checkpoint
    from ray.util.queue import Queue

    from sdray.train.launch import TrainingFailed, checkpoint_uri_of, finish_summary, torch_trainer, worker_error

    channel = Queue(actor_options={"num_cpus": 0})
    trainer = torch_trainer(trial, data, callbacks=[_callback(channel)])
    outcome: dict = {}

    def fit():
        try:
            outcome["result"] = trainer.fit()
        except Exception as exc:  # noqa: BLE001 - reported by the trainable's thread
            outcome["error"] = exc
        finally:
            channel.put(None)

    runner = threading.Thread(target=fit, daemon=True)
    runner.start()
    reported = False
    while True:
        item = channel.get()
        if item is None:
            break
        metrics = {k: v for k, v in item["metrics"].items() if isinstance(v, (int, float, str, bool))}
        if tune_spec.metric in metrics:
            metrics[tune_spec.metric] = _finite(metrics[tune_spec.metric], tune_spec.mode)
        metrics["copied_from"] = copied_from or ""
        metrics["learning_rate"] = trial.spec.train.learning_rate
        checkpoint = None
        uri = checkpoint_uri_of(item["checkpoint"], trial) if item["checkpoint"] else None
        if uri:
            folder = Path(tempfile.mkdtemp(prefix="sdray-pointer-"))
            (folder / POINTER).write_text(json.dumps({"checkpoint": uri, "trial": trial_id, "copied_from": copied_from,
                                                      "step": metrics.get("step"), "metrics": metrics}))
            checkpoint = Checkpoint.from_directory(str(folder))
        ray.tune.report(metrics, checkpoint=checkpoint)
        reported = True
    runner.join()
    if "error" in outcome:
        raise TrainingFailed(worker_error(outcome["error"]))
    if not reported and pointer is not None:
        # PBT copied a checkpoint at the last step: nothing was left to train, so this trial ends with the
        # copied checkpoint's metrics (and its own learning rate and origin)
        ray.tune.report({**pointer.get("metrics", {}), "copied_from": copied_from,
                         "learning_rate": trial.spec.train.learning_rate})
    finish_summary(trial, data, {"trial": trial_id, "params": config})


# -- the search --------------------------------------------------------------------------------------

def concurrent_trials(job: DiffusionJob) -> int:
    """How many trials the cluster runs at once: its CPUs (less two for Ray Data) and GPUs over what one
    trial's workers take, unless ``max_concurrent_trials`` says fewer. Later trials queue."""
    import ray

    spec = job.spec
    res = spec.distributed.resources_per_worker or {}
    workers = spec.distributed.num_workers
    cluster = ray.cluster_resources()
    fits = max(1, int((cluster.get("CPU", 1) - 2) // max(workers * float(res.get("CPU", 1)), 1e-9)))
    gpus = float(res.get("GPU", 1 if spec.distributed.use_gpu else 0)) * workers
    if gpus:
        fits = min(fits, max(1, int(cluster.get("GPU", 0) // gpus)))
    wanted = spec.tune.max_concurrent_trials
    return min(fits, wanted) if wanted else fits


def _scheduler(job: DiffusionJob):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining

    tune_spec = job.spec.tune
    sched = tune_spec.scheduler
    every = job.spec.checkpoint.every_n_steps
    if sched.name == "asha":
        # max_t past the last step: ASHA stops a trial that reaches max_t, and a trial stopped at its last
        # report would be killed while it exports its pipeline.
        return ASHAScheduler(time_attr="step", max_t=job.spec.train.max_steps + every,
                             grace_period=sched.grace_period or every, reduction_factor=sched.reduction_factor)
    if sched.name == "pbt":
        if tune_spec.seed is not None:  # PBT draws its perturbations from Python's and NumPy's generators
            random.seed(tune_spec.seed)
            np.random.seed(tune_spec.seed % 2**32)
        return PopulationBasedTraining(time_attr="step", perturbation_interval=sched.perturbation_interval or every,
                                       hyperparam_mutations=search_space(tune_spec),
                                       quantile_fraction=sched.quantile_fraction,
                                       resample_probability=sched.resample_probability)
    return FIFOScheduler()


def _search_alg(job: DiffusionJob, concurrent: int):
    """The sampler of trial values, running at most ``concurrent`` trials at once."""
    tune_spec = job.spec.tune
    if tune_spec.search_alg != "optuna":
        from ray.tune.search.basic_variant import BasicVariantGenerator

        return BasicVariantGenerator(random_state=tune_spec.seed, max_concurrent=concurrent)
    try:
        import optuna  # noqa: F401
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch
    except ImportError:
        raise TuneError("spec.tune.search_alg: optuna is not installed here; pip install optuna, or use random") from None
    return ConcurrencyLimiter(OptunaSearch(seed=tune_spec.seed), max_concurrent=concurrent)


def planned_trials(tune_spec: TuneSpec) -> int:
    """Trials the search will run: num_samples times every grid combination."""
    grid = math.prod(len(d.grid) for d in tune_spec.search_space.values() if d.grid is not None)
    return tune_spec.num_samples * grid


class TrialProgress(Callback):
    """A Tune callback telling ``on_progress`` how many of the ``total`` trials have ended, the best metric
    so far and every trial. Tune saves its run config (callbacks too) with the experiment: the display
    function is not saved."""

    def __init__(self, metric: str, mode: str, on_progress, total: int | None = None):
        self.metric, self.mode, self.on_progress, self.total = metric, mode, on_progress, total
        self.ended: set[str] = set()
        self.best: float | None = None

    def __getstate__(self):
        return {**self.__dict__, "on_progress": None}

    def _tell(self, trials=()):
        if self.on_progress is not None:
            self.on_progress(Progress(trials_ended=len(self.ended), trials_total=self.total, best=self.best,
                                      trials=[self._row(t) for t in trials]))

    def _row(self, trial) -> Trial:
        """One trial as a person reads it: its values, state, metric and step."""
        last = trial.last_result or {}
        value, step = last.get(self.metric), last.get("step")
        return Trial(trial=trial.trial_id, params=dict(trial.config or {}), state=str(trial.status).lower(),
                     metric=value if isinstance(value, (int, float)) else None,
                     step=step if isinstance(step, int) else None)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        value = result.get(self.metric)
        if isinstance(value, (int, float)) and math.isfinite(value):
            if self.best is None or (value < self.best if self.mode == "min" else value > self.best):
                self.best = value
        self._tell(trials)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.ended.add(trial.trial_id)
        self._tell(trials)

    on_trial_error = on_trial_complete


def _tuner(job: DiffusionJob, restore: bool | str, on_progress=None):
    from ray import tune

    tune_spec = job.spec.tune
    exp = experiment_uri(job)
    storage.require_bucket(exp, job.spec.storage)  # Ray Tune's writes would create a mistyped bucket
    fs, path = storage.filesystem(exp, job.spec.storage)
    fs = fs if storage.is_s3(exp) else None  # a local experiment needs no explicit filesystem
    trainable = tune.with_parameters(run_trial, job_doc=job.model_dump(mode="json", exclude_unset=True))
    # The trial actor only waits on its Ray Train run, whose workers hold the resources (Ray refuses 0).
    trainable = tune.with_resources(trainable, {"CPU": 0.01})
    if restore == "auto":
        # A retried driver (RayJob, service) continues the search its first try left; a new document under an
        # old name (another search space, say) starts afresh instead of silently getting the old search.
        restore = (job.spec.checkpoint.resume == "auto" and tune.Tuner.can_restore(path, storage_filesystem=fs)
                   and _same_search(job))
    if restore:
        if not tune.Tuner.can_restore(path, storage_filesystem=fs):
            raise TuneError(f"--resume: no search to resume at {exp}; run `sdray tune` without --resume first")
        return tune.Tuner.restore(path, trainable, storage_filesystem=fs, resume_unfinished=True,
                                  resume_errored=True)
    if not fs:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    storage.write_bytes(storage.join(exp, SEARCH_FILE),
                        json.dumps({"job": job.metadata.name, "fingerprint": search_fingerprint(job)}).encode(),
                        job.spec.storage)
    pbt = tune_spec.scheduler.name == "pbt"
    return tune.Tuner(
        trainable,
        param_space=search_space(tune_spec),
        tune_config=tune.TuneConfig(
            metric=tune_spec.metric, mode=tune_spec.mode, num_samples=tune_spec.num_samples,
            # Trials beyond what the cluster fits queue here, not in Ray (where their Ray Train runs would
            # hold CPUs that Ray Data needs, and wait forever).
            scheduler=_scheduler(job), search_alg=_search_alg(job, concurrent_trials(job)),
            time_budget_s=tune_spec.time_budget_s, reuse_actors=False,
        ),
        run_config=tune.RunConfig(
            name=path.rsplit("/", 1)[1], storage_path=path.rsplit("/", 1)[0], storage_filesystem=fs,
            # Pointers are tiny; PBT needs the copied trial's one to stay.
            checkpoint_config=tune.CheckpointConfig(num_to_keep=None if pbt else 2),
            callbacks=([TrialProgress(tune_spec.metric, tune_spec.mode, on_progress, planned_trials(tune_spec))]
                       if on_progress else None),
            verbose=0,
        ),
    )


@dataclass
class TrialRow:
    trial: str
    params: dict[str, Any]
    metric: float | None
    step: int
    status: str
    error: str | None
    output: str
    copied_from: str


def _rows(job: DiffusionJob, grid) -> list[TrialRow]:
    tune_spec = job.spec.tune
    rows = []
    for result in grid:
        metrics = result.metrics or {}
        trial_id = metrics.get("trial_id") or Path(result.path).name
        step = int(metrics.get("step", 0) or 0)
        if result.error is not None:
            status = "failed"
        elif step >= job.spec.train.max_steps:
            status = "finished"
        else:
            status = "stopped early"
        params = {k: v for k, v in (result.config or {}).items()}
        value = metrics.get(tune_spec.metric)
        rows.append(TrialRow(trial=trial_id, params=params,
                             metric=float(value) if isinstance(value, (int, float)) else None, step=step,
                             status=status, error=str(result.error).strip().splitlines()[-1] if result.error else None,
                             output=storage.join(job.spec.output.uri, "trials", trial_slug(trial_id)),
                             copied_from=str(metrics.get("copied_from") or "")))
    return rows


def _best(job: DiffusionJob, rows: list[TrialRow]) -> TrialRow | None:
    """The best finished trial by its last reported metric (a finished trial has exported a pipeline)."""
    done = [r for r in rows if r.status == "finished" and r.metric is not None and math.isfinite(r.metric)]
    if not done:
        return None
    sign = 1 if job.spec.tune.mode == "min" else -1
    return min(done, key=lambda r: sign * r.metric)


def _write_outputs(job: DiffusionJob, rows: list[TrialRow], best: TrialRow) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = job.spec.output.uri
    s3 = job.spec.storage
    keys = sorted({k for r in rows for k in r.params})
    table = pa.table({
        "trial": [r.trial for r in rows], "status": [r.status for r in rows], "step": [r.step for r in rows],
        job.spec.tune.metric: [r.metric for r in rows], "error": [r.error for r in rows],
        "copied_from": [r.copied_from for r in rows],
        **{k: [r.params.get(k) for r in rows] for k in keys},
    })
    with tempfile.TemporaryDirectory(prefix="sdray-tune-") as tmp:
        pq.write_table(table, Path(tmp) / "results.parquet")
        storage.write_bytes(storage.join(out, "results.parquet"), (Path(tmp) / "results.parquet").read_bytes(), s3)

        fig, ax = plt.subplots(figsize=(6, 4))
        lr_key = "train.learning_rate"
        batches = sorted({r.params.get("train.batch_size", job.spec.train.batch_size) for r in rows})
        cmap = plt.get_cmap("viridis", max(len(batches), 2))
        for i, b in enumerate(batches):
            pts = [r for r in rows if r.params.get("train.batch_size", job.spec.train.batch_size) == b
                   and r.metric is not None and math.isfinite(r.metric)]
            ax.scatter([r.params.get(lr_key, job.spec.train.learning_rate) for r in pts], [r.metric for r in pts],
                       color=cmap(i), label=f"batch {b}", s=40)
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel(job.spec.tune.metric)
        ax.set_title(f"{job.metadata.name}: {len(rows)} trials")
        ax.legend()
        fig.tight_layout()
        fig.savefig(Path(tmp) / "tune.png", dpi=100)
        plt.close(fig)
        storage.write_bytes(storage.join(out, "tune.png"), (Path(tmp) / "tune.png").read_bytes(), s3)

        best_doc = apply_params(job, best.params)
        best_doc["metadata"]["name"] = f"{job.metadata.name}-best"[:63]
        storage.write_bytes(storage.join(out, "best.yaml"), yaml.safe_dump(best_doc, sort_keys=False).encode(), s3)
        pipeline = storage.local_copy(storage.join(best.output, "pipeline"), s3) if storage.is_s3(best.output) \
            else Path(best.output) / "pipeline"
        storage.upload_dir(pipeline, storage.join(out, "pipeline"), s3)
    return {"results": storage.join(out, "results.parquet"), "plot": storage.join(out, "tune.png"),
            "best_job": storage.join(out, "best.yaml"), "pipeline": storage.join(out, "pipeline")}


def run_search(job: DiffusionJob, *, address: str | None = None, resume: bool | str = False,
               worker_logs: bool = False, on_progress=None) -> dict:
    """Run ``spec.tune``; returns the summary (trial rows, the best trial, where the outputs are).
    ``resume``: True continues the job's search (an error when there is none); ``"auto"`` continues it
    when there is one and ``checkpoint.resume`` is ``auto``, and starts it otherwise."""
    from sdray.train.launch import ray_cluster

    if job.spec.tune is None:
        raise TuneError("spec.tune: this document has no search; add spec.tune, or run it with `sdray train`")
    _search_alg(job, 1)  # fail before any trial starts when optuna is missing
    # Trials report at every checkpoint, and Tune snapshots the experiment each time; its warning about
    # frequent snapshots is expected here.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    open_group(job)  # the search's MLflow parent run, before its trials look for it
    with ray_cluster(job, address, log_to_driver=worker_logs):
        tuner = _tuner(job, restore=resume, on_progress=on_progress)
        grid = tuner.fit()
    rows = _rows(job, grid)
    summary: dict[str, Any] = {"job": job.metadata.name, "metric": job.spec.tune.metric, "mode": job.spec.tune.mode,
                               "trials": [r.__dict__ for r in rows], "experiment": experiment_uri(job)}
    if rows and all(r.status == "failed" for r in rows):
        raise TuneError("every trial failed; the first error: " + (rows[0].error or "unknown"))
    best = _best(job, rows)
    if best is None:
        raise TuneError("no trial finished (all were stopped early or cut by time_budget_s): nothing to export")
    summary["best"] = best.__dict__
    summary.update(_write_outputs(job, rows, best))
    storage.write_bytes(storage.join(job.spec.output.uri, "tune_summary.json"),
                        json.dumps(summary, indent=2, default=str).encode(), job.spec.storage)
    return summary
