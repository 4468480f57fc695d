"""The model families sdray trains, by ``spec.model.family`` name (``sdray.models.families.base`` says
what a family owns). Adding a family: a module here with a ``ModelFamily`` subclass, one line in
``_FAMILY_CLASSES``, and its presets in ``sdray.models.presets``."""

from __future__ import annotations

from sdray.models.families.base import ModelFamily, TextSlot
from sdray.models.families.flux import Flux
from sdray.models.families.sd import StableDiffusion
from sdray.models.families.sd3 import StableDiffusion3
from sdray.models.families.sdxl import StableDiffusionXL

_FAMILY_CLASSES: tuple[type[ModelFamily], ...] = (StableDiffusion, StableDiffusionXL, StableDiffusion3, Flux)

FAMILIES: dict[str, ModelFamily] = {cls.name: cls() for cls in _FAMILY_CLASSES}


def family_named(name: str) -> ModelFamily:
    if name not in FAMILIES:
        raise KeyError(f"unknown model family {name!r} (known: {', '.join(FAMILIES)})")
    return FAMILIES[name]


def family_of_pipeline(class_name: str) -> ModelFamily | None:
    """The family whose pretrained pipelines have this ``model_index.json`` ``_class_name`` (None: unknown)."""
    for family in FAMILIES.values():
        if class_name in family.pipeline_names:
            return family
    return None


__all__ = ["FAMILIES", "ModelFamily", "TextSlot", "family_named", "family_of_pipeline"]
