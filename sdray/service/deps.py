"""What every route asks for, as FastAPI dependencies: the service's parts, the caller, a bounded body, and
a job document that parses, validates and passes the tenant policy.

Every submit path (``POST /v1/jobs``, ``POST /v1/validate``) takes its document from ``checked_document``,
so no path reaches the queue without the policy check.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field

from fastapi import Depends, Request
from fastapi.responses import JSONResponse

from sdray.service.auth import Authenticator, Principal
from sdray.service.backends.base import Backend
from sdray.service.jobs import JobManager
from sdray.service.metrics import ServiceMetrics
from sdray.service.policy import Policy
from sdray.service.store import JobRecord, JobStore
from sdray.spec import MAX_DOCUMENT_BYTES, DiffusionJob, SpecError, _field_at, parse_document_text, parse_job

MAX_BODY = MAX_DOCUMENT_BYTES  # a job document is a few KiB; anything near this is a mistake or an attack
YAML_TYPES = ("application/yaml", "application/x-yaml", "text/yaml", "text/x-yaml")
MAX_ERRORS = 50  # error lines in one 422 answer


@dataclass
class Service:
    """The service's parts, shared by every route (``request.app.state.service``)."""

    store: JobStore
    auth: Authenticator
    policy: Policy
    backend: Backend
    manager: JobManager
    metrics: ServiceMetrics
    base_url: str
    wake: threading.Event = field(default_factory=threading.Event)
    stop: threading.Event = field(default_factory=threading.Event)


class Refused(Exception):
    """An error answer: its status, what went wrong and, for a document, which fields."""

    def __init__(self, status: int, detail: str, **extra):
        self.status, self.detail, self.extra = status, detail, extra


def error_response(status: int, detail: str, **extra) -> JSONResponse:
    return JSONResponse({"detail": detail, **extra}, status_code=status,
                        headers={"WWW-Authenticate": "Bearer"} if status == 401 else None)


def service(request: Request) -> Service:
    return request.app.state.service


async def caller(request: Request, svc: Service = Depends(service)) -> Principal:
    """The tenant and role of the request's bearer token (401 without a valid one)."""
    who = svc.auth.principal(request.headers.get("authorization"))
    if who is None:
        raise Refused(401, "a valid bearer token is required (Authorization: Bearer <token>; "
                           "create one with `sdray token create`)")
    return who


def own_job(job_id: str, who: Principal = Depends(caller), svc: Service = Depends(service)) -> JobRecord:
    """The job ``job_id`` when the caller may see it; another tenant's is answered as missing (404)."""
    rec = svc.store.get(job_id)
    if rec is None or (rec.tenant != who.tenant and not who.admin):
        raise Refused(404, f"no job {job_id!r}")
    return rec


async def read_body(request: Request, limit: int, what: str) -> bytes:
    """The request's body, refused with 413 as soon as it passes ``limit`` bytes (never read whole first)."""
    too_big = Refused(413, f"the body is larger than {limit} bytes: {what}")
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > limit):
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


def _metric_field(line: str) -> str:
    """The field an error line names, as a bounded metric label: a real schema path, else '<other>'."""
    path = line.split(":", 1)[0].strip()
    parts = path.split(".")
    if parts[:1] == ["<document>"]:
        return "<document>"
    known = []
    for i in range(1, len(parts) + 1):
        if _field_at(DiffusionJob, parts[:i]) is None:
            break
        known = parts[:i]
    return ".".join(known) if known else "<other>"


def spec_errors(lines: list[str]) -> list[dict]:
    out = []
    for line in lines:
        path, _, message = line.partition(": ")
        out.append({"field": path, "message": message or line})
    return out


async def document(request: Request, who: Principal = Depends(caller), svc: Service = Depends(service)) -> DiffusionJob:
    """The body as a valid DiffusionJob: 401 before anything is read without a valid token, 413 over the size
    limit, 415 for another Content-Type, 400 when it does not parse (aliases, duplicate keys and runaway
    nesting included), 422 naming each invalid field."""
    body = await read_body(request, MAX_BODY, "a job document is a few KiB")
    ctype = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    if ctype in YAML_TYPES:
        fmt = "yaml"
    elif ctype in ("application/json", "text/json") or ctype.endswith("+json"):
        fmt = "json"
    else:
        raise Refused(415, f"Content-Type {ctype!r}: send the document as application/json or application/yaml")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise Refused(400, "the body is not UTF-8 text") from None
    try:
        doc = parse_document_text(text, fmt, "request body")
    except SpecError as exc:
        raise Refused(400, f"the body is not a usable {fmt.upper()} document: {exc.errors[0]}") from None
    try:
        job = parse_job(doc, "request body", strict=fmt == "json")
    except SpecError as exc:
        for line in exc.errors:
            svc.metrics.validation_failures.labels(_metric_field(line)).inc()
        lines = exc.errors[:MAX_ERRORS]
        raise Refused(422, "invalid job document", errors=spec_errors(lines), text=lines) from None
    return job


async def checked_document(job: DiffusionJob = Depends(document), who: Principal = Depends(caller),
                           svc: Service = Depends(service)) -> DiffusionJob:
    """A valid document that the caller's tenant policy allows (admins: any); 403 naming each refused
    field and the rule that refused it."""
    if who.admin:
        return job
    refusals = svc.policy.check(who.tenant, job)
    if refusals:
        for r in refusals:
            svc.metrics.policy_refusals.labels(r.rule).inc()
        raise Refused(403, f"refused by the tenant policy of {who.tenant!r}: " + "; ".join(
            f"{r.field}: {r.message}" for r in refusals[:MAX_ERRORS]), errors=[r.as_dict() for r in refusals[:MAX_ERRORS]])
    return job


def stored_document(job: DiffusionJob) -> dict:
    """The document as the store keeps it (fields left out stay out), refused past the size limit."""
    doc = job.model_dump(mode="json", exclude_unset=True)
    if len(json.dumps(doc)) > MAX_DOCUMENT_BYTES:
        raise Refused(413, f"the document is larger than {MAX_DOCUMENT_BYTES} bytes once expanded")
    return doc
