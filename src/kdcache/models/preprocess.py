"""Per-model preprocessing: which :class:`~kdcache.views.recipe.Rendering` a teacher or student
gets.

A cache's views are resolution-free; each model renders them at its own size, interpolation and
mean/std. :class:`RenderSpec` is what a config says (every field optional); :func:`resolve`
fills the gaps from the recipe or from the timm model's pretrained config: a ViT teacher with
hub weights expects bicubic resizing and mean/std 0.5, a ResNet-50 bilinear and ImageNet's.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from kdcache.core.config import StrictModel
from kdcache.core.errors import ConfigError
from kdcache.models.build import ModelSpec
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


def resolve(spec: RenderSpec, recipe: ViewRecipe, model: ModelSpec | None, key: str) -> Rendering:
    """The concrete rendering; ``key`` names the config entry in errors (``teachers.0.render``)."""
    source = spec.source
    if source == "auto":
        pretrained = model is not None and model.source == "timm" and model.pretrained
        source = "timm" if pretrained else "recipe"
    base = timm_rendering(model, recipe, key) if source == "timm" else recipe.rendering()
    overrides = {
        name: value
        for name in ("size", "interpolation", "mean", "std")
        if (value := getattr(spec, name)) is not None
    }
    rendering = Rendering.model_validate({**base.model_dump(), **overrides})
    if len(rendering.mean) != recipe.channels:
        raise ConfigError(
            f"{key}: mean and std have {len(rendering.mean)} values but the recipe decodes "
            f"{recipe.channels} channel(s); set {key}.mean and {key}.std"
        )
    return rendering


def timm_rendering(model: ModelSpec | None, recipe: ViewRecipe, key: str) -> Rendering:
    """The rendering in a timm model's pretrained config."""
    if model is None or model.source != "timm":
        raise ConfigError(f"{key}.source: 'timm' needs a timm model (source: timm)")
    import timm

    cfg = timm.get_pretrained_cfg(model.name)
    if cfg is None:
        raise ConfigError(f"{key}.source: timm has no pretrained config for {model.name!r}")
    ours: dict[str, Interpolation] = {name: name for name in INTERPOLATIONS}
    interpolation = ours.get(cfg.interpolation, "bicubic")  # bicubic for one views lack
    mean = tuple(cfg.mean)
    std = tuple(cfg.std)
    if recipe.channels == 1 and len(mean) == 3:
        mean = (sum(mean) / 3,)
        std = (sum(std) / 3,)
    return Rendering(size=int(cfg.input_size[-1]), interpolation=interpolation, mean=mean, std=std)
