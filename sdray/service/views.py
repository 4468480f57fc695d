"""What the REST API answers: the response models (they are also the OpenAPI document's schemas)."""

from __future__ import annotations

import time
from typing import Annotated, Any

from pydantic import BaseModel, Field

from sdray.service.store import JobRecord
from sdray.states import JobState


class Condition(BaseModel):
    type: str
    status: str
    reason: str
    message: str = ""
    lastTransitionTime: str


class CheckpointRef(BaseModel):
    step: int | None = None
    uri: str | None = None


class Links(BaseModel):
    self: str
    logs: str
    metrics: str
    sample: str


class JobView(BaseModel):
    """A job as the API shows it: its state and conditions, the latest progress, and (a search) its trials."""

    id: str
    name: str
    tenant: str
    kind: str = Field(description="train or tune")
    state: JobState = Field(description="Queued (in the service's queue), Pending (submitted, starting), Running, "
                            "Succeeded, Failed, Cancelled or Preempted (stopped at a checkpoint: submit the document "
                            "again to continue); the DiffusionJob CRD's status.state says the same strings.")
    labels: dict[str, str]
    conditions: list[Condition]
    attempts: int
    created: str | None
    started: str | None
    finished: str | None
    step: int | None = None
    max_steps: int | None = None
    loss: float | None = None
    val_loss: float | None = None
    images_per_s: float | None = None
    data_wait_share: float | None = None
    skipped_images: int | None = None
    last_checkpoint: CheckpointRef | None = None
    output_uri: str | None = None
    demand: dict[str, float]
    backend_handle: str | None = None
    links: Links
    trials: list[dict[str, Any]] | None = Field(default=None, description="A search's trials.")
    trials_total: int | None = None
    trials_ended: int | None = None
    best: float | None = None


class JobList(BaseModel):
    jobs: list[JobView]
    next_page_token: str | None = Field(description="Pass as page_token for the next page; null on the last.")


class FieldError(BaseModel):
    field: str = Field(description="The document's field path, e.g. spec.train.learning_rate.")
    message: str


class PolicyRefusal(BaseModel):
    field: str = Field(description="The document's field path, e.g. spec.cluster.image.")
    rule: str = Field(description="The tenant policy's rule that refused it, e.g. images.")
    message: str


class ErrorBody(BaseModel):
    """Every error the API answers: what went wrong, and for a document its fields."""

    detail: str
    errors: list[FieldError | PolicyRefusal] | None = None
    text: list[str] | None = Field(default=None, description="422: the lines `sdray validate` prints.")


class Check(BaseModel):
    ok: bool
    message: str


class Readiness(BaseModel):
    ready: bool
    checks: dict[str, Check] = Field(description="store and backend: whether each answers, and what it said.")


class Validated(BaseModel):
    valid: bool
    name: str
    kind: str


class Curves(BaseModel):
    id: str
    curves: dict[str, list[Annotated[list[float], Field(min_length=2, max_length=2)]]] = Field(
        description="Each curve's [step, value] points.")
    latest: dict[str, Any]


def _iso(t: float | None) -> str | None:
    return None if t is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def job_view(rec: JobRecord, base: str) -> JobView:
    p = rec.progress
    spec = rec.document.get("spec", {})
    view = JobView(
        id=rec.id, name=rec.name, tenant=rec.tenant, kind=rec.kind, state=rec.state, labels=rec.labels,
        conditions=rec.conditions, attempts=rec.attempts,
        created=_iso(rec.created), started=_iso(rec.started), finished=_iso(rec.finished),
        step=p.get("step"), max_steps=p.get("max_steps", spec.get("train", {}).get("max_steps")),
        loss=p.get("loss"), val_loss=p.get("val_loss"), images_per_s=p.get("images_per_s"),
        data_wait_share=p.get("data_wait_share"), skipped_images=p.get("skipped_images"),
        last_checkpoint=(CheckpointRef(step=p.get("checkpoint_step"), uri=p.get("checkpoint"))
                         if p.get("checkpoint_step") is not None or p.get("checkpoint") else None),
        output_uri=spec.get("output", {}).get("uri"), demand=rec.demand, backend_handle=rec.handle,
        links=Links(self=f"{base}/v1/jobs/{rec.id}", logs=f"{base}/v1/jobs/{rec.id}/logs",
                    metrics=f"{base}/v1/jobs/{rec.id}/metrics", sample=f"{base}/v1/jobs/{rec.id}/samples/latest.png"),
    )
    if rec.kind == "tune":
        view.trials = p.get("trials", [])
        view.trials_total, view.trials_ended, view.best = p.get("trials_total"), p.get("trials_ended"), p.get("best")
    return view


ERROR_BODY = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}
# What each error answer means, for the OpenAPI document; every one has the body ErrorBody.
ERRORS = {
    400: "A malformed request: a query or path parameter outside its schema (each in `errors` with its field), "
         "or a body that is not UTF-8 JSON/YAML (anchors, aliases and duplicate keys refused)",
    401: "No valid bearer token (`WWW-Authenticate: Bearer`)",
    403: "Refused by the caller's tenant policy: each refused field with the rule that refused it (`errors`)",
    404: "No such job (another tenant's job is answered the same way)",
    413: "The body (or the document once expanded) is larger than 1 MiB",
    415: "The body is neither JSON nor YAML (Content-Type)",
    422: "An invalid document: each error with its field path (`errors`) and the lines `sdray validate` prints "
         "(`text`); this includes the rules of the DiffusionJob schema's description that JSON Schema cannot "
         "express",
    429: "Over the tenant's quota (concurrent jobs, workers or GPUs)",
    502: "The backend did not answer",
}


def errors(*codes: int) -> dict[int, dict]:
    """The OpenAPI responses of these error codes (each with ErrorBody, whatever the route's own content)."""
    return {code: {"description": ERRORS[code], "content": ERROR_BODY} for code in codes}
