"""``/internal/v1``: progress and sample grids from the job drivers, each with its own job's token."""

from __future__ import annotations

import json

from fastapi import APIRouter, Depends, Request

from sdray.service.deps import Refused, Service, read_body, service
from sdray.service.store import JobRecord

router = APIRouter(prefix="/internal/v1", tags=["internal"], include_in_schema=False)

MAX_PROGRESS = 1 << 20  # one progress update: the latest values plus at most 10,000 curve points
MAX_SAMPLE = 16 << 20
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def driver(job_id: str, request: Request, svc: Service = Depends(service)) -> JobRecord:
    """The job whose own progress token the request carries (401 otherwise)."""
    rec = svc.store.get(job_id)
    scheme, _, token = (request.headers.get("authorization") or "").partition(" ")
    if rec is None or scheme.lower() != "bearer" or not svc.manager.check_progress_token(rec, token.strip()):
        raise Refused(401, "a job's own progress token is required")
    return rec


@router.post("/jobs/{job_id}/progress")
async def progress(request: Request, rec: JobRecord = Depends(driver), svc: Service = Depends(service)):
    body = await read_body(request, MAX_PROGRESS, "a progress update is a few KiB")
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise Refused(400, "progress: expected a JSON object") from None
    if not isinstance(payload, dict):
        raise Refused(400, "progress: expected a JSON object")
    svc.manager.record_progress(rec.id, payload)
    return {"ok": True}


@router.put("/jobs/{job_id}/samples/latest.png")
async def put_sample(request: Request, rec: JobRecord = Depends(driver), svc: Service = Depends(service)):
    png = await read_body(request, MAX_SAMPLE, "a sample grid is a PNG of a few MiB at most")
    if not png.startswith(PNG_MAGIC):
        raise Refused(400, f"expected a PNG image of at most {MAX_SAMPLE} bytes")
    svc.store.put_sample(rec.id, png, rec.progress.get("step"))
    return {"ok": True}
