"""Run a job: on Ray Train (``TorchTrainer``, the default) or as one plain process.

Both read the data with Ray Data and run the same per-worker loop (``sdray.train.loop``). On Ray Train:
- the run lives at ``<checkpoint.uri>/<metadata.name>``; ``resume: auto`` reuses that name, so Ray Train
  hands the loop the latest *registered* checkpoint (registration follows a complete upload: a crash
  mid-write leaves the previous checkpoint the latest); ``never`` or a URI start a fresh, timestamped run;
- each rank uploads its checkpoint files itself (``sdray.storage``, retried) to ``checkpoint_<step>``, and
  the checkpoint is registered only when every rank's upload succeeded (``RayContext.save_checkpoint``);
- ``keep_last`` is Ray Train's ``num_to_keep``; ``max_failures`` its ``FailureConfig``;
- the ``train`` dataset is split across workers, ``validation`` is not.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import ray
import torch

from sdray import storage
from sdray.data.pipeline import JobData, build_datasets
from sdray.models.build import check_job, data_requirements
from sdray.progress import Progress
from sdray.spec import DiffusionJob
from sdray.train import preemption
from sdray.train.context import LocalContext, iterate
from sdray.train.loop import train_worker
from sdray.train.parallel import all_workers_have

# Set for every process of an embedded cluster: no usage reporting. The Hub is reached only for hf:// sources;
# HF_HUB_OFFLINE=1, where the user sets it, keeps every process to the hub cache (workers inherit it).
RAY_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0",
}


class TrainingFailed(RuntimeError):
    """The run failed for good (after ``max_failures`` restarts); the last checkpoint stays readable."""


@contextlib.contextmanager
def ray_cluster(job: DiffusionJob, address: str | None = None, log_to_driver: bool = True):
    """Connect to ``address``, reuse the current Ray, or start an embedded local cluster for the job.

    An embedded cluster declares at least two CPUs more than the workers take: Ray Data needs CPUs to
    read while the workers train, or a streaming run waits forever.
    """
    os.environ.update({k: os.environ.get(k, v) for k, v in RAY_ENV.items()})
    if ray.is_initialized():
        yield
        return
    if address and address != "local":
        ray.init(address=address, runtime_env={"env_vars": RAY_ENV}, log_to_driver=log_to_driver)
    else:
        need = job.spec.distributed.num_workers * job.spec.distributed.cpus_per_worker
        # The dashboard serves the state API that Ray Train V2 uses to clean up after a run.
        # Loopback only: an embedded cluster serves this process alone.
        # address="local": a new cluster even when `ray start` left one to auto-detect on this machine.
        ray.init(address="local", num_cpus=max(os.cpu_count() or 1, math.ceil(need) + 2),
                 runtime_env={"env_vars": RAY_ENV},
                 logging_level="WARNING", log_to_driver=log_to_driver, _node_ip_address="127.0.0.1")
    try:
        yield
    finally:
        ray.shutdown()


@ray.remote(num_cpus=0)
class ProgressBoard:
    """Holds rank 0's latest progress for the driver."""

    def __init__(self):
        self.latest: Progress | None = None
        self.stop = False

    def update(self, progress: Progress) -> None:
        self.latest = progress

    def get(self) -> Progress | None:
        return self.latest

    def request_stop(self) -> None:
        """The driver was told to stop (SIGTERM): workers checkpoint at the next step and end."""
        self.stop = True

    def stop_requested(self) -> bool:
        return self.stop


class RayContext:
    """The ``WorkerContext`` of a Ray Train worker."""

    def __init__(self, job: DiffusionJob, board):
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.rank = ctx.get_world_rank()
        self.world_size = ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        self.num_threads = max(1, int(job.spec.distributed.cpus_per_worker))
        self.job = job
        self.board = board
        self._restored_dir: str | None = None
        if board is not None:  # a stop the driver was told of reaches the loop as a preemption request
            preemption.watch(lambda: ray.get(board.stop_requested.remote()))

    def train_batches(self):
        import ray.train

        return iterate(ray.train.get_dataset_shard("train"), batch_size=self.job.spec.train.batch_size,
                       shuffle=self.job.spec.data.shuffle, bucketed=self.job.spec.data.bucketed)

    def validation_batches(self):
        import ray.train

        if self.job.spec.data.validation_fraction == 0:
            return None
        return iterate(ray.train.get_dataset_shard("validation"), batch_size=self.job.spec.train.batch_size,
                       shuffle=False)

    def restored_checkpoint(self) -> Path | None:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        self._restored_dir = tempfile.mkdtemp(prefix="sdray-restore-")
        return Path(checkpoint.to_directory(self._restored_dir))

    def save_checkpoint(self, directory: Path, metrics: dict) -> None:
        """Upload this rank's files to the run's ``checkpoint_<step>`` (retried by ``storage.upload_dir``),
        then register the checkpoint with Ray Train if every rank's upload succeeded. Otherwise report the
        metrics alone (Ray Train pairs the ranks' reports by count) and raise a StorageError on every rank,
        transient only if every rank's failure was: the previous checkpoint stays the latest."""
        import ray.train
        from ray.train import Checkpoint, CheckpointUploadMode

        run = ray.train.get_context().get_storage()
        name = f"checkpoint_{metrics['step']:08d}"
        path = f"{run.experiment_fs_path}/{name}"
        uri = "s3://" + path if storage.is_s3(self.job.spec.checkpoint_uri) else path
        failure = None
        try:
            storage.upload_dir(directory, uri, self.job.spec.storage)
        except storage.StorageError as exc:
            failure = exc
        if all_workers_have(failure is None, self.device):
            ray.train.report(metrics, checkpoint=Checkpoint(path, filesystem=run.storage_filesystem),
                             checkpoint_dir_name=name, checkpoint_upload_mode=CheckpointUploadMode.NO_UPLOAD)
            return
        transient = all_workers_have(failure is None or failure.transient, self.device)
        ray.train.report(metrics)
        raise storage.StorageError(str(failure) if failure else f"checkpoint {uri}: another worker could not upload "
                                   "its files", transient=transient)

    def progress(self, progress: Progress) -> None:
        if self.board is not None:
            self.board.update.remote(progress)


def preemptible_torch_config():
    """Ray Train's ``TorchConfig`` whose backend also makes SIGTERM a preemption request in every worker
    process: installed through the worker group, whose calls run on each worker's main thread (the training
    function runs on another thread, where Python cannot install a signal handler)."""
    from ray.train.torch import TorchConfig

    class Config(TorchConfig):
        @property
        def backend_cls(self):
            torch_backend = super().backend_cls

            class PreemptibleBackend(torch_backend):
                def on_training_start(self, worker_group, backend_config):
                    super().on_training_start(worker_group, backend_config)
                    worker_group.execute(preemption.install_signal_handler)

            return PreemptibleBackend

    return Config()


def _ray_worker(config: dict) -> None:
    job = DiffusionJob.model_validate(config["job"])
    train_worker(job, RayContext(job, config.get("board")))


def run_name(job: DiffusionJob) -> str:
    """``metadata.name`` when resuming automatically; a fresh timestamped name otherwise."""
    if job.spec.checkpoint.resume == "auto":
        return job.metadata.name
    return f"{job.metadata.name}-{datetime.now(timezone.utc).strftime('%Y%m%d-%H%M%S')}"


def prepare_data(job: DiffusionJob) -> JobData:
    spec = job.spec
    check_job(spec)
    resolution, tokenizers = data_requirements(spec.model, stage=spec.stage, s3=spec.storage)
    return build_datasets(spec, resolution=resolution, tokenizers=tokenizers)


def finish_summary(job: DiffusionJob, data: JobData, extra: dict) -> dict:
    """Rank 0's summary.json plus what only the driver knows (skipped images, checkpoint)."""
    uri = storage.join(job.spec.output.uri, "summary.json")
    summary = json.loads(storage.read_bytes(uri, job.spec.storage))
    summary.update(extra, skipped_images=data.skipped())
    storage.write_bytes(uri, json.dumps(summary, indent=2).encode(), job.spec.storage)
    return summary


def torch_trainer(job: DiffusionJob, data: JobData, *, board=None, name: str | None = None,
                  storage_uri: str | None = None, callbacks=(), preemptible: bool = False):
    """The Ray Train ``TorchTrainer`` of ``job``: its workers run the per-worker loop on ``data``; the run
    lives at ``<storage_uri>/<name>`` (default: the job's checkpoint URI and run name). ``preemptible``:
    SIGTERM to a worker stops the run at a checkpoint (``sdray.train.preemption``), as ``sdray train`` does
    with ``checkpoint.on_preemption``; a search's trials are not (a trial that ended early would count as
    done): they fail on SIGTERM and the search resumes them from their last checkpoints."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    spec = job.spec
    storage_uri = storage_uri or spec.checkpoint_uri
    storage.require_bucket(storage_uri, spec.storage)  # Ray Train's writes would create a mistyped bucket
    fs, path = storage.filesystem(storage_uri, spec.storage)
    if not storage.is_s3(storage_uri):
        Path(path).mkdir(parents=True, exist_ok=True)
    datasets = {"train": data.train}
    if data.validation is not None:
        datasets["validation"] = data.validation
    return TorchTrainer(
        _ray_worker,
        torch_config=preemptible_torch_config() if preemptible else None,
        train_loop_config={"job": job.model_dump(mode="json", exclude_unset=True), "board": board},
        scaling_config=ScalingConfig(num_workers=spec.distributed.num_workers, use_gpu=spec.distributed.use_gpu,
                                     resources_per_worker=spec.distributed.resources_per_worker or {"CPU": 1}),
        run_config=RunConfig(
            name=name or run_name(job),
            storage_path=path,
            storage_filesystem=fs if storage.is_s3(storage_uri) else None,
            checkpoint_config=CheckpointConfig(num_to_keep=spec.checkpoint.keep_last),
            failure_config=FailureConfig(max_failures=spec.distributed.max_failures),
            callbacks=list(callbacks),
        ),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=["train"]),
    )


def checkpoint_uri_of(checkpoint, job: DiffusionJob) -> str | None:
    """The URI of a Ray Train checkpoint (Ray gives S3 paths without their scheme)."""
    if checkpoint is None:
        return None
    path = checkpoint.path if hasattr(checkpoint, "path") else str(checkpoint)
    return "s3://" + path if storage.is_s3(job.spec.checkpoint_uri) and not path.startswith("s3://") else path


@contextlib.contextmanager
def preemption_notice(job: DiffusionJob):
    """While the body runs, SIGTERM to this process (the driver) asks the run to stop with a checkpoint
    (``sdray.train.preemption``; ``run_job`` passes the request on to its workers through the board)."""
    if not job.spec.checkpoint.on_preemption:
        yield
        return
    import signal

    preemption.reset()
    previous = signal.getsignal(signal.SIGTERM)
    installed = preemption.install_signal_handler()
    try:
        yield
    finally:
        if installed:
            signal.signal(signal.SIGTERM, previous)
        preemption.reset()


def run_job(job: DiffusionJob, *, address: str | None = None,
            on_progress: Callable[[Progress], None] | None = None, worker_logs: bool = True) -> dict:
    """Train ``job`` with Ray Train on ``num_workers`` workers; returns the run summary (``status``:
    ``succeeded``, or ``preempted`` when the driver or a worker got SIGTERM and the run stopped at a
    checkpoint)."""
    with ray_cluster(job, address, log_to_driver=worker_logs):
        with prepare_data(job) as data:
            return _fit(job, data, on_progress)


def _fit(job: DiffusionJob, data: JobData, on_progress: Callable[[Progress], None] | None) -> dict:
    """``run_job``'s Ray Train run of ``job`` on ``data``."""
    board = ProgressBoard.remote()
    trainer = torch_trainer(job, data, board=board, preemptible=job.spec.checkpoint.on_preemption)
    done = threading.Event()

    def watch():
        told = False
        while not done.wait(0.5):
            if preemption.requested() and not told:
                board.request_stop.remote()
                told = True
            if on_progress is not None and (progress := ray.get(board.get.remote())) is not None:
                on_progress(progress)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        with preemption_notice(job):
            result = trainer.fit()
    except Exception as exc:  # Ray Train's TrainingFailedError wraps the worker's exception
        raise TrainingFailed(worker_error(exc)) from None
    finally:
        done.set()
        watcher.join()
    if on_progress is not None and (last := ray.get(board.get.remote())) is not None:
        on_progress(last)
    return finish_summary(job, data, {"checkpoint": checkpoint_uri_of(result.checkpoint, job),
                                       "run": run_name(job)})


def worker_error(exc: BaseException) -> str:
    text = str(exc)
    for line in reversed(text.splitlines()):
        if "Error:" in line or "error:" in line:
            return line.strip()
    return text.strip().splitlines()[-1] if text.strip() else type(exc).__name__


def run_in_process(job: DiffusionJob, *, device: str | None = None, num_threads: int | None = None,
                   on_progress: Callable[[Progress], None] | None = None) -> dict:
    """Train ``job`` as one ordinary process (no Ray Train): one worker, checkpoints renamed into place
    under ``<checkpoint.uri>/<metadata.name>`` (local paths only); ``on_progress`` gets each update."""
    spec = job.spec
    if storage.is_s3(spec.checkpoint_uri):
        raise ValueError("spec.checkpoint.uri: a plain-process run keeps checkpoints on a local path")
    with ray_cluster(job), prepare_data(job) as data:
        ctx = LocalContext(
            train=data.train, validation=data.validation, batch_size=spec.train.batch_size,
            shuffle=spec.data.shuffle, run_dir=Path(spec.checkpoint_uri) / run_name(job),
            keep_last=spec.checkpoint.keep_last, device=device or ("cuda" if torch.cuda.is_available() else "cpu"),
            num_threads=num_threads or int(spec.distributed.cpus_per_worker), bucketed=spec.data.bucketed,
            on_progress=on_progress,
        )
        start = time.perf_counter()
        with preemption_notice(job):
            train_worker(job, ctx)
        # The loop leaves its last epoch half-read, and Ray Data's iterators sit in reference cycles: collect
        # them while Ray is up. Collected after ray.shutdown(), one starts a new Ray and the process never ends.
        gc.collect()
        return finish_summary(job, data, {"elapsed_s": time.perf_counter() - start, "run": ctx.run_dir.name})
