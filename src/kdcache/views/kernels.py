"""Faster kernels for the few view ops whose torchvision cost is overhead, pixel for pixel equal.

torchvision's v2 tensor kernels are the pixel contract of a view (precompute and the trainer both
render with them), but on the small images a student trains on, two of them spend most of their
time on set-up rather than pixels:

- the geometric policy ops (Rotate, ShearX/Y, TranslateX/Y) build a sampling grid per call and
  sample a ones-channel for the fill mask (~0.8 ms on a 28 px image; the sampling itself takes
  ~30 us). The grid and the sampled mask depend only on the op's argument and the image size, and
  a policy's arguments are stored codes, so both are made once per (op, argument, size) and kept
  in a bounded per-process cache; each call then samples the image alone;
- Equalize computes its histograms with a dozen small tensor ops (~0.6 ms); it is integer
  arithmetic, done here with numpy's ``bincount``.

Both reproduce torchvision's arithmetic step by step (the grid from torchvision's own helpers, the
fill as ``(sampled - fill) * mask + fill`` in float32, rounded; the equalize LUT as PIL's scheme),
and ``tests/views/test_kernels.py`` checks equality with torchvision's public functions over every
op, a range of arguments, sizes, channel counts and fills. Where torchvision's helpers are not
importable (a future release), the ops fall back to torchvision's public functions.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict

import numpy as np
import torch
from torch.nn.functional import grid_sample
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

try:  # torchvision's own grid helpers: the grid is then the one its kernels build
    from torchvision.transforms.v2.functional._geometry import (
        _affine_grid,  # pyright: ignore[reportPrivateUsage]  # same grid as affine_image
        _get_inverse_affine_matrix,  # pyright: ignore[reportPrivateUsage]  # same matrix
    )
except ImportError:  # pragma: no cover - a torchvision without them: public functions only
    _affine_grid = None
    _get_inverse_affine_matrix = None

GEOMETRIC = ("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY")
"""Policy ops that resample the image through a grid."""
GRID_CACHE_BYTES = 64 * 2**20
"""Per-process bound of the grid cache (a 28 px grid and mask are 9 KB, a 224 px pair 600 KB)."""


class _Grids:
    """Least-recently-used (grid, mask) pairs by (op, argument, height, width), bounded in bytes;
    safe to share between threads (precompute renders in a background thread)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.bytes = 0
        self.entries: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, name: str, value: float, height: int, width: int):
        key = (name, value, height, width)
        with self.lock:
            found = self.entries.get(key)
            if found is not None:
                self.entries.move_to_end(key)
                return found
        made = _grid_and_mask(name, value, height, width)  # outside the lock: it takes a while
        with self.lock:
            if key not in self.entries:
                self.entries[key] = made
                self.bytes += _nbytes(made)
            while self.bytes > self.limit and len(self.entries) > 1:
                _, dropped = self.entries.popitem(last=False)
                self.bytes -= _nbytes(dropped)
        return made


def _nbytes(tensors: tuple[torch.Tensor, ...]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


_GRIDS = _Grids(GRID_CACHE_BYTES)


def warp(image: torch.Tensor, name: str, value: float, fill: list[float]) -> torch.Tensor:
    """A geometric policy op on ``uint8[C, H, W]``, bilinear, ``fill`` outside the image: equal to
    torchvision's ``rotate`` / ``affine`` as :func:`~kdcache.views.augment.apply_op` calls them."""
    height, width = int(image.shape[-2]), int(image.shape[-1])
    if _affine_grid is None or _needs_public(name, value, height, width):
        return _public_warp(image, name, value, fill)
    grid, mask = _GRIDS.get(name, value, height, width)
    sampled = grid_sample(
        image.to(torch.float32).unsqueeze(0),
        grid,
        mode="bilinear",
        padding_mode="zeros",
        align_corners=False,
    )
    colour = torch.tensor(fill, dtype=torch.float32).view(1, -1, 1, 1)
    # torchvision's fill: sampled * mask + (1 - mask) * fill, computed as below, then rounded
    out = sampled.sub_(colour).mul_(mask).add_(colour)
    return out.round_().to(image.dtype)[0]


def _needs_public(name: str, value: float, height: int, width: int) -> bool:
    """Rotations torchvision does without a grid (multiples of 90 degrees) go to it."""
    if name != "Rotate":
        return False
    angle = value % 360
    return angle in (0, 180) or (angle in (90, 270) and height == width)


def _public_warp(image: torch.Tensor, name: str, value: float, fill: list[float]) -> torch.Tensor:
    """The op through torchvision's public functions (the reference :func:`warp` equals)."""
    bilinear = InterpolationMode.BILINEAR
    if name == "Rotate":
        return F.rotate(image, value, interpolation=bilinear, fill=fill)
    translate, shear, center = _affine_args(name, value, int(image.shape[-2]), int(image.shape[-1]))
    return F.affine(
        image,
        angle=0.0,
        translate=translate,
        scale=1.0,
        shear=shear,
        interpolation=bilinear,
        fill=fill,
        center=center,
    )


def _affine_args(
    name: str, value: float, height: int, width: int
) -> tuple[list[float], list[float], list[float] | None]:
    """(translate, shear in degrees, centre) of a shear or translation, as apply_op passes them:
    shears about the top-left corner, translations by whole pixels."""
    if name == "ShearX":
        return [0.0, 0.0], [math.degrees(math.atan(value)), 0.0], [0.0, 0.0]
    if name == "ShearY":
        return [0.0, 0.0], [0.0, math.degrees(math.atan(value))], [0.0, 0.0]
    if name == "TranslateX":
        return [float(int(round(value * width))), 0.0], [0.0, 0.0], None
    return [0.0, float(int(round(value * height)))], [0.0, 0.0], None


def _grid_and_mask(
    name: str, value: float, height: int, width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The sampling grid ``[1, H, W, 2]`` of the op and the bilinear-sampled ones-mask
    ``[1, 1, H, W]`` (the weight of the image, not the fill, at each output pixel)."""
    if _affine_grid is None or _get_inverse_affine_matrix is None:
        raise RuntimeError("torchvision's grid helpers are not importable")
    if name == "Rotate":  # torchvision's rotate inverts the angle's direction for its matrix
        matrix = _get_inverse_affine_matrix([0.0, 0.0], -(value % 360), [0.0, 0.0], 1.0, [0.0, 0.0])
    else:
        translate, shear, center = _affine_args(name, value, height, width)
        # centre in pixels, moved so (0, 0) is the image centre, as affine_image does
        centre = [0.0, 0.0] if center is None else [-width * 0.5, -height * 0.5]
        matrix = _get_inverse_affine_matrix(centre, 0.0, translate, 1.0, shear)
    theta = torch.tensor(matrix, dtype=torch.float32).reshape(1, 2, 3)
    grid = _affine_grid(theta, w=width, h=height, ow=width, oh=height)
    ones = torch.ones((1, 1, height, width), dtype=torch.float32)
    mask = grid_sample(ones, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return grid, mask


def equalize(image: torch.Tensor) -> torch.Tensor:
    """Histogram equalisation of ``uint8[C, H, W]`` per channel: torchvision's ``equalize`` (PIL's
    LUT scheme) in numpy integer arithmetic."""
    pixels = image.numpy().reshape(image.shape[0], -1)
    out = np.empty_like(pixels)
    for channel, values in enumerate(pixels):
        out[channel] = _equalize_lut(values)[values]
    return torch.from_numpy(out.reshape(image.shape))


def _equalize_lut(values: np.ndarray) -> np.ndarray:
    """The uint8 LUT of one channel: ``lut[k] = (cum[k - 1] + step // 2) // step`` clipped, with
    ``step`` the pixels outside the top bin over 255; identity when ``step`` is 0."""
    hist = np.bincount(values, minlength=256).astype(np.int64)
    cumulative = np.cumsum(hist)
    top = int(np.argmax(cumulative))  # the first bin reaching the total: the last non-empty one
    step = (values.size - int(hist[top])) // 255
    if step == 0:
        return np.arange(256, dtype=np.uint8)
    lut = np.zeros(256, dtype=np.int64)
    lut[1:] = (cumulative[:-1] + step // 2) // step
    return np.clip(lut, 0, 255).astype(np.uint8)
