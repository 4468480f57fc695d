"""The REST API (``sdray serve``): FastAPI over the job manager; OpenAPI at ``/docs`` and ``/openapi.json``.

Every ``/v1`` route needs a bearer token; a tenant sees and touches only its own jobs (others' are
``404``), an admin sees all, and a tenant's documents pass its tenant policy (``sdray/service/policy.py``).
``/internal/v1`` takes progress from the job drivers, each with its own job's token. ``/healthz``,
``/readyz``, ``/metrics`` and the page at ``/`` need none (the page asks for a token and sends it with
each call).

The routes live in ``sdray/service/routes/`` (jobs, internal, operations); what they share (the caller,
bounded bodies, the checked document) in ``deps.py``; what they answer in ``views.py``. This module
assembles them: the background loop, the metrics middleware, the error answers and the OpenAPI document.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import iter_route_contexts
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import compile_path

from sdray.service.auth import Authenticator
from sdray.service.backends.base import Backend
from sdray.service.deps import MAX_ERRORS, Refused, Service, error_response
from sdray.service.jobs import JobManager
from sdray.service.metrics import ServiceMetrics
from sdray.service.policy import Policy
from sdray.service.routes import internal, jobs, operations
from sdray.service.store import JobStore
from sdray.service.views import ErrorBody
from sdray.spec_rules import job_schema

log = logging.getLogger("sdray.service")


@dataclass
class Settings:
    tokens: Path
    db: Path
    public_url: str = "http://127.0.0.1:8000"
    poll_interval_s: float = 1.0
    policy: Path | None = None  # the tenant policy file; None: the built-in default (policy.py)
    metrics_on_api: bool = True  # False: /metrics is served elsewhere (sdray serve --metrics-port)


class _Middleware:
    """An ASGI middleware calling ``handler(scope, receive, send, app)``."""

    def __init__(self, app, handler):
        self.app, self.handler = app, handler

    async def __call__(self, scope, receive, send):
        await self.handler(scope, receive, send, self.app)


def _counting(metrics: ServiceMetrics):
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
            await error_response(500, "internal error: see the service log")(scope, receive, counted)
    return count


def _openapi(app: FastAPI):
    """FastAPI's document with the DiffusionJob schema (the pydantic model's, with the cross-field rules of
    ``sdray.spec_rules``), the error body every error answer has, and bearer auth on every route but those
    that declare ``security: []``."""
    def build():
        if app.openapi_schema:
            return app.openapi_schema
        from fastapi.openapi.utils import get_openapi

        schema = job_schema()
        doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        components = doc.setdefault("components", {}).setdefault("schemas", {})
        components.update(schema.get("$defs", {}))
        components["DiffusionJob"] = {k: v for k, v in schema.items() if k != "$defs"}
        components.update(ErrorBody.model_json_schema(ref_template="#/components/schemas/{model}")["$defs"])
        components["ErrorBody"] = {k: v for k, v in ErrorBody.model_json_schema().items() if k != "$defs"}
        # Parameters outside their schema are answered 400 with ErrorBody (below), not FastAPI's 422.
        for path in doc["paths"].values():
            for operation in path.values():
                if "HTTPValidationError" in json.dumps(operation["responses"].get("422", {})):
                    del operation["responses"]["422"]
        for name in ("HTTPValidationError", "ValidationError"):
            components.pop(name, None)
        doc = json.loads(json.dumps(doc).replace("#/$defs/", "#/components/schemas/"))
        doc["components"]["securitySchemes"] = {"bearer": {
            "type": "http", "scheme": "bearer",
            "description": "A token from `sdray token create`; /internal/v1 takes a job's own progress token."}}
        doc["security"] = [{"bearer": []}]
        app.openapi_schema = doc
        return doc
    return build


def _allowed_methods(app: FastAPI, path: str) -> list[str]:
    """The methods of every route at ``path`` (Starlette's 405 names only the first matching route's)."""
    methods = set()
    for route in iter_route_contexts(app.routes):
        if compile_path(route.path)[0].match(path):
            methods |= set(route.methods or ())
    return sorted(methods)


def create_app(settings: Settings, backend: Backend, *, store: JobStore | None = None,
               auth: Authenticator | None = None, policy: Policy | None = None) -> FastAPI:
    store = store or JobStore(settings.db)
    auth = auth or Authenticator(settings.tokens)
    metrics = ServiceMetrics(store)
    policy = policy or Policy.load(settings.policy)
    manager = JobManager(store, backend, auth, public_url=settings.public_url, on_transition=metrics.transition,
                         namespace_of=lambda tenant: policy.for_tenant(tenant).namespace)
    svc = Service(store=store, auth=auth, policy=policy, backend=backend, manager=manager, metrics=metrics,
                  base_url=settings.public_url.rstrip("/"))

    def follow() -> None:
        """The service's one background loop: reconcile once, then follow and admit jobs."""
        first = True
        while not svc.stop.is_set():
            try:
                if first:
                    manager.reconcile()
                    first = False
                manager.tick()
            except Exception:  # never let one bad poll end the loop
                log.exception("following jobs failed; retrying")
            svc.wake.wait(settings.poll_interval_s)
            svc.wake.clear()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        thread = threading.Thread(target=follow, name="sdray-follow", daemon=True)
        thread.start()
        yield
        svc.stop.set()
        svc.wake.set()
        thread.join(timeout=30)
        backend.close()

    app = FastAPI(title="sdray", version="v1", lifespan=lifespan,
                  description="Submit, follow and cancel DiffusionJob documents; see the README.")
    app.state.service = svc
    app.state.manager = manager
    app.state.metrics = metrics
    app.openapi = _openapi(app)

    @app.exception_handler(Refused)
    async def refused(request: Request, exc: Refused):
        return error_response(exc.status, exc.detail, **exc.extra)

    @app.exception_handler(RequestValidationError)
    async def bad_parameters(request: Request, exc: RequestValidationError):
        """A query or path parameter outside its schema: 400, each with its field (query.limit) and the rule."""
        found = [{"field": ".".join(str(p) for p in e["loc"]), "message": e["msg"]} for e in exc.errors()[:MAX_ERRORS]]
        return error_response(400, "invalid request: " + "; ".join(f"{e['field']}: {e['message']}" for e in found),
                              errors=found)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        """Starlette's own answers (404 for an unknown path, 405) with the service's error body; a 405 names
        every method of the path in Allow."""
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            headers["Allow"] = ", ".join(_allowed_methods(request.app, request.url.path))
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=headers)

    app.add_middleware(_Middleware, handler=_counting(metrics))
    for module in (jobs, internal, operations):
        app.include_router(module.router)
    if settings.metrics_on_api:
        app.include_router(operations.metrics_router)
    return app
