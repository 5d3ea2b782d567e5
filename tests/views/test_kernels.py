"""The fast view kernels give torchvision's pixels exactly: caches rendered with torchvision's
kernels replay unchanged, and precompute and the trainer keep seeing the same image."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from kdcache.views import kernels
from kdcache.views.augment import LEVEL_STEPS, PolicyConfig, apply_op, op_value

SIZES = [(28, 28), (17, 31), (64, 48)]


def reference(image: torch.Tensor, name: str, value: float, fill: list[float]) -> torch.Tensor:
    """The op as torchvision's public functions compute it (what views rendered before)."""
    height, width = int(image.shape[-2]), int(image.shape[-1])
    bilinear = InterpolationMode.BILINEAR
    if name == "Rotate":
        return F.rotate(image, value, interpolation=bilinear, fill=fill)
    if name in ("ShearX", "ShearY"):
        degrees = math.degrees(math.atan(value))
        shear = [degrees, 0.0] if name == "ShearX" else [0.0, degrees]
        return F.affine(
            image, 0.0, [0, 0], 1.0, shear, interpolation=bilinear, fill=fill, center=[0, 0]
        )
    if name in ("TranslateX", "TranslateY"):
        shift = (
            [int(round(value * width)), 0]
            if name == "TranslateX"
            else [0, int(round(value * height))]
        )
        return F.affine(image, 0.0, shift, 1.0, [0.0, 0.0], interpolation=bilinear, fill=fill)
    if name == "Equalize":
        return F.equalize(image)
    raise AssertionError(name)


def _images(channels: int, height: int, width: int, seed: int) -> list[torch.Tensor]:
    """Noise, a smooth ramp, a constant and a two-level image (the LUT's edge cases)."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randint(0, 256, (channels, height, width), generator=g, dtype=torch.uint8)
    ramp = torch.linspace(0, 255, height * width).round().to(torch.uint8)
    ramp = ramp.view(1, height, width).expand(channels, -1, -1).contiguous()
    flat = torch.full((channels, height, width), 77, dtype=torch.uint8)
    two = torch.where(noise > 200, 250, 3).to(torch.uint8)
    return [noise, ramp, flat, two]


def _values(name: str) -> list[float]:
    """Arguments the op sets store for ``name``: timm levels over their whole range, and
    torchvision's RandAugment and TrivialAugmentWide bins (wide shears and rotations), both
    signs."""
    timm = PolicyConfig(name="randaugment", ops="timm")
    torchvision = PolicyConfig(name="randaugment", ops="torchvision")
    wide = PolicyConfig(name="trivialaugment")
    stored = [(timm, code) for code in range(0, 32 * LEVEL_STEPS, 29)]
    stored += [(cfg, bin_) for cfg in (torchvision, wide) for bin_ in range(0, 31, 6)]
    return sorted({op_value(name, code, neg, cfg) for cfg, code in stored for neg in (0, 1)})


@pytest.mark.parametrize("name", kernels.GEOMETRIC)
@pytest.mark.parametrize("channels", [1, 3])
def test_warp_equals_torchvision(name: str, channels: int) -> None:
    fill = [128.0] if channels == 1 else [124.0, 116.0, 104.0]
    for height, width in SIZES:
        for image in _images(channels, height, width, seed=height * width)[:2]:
            for value in _values(name):
                got = apply_op(image, name, value, fill)
                want = reference(image, name, value, fill)
                assert torch.equal(got, want), (name, value, height, width)


@pytest.mark.parametrize("value", [0.0, 90.0, -90.0, 180.0, 45.0, 359.5])
def test_rotations_torchvision_does_without_a_grid(value: float) -> None:
    for height, width in [(28, 28), (20, 30)]:
        image = _images(1, height, width, seed=3)[0]
        got = apply_op(image, "Rotate", value, [0.0])
        assert torch.equal(got, reference(image, "Rotate", value, [0.0]))


def test_warp_repeats_from_the_cache() -> None:
    """A cached (grid, mask) pair gives what a fresh one gives, for a different image."""
    first, second = _images(3, 28, 28, seed=1)[:2]
    apply_op(first, "ShearX", 0.2, [0.0, 0.0, 0.0])
    assert torch.equal(
        apply_op(second, "ShearX", 0.2, [0.0, 0.0, 0.0]),
        reference(second, "ShearX", 0.2, [0.0, 0.0, 0.0]),
    )


def test_grid_cache_stays_within_its_bound() -> None:
    grids = kernels._Grids(limit=100_000)  # room for a few 28 px pairs, not for 64 px ones
    for degrees in range(40):
        grids.get("Rotate", float(degrees), 64, 64)
        assert grids.bytes <= max(grids.limit, 64 * 64 * 3 * 4)
    sizes = sum(t.numel() * t.element_size() for pair in grids.entries.values() for t in pair)
    assert sizes == grids.bytes
    assert ("Rotate", 39.0, 64, 64) in grids.entries  # the newest is kept


@pytest.mark.parametrize("channels", [1, 3])
def test_equalize_equals_torchvision(channels: int) -> None:
    rng = np.random.default_rng(0)
    images = _images(channels, 28, 28, seed=5) + _images(channels, 9, 13, seed=6)
    for _ in range(50):  # narrow histograms: few levels, one dominant value
        levels = rng.integers(1, 6)
        values = rng.choice(256, size=levels, replace=False)
        picks = rng.integers(0, levels, size=(channels, 20, 20))
        images.append(torch.from_numpy(values[picks].astype(np.uint8)))
    for image in images:
        assert torch.equal(kernels.equalize(image), F.equalize(image))
