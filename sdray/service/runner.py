"""The fixed entrypoint of every job the service runs: ``python -m sdray.service.runner``.

The document arrives as JSON in ``SDRAY_JOB_DOCUMENT`` (never on a command line), is validated again, and
runs as ``sdray train`` (``sdray tune`` with ``spec.tune``) on the cluster the driver was started in,
posting progress to the service when ``SDRAY_PROGRESS_URL`` is set.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import yaml


def main() -> int:
    raw = os.environ.get("SDRAY_JOB_DOCUMENT")
    if not raw:
        print("error: SDRAY_JOB_DOCUMENT is not set: this entrypoint runs jobs for the sdray service", file=sys.stderr)
        return 2
    doc = json.loads(raw)
    import typer

    from sdray.service.progress import ProgressReporter
    from sdray.spec import SpecError, parse_job

    try:
        job = parse_job(doc, "SDRAY_JOB_DOCUMENT")
    except SpecError as exc:
        print(f"error: invalid job document: {exc}", file=sys.stderr)
        return 2
    reporter = ProgressReporter.from_env(job.spec.storage)
    try:
        return _run(job, doc, reporter)
    except typer.Exit as exc:  # the CLI has printed why
        return exc.exit_code
    finally:
        if reporter is not None:
            reporter.close()


def _run(job, doc: dict, reporter) -> int:
    from sdray.cli import run_training, run_tuning

    with tempfile.TemporaryDirectory(prefix="sdray-job-") as tmp:
        path = Path(tmp) / "job.yaml"
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        if job.spec.tune is not None:
            summary = run_tuning(path, address="auto", on_progress=reporter)
            final = {"best": summary["best"].get("metric"), "output": job.spec.output.uri,
                     "trials": [{"trial": t["trial"], "params": t["params"], "state": t["status"],
                                 "metric": t["metric"], "step": t["step"]} for t in summary["trials"]]}
        else:
            summary = run_training(path, address="auto", on_progress=reporter)
            final = {k: summary.get(k) for k in ("step", "loss", "checkpoint", "skipped_images")}
            final["output"] = job.spec.output.uri
        if reporter is not None:
            reporter({k: v for k, v in final.items() if v is not None}, final=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
