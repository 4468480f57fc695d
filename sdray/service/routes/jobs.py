"""``/v1``: submit, validate, list, show, cancel jobs, their logs, samples and curves (a user's token)."""

from __future__ import annotations

import asyncio
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import StringConstraints

from sdray.service.auth import Principal
from sdray.service.client import LOG_OFFSET
from sdray.service.backends.base import BackendError, tail_lines
from sdray.service.deps import Refused, Service, caller, checked_document, own_job, service, stored_document
from sdray.service.jobs import QuotaExceeded
from sdray.service.store import JobRecord
from sdray.service.views import Curves, JobList, JobView, Validated, errors, job_view
from sdray.spec import DiffusionJob
from sdray.states import FINAL, STATES, parse_state

router = APIRouter(prefix="/v1", tags=["jobs"], responses=errors(401))

MAX_LABEL_FILTERS = 20
# The states a list may be filtered by: as the states are written, or in lower case (the API's earlier spelling).
StateSpelling = Literal[tuple([*STATES, *(state.lower() for state in STATES)])]
MAX_LOG_BYTES = 8 << 20  # a log answer's size: the tail of a longer log

# A document the built-in tenant policy allows (s3:// URIs; no local path, secret or image of its own).
EXAMPLE_JOB = {
    "apiVersion": "sdray.io/v1alpha1", "kind": "DiffusionJob",
    "metadata": {"name": "digits", "labels": {"team": "vision"}},
    "spec": {"model": {"preset": "tiny"}, "data": {"uri": "s3://datasets/digits"},
             "train": {"max_steps": 200, "batch_size": 32}, "output": {"uri": "s3://models/digits"}},
}
_DOCUMENT = {"schema": {"$ref": "#/components/schemas/DiffusionJob"}, "example": EXAMPLE_JOB}
_JOB_BODY = {
    "requestBody": {
        "required": True,
        "description": "A DiffusionJob document, as JSON or YAML (by Content-Type). YAML anchors and aliases, "
                       "duplicate keys and documents over 1 MiB are refused. The schema's description lists the "
                       "cross-field rules JSON Schema cannot express (answered with 422); the caller's tenant "
                       "policy decides which paths, endpoints, secrets, images, queues and resources a document "
                       "may name (403).",
        # YAML is typed as YAML 1.1 reads it (1e-4 is a string there, which the job model reads as a number),
        # so its schema is the text; the document it holds is the DiffusionJob above.
        "content": {"application/json": _DOCUMENT,
                    "application/yaml": {"schema": {"type": "string", "description": "A DiffusionJob as YAML"}}},
    }
}
_SUBMIT_ERRORS = errors(400, 403, 413, 415, 422)
# OpenAPI links: what a client (or a stateful tester) can call with the id of a job it submitted.
_JOB_LINKS = {name: {"operationId": op, "parameters": {"job_id": "$response.body#/id"}} for name, op in (
    ("GetJob", "get_job"), ("CancelJob", "cancel_job"), ("JobLogs", "job_logs"), ("JobMetrics", "job_metrics"),
    ("JobSample", "job_sample"))}


@router.post("/validate", openapi_extra=_JOB_BODY, response_model=Validated, responses=_SUBMIT_ERRORS,
             operation_id="validate_job")
async def validate(job: DiffusionJob = Depends(checked_document)):
    """Check a document as `POST /v1/jobs` would (the tenant policy included), without submitting it."""
    return Validated(valid=True, name=job.metadata.name, kind="tune" if job.spec.tune else "train")


@router.post("/jobs", status_code=201, openapi_extra=_JOB_BODY, response_model=JobView, operation_id="submit_job",
             responses={201: {"description": "Queued: the job as GET /v1/jobs/{job_id} shows it (Location: its URL)",
                              "links": _JOB_LINKS}, **_SUBMIT_ERRORS, **errors(429)})
async def submit(job: DiffusionJob = Depends(checked_document), who: Principal = Depends(caller),
                 svc: Service = Depends(service)):
    """Submit a DiffusionJob; it waits in the queue until the cluster has room for it."""
    doc = stored_document(job)
    try:
        # In a thread: the submission waits for the manager's lock, which the following loop holds
        # while it talks to the backend; the event loop must keep serving meanwhile.
        rec = await run_in_threadpool(svc.manager.submit, who, job, doc)
    except QuotaExceeded as exc:
        raise Refused(429, str(exc)) from None
    svc.wake.set()
    view = job_view(rec, svc.base_url)
    return JSONResponse(view.model_dump(mode="json"), status_code=201, headers={"Location": view.links.self})


@router.get("/jobs", response_model=JobList, responses=errors(400), operation_id="list_jobs")
def list_jobs(who: Principal = Depends(caller), svc: Service = Depends(service),
              state: list[StateSpelling] = Query(
                  default=[], description=f"Only jobs in these states: {', '.join(STATES)} (or in lower case, as "
                                          "the API wrote them before: running is Running)."),
              label: list[Annotated[str, StringConstraints(pattern=r"^[^=]+=")]] = Query(
                  default=[], max_length=MAX_LABEL_FILTERS,
                  description=f"key=value; all must match (at most {MAX_LABEL_FILTERS})."),
              limit: int = Query(default=50, ge=1, le=500),
              page_token: str | None = Query(default=None, pattern=r"^[0-9]{1,18}$",
                                             description="The next_page_token of the previous page."),
              order: Literal["oldest", "newest"] = Query(
                  default="oldest", description="oldest: in submission order; newest: latest first."),
              tenant: str | None = Query(default=None, description="Admins only: one tenant's jobs.")):
    """The caller's jobs (an admin's: everyone's), oldest (or newest) first, a page at a time."""
    states = sorted({parse_state(s) for s in state})
    labels = dict(item.split("=", 1) for item in label)
    after = int(page_token) if page_token is not None else 0
    if not who.admin:
        tenant = who.tenant
    recs = svc.store.list(tenant=tenant, states=states or None, labels=labels or None, after_seq=after,
                          limit=limit, newest_first=order == "newest")
    more = len(recs) > limit
    recs = recs[:limit]
    return JobList(jobs=[job_view(r, svc.base_url) for r in recs], next_page_token=str(recs[-1].seq) if more else None)


@router.get("/jobs/{job_id}", response_model=JobView, responses=errors(404), operation_id="get_job")
def get_job(rec: JobRecord = Depends(own_job), svc: Service = Depends(service)):
    """State, conditions, progress, last checkpoint, output and (for a search) its trials."""
    return job_view(rec, svc.base_url)


@router.delete("/jobs/{job_id}", response_model=JobView, responses=errors(404, 502), operation_id="cancel_job")
def cancel_job(rec: JobRecord = Depends(own_job), svc: Service = Depends(service)):
    """Cancel: the run is stopped, its checkpoints stay. Cancelling a finished job changes nothing."""
    try:
        rec = svc.manager.cancel(rec)
    except BackendError as exc:
        raise Refused(502, f"the backend could not stop the job: {exc}") from None
    svc.wake.set()
    return job_view(rec, svc.base_url)


def _bounded(text: str) -> str:
    """At most the last MAX_LOG_BYTES of a log, from a line start."""
    if len(text) <= MAX_LOG_BYTES:
        return text
    cut = text[-MAX_LOG_BYTES:]
    return cut[cut.find("\n") + 1:]


@router.get("/jobs/{job_id}/logs", response_class=PlainTextResponse, responses=errors(400, 404, 502),
            operation_id="job_logs")
def job_logs(rec: JobRecord = Depends(own_job), svc: Service = Depends(service),
             tail: int | None = Query(default=None, ge=0, le=100_000), follow: bool = False,
             offset: int | None = Query(default=None, ge=0, description=(
                 "With follow: start after this many characters of the log (a follower reconnecting after a "
                 "restart of the service sends what it has; the default starts at the tail)."))):
    """The driver's log (its last 8 MiB at most); ``follow=true`` streams new lines until the job ends. A
    followed log's ``X-Sdray-Log-Offset`` header says where in the whole log its first character is."""
    if rec.handle is None:  # still queued: its log is empty, and a follower waits for it to start
        if not follow:
            return PlainTextResponse("", media_type="text/plain")
        return StreamingResponse(_follow_once_started(svc, rec.id, offset or 0), media_type="text/plain",
                                 headers={LOG_OFFSET: str(offset or 0)})
    try:
        # A plain read asks the backend for the tail only (the kuberay backend has the API server cut it);
        # a follower needs the whole length, to continue from its end.
        text = svc.backend.logs(rec.handle, None if follow else tail)
    except BackendError as exc:
        raise Refused(502, str(exc)) from None
    if not follow:
        return PlainTextResponse(_bounded(text))
    first = text[offset:] if offset is not None else tail_lines(_bounded(text), tail)
    return StreamingResponse(_follow(svc, rec.handle, rec.id, first, len(text)), media_type="text/plain",
                             headers={LOG_OFFSET: str(len(text) - len(first))})


async def _follow(svc: Service, handle: str, job_id: str, first: str, seen: int):
    """``first`` (the log's text so far, from the follower's start), then what the backend streams after its
    first ``seen`` characters, until the job ends (then one last read, so that no line the driver wrote at the
    end is lost) or the service stops (``sdray serve`` gives open streams a few seconds to end before it
    cancels them; the client then reconnects with its offset)."""
    yield first
    while not svc.stop.is_set():
        chunks = svc.backend.follow_logs(handle, seen)
        pending: asyncio.Future | None = None
        try:
            while not svc.stop.is_set():
                pending = pending or asyncio.ensure_future(anext(chunks))
                done, _ = await asyncio.wait({pending}, timeout=1.0)
                if not done:
                    if await _ended(svc, job_id):
                        break
                    continue
                try:
                    chunk = pending.result()
                except (StopAsyncIteration, BackendError):
                    break  # the stream is over (the job ended) or broke
                pending = None
                seen += len(chunk)
                yield chunk
        finally:
            if pending is not None and not pending.done():
                pending.cancel()
                await asyncio.wait({pending})  # (not `await pending`: that would re-raise its cancellation)
            await chunks.aclose()
        if await _ended(svc, job_id):
            last = await run_in_threadpool(_logs_or_empty, svc, handle)
            if len(last) > seen:
                yield last[seen:]
            return
        await asyncio.sleep(1.0)  # the stream ended before the service saw the job end: open it again


async def _follow_once_started(svc: Service, job_id: str, offset: int):
    """A queued job's log: nothing until the job has been submitted (or ends without), then as ``_follow``."""
    while not svc.stop.is_set():
        rec = await run_in_threadpool(svc.store.get, job_id)
        if rec is None or rec.handle is None and rec.state in FINAL:
            return
        if rec.handle is not None:
            text = await run_in_threadpool(_logs_or_empty, svc, rec.handle)
            async for chunk in _follow(svc, rec.handle, job_id, text[offset:], len(text)):
                yield chunk
            return
        await asyncio.sleep(1.0)


async def _ended(svc: Service, job_id: str) -> bool:
    current = await run_in_threadpool(svc.store.get, job_id)
    return current is None or current.state in FINAL


def _logs_or_empty(svc: Service, handle: str) -> str:
    try:
        return svc.backend.logs(handle)
    except BackendError:
        return ""


@router.get("/jobs/{job_id}/samples/latest.png", response_class=Response,
            responses={200: {"content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
                             "headers": {"X-Sdray-Step": {"description": "The step the grid was drawn at",
                                                          "schema": {"type": "string"}}}},
                       **errors(404)}, operation_id="job_sample")
def latest_sample(rec: JobRecord = Depends(own_job), svc: Service = Depends(service)):
    """The latest sample grid the job drew."""
    found = svc.store.sample(rec.id)
    if found is None:
        raise Refused(404, f"job {rec.id!r} has drawn no sample grid yet")
    png, step = found
    return Response(png, media_type="image/png", headers={"X-Sdray-Step": str(step if step is not None else "")})


@router.get("/jobs/{job_id}/metrics", response_model=Curves, responses=errors(404), operation_id="job_metrics")
def job_metrics(rec: JobRecord = Depends(own_job), svc: Service = Depends(service)):
    """The loss curve: ``{"loss": [[step, value], …], "val_loss": […]}``, plus the latest progress."""
    return Curves(id=rec.id, curves=svc.store.points(rec.id),
                  latest={k: v for k, v in rec.progress.items() if k != "trials"})
