"""The REST API (``sdray serve``): FastAPI over the job manager; OpenAPI at ``/docs`` and ``/openapi.json``.

Every ``/v1`` route needs a bearer token; a tenant sees and touches only its own jobs (others' are
``404``), an admin sees all. ``/internal/v1`` takes progress from the job drivers, each with its own job's
token. ``/healthz``, ``/readyz``, ``/metrics`` and the page at ``/`` need none (the page asks for a token
and sends it with each call).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Literal

import yaml
from fastapi import Depends, FastAPI, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from sdray.service.auth import Authenticator, Principal
from sdray.service.backends.base import FINAL, STATES, Backend, BackendError, tail_lines
from sdray.service.jobs import JobManager, QuotaExceeded
from sdray.service.metrics import ServiceMetrics
from sdray.service.store import JobRecord, JobStore
from sdray.spec import DiffusionJob, SpecError, _field_at, json_schema, parse_job

log = logging.getLogger("sdray.service")

MAX_BODY = 1 << 20  # a job document is a few KiB; anything near this is a mistake or an attack
MAX_SAMPLE = 16 << 20
YAML_TYPES = ("application/yaml", "application/x-yaml", "text/yaml", "text/x-yaml")
# libyaml's parser when PyYAML has it: the same safe loading, about 5x faster than the pure-Python one.
YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@dataclass
class Settings:
    tokens: Path
    db: Path
    public_url: str = "http://127.0.0.1:8000"
    poll_interval_s: float = 1.0


def _error(status: int, detail: str, **extra) -> JSONResponse:
    return JSONResponse({"detail": detail, **extra}, status_code=status,
                        headers={"WWW-Authenticate": "Bearer"} if status == 401 else None)


class _Middleware:
    """An ASGI middleware calling ``handler(scope, receive, send, app)``."""

    def __init__(self, app, handler):
        self.app, self.handler = app, handler

    async def __call__(self, scope, receive, send):
        await self.handler(scope, receive, send, self.app)


class _Refused(Exception):
    def __init__(self, status: int, detail: str, **extra):
        self.status, self.detail, self.extra = status, detail, extra


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
        field, _, message = line.partition(": ")
        out.append({"field": field, "message": message or line})
    return out


def _job_view(rec: JobRecord, base: str) -> dict:
    p = rec.progress
    view = {
        "id": rec.id, "name": rec.name, "tenant": rec.tenant, "kind": rec.kind, "state": rec.state,
        "labels": rec.labels, "conditions": rec.conditions, "attempts": rec.attempts,
        "created": _iso(rec.created), "started": _iso(rec.started), "finished": _iso(rec.finished),
        "step": p.get("step"), "max_steps": p.get("max_steps", rec.document.get("spec", {}).get("train", {}).get("max_steps")),
        "loss": p.get("loss"), "val_loss": p.get("val_loss"), "images_per_s": p.get("images_per_s"),
        "data_wait_share": p.get("data_wait_share"), "skipped_images": p.get("skipped_images"),
        "last_checkpoint": ({"step": p.get("checkpoint_step"), "uri": p.get("checkpoint")}
                            if p.get("checkpoint_step") is not None or p.get("checkpoint") else None),
        "output_uri": rec.document.get("spec", {}).get("output", {}).get("uri"),
        "demand": rec.demand, "backend_handle": rec.handle,
        "links": {"self": f"{base}/v1/jobs/{rec.id}", "logs": f"{base}/v1/jobs/{rec.id}/logs",
                  "metrics": f"{base}/v1/jobs/{rec.id}/metrics",
                  "sample": f"{base}/v1/jobs/{rec.id}/samples/latest.png"},
    }
    if rec.kind == "tune":
        view["trials"] = p.get("trials", [])
        view["trials_total"] = p.get("trials_total")
        view["trials_ended"] = p.get("trials_ended")
        view["best"] = p.get("best")
    return view


def _iso(t: float | None) -> str | None:
    return None if t is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


_JOB_BODY = {
    "requestBody": {
        "required": True,
        "description": "A DiffusionJob document, as JSON or YAML (by Content-Type).",
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/DiffusionJob"}},
                    "application/yaml": {"schema": {"type": "string"}}},
    }
}


def create_app(settings: Settings, backend: Backend, *, store: JobStore | None = None,
               auth: Authenticator | None = None) -> FastAPI:
    store = store or JobStore(settings.db)
    auth = auth or Authenticator(settings.tokens)
    metrics = ServiceMetrics(store)
    manager = JobManager(store, backend, auth, public_url=settings.public_url, on_transition=metrics.transition)
    wake = threading.Event()
    stop = threading.Event()

    def follow() -> None:
        """The service's one background loop: reconcile once, then follow and admit jobs."""
        first = True
        while not stop.is_set():
            try:
                if first:
                    manager.reconcile()
                    first = False
                manager.tick()
            except Exception:  # never let one bad poll end the loop
                log.exception("following jobs failed; retrying")
            wake.wait(settings.poll_interval_s)
            wake.clear()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        thread = threading.Thread(target=follow, name="sdray-follow", daemon=True)
        thread.start()
        yield
        stop.set()
        wake.set()
        thread.join(timeout=30)
        backend.close()

    app = FastAPI(title="sdray", version="v1", lifespan=lifespan,
                  description="Submit, follow and cancel DiffusionJob documents; see the README.")
    app.state.manager = manager
    app.state.metrics = metrics

    schema = json_schema()

    def custom_openapi():
        if app.openapi_schema:
            return app.openapi_schema
        from fastapi.openapi.utils import get_openapi

        doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        components = doc.setdefault("components", {}).setdefault("schemas", {})
        components.update({k: v for k, v in schema.get("$defs", {}).items()})
        components["DiffusionJob"] = {k: v for k, v in schema.items() if k != "$defs"}
        text = json.dumps(doc).replace("#/$defs/", "#/components/schemas/")
        doc = json.loads(text)
        doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        doc["security"] = [{"bearer": []}]
        app.openapi_schema = doc
        return doc

    app.openapi = custom_openapi

    @app.exception_handler(_Refused)
    async def refused(request: Request, exc: _Refused):
        return _error(exc.status, exc.detail, **exc.extra)

    async def count(scope, receive, send, app):
        """Requests and latency (to the response's start) by route; an unhandled error becomes a logged 500.
        Plain ASGI: Starlette's ``@app.middleware("http")`` costs a task and a stream per request."""
        if scope["type"] != "http":
            return await app(scope, receive, send)
        start = time.perf_counter()
        status = None

        def record(code: int) -> None:
            route = scope.get("route")
            name = route.path if route is not None else "<unmatched>"
            metrics.requests.labels(name, scope["method"], str(code)).inc()
            metrics.latency.labels(name, scope["method"]).observe(time.perf_counter() - start)

        async def counted(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                record(status)
            await send(message)

        try:
            await app(scope, receive, counted)
        except Exception:
            log.exception("unhandled error on %s %s", scope["method"], scope["path"])
            if status is not None:  # the response has begun: too late for another one
                raise
            await _error(500, "internal error: see the service log")(scope, receive, counted)

    app.add_middleware(_Middleware, handler=count)

    # -- identity --------------------------------------------------------------------------------
    async def principal(request: Request) -> Principal:
        who = auth.principal(request.headers.get("authorization"))
        if who is None:
            raise _Refused(401, "a valid bearer token is required (Authorization: Bearer <token>; "
                                "create one with `sdray token create`)")
        return who

    def own_job(job_id: str, who: Principal) -> JobRecord:
        rec = store.get(job_id)
        if rec is None or (rec.tenant != who.tenant and not who.admin):
            raise _Refused(404, f"no job {job_id!r}")
        return rec

    async def document(request: Request) -> tuple[DiffusionJob, dict]:
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY):
            raise _Refused(413, f"the body is larger than {MAX_BODY} bytes: a job document is a few KiB")
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY:
                raise _Refused(413, f"the body is larger than {MAX_BODY} bytes: a job document is a few KiB")
        ctype = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            raise _Refused(400, "the body is not UTF-8 text") from None
        try:
            if ctype in YAML_TYPES:
                doc = yaml.load(text, Loader=YAML_LOADER)
            elif ctype in ("application/json", "text/json") or ctype.endswith("+json"):
                doc = json.loads(text)
            else:
                raise _Refused(415, f"Content-Type {ctype!r}: send the document as application/json or "
                                    "application/yaml")
        except (json.JSONDecodeError, yaml.YAMLError, RecursionError, ValueError) as exc:
            kind = "YAML" if ctype in YAML_TYPES else "JSON"
            line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise _Refused(400, f"the body is not valid {kind}: {line}") from None
        try:
            job = parse_job(doc, "request body")
        except SpecError as exc:
            for line in exc.errors:
                metrics.validation_failures.labels(_metric_field(line)).inc()
            raise _Refused(422, "invalid job document", errors=spec_errors(exc.errors), text=exc.errors) from None
        except RecursionError:
            raise _Refused(400, "the document is nested too deeply") from None
        return job, job.model_dump(mode="json", exclude_unset=True)

    base = settings.public_url.rstrip("/")

    # -- the job API -----------------------------------------------------------------------------
    @app.post("/v1/validate", openapi_extra=_JOB_BODY, tags=["jobs"],
              responses={422: {"description": "Each error with its field path"}})
    async def validate(request: Request, who: Principal = Depends(principal)):
        """Check a document as `POST /v1/jobs` would, without submitting it."""
        job, _ = await document(request)
        return {"valid": True, "name": job.metadata.name, "kind": "tune" if job.spec.tune else "train"}

    @app.post("/v1/jobs", status_code=201, openapi_extra=_JOB_BODY, tags=["jobs"],
              responses={422: {"description": "Each error with its field path"},
                         429: {"description": "Over the tenant's quota"}})
    async def submit(request: Request, who: Principal = Depends(principal)):
        """Submit a DiffusionJob; it waits in the queue until the cluster has room for it."""
        job, doc = await document(request)
        try:
            # In a thread: the submission waits for the manager's lock, which the following loop holds
            # while it talks to the backend; the event loop must keep serving meanwhile.
            rec = await run_in_threadpool(manager.submit, who, job, doc)
        except QuotaExceeded as exc:
            raise _Refused(429, str(exc)) from None
        wake.set()
        view = _job_view(rec, base)
        return JSONResponse(view, status_code=201, headers={"Location": view["links"]["self"]})

    @app.get("/v1/jobs", tags=["jobs"])
    def list_jobs(who: Principal = Depends(principal),
                  state: list[str] = Query(default=[], description="Only jobs in these states."),
                  label: list[str] = Query(default=[], description="key=value; all must match."),
                  limit: int = Query(default=50, ge=1, le=500), page_token: str | None = None,
                  order: Literal["oldest", "newest"] = Query(
                      default="oldest", description="oldest: in submission order; newest: latest first."),
                  tenant: str | None = Query(default=None, description="Admins only: one tenant's jobs.")):
        """The caller's jobs (an admin's: everyone's), oldest (or newest) first, a page at a time."""
        bad = [s for s in state if s not in STATES]
        if bad:
            raise _Refused(400, f"state: expected one of {', '.join(STATES)}, got {bad[0]!r}")
        labels = {}
        for item in label:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise _Refused(400, f"label: expected key=value, got {item!r}")
            labels[key] = value
        after = 0
        if page_token is not None:
            if not page_token.isdigit() or len(page_token) > 18:
                raise _Refused(400, "page_token: use the next_page_token of the previous page")
            after = int(page_token)
        if not who.admin:
            tenant = who.tenant
        recs = store.list(tenant=tenant, states=state or None, labels=labels or None, after_seq=after, limit=limit,
                          newest_first=order == "newest")
        more = len(recs) > limit
        recs = recs[:limit]
        return {"jobs": [_job_view(r, base) for r in recs],
                "next_page_token": str(recs[-1].seq) if more else None}

    @app.get("/v1/jobs/{job_id}", tags=["jobs"])
    def get_job(job_id: str, who: Principal = Depends(principal)):
        """State, conditions, progress, last checkpoint, output and (for a search) its trials."""
        return _job_view(own_job(job_id, who), base)

    @app.delete("/v1/jobs/{job_id}", tags=["jobs"])
    def cancel_job(job_id: str, who: Principal = Depends(principal)):
        """Cancel: the run is stopped, its checkpoints stay. Cancelling a finished job changes nothing."""
        rec = own_job(job_id, who)
        try:
            rec = manager.cancel(rec)
        except BackendError as exc:
            raise _Refused(502, f"the backend could not stop the job: {exc}") from None
        wake.set()
        return _job_view(rec, base)

    @app.get("/v1/jobs/{job_id}/logs", tags=["jobs"], response_class=PlainTextResponse)
    def job_logs(job_id: str, who: Principal = Depends(principal),
                 tail: int | None = Query(default=None, ge=0, le=100_000), follow: bool = False):
        """The driver's log; ``follow=true`` streams new lines until the job ends."""
        rec = own_job(job_id, who)
        if rec.handle is None:
            return PlainTextResponse("", media_type="text/plain")
        try:
            full = backend.logs(rec.handle)
        except BackendError as exc:
            raise _Refused(502, str(exc)) from None
        if not follow:
            return PlainTextResponse(tail_lines(full, tail))
        return StreamingResponse(_follow(rec.handle, job_id, full, tail), media_type="text/plain")

    async def _follow(handle: str, job_id: str, full: str, tail: int | None):
        """The log's (tail of) text so far, then what the backend streams after it, until the job ends
        (then one last read, so that no line the driver wrote at the end is lost) or the service stops
        (``sdray serve`` gives open streams a few seconds to end before it cancels them)."""
        yield tail_lines(full, tail)
        seen = len(full)
        while not stop.is_set():
            chunks = backend.follow_logs(handle, seen)
            pending: asyncio.Future | None = None
            try:
                while not stop.is_set():
                    pending = pending or asyncio.ensure_future(anext(chunks))
                    done, _ = await asyncio.wait({pending}, timeout=1.0)
                    if not done:
                        if await _ended(job_id):
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
            if await _ended(job_id):
                last = await run_in_threadpool(_logs_or_empty, handle)
                if len(last) > seen:
                    yield last[seen:]
                return
            await asyncio.sleep(1.0)  # the stream ended before the service saw the job end: open it again

    async def _ended(job_id: str) -> bool:
        current = await run_in_threadpool(store.get, job_id)
        return current is None or current.state in FINAL

    def _logs_or_empty(handle: str) -> str:
        try:
            return backend.logs(handle)
        except BackendError:
            return ""

    @app.get("/v1/jobs/{job_id}/samples/latest.png", tags=["jobs"], response_class=Response,
             responses={200: {"content": {"image/png": {}}}})
    def latest_sample(job_id: str, who: Principal = Depends(principal)):
        """The latest sample grid the job drew."""
        own_job(job_id, who)
        found = store.sample(job_id)
        if found is None:
            raise _Refused(404, f"job {job_id!r} has drawn no sample grid yet")
        png, step = found
        return Response(png, media_type="image/png", headers={"X-Sdray-Step": str(step if step is not None else "")})

    @app.get("/v1/jobs/{job_id}/metrics", tags=["jobs"])
    def job_metrics(job_id: str, who: Principal = Depends(principal)):
        """The loss curve: ``{"loss": [[step, value], …], "val_loss": […]}``, plus the latest progress."""
        rec = own_job(job_id, who)
        return {"id": rec.id, "curves": store.points(job_id),
                "latest": {k: v for k, v in rec.progress.items() if k != "trials"}}

    # -- from the job drivers --------------------------------------------------------------------
    def driver(job_id: str, request: Request) -> JobRecord:
        rec = store.get(job_id)
        token = (request.headers.get("authorization") or "").removeprefix("Bearer ").strip()
        if rec is None or not manager.check_progress_token(rec, token):
            raise _Refused(401, "a job's own progress token is required")
        return rec

    @app.post("/internal/v1/jobs/{job_id}/progress", tags=["internal"], include_in_schema=False)
    async def progress(job_id: str, request: Request):
        rec = driver(job_id, request)
        try:
            payload = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise _Refused(400, "progress: expected a JSON object") from None
        if not isinstance(payload, dict):
            raise _Refused(400, "progress: expected a JSON object")
        manager.record_progress(rec.id, payload)
        return {"ok": True}

    @app.put("/internal/v1/jobs/{job_id}/samples/latest.png", tags=["internal"], include_in_schema=False)
    async def put_sample(job_id: str, request: Request):
        rec = driver(job_id, request)
        png = await request.body()
        if len(png) > MAX_SAMPLE or not png.startswith(b"\x89PNG\r\n\x1a\n"):
            raise _Refused(400, f"expected a PNG image of at most {MAX_SAMPLE} bytes")
        store.put_sample(rec.id, png, rec.progress.get("step"))
        return {"ok": True}

    # -- health, metrics, the page ---------------------------------------------------------------
    @app.get("/healthz", tags=["service"])
    def healthz():
        """The process answers."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["service"])
    def readyz():
        """Ready only when the job store and the backend both answer."""
        checks = {}
        try:
            checks["store"] = (store.ping(), "ok")
        except Exception as exc:
            checks["store"] = (False, str(exc))
        try:
            checks["backend"] = backend.ready()
        except Exception as exc:
            checks["backend"] = (False, str(exc))
        ok = all(v[0] for v in checks.values())
        return JSONResponse({"ready": ok, "checks": {k: {"ok": v[0], "message": v[1]} for k, v in checks.items()}},
                            status_code=200 if ok else 503)

    @app.get("/metrics", tags=["service"], response_class=PlainTextResponse)
    def prometheus_metrics():
        """Prometheus exposition: the service's and the training's metrics."""
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    page = resources.files("sdray.service").joinpath("static/index.html")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index():
        return HTMLResponse(page.read_text(encoding="utf-8"))

    return app
