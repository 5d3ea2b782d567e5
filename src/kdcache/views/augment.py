"""Strong augmentation as stored parameters: a policy (RandAugment, TrivialAugmentWide), colour
jitter, random erasing, Mixup and CutMix.

Each op family has a config, a ``draw_*`` function that turns a counter generator into small
integer codes (what the cache stores per view), and an ``apply_*`` function that turns a
``uint8[C, H, W]`` image and the codes into the augmented image with torchvision's v2 kernels
(the geometric ops and Equalize through :mod:`~kdcache.views.kernels`: the same pixels, faster).
Codes never depend on the output resolution: magnitudes are levels or bins, translations and
boxes are fractions of the image side, so each model may render a view at its own size.
Precompute and the trainer call the same ``apply_*`` functions, so both see the same pixels.

Code layouts (all ``uint8`` unless said otherwise):

- policy ``[N, 2]``: ``(op, magnitude)`` per op slot; ``op`` is 0 for a slot whose op was not
  applied, else ``1 + index`` into the op set with bit 7 set when the op's value is negated;
  ``magnitude`` is the level in 1/8 steps (timm op sets) or the magnitude bin (torchvision op
  sets, TrivialAugmentWide).
- jitter ``[5]``: the order of (brightness, contrast, saturation, hue) as an index into the 24
  permutations (255: jitter not applied), then each factor as a code ``0..31`` spanning its
  range (``lo + (hi - lo) * code / 31``: 32 levels, 5 bits that compress to their entropy).
- erase ``[4]``: box ``(top, left, height, width)`` in 1/255 of the image side (height 0: no
  box), and a ``uint16`` seed of the random fill (``rand``: one colour, ``pixel``: every pixel;
  uniform over 0..255 from the Philox generator's raw stream, which numpy keeps stable).
- mix: the partner's row offset within the shard (``int8``, or ``int16`` for groups over 128
  rows; 0: not mixed); ``lam`` in 1/255 steps: for Mixup the weight of the view's own image and
  label, for CutMix the drawn lam that sets the pasted square's side, ``sqrt(1 - lam)``; and for
  CutMix the square's centre ``(cy, cx)`` in 1/254 of the side (255: a Mixup view). The pasted box
  is the square clipped to the image (:func:`cutmix_boxes`), and a CutMix view's label weight is
  one minus its area (timm's ``correct_lam``).
"""

from __future__ import annotations

import itertools
import math
import threading
from typing import Literal

import numpy as np
import torch
from pydantic import Field, model_validator
from torchvision.transforms.v2 import functional as F

from kdcache.core.config import StrictModel
from kdcache.views.kernels import GEOMETRIC, equalize, warp

LEVEL_STEPS = 8
"""timm op sets store the (noisy, continuous) magnitude level in 1/8 steps: 0 .. 31.875."""
NEGATE = 0x80
"""Bit 7 of a policy op code: the op's value is negated (random sign, as timm and torchvision)."""
BOX_STEPS = 255
"""Boxes and lam are stored in 1/255 steps."""
NOT_APPLIED = 255
"""Jitter order code of a view without jitter; also the CutMix centre code of a Mixup view."""
CENTER_STEPS = 254
"""CutMix centres are stored in 1/254 steps of the side (0..254; 255 marks Mixup)."""
PERMUTATIONS = tuple(itertools.permutations(range(4)))
"""The 24 orders of (brightness, contrast, saturation, hue); a jitter code indexes this."""
PERMUTATION_CODES = {order: code for code, order in enumerate(PERMUTATIONS)}
JITTER_STEPS = 31
"""Jitter factors are drawn on 32 levels of their range (codes 0..31)."""
SEED_LIMIT = 2**16
"""Random erasing fills come from one of this many seeds (stored as uint16)."""

TIMM_OPS = (
    "AutoContrast",
    "Equalize",
    "Invert",
    "Rotate",
    "Posterize",
    "Solarize",
    "SolarizeAdd",
    "Color",
    "Contrast",
    "Brightness",
    "Sharpness",
    "ShearX",
    "ShearY",
    "TranslateX",
    "TranslateY",
)
"""timm's RandAugment set (``_RAND_TRANSFORMS``; translations relative, 0.45 of the side)."""
TORCHVISION_OPS = (
    "Identity",
    "ShearX",
    "ShearY",
    "TranslateX",
    "TranslateY",
    "Rotate",
    "Brightness",
    "Color",
    "Contrast",
    "Sharpness",
    "Posterize",
    "Solarize",
    "AutoContrast",
    "Equalize",
)
"""torchvision's RandAugment and TrivialAugmentWide sets (their ``_AUGMENTATION_SPACE``)."""
OP_SETS = {"timm": TIMM_OPS, "torchvision": TORCHVISION_OPS}
ENHANCE = {"Brightness", "Color", "Contrast", "Sharpness"}


# ---- configs -------------------------------------------------------------------------------------


class PolicyConfig(StrictModel):
    """An automatic augmentation policy applied after the crop and flip."""

    name: Literal["randaugment", "trivialaugment"] = "randaugment"
    """``randaugment`` (N ops per view) or ``trivialaugment`` (TrivialAugmentWide: one op, a
    random magnitude bin, torchvision's wide ranges)."""
    ops: Literal["timm", "torchvision"] = "timm"
    """randaugment: timm's op set and level scale (``rand-m9-n2-mstd0.5``), or torchvision's
    ``RandAugment`` (magnitude bins, every op applied)."""
    num_ops: int = Field(default=2, ge=1, le=8)
    """randaugment: ops per view (timm ``n``), drawn with replacement."""
    magnitude: float = Field(default=9.0, ge=0.0)
    """randaugment: timm level (``m``, 0..``magnitude_max``) or torchvision bin (0..num_bins-1)."""
    magnitude_std: float = Field(default=0.5, ge=0.0)
    """timm: std of the per-op magnitude noise (``mstd``); 0 keeps it fixed; above 100 draws the
    level uniformly in ``[0, magnitude]`` (timm's ``mstd`` > 100)."""
    magnitude_max: float = Field(default=10.0, gt=0.0, le=31.0)
    """timm: upper clip of the noisy level (``mmax``)."""
    prob: float = Field(default=0.5, ge=0.0, le=1.0)
    """timm: probability that each chosen op is applied (``p``); torchvision applies every op."""
    increasing: bool = False
    """timm: the ``inc1`` op variants, whose severity increases with the level (DeiT's recipe)."""
    num_bins: int = Field(default=31, ge=2, le=255)
    """torchvision and trivialaugment: number of magnitude bins."""

    @model_validator(mode="after")
    def _check(self) -> PolicyConfig:
        torchvision = self.name == "randaugment" and self.ops == "torchvision"
        if torchvision and (
            self.magnitude != int(self.magnitude) or self.magnitude >= self.num_bins
        ):
            raise ValueError(
                f"torchvision magnitude must be a bin 0..{self.num_bins - 1}, "
                f"found {self.magnitude}"
            )
        if self.ops == "timm" and self.magnitude > self.magnitude_max and self.magnitude_std <= 100:
            raise ValueError(
                f"magnitude {self.magnitude} is above magnitude_max {self.magnitude_max}"
            )
        return self

    @property
    def slots(self) -> int:
        """Op slots stored per view."""
        return 1 if self.name == "trivialaugment" else self.num_ops

    @property
    def op_names(self) -> tuple[str, ...]:
        return TORCHVISION_OPS if self.name == "trivialaugment" else OP_SETS[self.ops]


def parse_timm_policy(text: str) -> PolicyConfig:
    """A :class:`PolicyConfig` from timm's RandAugment string, e.g. ``rand-m9-mstd0.5-inc1``."""
    parts = text.split("-")
    if parts[0] != "rand":
        raise ValueError(
            f"expected a timm RandAugment string starting with 'rand-', found {text!r}"
        )
    fields: dict[str, object] = {
        "name": "randaugment",
        "ops": "timm",
        "magnitude": 10.0,
        "magnitude_std": 0.0,
    }
    keys = {
        "m": "magnitude",
        "n": "num_ops",
        "mstd": "magnitude_std",
        "mmax": "magnitude_max",
        "p": "prob",
        "inc": "increasing",
    }
    for part in parts[1:]:
        key = part.rstrip("0123456789.")
        if key not in keys or key == part:
            raise ValueError(
                f"{text!r}: unknown section {part!r} (known: m, n, mstd, mmax, p, inc)"
            )
        value = float(part[len(key) :])
        fields[keys[key]] = bool(value) if key == "inc" else int(value) if key == "n" else value
    return PolicyConfig.model_validate(fields)


class JitterConfig(StrictModel):
    """torchvision's ColorJitter: each factor uniform in its range, the four in a random order."""

    brightness: float = Field(default=0.4, ge=0.0)
    """Brightness factor in ``[max(0, 1 - b), 1 + b]``."""
    contrast: float = Field(default=0.4, ge=0.0)
    saturation: float = Field(default=0.4, ge=0.0)
    hue: float = Field(default=0.0, ge=0.0, le=0.5)
    """Hue shift in ``[-h, h]`` (fraction of the colour wheel)."""
    prob: float = Field(default=1.0, ge=0.0, le=1.0)
    """Probability that a view is jittered at all."""

    def ranges(self) -> list[tuple[float, float]]:
        """(lo, hi) of brightness, contrast, saturation and hue."""
        factors = [
            (max(0.0, 1 - v), 1 + v) for v in (self.brightness, self.contrast, self.saturation)
        ]
        return [*factors, (-self.hue, self.hue)]


class ErasingConfig(StrictModel):
    """timm's RandomErasing (one box): area and log-uniform aspect ratio of the image."""

    prob: float = Field(default=0.25, ge=0.0, le=1.0)
    """Probability that a view gets a box (timm ``reprob``)."""
    area: tuple[float, float] = (0.02, 1 / 3)
    """Range of the box's area as a fraction of the image."""
    aspect: tuple[float, float] = (0.3, 1 / 0.3)
    """Range of the box's aspect ratio (height / width), drawn log-uniformly."""
    mode: Literal["const", "rand", "pixel"] = "pixel"
    """Fill: the recipe's mean colour (``const``), one random colour (``rand``) or random pixels
    (``pixel``, timm's ``remode``); random fills are uniform over 0..255, replayed from a seed."""

    @model_validator(mode="after")
    def _check(self) -> ErasingConfig:
        if not 0 < self.area[0] <= self.area[1] < 1:
            raise ValueError(f"area must satisfy 0 < min <= max < 1, found {self.area}")
        if not 0 < self.aspect[0] <= self.aspect[1]:
            raise ValueError(f"aspect must satisfy 0 < min <= max, found {self.aspect}")
        return self


class MixConfig(StrictModel):
    """Mixup and CutMix per view (timm's ``elem`` mode), with a partner from the same shard.

    The partner is another valid sample of the same group of ``group_size`` consecutive samples
    of the shard, so a streaming reader holds both images; the teacher sees the mixed image."""

    mixup_alpha: float = Field(default=0.8, ge=0.0)
    """Beta(alpha, alpha) of Mixup's lam; 0 disables Mixup."""
    cutmix_alpha: float = Field(default=1.0, ge=0.0)
    """Beta(alpha, alpha) of CutMix's lam; 0 disables CutMix."""
    switch_prob: float = Field(default=0.5, ge=0.0, le=1.0)
    """With both enabled: probability of CutMix instead of Mixup."""
    prob: float = Field(default=1.0, ge=0.0, le=1.0)
    """Probability that a view is mixed at all."""
    group_size: int = Field(default=64, ge=2, le=4096)
    """Partners come from the same group of this many consecutive samples of a shard."""

    @model_validator(mode="after")
    def _check(self) -> MixConfig:
        if self.mixup_alpha == 0 and self.cutmix_alpha == 0:
            raise ValueError("mixup_alpha and cutmix_alpha are both 0: set one, or leave mix out")
        return self

    @property
    def has_cutmix(self) -> bool:
        return self.cutmix_alpha > 0


class UnseenOps(StrictModel):
    """Augmentation of the student's view that the teacher never saw (drawn afresh each epoch,
    not stored): it breaks the consistency the cache exists for, so it is opt-in."""

    policy: PolicyConfig | None = None
    color_jitter: JitterConfig | None = None
    erasing: ErasingConfig | None = None

    @model_validator(mode="after")
    def _check(self) -> UnseenOps:
        if self.policy is None and self.color_jitter is None and self.erasing is None:
            raise ValueError("name at least one of policy, color_jitter, erasing (or leave it out)")
        return self

    def describe(self) -> str:
        parts = [name for name in ("policy", "color_jitter", "erasing") if getattr(self, name)]
        return " + ".join(parts)


def apply_unseen(
    image: torch.Tensor, ops: UnseenOps, rng: np.random.Generator, fill: list[float]
) -> torch.Tensor:
    """Draw and apply :class:`UnseenOps` to one rendered view."""
    if ops.policy is not None:
        image = apply_policy(image, draw_policy(rng, ops.policy), ops.policy, fill)
    if ops.color_jitter is not None:
        image = apply_jitter(image, draw_jitter(rng, ops.color_jitter), ops.color_jitter)
    if ops.erasing is not None:
        box, seed = draw_erase(rng, ops.erasing)
        image = apply_erase(image, box, seed, ops.erasing, fill)
    return image


# ---- drawing codes -------------------------------------------------------------------------------


def draw_policy(rng: np.random.Generator, cfg: PolicyConfig) -> np.ndarray:
    """``uint8[slots, 2]`` op codes and magnitudes of one view."""
    out = np.zeros((cfg.slots, 2), np.uint8)
    names = cfg.op_names
    for slot in range(cfg.slots):
        op = int(rng.integers(len(names)))
        if cfg.name == "trivialaugment":
            magnitude = int(rng.integers(cfg.num_bins))
            applied = True
        elif cfg.ops == "torchvision":
            magnitude = int(cfg.magnitude)
            applied = True
        else:
            applied = rng.random() < cfg.prob
            magnitude = _timm_level_code(rng, cfg)
        negate = rng.random() < 0.5
        if applied:
            out[slot] = (op + 1) | (NEGATE if negate else 0), magnitude
    return out


def _timm_level_code(rng: np.random.Generator, cfg: PolicyConfig) -> int:
    """timm's noisy level (``gauss(m, mstd)``, or uniform for mstd > 100) clipped to
    ``[0, mmax]``, in 1/8 steps."""
    level = cfg.magnitude
    if cfg.magnitude_std > 100:
        level = rng.uniform(0, cfg.magnitude)
    elif cfg.magnitude_std > 0:
        level = rng.normal(cfg.magnitude, cfg.magnitude_std)
    level = min(max(level, 0.0), cfg.magnitude_max)
    return int(round(level * LEVEL_STEPS))


def draw_jitter(rng: np.random.Generator, cfg: JitterConfig) -> np.ndarray:
    """``uint8[5]``: order index (255: not applied) and the four factor codes.

    Codes that change no pixel are stored in one canonical form so that they cost no bytes on
    disk: an adjustment whose range is a single value (e.g. ``hue: 0``) has code 0 and comes
    after the active ones in the order, and a view without jitter has all codes 0. The
    generator is consumed the same way whatever the config, so other ops' draws do not move."""
    out = np.zeros(5, np.uint8)
    applied = rng.random() < cfg.prob
    order = int(rng.integers(len(PERMUTATIONS)))
    factors = rng.integers(0, JITTER_STEPS + 1, 4)
    if not applied:
        out[0] = NOT_APPLIED
        return out
    active = [lo != hi for lo, hi in cfg.ranges()]
    out[1:] = np.where(active, factors, 0)
    out[0] = canonical_order(order, active)
    return out


def canonical_order(order: int, active: list[bool]) -> int:
    """The order code that applies the active adjustments in ``order``'s sequence, followed by
    the inactive ones in index order (which :func:`apply_jitter` skips)."""
    sequence = PERMUTATIONS[order]
    first = [i for i in sequence if active[i]]
    rest = [i for i in range(len(active)) if not active[i]]
    return PERMUTATION_CODES[(*first, *rest)]


def draw_erase(rng: np.random.Generator, cfg: ErasingConfig) -> tuple[np.ndarray, int]:
    """(``uint8[4]`` box in 1/255 of the side, height 0 for none; ``uint32`` fill seed)."""
    box = np.zeros(4, np.uint8)
    seed = int(rng.integers(0, SEED_LIMIT))
    if rng.random() >= cfg.prob:
        return box, 0
    log_aspect = (math.log(cfg.aspect[0]), math.log(cfg.aspect[1]))
    for _ in range(10):  # timm's 10 attempts
        area = rng.uniform(cfg.area[0], cfg.area[1])
        aspect = math.exp(rng.uniform(*log_aspect))
        h = int(round(math.sqrt(area * aspect) * BOX_STEPS))
        w = int(round(math.sqrt(area / aspect) * BOX_STEPS))
        if 0 < h < BOX_STEPS and 0 < w < BOX_STEPS:
            top = int(rng.integers(0, BOX_STEPS - h + 1))
            left = int(rng.integers(0, BOX_STEPS - w + 1))
            box[:] = top, left, h, w
            return box, seed if cfg.mode != "const" else 0
    return box, 0


def draw_mix(
    rng: np.random.Generator, cfg: MixConfig, offsets: list[int]
) -> tuple[int, int, np.ndarray]:
    """(partner row offset, 0 for none; lam code; ``uint8[2]`` CutMix centre, 255s for Mixup).

    ``offsets``: row offsets (from this row) of the valid partners in this row's group."""
    center = np.full(2, NOT_APPLIED, np.uint8)
    applied = rng.random() < cfg.prob
    cutmix = cfg.mixup_alpha == 0 or (cfg.cutmix_alpha > 0 and rng.random() < cfg.switch_prob)
    alpha = cfg.cutmix_alpha if cutmix else cfg.mixup_alpha
    lam = float(rng.beta(alpha, alpha))
    pick = int(rng.integers(len(offsets))) if offsets else 0
    if not applied or not offsets:
        return 0, BOX_STEPS, center
    if cutmix:
        center[:] = rng.integers(0, CENTER_STEPS + 1, 2)
    return offsets[pick], int(round(lam * BOX_STEPS)), center


def cutmix_boxes(center: np.ndarray, lam_code: np.ndarray | int) -> np.ndarray:
    """CutMix boxes ``(top, left, height, width)`` in 1/255 steps of the side, ``int64[..., 4]``,
    from stored centres ``[..., 2]`` and lam codes ``[...]``: the square of side ``sqrt(1 - lam)``
    around the centre, clipped to the image (numpy's IEEE arithmetic: the same box everywhere)."""
    if np.ndim(center) == 1 and np.ndim(lam_code) == 0:
        return _cutmix_box(int(center[0]), int(center[1]), int(lam_code))
    side = np.sqrt(1.0 - np.asarray(lam_code, np.float64) / BOX_STEPS)[..., None]
    mid = np.asarray(center, np.float64) / CENTER_STEPS
    low = np.rint(np.clip(mid - side / 2, 0.0, 1.0) * BOX_STEPS).astype(np.int64)
    high = np.rint(np.clip(mid + side / 2, 0.0, 1.0) * BOX_STEPS).astype(np.int64)
    return np.concatenate([low, high - low], axis=-1)


def _cutmix_box(cy: int, cx: int, lam_code: int) -> np.ndarray:
    """One view's box by Python floats: the same IEEE operations as the array path (sqrt and
    division correctly rounded, ``round`` halves to even as ``np.rint``), ten times faster."""
    side = math.sqrt(1.0 - lam_code / BOX_STEPS)
    out = []
    for mid in (cy / CENTER_STEPS, cx / CENTER_STEPS):
        low = round(min(max(mid - side / 2, 0.0), 1.0) * BOX_STEPS)
        high = round(min(max(mid + side / 2, 0.0), 1.0) * BOX_STEPS)
        out.append((low, high - low))
    return np.array([out[0][0], out[1][0], out[0][1], out[1][1]], np.int64)


def cutmix_weight(box: np.ndarray) -> np.ndarray:
    """The own label's weight of CutMix views: one minus the pasted box's area."""
    return 1.0 - box[..., 2] * box[..., 3] / float(BOX_STEPS**2)


# ---- applying codes ------------------------------------------------------------------------------


def apply_policy(
    image: torch.Tensor, codes: np.ndarray, cfg: PolicyConfig, fill: list[float]
) -> torch.Tensor:
    """The policy's ops of one view, in slot order (skipped slots have op code 0)."""
    names = cfg.op_names
    for op_code, magnitude in codes:
        if op_code == 0:
            continue
        name = names[(int(op_code) & ~NEGATE) - 1]
        negate = bool(int(op_code) & NEGATE)
        image = apply_op(image, name, op_value(name, int(magnitude), negate, cfg), fill)
    return image


def op_value(name: str, magnitude: int, negate: bool, cfg: PolicyConfig) -> float:
    """The op's argument from its stored magnitude code (translations as fractions of the side)."""
    if cfg.name == "randaugment" and cfg.ops == "timm":
        return _timm_value(name, magnitude / LEVEL_STEPS, negate, cfg.increasing)
    return _bin_value(name, magnitude, negate, cfg.num_bins, wide=cfg.name == "trivialaugment")


def _timm_value(name: str, level: float, negate: bool, increasing: bool) -> float:
    """timm's ``LEVEL_TO_ARG`` (``_LEVEL_DENOM`` = 10) of ``level``."""
    frac = level / 10.0
    sign = -1.0 if negate else 1.0
    if name == "Rotate":
        return sign * frac * 30.0
    if name in ("ShearX", "ShearY"):
        return sign * frac * 0.3
    if name in ("TranslateX", "TranslateY"):
        return sign * frac * 0.45
    if name == "Posterize":
        bits = int(frac * 4)
        return 4 - bits if increasing else bits
    if name == "Solarize":
        threshold = min(256, int(frac * 256))
        return 256 - threshold if increasing else threshold
    if name == "SolarizeAdd":
        return min(128, int(frac * 110))
    if name in ENHANCE:
        return max(0.1, 1.0 + sign * frac * 0.9) if increasing else frac * 1.8 + 0.1
    return 0.0


def _bin_value(name: str, bin_: int, negate: bool, bins: int, wide: bool) -> float:
    """torchvision's ``_AUGMENTATION_SPACE`` (RandAugment, or TrivialAugmentWide's wide ranges).

    TrivialAugmentWide translates by up to 32 pixels; here that is 32/224 of the side."""
    frac = bin_ / (bins - 1)
    sign = -1.0 if negate else 1.0
    shear = 0.99 if wide else 0.3
    translate = 32 / 224 if wide else 150 / 331
    rotate = 135.0 if wide else 30.0
    top = {"ShearX": shear, "ShearY": shear, "TranslateX": translate, "TranslateY": translate}
    top["Rotate"] = rotate
    if name in top:
        return sign * frac * top[name]
    if name in ENHANCE:
        return 1.0 + sign * frac * (0.99 if wide else 0.9)
    if name == "Posterize":
        return int(round(8 - bin_ / ((bins - 1) / (6 if wide else 4))))
    if name == "Solarize":
        return (1.0 - frac) * 255.0
    return 0.0


def apply_op(image: torch.Tensor, name: str, value: float, fill: list[float]) -> torch.Tensor:
    """One policy op on ``uint8[C, H, W]`` (bilinear geometry, ``fill`` outside the image):
    torchvision's kernels, the geometric ops and Equalize through :mod:`~kdcache.views.kernels`
    (the same pixels, without the per-call set-up)."""
    if name in GEOMETRIC:
        return warp(image, name, value, fill)
    return _apply_pixel_op(image, name, value)


def _apply_pixel_op(image: torch.Tensor, name: str, value: float) -> torch.Tensor:
    """A pixel op through torchvision's image kernels (called directly: the dispatch of
    ``F.adjust_*`` to them costs as much as the op on a small image)."""
    if name == "Brightness":
        return F.adjust_brightness_image(image, value)
    if name == "Color":
        return F.adjust_saturation_image(image, value)
    if name == "Contrast":
        return F.adjust_contrast_image(image, value)
    if name == "Sharpness":
        return F.adjust_sharpness_image(image, value)
    if name == "Posterize":
        return F.posterize_image(image, int(value)) if value < 8 else image
    if name == "Solarize":
        return F.solarize_image(image, value) if value <= 255 else image
    if name == "SolarizeAdd":
        added = (image.to(torch.int16) + int(value)).clamp_max(255).to(torch.uint8)
        return torch.where(image < 128, added, image)
    if name == "AutoContrast":
        return F.autocontrast_image(image)
    if name == "Equalize":
        return equalize(image)
    if name == "Invert":
        return F.invert_image(image)
    return image  # Identity


def apply_jitter(image: torch.Tensor, codes: np.ndarray, cfg: JitterConfig) -> torch.Tensor:
    """Colour jitter of one view: the four adjustments in the stored order (255: none)."""
    if int(codes[0]) == NOT_APPLIED:
        return image
    ranges = cfg.ranges()
    for which in PERMUTATIONS[int(codes[0])]:
        lo, hi = ranges[which]
        if lo == hi:  # a single value: this adjustment changes nothing
            continue
        factor = lo + (hi - lo) * int(codes[1 + which]) / JITTER_STEPS
        image = _JITTER[which](image, factor)
    return image


_JITTER = (
    F.adjust_brightness_image,
    F.adjust_contrast_image,
    F.adjust_saturation_image,
    F.adjust_hue_image,
)


def pixel_box(box: np.ndarray, height: int, width: int) -> tuple[int, int, int, int]:
    """A stored box (1/255 of the side) in pixels of an ``height x width`` rendering."""
    top = int(round(int(box[0]) * height / BOX_STEPS))
    left = int(round(int(box[1]) * width / BOX_STEPS))
    bottom = int(round((int(box[0]) + int(box[2])) * height / BOX_STEPS))
    right = int(round((int(box[1]) + int(box[3])) * width / BOX_STEPS))
    return top, left, bottom - top, right - left


def apply_erase(
    image: torch.Tensor, box: np.ndarray, seed: int, cfg: ErasingConfig, fill: list[float]
) -> torch.Tensor:
    """Random erasing of one view: the stored box filled as ``cfg.mode`` says."""
    if int(box[2]) == 0:
        return image
    channels, height, width = (int(s) for s in image.shape)
    top, left, h, w = pixel_box(box, height, width)
    if h == 0 or w == 0:
        return image
    out = image.clone()
    if cfg.mode == "const":
        patch = torch.tensor([round(v) for v in fill], dtype=torch.uint8).view(-1, 1, 1)
    else:
        count = channels * h * w if cfg.mode == "pixel" else channels
        shape = (channels, h, w) if cfg.mode == "pixel" else (channels, 1, 1)
        patch = torch.from_numpy(random_bytes(seed, count).reshape(shape))
    out[:, top : top + h, left : left + w] = patch
    return out


def random_bytes(seed: int, count: int) -> np.ndarray:
    """``count`` uniform bytes from Philox's raw 64-bit stream (stable across numpy versions)."""
    words = keyed_generator(seed).bit_generator.random_raw((count + 7) // 8)
    return np.asarray(words, dtype="<u8").view(np.uint8)[:count].copy()


_PHILOX = threading.local()


def keyed_generator(key: int) -> np.random.Generator:
    """``Generator(Philox(key=key))`` for a 64-bit ``key``, made by resetting one thread-local
    Philox to that key's fresh state: the same stream without the constructor's 35 us (the
    trainer needs one per sample per epoch). Valid until the thread's next call."""
    made = getattr(_PHILOX, "generator", None)
    if made is None:
        made = _PHILOX.generator = np.random.Generator(np.random.Philox(key=0))
    made.bit_generator.state = {
        "bit_generator": "Philox",
        # a fresh Philox: counter 0, the key's two 64-bit words (the high one 0), buffer empty
        "state": {"counter": np.zeros(4, np.uint64), "key": np.array([key, 0], np.uint64)},
        "buffer": np.zeros(4, np.uint64),
        "buffer_pos": 4,
        "has_uint32": 0,
        "uinteger": 0,
    }
    return made


def apply_mix(
    image: torch.Tensor, partner: torch.Tensor, lam_code: int, box: np.ndarray
) -> torch.Tensor:
    """Mixup (``lam * image + (1 - lam) * partner``, rounded to uint8) or CutMix (the partner's
    pixels inside ``box``) of two renderings of the same size."""
    if int(box[2]) > 0 and int(box[3]) > 0:
        top, left, h, w = pixel_box(box, int(image.shape[-2]), int(image.shape[-1]))
        out = image.clone()
        out[:, top : top + h, left : left + w] = partner[:, top : top + h, left : left + w]
        return out
    lam = lam_code / BOX_STEPS
    mixed = image.to(torch.float32) * lam + partner.to(torch.float32) * (1.0 - lam)
    return mixed.round_().clamp_(0, 255).to(torch.uint8)
