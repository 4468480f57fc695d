"""The fixed entrypoint of every job the service runs: ``python -m sdray.service.runner``.

The document arrives as JSON in ``SDRAY_JOB_DOCUMENT`` (never on a command line), is validated again, and
runs through ``sdray.run`` on the cluster the driver was started in (``address="auto"``): a training, or with
``spec.tune`` a search that continues the job's own when a retried driver finds one. ``sdray.run`` posts the
progress to the service (``SDRAY_PROGRESS_URL``). The driver's log gets a line when the run starts, one
every ``LOG_EVERY_S`` seconds of progress, and the summary; an error is one line on stderr, with exit
status 2 for a document that is not valid and 1 for a run that failed.
"""

from __future__ import annotations

import json
import os
import sys
import time

from sdray.progress import Progress

LOG_EVERY_S = 30.0
SUMMARY_KEYS = ("step", "loss", "resumed_from", "pipeline", "vae", "checkpoint", "skipped_images",  # training
                "best", "best_job", "results")  # a search


def _say(text: str) -> None:
    print(text, flush=True)  # the service follows the log while the job runs


def _progress_line(progress: Progress) -> str:
    """One line of a run's progress: where it is, its loss and speed (training) or its trials (a search)."""
    parts = []
    if progress.step is not None:
        parts.append(f"step {progress.step}" + (f"/{progress.max_steps}" if progress.max_steps else ""))
    if progress.loss is not None:
        parts.append(f"loss {progress.loss:.4f}")
    if progress.images_per_s is not None:
        parts.append(f"{progress.images_per_s:.0f} img/s")
    if progress.trials_ended is not None:
        parts.append(f"trials {progress.trials_ended}/{progress.trials_total or '?'} ended")
    if progress.best is not None:
        parts.append(f"best {progress.best:.4f}")
    return ", ".join(parts)


def main() -> int:
    raw = os.environ.get("SDRAY_JOB_DOCUMENT")
    if not raw:
        print("error: SDRAY_JOB_DOCUMENT is not set: this entrypoint runs jobs for the sdray service", file=sys.stderr)
        return 2
    from sdray import run
    from sdray.spec import SpecError, parse_job

    try:
        job = parse_job(json.loads(raw), "SDRAY_JOB_DOCUMENT")
    except json.JSONDecodeError as exc:
        print(f"error: SDRAY_JOB_DOCUMENT is not JSON: {exc}", file=sys.stderr)
        return 2
    except SpecError as exc:
        print(f"error: invalid job document: {exc}", file=sys.stderr)
        return 2
    run.configure_logging()
    name, last = job.metadata.name, [-LOG_EVERY_S]

    def log(progress: Progress) -> None:
        now = time.monotonic()
        if now - last[0] >= LOG_EVERY_S and (line := _progress_line(progress)):
            last[0] = now
            _say(f"{name}: {line}")

    searching = job.spec.tune is not None
    _say(f"{name}: {'search' if searching else 'training'} ({job.spec.stage}) started on the Ray cluster at auto")
    try:
        if searching:
            summary = run.tune(job, address="auto", resume_if_exists=True, on_progress=log)
            summary = {**summary, "best": summary["best"]["metric"]}
        else:
            summary = run.train(job, address="auto", on_progress=log)
    except run.expected_errors() as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    done = {k: summary[k] for k in SUMMARY_KEYS if summary.get(k) is not None}
    _say(f"{name}: done: {json.dumps(done, default=str)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
