"""A run's progress, as one typed record from the training loop to every place that shows it.

Rank 0's loop and a search's Tune callback make a ``Progress``; the driver shows it (``sdray train``'s
progress bar), posts it to the sdray service and writes its step and loss into a DiffusionJob's status; the
service reads a driver's post back with ``Progress.from_payload``. Every field is optional: an update carries
what changed (a checkpoint or a sample grid comes alone).

Non-finite numbers: a NaN or infinite loss is a real observation (a diverged run), so the model holds it
(the progress bar prints ``nan``). ``to_payload`` writes it as ``null``, which keeps the JSON valid, and
``from_payload`` reads a ``null`` number back as a value that is set but unknown, so whoever merges updates
(the service) replaces the last finite loss instead of showing it as current. Loss-curve points that are
not finite are dropped: a curve has a gap there.

This module sits at the bottom of sdray: it imports nothing of it.
"""

from __future__ import annotations

import math
import time
from functools import cache
from itertools import islice
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_TRIALS = 1000
MAX_CURVE_POINTS = 10_000  # per curve, in one update
CURVES = ("loss", "val_loss")
_MAX_DEPTH = 4  # of a trial's parameter values (a choice of lists, say)


class _Junk(Exception):
    """A value of the wrong type, or one that does not convert: the field is left out."""


def _coerce(value: Any, kind: type) -> Any:
    """``value`` as ``kind`` (int, float or str), converted as ``kind(value)`` converts it, from a number or a
    string but never from a bool; ``None`` for a float means a number that is not known."""
    if value is None and kind is float:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise _Junk
    try:
        return kind(value)
    except (ValueError, OverflowError):  # "fast", int(nan), int(inf)
        raise _Junk from None


def _finite(value: float | None) -> float | None:
    return value if value is None or math.isfinite(value) else None


def _json_value(value: Any, depth_left: int = _MAX_DEPTH) -> Any:
    """A JSON value, non-finite numbers as ``None``; anything else, or nested deeper than ``depth_left``,
    is junk."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return _finite(value)
    if depth_left > 0 and isinstance(value, (list, tuple)):
        return [_json_value(v, depth_left - 1) for v in value]
    if depth_left > 0 and isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: _json_value(v, depth_left - 1) for k, v in value.items()}
    raise _Junk


@cache
def _scalar_kinds(model: type[BaseModel]) -> dict[str, type]:
    """The model's int, float and str fields (each declared ``X | None``), by name."""
    return {name: kind for name, field in model.model_fields.items() for kind in (int, float, str)
            if field.annotation == kind | None}


def _known_scalars(model: type[BaseModel], payload: dict) -> dict[str, Any]:
    """The well-typed scalar fields of ``payload``, converted; junk and unknown keys are left out."""
    clean = {}
    for name, kind in _scalar_kinds(model).items():
        if name in payload:
            try:
                clean[name] = _coerce(payload[name], kind)
            except _Junk:
                continue
    return clean


class Trial(BaseModel):
    """One trial of a search as a person reads it."""

    trial: str | None = Field(default=None, description="Ray Tune's trial id.")
    params: dict[str, Any] = Field(default_factory=dict, description="The trial's values, by dotted path.")
    state: str | None = Field(default=None, description="Tune's state while it runs; finished, failed or "
                                                        "stopped early at the end.")
    metric: float | None = Field(default=None, description="The search's metric at the trial's last report.")
    step: int | None = Field(default=None, description="The step of that report.")

    @field_validator("params", mode="before")
    @classmethod
    def _json_params(cls, params: Any) -> dict[str, Any]:
        """The values under string keys that are JSON (non-finite numbers as None); the others are dropped."""
        kept = {}
        for key, value in (params.items() if isinstance(params, dict) else ()):
            try:
                if isinstance(key, str):
                    kept[key] = _json_value(value)
            except _Junk:
                continue
        return kept

    @classmethod
    def from_payload(cls, payload: dict) -> Trial:
        """The known, well-typed fields of one trial in an untrusted payload (as ``Progress.from_payload``)."""
        return cls(**_known_scalars(cls, payload), params=payload.get("params"))


class Progress(BaseModel):
    """The latest state of a training run or a search (rank 0's view; the fields an update sets)."""

    model_config = ConfigDict(extra="forbid")

    # training
    step: int | None = Field(default=None, description="Optimizer steps done.")
    max_steps: int | None = Field(default=None, description="Steps the run will take.")
    epoch: int | None = Field(default=None, description="Passes over the training data so far.")
    loss: float | None = Field(default=None, description="Training loss, mean over the last logging window and "
                                                         "the workers.")
    val_loss: float | None = Field(default=None, description="Loss on the held-out split at the last checkpoint.")
    lr: float | None = Field(default=None, description="Learning rate at the last step.")
    images_per_s: float | None = Field(default=None, description="Training images per second, all workers.")
    step_s: float | None = Field(default=None, description="Seconds per optimizer step.")
    data_wait_s: float | None = Field(default=None, description="Seconds spent waiting for data in the last "
                                                                "logging window.")
    data_wait_share: float | None = Field(default=None, description="Share of step time spent waiting for data.")
    images_seen: int | None = Field(default=None, description="Training images seen, all workers.")
    elapsed_s: float | None = Field(default=None, description="Seconds since this start of the run.")
    gpu_memory_bytes: int | None = Field(default=None, description="Peak GPU memory allocated on rank 0.")
    skipped_images: int | None = Field(default=None, description="Unreadable images skipped.")
    checkpoint_step: int | None = Field(default=None, description="Step of the last checkpoint.")
    checkpoint_s: float | None = Field(default=None, description="Seconds the last checkpoint took.")
    checkpoint: str | None = Field(default=None, description="URI of the last checkpoint (at the end of a run).")
    sample: str | None = Field(default=None, description="URI of the last sample grid.")
    output: str | None = Field(default=None, description="Where the run's outputs go.")
    # a data job (sdray data precompute)
    images_done: int | None = Field(default=None, description="Images a data job has processed so far.")
    # a search
    best: float | None = Field(default=None, description="The best metric of a search so far.")
    trials_ended: int | None = Field(default=None, description="Trials of a search that have ended.")
    trials_total: int | None = Field(default=None, description="Trials the search will run.")
    trials: list[Trial] | None = Field(default=None, description=f"Every trial (at most {MAX_TRIALS}).")
    # the loss curve
    curve: dict[str, list[tuple[int, float]]] | None = Field(
        default=None, description=f"Loss-curve points (step, value) by curve name ({', '.join(CURVES)}): the "
                                  "last ones logged, so that a reader that sees only some updates still gets "
                                  f"every point (at most {MAX_CURVE_POINTS} per curve).")

    @field_validator("curve", mode="before")
    @classmethod
    def _well_formed_points(cls, curve: Any) -> dict[str, list[tuple[int, float]]] | None:
        """Only the known curves' points that are ``[step, value]`` with an int step and a finite value."""
        if not isinstance(curve, dict):
            return None
        out: dict[str, list[tuple[int, float]]] = {}
        for name in CURVES:
            points = curve.get(name)
            if not isinstance(points, (list, tuple)):
                continue
            for p in points[:MAX_CURVE_POINTS]:
                if (isinstance(p, (list, tuple)) and len(p) == 2 and isinstance(p[0], int)
                        and not isinstance(p[0], bool) and isinstance(p[1], (int, float))
                        and not isinstance(p[1], bool) and math.isfinite(p[1])):
                    out.setdefault(name, []).append((p[0], float(p[1])))
        return out

    @classmethod
    def from_payload(cls, payload: Any) -> Progress:
        """The known, well-typed fields of an untrusted JSON object (a driver's post); never raises.

        Numbers and strings are converted as ``int()``, ``float()`` and ``str()`` convert them (``"12"`` is a
        step, ``"nan"`` a loss), bools and values that do not convert are left out, and so are unknown keys.
        ``null`` for a float field (what ``to_payload`` writes for a non-finite number) sets it to None.
        ``trials``: the first 1,000 objects, each reduced to its known fields; ``curve``: see ``curve_points``.
        """
        if not isinstance(payload, dict):
            return cls()
        clean = _known_scalars(cls, payload)
        trials = payload.get("trials")
        if isinstance(trials, list):
            clean["trials"] = [Trial.from_payload(t) for t in
                               islice((t for t in trials if isinstance(t, dict)), MAX_TRIALS)]
        if isinstance(payload.get("curve"), dict):
            clean["curve"] = payload["curve"]
        return cls(**clean)

    def to_payload(self) -> dict[str, Any]:
        """The fields this update sets, as JSON: non-finite numbers as ``null``, curve points as lists."""
        out = {k: _finite(v) if isinstance(v, float) else v for k, v in self.model_dump(exclude_unset=True).items()}
        if "curve" in out:
            out["curve"] = {k: [list(p) for p in points] for k, points in self.curve_points().items()}
        if out.get("trials"):  # every field of each trial, for readers that index them
            out["trials"] = [{**t.model_dump(), "metric": _finite(t.metric)} for t in self.trials]
        return out

    def curve_points(self) -> dict[str, list[tuple[int, float]]]:
        """``{"loss": [(step, value), …], "val_loss": […]}``: the update's well-formed loss-curve points
        (finite values, int steps; curves other than ``loss`` and ``val_loss`` are ignored)."""
        return {name: list(points) for name, points in (self.curve or {}).items() if points}

    def updated(self, **fields: Any) -> Progress:
        """This progress with ``fields`` set (validated as any construction is)."""
        return type(self)(**{**{k: getattr(self, k) for k in self.model_fields_set}, **fields})


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


class ProgressLines:
    """Progress as one line every ``interval_s`` seconds (and a last one at the end), for where a progress bar
    cannot draw: ``kubectl logs``, ``sdray logs -f``, CI logs, a file. Fed ``Progress`` updates, it keeps the
    latest value of each field (an update carries only what changed) and hands each line to ``write``."""

    def __init__(self, name: str, write, interval_s: float = 30.0, clock=None):
        self.name = name
        self.write = write
        self.interval_s = interval_s
        self.clock = clock or time.monotonic
        self.latest: dict[str, Any] = {}
        self.started = self.clock()
        self.last_written: float | None = None
        self.unwritten = False
        self.first_step: tuple[float, int] | None = None  # (when, step) of the first step seen: for the ETA

    def __call__(self, progress: Progress) -> None:
        self.latest.update({k: v for k, v in progress.model_dump(exclude_none=True).items() if k != "curve"})
        self.unwritten = True
        now = self.clock()
        if self.first_step is None and progress.step is not None:
            self.first_step = (now, progress.step)
        if self.last_written is None or now - self.last_written >= self.interval_s:
            self.flush()

    def flush(self) -> None:
        """Write the latest state now, if anything arrived since the last line."""
        if self.unwritten and self.latest:
            self.write(self.line())
            self.last_written = self.clock()
            self.unwritten = False

    def line(self) -> str:
        p = self.latest
        parts = [self.name]
        if "trials_total" in p or "trials_ended" in p:
            parts.append(f"trials {p.get('trials_ended', 0)}/{p.get('trials_total', '?')} ended")
            if p.get("trials"):
                parts.append(f"{sum(t.get('state') == 'RUNNING' for t in p['trials'])} running")
            if "best" in p:
                parts.append(f"best {p['best']:.4g}")
        if "images_done" in p:
            parts.append(f"{p['images_done']} images encoded")
            if p.get("skipped_images"):
                parts.append(f"{p['skipped_images']} skipped")
            rate = p["images_done"] / max(self.clock() - self.started, 1e-9)
            parts.append(f"{rate:.1f} img/s")
        if "step" in p:
            total = p.get("max_steps")
            parts.append(f"step {p['step']}/{total}" if total else f"step {p['step']}")
        for key, label, form in (("loss", "loss", "{:.4f}"), ("val_loss", "val_loss", "{:.4f}"), ("lr", "lr", "{:.2e}"),
                                 ("images_per_s", "img/s", "{:.1f}")):
            if key in p:
                parts.append(f"{label} {form.format(p[key])}")
        if "data_wait_share" in p:
            parts.append(f"data wait {100 * p['data_wait_share']:.0f}%")
        elapsed = self.clock() - self.started
        parts.append(f"elapsed {_duration(elapsed)}")
        if self.first_step is not None and p.get("max_steps") and p["step"] > self.first_step[1]:
            rate = (p["step"] - self.first_step[1]) / max(self.clock() - self.first_step[0], 1e-9)
            parts.append(f"ETA {_duration(max(0, p['max_steps'] - p['step']) / rate)}")
        if p.get("checkpoint_step") is not None:
            parts.append(f"checkpoint @{p['checkpoint_step']}")
        return " | ".join(parts)
