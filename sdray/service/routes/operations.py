"""Operations, without a token: liveness, readiness, Prometheus metrics, and the page (which asks for one)."""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter, Depends
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from sdray.service.deps import Service, service
from sdray.service.views import Readiness

router = APIRouter(tags=["service"])
_NO_TOKEN = {"security": []}  # OpenAPI: these routes need no bearer token


@router.get("/healthz", openapi_extra=_NO_TOKEN, operation_id="healthz")
def healthz():
    """The process answers."""
    return {"status": "ok"}


@router.get("/readyz", openapi_extra=_NO_TOKEN, operation_id="readyz", response_model=Readiness,
            responses={503: {"model": Readiness, "description": "The store or the backend does not answer"}})
def readyz(svc: Service = Depends(service)):
    """Ready only when the job store and the backend both answer."""
    checks = {}
    try:
        checks["store"] = (svc.store.ping(), "ok")
    except Exception as exc:
        checks["store"] = (False, str(exc))
    try:
        checks["backend"] = svc.backend.ready()
    except Exception as exc:
        checks["backend"] = (False, str(exc))
    ok = all(v[0] for v in checks.values())
    return JSONResponse({"ready": ok, "checks": {k: {"ok": v[0], "message": v[1]} for k, v in checks.items()}},
                        status_code=200 if ok else 503)


# Apart, so that `sdray serve --metrics-port` can serve the metrics on a port of their own instead.
metrics_router = APIRouter(tags=["service"])


@metrics_router.get("/metrics", response_class=PlainTextResponse, openapi_extra=_NO_TOKEN, operation_id="metrics")
def prometheus_metrics(svc: Service = Depends(service)):
    """Prometheus exposition: the service's and the training's metrics (labelled with tenant and job names:
    keep this route off public ingresses, or serve it on its own port with `--metrics-port`)."""
    return Response(generate_latest(svc.metrics.registry), media_type=CONTENT_TYPE_LATEST)


_PAGE = resources.files("sdray.service").joinpath("static/index.html")


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
def index():
    return HTMLResponse(_PAGE.read_text(encoding="utf-8"))
