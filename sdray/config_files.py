"""Operator-written YAML files read into a pydantic model (the tenant policy, the pod defaults), with errors
that name the file and the field, never a traceback."""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ValidationError

Model = TypeVar("Model", bound=BaseModel)


def load_model(path: str | Path, model: type[Model], error: type[Exception], what: str) -> Model:
    """``model`` validated from the YAML file at ``path`` (empty: the model's defaults); raises ``error`` with
    ``<path>: <field>: <problem>`` (``what`` names the file's role when it cannot be read)."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise error(f"{path}: cannot read the {what}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise error(f"{path}: not valid YAML: {str(exc).splitlines()[0]}") from None
    try:
        return model.model_validate(raw or {})
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])  # empty for checks across fields, which name theirs
        message = first["msg"].removeprefix("Value error, ")
        raise error(f"{path}: {where + ': ' if where else ''}{message}") from None
