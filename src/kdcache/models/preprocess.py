"""Per-model preprocessing: which :class:`~kdcache.views.recipe.Rendering` a teacher or student
gets.

A cache's views are resolution-free; each model renders them at its own size, interpolation and
mean/std. :class:`RenderSpec` is what a config says (every field optional); :func:`resolve`
fills the gaps from the recipe or from the timm model's pretrained config: a ViT teacher with
hub weights expects bicubic resizing and mean/std 0.5, a ResNet-50 bilinear and ImageNet's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import Field

from kdcache.core.config import StrictModel
from kdcache.core.errors import ConfigError
from kdcache.models.spec import LOCAL_DIR, ModelSpec
from kdcache.views.recipe import INTERPOLATIONS, Interpolation, Rendering, ViewRecipe


class RenderSpec(StrictModel):
    """How a model renders views; fields left out come from ``source``."""

    source: Literal["auto", "recipe", "timm"] = "auto"
    """``recipe``: the view recipe's size, interpolation, mean and std; ``timm``: the model's timm
    pretrained config (its input size, interpolation, mean and std; also right for a checkpoint
    fine-tuned from those weights); ``auto``: ``timm`` for a timm model with ``pretrained: true``,
    else ``recipe``."""
    size: int | None = Field(default=None, ge=1)
    """Output side in pixels (e.g. 320 for a teacher, 224 for the student)."""
    interpolation: Interpolation | None = None
    """``bilinear``, ``bicubic`` or ``nearest``."""
    mean: tuple[float, ...] | None = None
    """Per-channel mean (0..1)."""
    std: tuple[float, ...] | None = None
    """Per-channel std (0..1)."""


FIELDS = ("size", "interpolation", "mean", "std")
"""A rendering's fields, in the order they are described."""


def resolve(spec: RenderSpec, recipe: ViewRecipe, model: ModelSpec | None, key: str) -> Rendering:
    """The concrete rendering; ``key`` names the config entry in errors (``teachers.0.render``)."""
    return resolve_sourced(spec, recipe, model, key)[0]


def resolve_sourced(
    spec: RenderSpec, recipe: ViewRecipe, model: ModelSpec | None, key: str
) -> tuple[Rendering, dict[str, str]]:
    """The concrete rendering and where each field came from (``config (teachers.0.render)``,
    ``recipe``, ``timm pretrained_cfg of 'vit_small_patch16_224'`` ...)."""
    base, origin = _base(spec, recipe, model, key)
    overrides = {name: value for name in FIELDS if (value := getattr(spec, name)) is not None}
    sources = {name: f"config {key}" if name in overrides else origin[name] for name in FIELDS}
    rendering = Rendering.model_validate({**base, **overrides})
    if len(rendering.mean) != recipe.channels:
        raise ConfigError(
            f"{key}: mean and std have {len(rendering.mean)} values but the recipe decodes "
            f"{recipe.channels} channel(s); set {key}.mean and {key}.std"
        )
    return rendering, sources


def _base(
    spec: RenderSpec, recipe: ViewRecipe, model: ModelSpec | None, key: str
) -> tuple[dict, dict[str, str]]:
    """The fields a config's ``render`` leaves out, and their sources."""
    source = spec.source
    timm_model = model if model is not None and model.source == "timm" else None
    if source == "auto" and timm_model and timm_model.name.startswith(LOCAL_DIR):
        return _local_dir_base(timm_model, recipe)
    if source == "auto" and timm_model and timm_model.pretrained and _overlay_file(timm_model):
        return _overlay_base(spec, recipe, timm_model, key)
    if source == "auto":
        source = "timm" if timm_model and timm_model.pretrained else "recipe"
    if source == "timm":
        fields = timm_rendering(model, recipe, key).model_dump()  # a ConfigError without a model
        name = model.name if model is not None else "?"
        return fields, dict.fromkeys(FIELDS, f"timm pretrained_cfg of {name!r}")
    return recipe.rendering().model_dump(), dict.fromkeys(FIELDS, "recipe")


def _overlay_file(model: ModelSpec) -> str | None:
    """The local weights file of timm's ``pretrained_cfg_overlay: {file: ...}``, if any."""
    overlay = model.kwargs.get("pretrained_cfg_overlay") or {}
    return overlay.get("file") if isinstance(overlay, dict) else None


def stated_fields(cfg: dict, recipe: ViewRecipe) -> dict:
    """The rendering fields a timm pretrained config (or overlay) states, for the recipe's
    channels (RGB mean/std averaged for one channel)."""
    out: dict = {}
    if cfg.get("input_size"):
        out["size"] = int(cfg["input_size"][-1])
    if cfg.get("interpolation") in INTERPOLATIONS:
        out["interpolation"] = cfg["interpolation"]
    for name in ("mean", "std"):
        if cfg.get(name):
            values = tuple(float(v) for v in cfg[name])
            channels_differ = recipe.channels == 1 and len(values) == 3
            out[name] = (sum(values) / 3,) if channels_differ else values
    return out


def _overlay_base(
    spec: RenderSpec, recipe: ViewRecipe, model: ModelSpec, key: str
) -> tuple[dict, dict[str, str]]:
    """Weights from a local file: the overlay must state what the hub's config would otherwise
    fill in, since the hub's preprocessing fits the hub's weights, not necessarily these."""
    stated = stated_fields(model.kwargs["pretrained_cfg_overlay"], recipe)
    missing = [name for name in FIELDS if name not in stated and getattr(spec, name) is None]
    if missing:
        hub = timm_rendering(model, recipe, key)
        raise ConfigError(
            f"{key}: the weights of {model.name!r} come from a local file "
            f"({_overlay_file(model)}) but its {', '.join(missing)} are not stated, and timm's "
            f"hub config would render it as {describe(hub)}, which fits the hub's weights, not "
            f"necessarily these; state how they were trained ({key}.size / interpolation / mean "
            f"/ std, or input_size / interpolation / mean / std in pretrained_cfg_overlay), or "
            f"set {key}.source: timm (the hub's) or recipe"
        )
    return stated, dict.fromkeys(FIELDS, "config pretrained_cfg_overlay")


def _local_dir_base(model: ModelSpec, recipe: ViewRecipe) -> tuple[dict, dict[str, str]]:
    """A local model directory: the fields its ``config.json`` states (``pretrained_cfg``),
    the recipe's for the rest."""
    path = Path(model.name[len(LOCAL_DIR) :]) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):  # reported by build_model, which reads it too
        config = {}
    stated = stated_fields(config.get("pretrained_cfg", config), recipe)
    base = {**recipe.rendering().model_dump(), **stated}
    origin = {name: f"checkpoint {path}" if name in stated else "recipe" for name in FIELDS}
    return base, origin


def describe(rendering: Rendering, sources: dict[str, str] | None = None) -> str:
    """``size 64, bilinear, mean (0.5,) std (0.5,)``, each with its source when given."""
    parts = [
        f"size {rendering.size}",
        rendering.interpolation,
        f"mean {_values(rendering.mean)}",
        f"std {_values(rendering.std)}",
    ]
    if sources is None:
        return ", ".join(parts)
    return ", ".join(f"{part} [{sources[name]}]" for part, name in zip(parts, FIELDS, strict=True))


def _values(values: tuple[float, ...]) -> str:
    return "(" + ", ".join(f"{v:.3g}" for v in values) + ")"


def timm_rendering(model: ModelSpec | None, recipe: ViewRecipe, key: str) -> Rendering:
    """The rendering in a timm model's pretrained config."""
    if model is None or model.source != "timm":
        raise ConfigError(f"{key}.source: 'timm' needs a timm model (source: timm)")
    import timm

    cfg = timm.get_pretrained_cfg(model.name)
    if cfg is None:
        raise ConfigError(f"{key}.source: timm has no pretrained config for {model.name!r}")
    fields = stated_fields(cfg.to_dict(), recipe)
    fields.setdefault("interpolation", "bicubic")
    return Rendering.model_validate(fields)
