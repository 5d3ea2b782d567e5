"""View recipes, counter-based view parameters, and the one render function.

View ``a`` of sample ``key`` is drawn from a Philox generator keyed by ``(cache seed, key, a)``
alone, so a cache made by any number of workers in any order is replayed identically by any
reader. A view is a composition of ops: the crop (a box in source pixels) and flip, then
optionally a policy (RandAugment, TrivialAugmentWide), colour jitter, random erasing, and Mixup
or CutMix with a partner from the same group of samples of the shard. Every op's parameters
are *stored* in the cache (see :mod:`kdcache.views.augment` for the codes) and none depends on the
output resolution, so each model *renders* a view its own way (:class:`Rendering`: size,
interpolation, mean and std): :func:`render` turns decoded image(s) and stored parameters into
the exact uint8 pixels that model sees, and precompute and the trainer both call it.

Drawing order within one view's generator (part of the format): crop, flip, policy, jitter,
erasing. The mixing (partner, lam, CutMix box) comes from a second generator keyed by
``(seed, key, view, "mix")``, so a streaming reader can choose the partner before decoding.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import numpy as np
import torch
from pydantic import Field, field_validator, model_validator
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from kdcache.core.config import StrictModel
from kdcache.core.errors import DataError
from kdcache.views.augment import (
    BOX_STEPS,
    LEVEL_STEPS,
    NEGATE,
    NOT_APPLIED,
    PERMUTATIONS,
    ErasingConfig,
    JitterConfig,
    MixConfig,
    PolicyConfig,
    apply_erase,
    apply_jitter,
    apply_mix,
    apply_policy,
    cutmix_boxes,
    cutmix_weight,
    draw_erase,
    draw_jitter,
    draw_mix,
    draw_policy,
    keyed_generator,
    parse_timm_policy,
)

T = TypeVar("T")
RECIPE_VERSION = 2
"""2: views are op compositions with resolution-free parameters (format 3 caches)."""
Interpolation = Literal["bilinear", "bicubic", "nearest"]
INTERPOLATIONS: dict[Interpolation, InterpolationMode] = {
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
    "nearest": InterpolationMode.NEAREST,
}


class Rendering(StrictModel):
    """How one model turns a view into its input: side, interpolation, normalisation."""

    size: int = Field(ge=1)
    """Output side in pixels."""
    interpolation: Interpolation = "bilinear"
    """Resampling of the crop (torchvision, antialiased)."""
    mean: tuple[float, ...]
    """Per-channel mean (0..1) subtracted before the model."""
    std: tuple[float, ...]
    """Per-channel std (0..1) divided by before the model."""

    @model_validator(mode="after")
    def _check(self) -> Rendering:
        if len(self.mean) != len(self.std):
            raise ValueError(f"mean and std differ in length ({len(self.mean)} vs {len(self.std)})")
        if any(s <= 0 for s in self.std):
            raise ValueError("std values must be positive")
        return self

    def describe(self) -> str:
        return f"{self.size}px {self.interpolation}"


class ViewRecipe(StrictModel):
    """How views are made. Stored in the cache; the trainer replays with the cache's copy."""

    name: Literal["rrc_flip", "center"] = "rrc_flip"
    """The geometry: ``rrc_flip`` (RandomResizedCrop + horizontal flip, torchvision's draw) or
    ``center`` (a centred square of ``crop_pct`` of the shorter side, for evaluation sets)."""
    size: int = Field(default=224, ge=1)
    """Default output side in pixels (a model may render at its own, see ``Rendering``)."""
    scale: tuple[float, float] = (0.08, 1.0)
    """rrc_flip: range of the crop's area as a fraction of the image."""
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    """rrc_flip: range of the crop's aspect ratio (w / h)."""
    flip_prob: float = Field(default=0.5, ge=0.0, le=1.0)
    """rrc_flip: probability of a horizontal flip."""
    crop_pct: float = Field(default=0.875, gt=0.0, le=1.0)
    """center: the crop's side as a fraction of the image's shorter side (timm's crop_pct)."""
    interpolation: Interpolation = "bilinear"
    """Default resampling of the crop."""
    channels: Literal[1, 3] = 3
    """Images are decoded to this many channels (grey or RGB)."""
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    """Default normalisation mean; also the fill colour of geometric ops and ``const`` erasing."""
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    """Default normalisation std."""
    policy: PolicyConfig | None = None
    """RandAugment or TrivialAugmentWide after the crop and flip; a timm string such as
    ``rand-m9-mstd0.5-inc1`` is accepted. None: no policy."""
    color_jitter: JitterConfig | None = None
    """ColorJitter after the policy. None: no jitter."""
    erasing: ErasingConfig | None = None
    """Random erasing after the jitter. None: no erasing."""
    mix: MixConfig | None = None
    """Mixup / CutMix of two views (the teacher sees the mixed image). None: no mixing."""
    version: int = RECIPE_VERSION

    @field_validator("policy", mode="before")
    @classmethod
    def _timm_string(cls, value: Any) -> Any:
        return parse_timm_policy(value) if isinstance(value, str) else value

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

    @property
    def fill(self) -> list[float]:
        """The fill colour (uint8 levels) of geometric ops and ``const`` erasing: the mean."""
        return [float(round(m * 255)) for m in self.mean]

    @property
    def mixes(self) -> bool:
        return self.mix is not None

    @property
    def group_size(self) -> int:
        """Rows per mixing group (1 without mixing: every row alone)."""
        return self.mix.group_size if self.mix is not None else 1

    def rendering(self) -> Rendering:
        """The default rendering: the recipe's size, interpolation, mean and std."""
        return Rendering(
            size=self.size, interpolation=self.interpolation, mean=self.mean, std=self.std
        )

    def describe(self) -> str:
        if self.name == "center":
            parts = [f"center crop {self.size}px (crop_pct {self.crop_pct})"]
        else:
            ratio = tuple(round(r, 3) for r in self.ratio)
            parts = [f"random-resized-crop {self.size}px scale {self.scale} ratio {ratio}"]
            parts.append(f"flip {self.flip_prob}")
        if self.policy is not None:
            parts.append(_describe_policy(self.policy))
        if self.color_jitter is not None:
            jitter = self.color_jitter
            parts.append(
                f"jitter {jitter.brightness}/{jitter.contrast}/{jitter.saturation}/{jitter.hue}"
            )
        if self.erasing is not None:
            parts.append(f"erasing p={self.erasing.prob} {self.erasing.mode}")
        if self.mix is not None:
            mix = self.mix
            parts.append(f"mixup {mix.mixup_alpha} / cutmix {mix.cutmix_alpha} p={mix.prob}")
        return " + ".join(parts)


def _describe_policy(policy: PolicyConfig) -> str:
    if policy.name == "trivialaugment":
        return "trivialaugment"
    return f"randaugment ({policy.ops}) n={policy.num_ops} m={policy.magnitude:g}"


# ---- stored parameters ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ParamArray:
    """One stored parameter array: dtype, trailing shape after ``[rows, A]``, fill value."""

    dtype: str
    tail: tuple[int, ...]
    fill: int


def param_arrays(recipe: ViewRecipe) -> dict[str, ParamArray]:
    """The per-view parameter arrays a recipe stores (``views/<name>``, shape ``[R, A, *tail]``)."""
    out = {"crop": ParamArray("int32", (4,), 0), "flip": ParamArray("uint8", (), 0)}
    if recipe.policy is not None:
        out["policy"] = ParamArray("uint8", (recipe.policy.slots, 2), 0)
    if recipe.color_jitter is not None:
        out["jitter"] = ParamArray("uint8", (5,), 0)
    if recipe.erasing is not None:
        out["erase"] = ParamArray("uint8", (4,), 0)
        if recipe.erasing.mode != "const":
            out["erase_seed"] = ParamArray("uint16", (), 0)
    if recipe.mix is not None:
        # partners are rows of the same group: offsets below the group size
        offset = "int8" if recipe.mix.group_size <= 128 else "int16"
        out["mix_partner"] = ParamArray(offset, (), 0)
        out["mix_lam"] = ParamArray("uint8", (), BOX_STEPS)
        if recipe.mix.has_cutmix:
            out["mix_center"] = ParamArray("uint8", (2,), NOT_APPLIED)
    return out


@dataclass(frozen=True)
class View:
    """The stored parameters of one view (codes as :mod:`kdcache.views.augment` describes them)."""

    image_hw: tuple[int, int]
    """Height and width of the decoded source image (a changed image is detected)."""
    crop: tuple[int, int, int, int]
    """top, left, height, width in source pixels."""
    flip: bool = False
    policy: np.ndarray | None = None
    jitter: np.ndarray | None = None
    erase: np.ndarray | None = None
    erase_seed: int = 0
    mix_partner: int = 0
    """Row offset of the partner within the shard (0: not mixed)."""
    mix_lam: int = BOX_STEPS
    """Mixup: the weight of this view's own image and label; CutMix: the drawn lam that sets the
    pasted square's side (1/255 steps)."""
    mix_center: np.ndarray | None = None
    """CutMix: the pasted square's centre (1/254 steps; 255: a Mixup view)."""

    @property
    def mixed(self) -> bool:
        return self.mix_partner != 0

    @property
    def cutmix(self) -> bool:
        return self.mixed and self.mix_center is not None and int(self.mix_center[0]) != NOT_APPLIED

    @property
    def mix_box(self) -> np.ndarray:
        """The pasted box (top, left, height, width in 1/255 of the side; zeros for Mixup)."""
        center = self.mix_center
        if not self.cutmix or center is None:  # cutmix implies a centre
            return np.zeros(4, np.int64)
        return cutmix_boxes(center, self.mix_lam)

    @property
    def lam(self) -> float:
        """The weight of the view's own label (1 when not mixed)."""
        return mix_weight(self.mix_partner, self.mix_lam, self.mix_center)


def mix_weight(partner: int, lam_code: int, center: np.ndarray | None) -> float:
    """The weight of a view's own label from its stored mixing: 1 when not mixed, Mixup's lam,
    or one minus CutMix's clipped box area."""
    if partner == 0:
        return 1.0
    if center is None or int(center[0]) == NOT_APPLIED:
        return lam_code / BOX_STEPS
    return float(cutmix_weight(cutmix_boxes(center, lam_code)))


class ViewParams:
    """The stored parameters of ``n`` rows x A views: ``image_hw`` ``[n, 2]`` and one array per
    op family (:func:`param_arrays`) ``[n, A, ...]``; rows that were never drawn are zeros."""

    def __init__(self, image_hw: np.ndarray, arrays: dict[str, np.ndarray]):
        self.image_hw = image_hw
        self.arrays = arrays

    @classmethod
    def empty(cls, recipe: ViewRecipe, rows: int, num_views: int) -> ViewParams:
        arrays = {
            name: np.full((rows, num_views, *spec.tail), spec.fill, dtype=spec.dtype)
            for name, spec in param_arrays(recipe).items()
        }
        return cls(np.zeros((rows, 2), np.int32), arrays)

    def __len__(self) -> int:
        return len(self.image_hw)

    @property
    def num_views(self) -> int:
        return int(self.arrays["crop"].shape[1])

    def view(self, row: int, a: int) -> View:
        """View ``a`` of row ``row``."""
        get = self.arrays.get
        policy = get("policy")
        jitter = get("jitter")
        erase = get("erase")
        seed = get("erase_seed")
        partner = get("mix_partner")
        lam = get("mix_lam")
        center = get("mix_center")
        box = self.arrays["crop"][row, a]  # top, left, height, width
        return View(
            image_hw=(int(self.image_hw[row, 0]), int(self.image_hw[row, 1])),
            crop=(int(box[0]), int(box[1]), int(box[2]), int(box[3])),
            flip=bool(self.arrays["flip"][row, a]),
            policy=None if policy is None else policy[row, a],
            jitter=None if jitter is None else jitter[row, a],
            erase=None if erase is None else erase[row, a],
            erase_seed=0 if seed is None else int(seed[row, a]),
            mix_partner=0 if partner is None else int(partner[row, a]),
            mix_lam=BOX_STEPS if lam is None else int(lam[row, a]),
            mix_center=None if center is None else center[row, a],
        )

    def mixing(self, rows: np.ndarray, view_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For the views ``(rows[i], view_ids[i])``: the partner's row (the row itself when unmixed)
        and the weight of the view's own label (float32; 1 when unmixed)."""
        partner = self.arrays.get("mix_partner")
        if partner is None:
            return rows.copy(), np.ones(len(rows), np.float32)
        offset = partner[rows, view_ids].astype(np.int64)
        lam_code = self.arrays["mix_lam"][rows, view_ids]
        lam = lam_code / BOX_STEPS
        center = self.arrays.get("mix_center")
        if center is not None:
            centers = center[rows, view_ids]
            cut = centers[..., 0] != NOT_APPLIED
            lam = np.where(cut, cutmix_weight(cutmix_boxes(centers, lam_code)), lam)
        lam = np.where(offset != 0, lam, 1.0)
        return rows + offset, lam.astype(np.float32)

    def put(self, row: int, a: int, view: View) -> None:
        """Store ``view`` as view ``a`` of row ``row``."""
        self.image_hw[row] = view.image_hw
        values = {
            "crop": view.crop,
            "flip": view.flip,
            "policy": view.policy,
            "jitter": view.jitter,
            "erase": view.erase,
            "erase_seed": view.erase_seed,
            "mix_partner": view.mix_partner,
            "mix_lam": view.mix_lam,
            "mix_center": view.mix_center,
        }
        for name, array in self.arrays.items():
            if values[name] is not None:
                array[row, a] = values[name]


def param_problems(params: ViewParams, valid: np.ndarray, recipe: ViewRecipe) -> list[str]:
    """What is out of range in stored view parameters of a shard's rows (``valid``: bool per
    row; invalid rows are not checked): boxes outside their image, unknown op codes, partners
    that are not valid rows of the same mixing group."""
    rows = np.flatnonzero(valid)
    if not len(rows):
        return []
    a = params.arrays
    hw = params.image_hw[rows][:, None, :]
    top, left, h, w = np.moveaxis(a["crop"][rows], -1, 0)
    bad = {
        "crop box outside its image": (h <= 0)
        | (w <= 0)
        | (top < 0)
        | (left < 0)
        | (top + h > hw[..., 0])
        | (left + w > hw[..., 1]),
        "flip not 0 or 1": a["flip"][rows] > 1,
    }
    bad.update(_op_problems(a, rows, recipe))
    if recipe.mix is not None:
        bad["mix partner not a valid row of its group"] = _bad_partners(params, valid, rows, recipe)
    return [f"{int(mask.sum())} view(s): {what}" for what, mask in bad.items() if mask.any()]


def _op_problems(a: dict[str, np.ndarray], rows: np.ndarray, recipe: ViewRecipe) -> dict:
    out = {}
    if recipe.policy is not None:
        codes = a["policy"][rows]
        op = codes[..., 0] & ~np.uint8(NEGATE)
        magnitude = codes[..., 1].astype(np.int64)
        timm = recipe.policy.name == "randaugment" and recipe.policy.ops == "timm"
        top = recipe.policy.magnitude_max * LEVEL_STEPS if timm else recipe.policy.num_bins - 1
        bad = (op > len(recipe.policy.op_names)) | ((codes[..., 0] > 0) & (magnitude > top))
        out["policy op or magnitude out of range"] = bad.any(-1)
    if recipe.color_jitter is not None:
        order = a["jitter"][rows][..., 0]
        out["jitter order out of range"] = (order >= len(PERMUTATIONS)) & (order != NOT_APPLIED)
    if "erase" in a:
        box = a["erase"][rows].astype(np.int64)
        out["erase box outside the image"] = (box[..., 0] + box[..., 2] > BOX_STEPS) | (
            box[..., 1] + box[..., 3] > BOX_STEPS
        )
    if "mix_center" in a:
        center = a["mix_center"][rows]
        odd = (center == NOT_APPLIED).any(-1) & (center != NOT_APPLIED).any(-1)
        out["mix centre half set"] = odd
    return out


def _bad_partners(
    params: ViewParams, valid: np.ndarray, rows: np.ndarray, recipe: ViewRecipe
) -> np.ndarray:
    """Per checked view: a partner outside the shard, outside the row's group, or invalid."""
    offset = params.arrays["mix_partner"][rows].astype(np.int64)
    partner = rows[:, None] + offset
    size = recipe.group_size
    inside = (partner >= 0) & (partner < len(valid))
    same_group = partner // size == rows[:, None] // size
    usable = np.where(inside, valid[np.clip(partner, 0, len(valid) - 1)], False)
    return (offset != 0) & ~(inside & same_group & usable)


# ---- drawing -------------------------------------------------------------------------------------


def view_generator(seed: int, key: str, view: int) -> np.random.Generator:
    """A Philox generator keyed by ``(seed, key, view)`` only."""
    digest = hashlib.blake2b(f"{seed}\x1f{key}\x1f{view}".encode(), digest_size=16).digest()
    return np.random.Generator(np.random.Philox(key=int.from_bytes(digest, "little")))


def draw_view(
    recipe: ViewRecipe,
    seed: int,
    key: str,
    view: int,
    image_hw: tuple[int, int],
    partners: Sequence[int] = (),
) -> View:
    """View ``view`` of ``key``: every op's parameters from the ``(seed, key, view)`` generator.

    ``partners``: row offsets of the valid samples this one may be mixed with (the other valid
    rows of its group, see :func:`group_partners`); ignored without ``recipe.mix``."""
    rng = view_generator(seed, key, view)
    height, width = image_hw
    if recipe.name == "center":
        crop = center_box(height, width, recipe.crop_pct)
        flip = False
    else:
        crop = rrc_box(rng, height, width, recipe.scale, recipe.ratio)
        flip = bool(rng.random() < recipe.flip_prob)
    ops: dict[str, Any] = {}
    if recipe.policy is not None:
        ops["policy"] = draw_policy(rng, recipe.policy)
    if recipe.color_jitter is not None:
        ops["jitter"] = draw_jitter(rng, recipe.color_jitter)
    if recipe.erasing is not None:
        ops["erase"], ops["erase_seed"] = draw_erase(rng, recipe.erasing)
    if recipe.mix is not None:
        partner, lam, center = draw_mixing(recipe, seed, key, view, partners)
        center = center if recipe.mix.has_cutmix else None
        ops.update(mix_partner=partner, mix_lam=lam, mix_center=center)
    return View(image_hw=(height, width), crop=crop, flip=flip, **ops)


def draw_mixing(
    recipe: ViewRecipe, seed: int, key: str, view: int, partners: Sequence[int]
) -> tuple[int, int, np.ndarray]:
    """The mixing of view ``view`` of ``key`` (partner offset, 0 for none; lam code; CutMix
    centre), from its own generator: it does not depend on the image, only on the valid
    partners."""
    if recipe.mix is None:
        return 0, BOX_STEPS, np.full(2, NOT_APPLIED, np.uint8)
    digest = hashlib.blake2b(f"{seed}\x1f{key}\x1f{view}\x1fmix".encode(), digest_size=16)
    rng = np.random.Generator(np.random.Philox(key=int.from_bytes(digest.digest(), "little")))
    return draw_mix(rng, recipe.mix, list(partners))


def group_start(row: int, group_size: int) -> int:
    """The first row of ``row``'s mixing group: groups are ``group_size`` consecutive rows of a
    shard (0..G-1, G..2G-1, ...)."""
    return row - row % group_size


def grouped(items: Iterable[T], group_size: int) -> Iterator[tuple[int, list[T]]]:
    """``(first row, items)`` of each run of ``group_size`` consecutive items (a shard's samples
    in file order; the last group may be shorter)."""
    group: list[T] = []
    start = 0
    for row, item in enumerate(items):
        if not group:
            start = row
        group.append(item)
        if len(group) == group_size:
            yield start, group
            group = []
    if group:
        yield start, group


def draw_group(
    params: ViewParams,
    recipe: ViewRecipe,
    seed: int,
    rows: Sequence[int],
    keys: Mapping[int, str],
    image_hw: Mapping[int, tuple[int, int]],
    view_ids: Iterable[int] | None = None,
) -> None:
    """Draw every view (or those in ``view_ids``) of a mixing group's valid ``rows`` into
    ``params`` (shard rows, with their keys and decoded image sizes): what precompute stores for
    them. A view depends on ``(seed, key, view)`` and the valid rows only, so views drawn later
    (a cache grown from A to A' views) are those a cache of A' views has."""
    wanted = list(range(params.num_views) if view_ids is None else view_ids)
    for row in rows:
        partners = group_partners(row, rows)
        for a in wanted:
            params.put(row, a, draw_view(recipe, seed, keys[row], a, image_hw[row], partners))


def group_partners(row: int, valid_rows: Sequence[int]) -> list[int]:
    """Row offsets from ``row`` to the other valid rows of its group (``valid_rows``)."""
    return [other - row for other in valid_rows if other != row]


def rrc_box(
    rng: np.random.Generator, height: int, width: int, scale: tuple, ratio: tuple
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


def center_box(height: int, width: int, crop_pct: float) -> tuple[int, int, int, int]:
    """The centred square of side ``crop_pct * min(height, width)`` (timm's eval crop, in source
    pixels, so it is the same box at every output size)."""
    side = max(1, int(round(crop_pct * min(height, width))))
    return (height - side) // 2, (width - side) // 2, side, side


def center_view(image_hw: tuple[int, int], recipe: ViewRecipe) -> View:
    """The evaluation view of an image: the centre box, nothing else."""
    return View(image_hw=image_hw, crop=center_box(*image_hw, recipe.crop_pct))


# ---- rendering -----------------------------------------------------------------------------------


def render(
    image: torch.Tensor,
    view: View,
    recipe: ViewRecipe,
    rendering: Rendering,
    partner: tuple[torch.Tensor, View] | None = None,
) -> torch.Tensor:
    """The view's pixels for one model: ``uint8[C, size, size]`` from a decoded ``uint8[C, H, W]``.

    A mixed view needs ``partner``: the partner's decoded image and its view of the same index
    (whose own mixing is ignored: views mix unmixed renderings)."""
    out = render_base(image, view, recipe, rendering)
    if not view.mixed:
        return out
    if partner is None:
        raise DataError("the view is mixed with another sample but no partner image was given")
    other = render_base(partner[0], partner[1], recipe, rendering)
    return apply_mix(out, other, view.mix_lam, view.mix_box)


def render_rows(
    images: Mapping[int, torch.Tensor],
    params: ViewParams,
    rows: Sequence[int],
    recipe: ViewRecipe,
    rendering: Rendering,
    view_ids: Sequence[int] | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """All A views (or ``view_ids``) of ``rows`` for one model,
    ``uint8[len(rows) * len(view_ids), C, S, S]`` in (row, view) order; what :func:`render` gives
    view by view, with each base rendering made once and reused as a partner. ``images``: decoded
    images by shard row (partners included); ``out``: where to put them (e.g. a slice of a shared
    buffer)."""
    wanted = range(params.num_views) if view_ids is None else view_ids
    base: dict[tuple[int, int], torch.Tensor] = {}

    def base_of(row: int, a: int) -> torch.Tensor:
        if (row, a) not in base:
            base[row, a] = render_base(images[row], params.view(row, a), recipe, rendering)
        return base[row, a]

    made = []
    for row in rows:
        for a in wanted:
            view = params.view(row, a)
            image = base_of(row, a)
            if view.mixed:
                partner = base_of(row + view.mix_partner, a)
                image = apply_mix(image, partner, view.mix_lam, view.mix_box)
            made.append(image)
    return torch.stack(made, out=out)


def render_base(
    image: torch.Tensor, view: View, recipe: ViewRecipe, rendering: Rendering
) -> torch.Tensor:
    """Crop, resize, flip, policy, jitter and erasing of one image (everything but the mixing)."""
    height = int(image.shape[-2])
    width = int(image.shape[-1])
    if (height, width) != view.image_hw:
        stored = f"{view.image_hw[0]}x{view.image_hw[1]}"
        raise DataError(
            f"image is {height}x{width} but the view was made from a {stored} image: "
            "the shard changed after the cache was built"
        )
    top, left, h, w = view.crop
    size = [rendering.size, rendering.size]
    mode = INTERPOLATIONS[rendering.interpolation]
    # the image kernels directly: torchvision's dispatch costs a fifth of a 28 px resize
    out = F.resized_crop_image(image, top, left, h, w, size, interpolation=mode, antialias=True)
    if view.flip:
        out = F.horizontal_flip_image(out)
    if recipe.policy is not None and view.policy is not None:
        out = apply_policy(out, view.policy, recipe.policy, recipe.fill)
    if recipe.color_jitter is not None and view.jitter is not None:
        out = apply_jitter(out, view.jitter, recipe.color_jitter)
    if recipe.erasing is not None and view.erase is not None:
        out = apply_erase(out, view.erase, view.erase_seed, recipe.erasing, recipe.fill)
    return out


def normalize(batch: torch.Tensor, rendering: Rendering) -> torch.Tensor:
    """uint8 ``[B, C, H, W]`` -> float32 normalised by the rendering's mean and std (on the
    batch's device)."""
    mean = torch.tensor(rendering.mean, device=batch.device).view(1, -1, 1, 1) * 255.0
    std = torch.tensor(rendering.std, device=batch.device).view(1, -1, 1, 1) * 255.0
    # (x - mean) / std in place on one float copy: the same float32 arithmetic, one allocation
    # instead of three (a 224 px batch of 128 is 77 MB each; this runs in the training process)
    return batch.to(torch.float32, copy=True).sub_(mean).div_(std)


def epoch_view(seed: int, epoch: int, key: str, num_views: int) -> int:
    """The view of ``key`` to train on in ``epoch``: every view once per ``num_views`` epochs.

    A per-key permutation of the views (from ``seed`` and ``key``) is walked one step per epoch,
    so views never repeat before all were used and the choice is the same for any worker count.
    """
    if num_views == 1:
        return 0
    cycle, step = divmod(epoch, num_views)
    digest = hashlib.blake2b(f"{seed}\x1f{key}\x1f{cycle}".encode(), digest_size=8).digest()
    return int(keyed_generator(int.from_bytes(digest, "little")).permutation(num_views)[step])
