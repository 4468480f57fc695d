"""The fixed entrypoint of every job the service runs: ``python -m sdray.service.runner``.

The document arrives as JSON in ``SDRAY_JOB_DOCUMENT`` (never on a command line), is validated again, and
runs as ``sdray train --address auto`` (``sdray tune --resume-if-exists`` with ``spec.tune``) on the cluster the driver was
started in; the command posts progress to the service (``SDRAY_PROGRESS_URL``).
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
    import typer

    from sdray.cli import train, tune
    from sdray.spec import SpecError, parse_job

    doc = json.loads(raw)
    try:
        job = parse_job(doc, "SDRAY_JOB_DOCUMENT")
    except SpecError as exc:
        print(f"error: invalid job document: {exc}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="sdray-job-") as tmp:
        path = Path(tmp) / "job.yaml"
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        try:
            if job.spec.tune is not None:
                tune(path, address="auto", resume=False, resume_if_exists=True, verbose=False)
            else:
                train(path, address="auto", in_process=False, verbose=False)
        except typer.Exit as exc:  # the command has printed why
            return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
