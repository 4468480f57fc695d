"""Train or search one job: the library entry point that ``sdray train``/``sdray tune``, the service's job
runner (``sdray.service.runner``) and a RayJob's driver all call.

Besides returning the run's summary, a run reports its progress (``sdray.progress.Progress``) to whoever
its environment names: the DiffusionJob's status (``SDRAY_DIFFUSIONJOB``, in a RayJob's head) and the sdray
service that started it (``SDRAY_PROGRESS_URL``). Reporting never fails the run. The exceptions a run raises
for bad input or a failed run are ``expected_errors()``: their message is the whole story.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable
from typing import Any

from sdray.progress import Progress, Trial
from sdray.spec import DiffusionJob

OnProgress = Callable[[Progress], None]


def expected_errors() -> tuple[type[BaseException], ...]:
    """What a run raises when the input is wrong or the run failed: report the message, not a traceback."""
    from sdray.data.formats import DataError
    from sdray.models.build import ModelError
    from sdray.storage import StorageError
    from sdray.train.launch import TrainingFailed
    from sdray.train.loop import DataTooSmallError
    from sdray.tuning import TuneError

    return (DataError, ModelError, StorageError, TrainingFailed, DataTooSmallError, TuneError, ValueError, OSError)


def configure_logging(verbose: bool = False) -> None:
    """``verbose``: Ray's, Ray Data's and the libraries' own logging as they set it; otherwise errors only and
    no download progress bars. The Hub is asked only for hf:// sources, and not at all with HF_HUB_OFFLINE=1."""
    if verbose:
        os.environ["SDRAY_VERBOSE"] = "1"
        return
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore")
    for name in ("diffusers", "transformers", "ray", "ray.data", "ray.train"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import diffusers.utils.logging as diffusers_logging
    import huggingface_hub.utils
    import transformers.utils.logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    diffusers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    huggingface_hub.utils.disable_progress_bars()  # (the variable above is read once, where it was imported first)


class _Reporters:
    """The places besides the caller that a driver reports progress to, each when its environment says so."""

    def __init__(self, job: DiffusionJob):
        from sdray.k8s.progress import StatusReporter
        from sdray.service.progress import ProgressReporter

        self.status = StatusReporter.from_env()
        self.service = ProgressReporter.from_env(job.spec.storage)

    def __call__(self, progress: Progress, final: bool = False) -> None:
        if self.status is not None:
            self.status(progress.to_payload(), final=final)
        if self.service is not None:
            self.service(progress, final=final)

    def __enter__(self) -> _Reporters:
        return self

    def __exit__(self, *exc) -> None:
        for reporter in (self.status, self.service):
            if reporter is not None:
                reporter.close()


def _reporting(job: DiffusionJob, on_progress: OnProgress | None):
    """The reporters of this driver, and a progress callback that feeds them and ``on_progress``."""
    reporters = _Reporters(job)

    def update(progress: Progress) -> None:
        reporters(progress)
        if on_progress is not None:
            on_progress(progress)

    return reporters, update


def _finish(reporters: _Reporters, on_progress: OnProgress | None, final: Progress) -> None:
    reporters(final, final=True)
    if on_progress is not None:
        on_progress(final)


def train(job: DiffusionJob, *, address: str | None = None, in_process: bool = False,
          on_progress: OnProgress | None = None, worker_logs: bool = False) -> dict[str, Any]:
    """Train ``job``: on Ray Train (an embedded local cluster unless ``address``: ``"auto"``, ``"ray://…"``),
    or with ``in_process`` as one plain process. Returns the run's summary (``summary.json``).

    ``on_progress`` gets rank 0's progress while a Ray Train run goes, and the final state (step, loss,
    checkpoint, skipped images) at the end of either kind of run; ``worker_logs`` shows the workers' output.
    """
    from sdray.train.launch import run_in_process, run_job

    reporters, update = _reporting(job, on_progress)
    with reporters:
        if in_process:
            summary = run_in_process(job, on_progress=update)
        else:
            summary = run_job(job, address=address, on_progress=update, worker_logs=worker_logs)
        final = {k: summary.get(k) for k in ("step", "loss", "checkpoint", "skipped_images")}
        final["max_steps"] = job.spec.train.max_steps
        final["sample"] = summary.get("samples")  # the final grid, drawn after the last in-run update
        _finish(reporters, on_progress, Progress(**{k: v for k, v in final.items() if v is not None}))
    return summary


def tune(job: DiffusionJob, *, address: str | None = None, resume: bool = False, resume_if_exists: bool = False,
         on_progress: OnProgress | None = None, worker_logs: bool = False) -> dict[str, Any]:
    """Run the search of ``spec.tune`` (``sdray.tuning``); returns its summary (trials, the best one, outputs).

    ``resume`` continues the job's interrupted search (an error when there is none); ``resume_if_exists``
    continues it when the same spec started one (with ``checkpoint.resume: auto``) and starts it otherwise,
    as a retried RayJob or service driver must. ``on_progress`` gets the search's state (trials ended and
    planned, the best metric, each trial) and, at the end, the best metric and every trial's outcome.
    """
    from sdray.tuning import run_search

    reporters, update = _reporting(job, on_progress)
    with reporters:
        summary = run_search(job, address=address, resume=resume or ("auto" if resume_if_exists else False),
                             worker_logs=worker_logs, on_progress=update)
        trials = [Trial(trial=t["trial"], params=t["params"], state=t["status"], metric=t["metric"], step=t["step"])
                  for t in summary["trials"]]
        _finish(reporters, on_progress, Progress(best=summary["best"].get("metric"), trials=trials))
    return summary
