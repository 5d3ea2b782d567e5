"""View recipes, counter-based view parameters, and the one replay function.

View ``a`` of sample ``key`` is drawn from a Philox generator keyed by ``(cache seed, key, a)``
alone, so a cache made by any number of workers in any order is replayed identically by any
reader. The parameters are *stored* in the cache; :func:`replay` turns a decoded image and its
stored parameters into the exact pixels the teacher saw, on both sides (precompute and train).

Parameters of one view are ``int32[7]``: ``top, left, height, width, flip, image_h, image_w``.
The image size is kept so a replay against a changed image is detected, not silently wrong.
"""

from __future__ import annotations

import hashlib
import math
from typing import Literal

import numpy as np
import torch
from pydantic import Field, model_validator
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from kdcache.config import StrictModel
from kdcache.errors import DataError

NUM_PARAMS = 7
P_TOP, P_LEFT, P_H, P_W, P_FLIP, P_IMG_H, P_IMG_W = range(NUM_PARAMS)
RECIPE_VERSION = 1


class ViewRecipe(StrictModel):
    """How views are made. Stored in the cache; the trainer replays with the cache's copy."""

    name: Literal["rrc_flip", "center"] = "rrc_flip"
    """``rrc_flip``: RandomResizedCrop + horizontal flip (torchvision v2); ``center``: resize +
    center crop."""
    size: int = Field(224, ge=1)
    """Output side in pixels."""
    scale: tuple[float, float] = (0.08, 1.0)
    """rrc_flip: range of the crop's area as a fraction of the image."""
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    """rrc_flip: range of the crop's aspect ratio (w / h)."""
    flip_prob: float = Field(0.5, ge=0.0, le=1.0)
    """rrc_flip: probability of a horizontal flip."""
    crop_pct: float = Field(0.875, gt=0.0, le=1.0)
    """center: the image is resized so that ``size / crop_pct`` is its shorter side."""
    channels: Literal[1, 3] = 3
    """Images are decoded to this many channels (grey or RGB)."""
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    version: int = RECIPE_VERSION

    @model_validator(mode="after")
    def _check(self) -> ViewRecipe:
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ValueError(f"scale must satisfy 0 < min <= max <= 1, found {self.scale}")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"ratio must satisfy 0 < min <= max, found {self.ratio}")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(
                f"mean and std need {self.channels} values (channels), "
                f"found {len(self.mean)} and {len(self.std)}"
            )
        if any(s <= 0 for s in self.std):
            raise ValueError("std values must be positive")
        return self

    def describe(self) -> str:
        if self.name == "center":
            return f"center crop {self.size}px (crop_pct {self.crop_pct})"
        return (
            f"random-resized-crop {self.size}px scale {self.scale} "
            f"ratio {tuple(round(r, 3) for r in self.ratio)} + flip {self.flip_prob}"
        )


def view_generator(seed: int, key: str, view: int) -> np.random.Generator:
    """A Philox generator keyed by ``(seed, key, view)`` only."""
    digest = hashlib.blake2b(f"{seed}\x1f{key}\x1f{view}".encode(), digest_size=16).digest()
    return np.random.Generator(np.random.Philox(key=int.from_bytes(digest, "little")))


def view_params(
    recipe: ViewRecipe, seed: int, key: str, num_views: int, image_hw: tuple[int, int]
) -> np.ndarray:
    """``int32[num_views, 7]`` parameters of every view of one sample."""
    out = np.zeros((num_views, NUM_PARAMS), dtype=np.int32)
    for a in range(num_views):
        out[a] = _one_view(recipe, view_generator(seed, key, a), image_hw)
    return out


def single_view_params(
    recipe: ViewRecipe, seed: int, key: str, view: int, image_hw: tuple[int, int]
) -> np.ndarray:
    """``int32[7]`` parameters of view ``view`` of one sample (what :func:`view_params` stores)."""
    return np.asarray(_one_view(recipe, view_generator(seed, key, view), image_hw), dtype=np.int32)


def _one_view(recipe: ViewRecipe, rng: np.random.Generator, image_hw: tuple[int, int]) -> list[int]:
    height, width = image_hw
    if recipe.name == "center":
        return [0, 0, height, width, 0, height, width]
    top, left, h, w = _rrc_box(rng, height, width, recipe.scale, recipe.ratio)
    flip = int(rng.random() < recipe.flip_prob)
    return [top, left, h, w, flip, height, width]


def _rrc_box(
    rng: np.random.Generator, height: int, width: int, scale, ratio
) -> tuple[int, int, int, int]:
    """RandomResizedCrop's box, drawn as torchvision does (10 tries, then a central fallback)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w = width
        h = int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h = height
        w = int(round(height * ratio[1]))
    else:
        w = width
        h = height
    return (height - h) // 2, (width - w) // 2, h, w


def replay(image: torch.Tensor, params: np.ndarray, recipe: ViewRecipe) -> torch.Tensor:
    """The view's pixels: ``uint8[C, size, size]`` from a decoded ``uint8[C, H, W]`` image."""
    height = int(image.shape[-2])
    width = int(image.shape[-1])
    if (height, width) != (int(params[P_IMG_H]), int(params[P_IMG_W])):
        raise DataError(
            f"image is {height}x{width} but the view was made from a "
            f"{int(params[P_IMG_H])}x{int(params[P_IMG_W])} image: "
            "the shard changed after the cache was built"
        )
    if recipe.name == "center":
        return _center(image, recipe)
    out = F.resized_crop(
        image,
        int(params[P_TOP]),
        int(params[P_LEFT]),
        int(params[P_H]),
        int(params[P_W]),
        [recipe.size, recipe.size],
        interpolation=InterpolationMode.BILINEAR,
        antialias=True,
    )
    return F.horizontal_flip(out) if params[P_FLIP] else out


def _center(image: torch.Tensor, recipe: ViewRecipe) -> torch.Tensor:
    short = int(math.floor(recipe.size / recipe.crop_pct))
    resized = F.resize(image, [short], interpolation=InterpolationMode.BILINEAR, antialias=True)
    return F.center_crop(resized, [recipe.size, recipe.size])


def normalize(batch: torch.Tensor, recipe: ViewRecipe) -> torch.Tensor:
    """uint8 ``[B, C, H, W]`` -> float32 normalised by the recipe's mean and std (on batch's
    device)."""
    mean = torch.tensor(recipe.mean, device=batch.device).view(1, -1, 1, 1) * 255.0
    std = torch.tensor(recipe.std, device=batch.device).view(1, -1, 1, 1) * 255.0
    return (batch.float() - mean) / std


def epoch_view(seed: int, epoch: int, key: str, num_views: int) -> int:
    """The view of ``key`` to train on in ``epoch``: every view once per ``num_views`` epochs.

    A per-key permutation of the views (from ``seed`` and ``key``) is walked one step per epoch,
    so views never repeat before all were used and the choice is the same for any worker count.
    """
    if num_views == 1:
        return 0
    cycle, step = divmod(epoch, num_views)
    digest = hashlib.blake2b(f"{seed}\x1f{key}\x1f{cycle}".encode(), digest_size=8).digest()
    rng = np.random.Generator(np.random.Philox(key=int.from_bytes(digest, "little")))
    return int(rng.permutation(num_views)[step])


def replay_views(image: torch.Tensor, params: np.ndarray, recipe: ViewRecipe) -> torch.Tensor:
    """All stored views of one decoded image: ``uint8[A, C, size, size]``."""
    return torch.stack([replay(image, p, recipe) for p in params])
