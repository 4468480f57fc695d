"""The fixed entrypoint of every job the service runs: ``python -m sdray.service.runner``.

The document arrives as JSON in ``SDRAY_JOB_DOCUMENT`` (never on a command line), is validated again, and
runs through ``sdray.run`` on the cluster the driver was started in (``address="auto"``): a training, or with
``spec.tune`` a search that continues the job's own when a retried driver finds one. ``sdray.run`` posts the
progress to the service (``SDRAY_PROGRESS_URL``). The driver's log gets a line when the run starts, one
every ``LOG_EVERY_S`` seconds of progress, and the summary; an error is one line on stderr, with exit
status 2 for a document that is not valid, 1 for a run that failed and 3 for one preempted (SIGTERM: it
stopped at a checkpoint).
"""

from __future__ import annotations

import json
import os
import sys

from sdray.progress import ProgressLines

LOG_EVERY_S = 30.0
PREEMPTED = 3  # exit status of a run stopped at a checkpoint on SIGTERM (as `sdray train`'s)
SUMMARY_KEYS = ("step", "loss", "resumed_from", "pipeline", "vae", "checkpoint", "skipped_images",  # training
                "best", "best_job", "results")  # a search


def _say(text: str) -> None:
    print(text, flush=True)  # the service follows the log while the job runs


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
    name = job.metadata.name
    log = ProgressLines(name, _say, LOG_EVERY_S)
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
    log.flush()
    done = {k: summary[k] for k in SUMMARY_KEYS if summary.get(k) is not None}
    if summary.get("status") == "preempted":
        _say(f"{name}: preempted at step {summary['step']}, checkpointed: submit the document again to continue")
        return PREEMPTED

    _say(f"{name}: done: {json.dumps(done, default=str)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
