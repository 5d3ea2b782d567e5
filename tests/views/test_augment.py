"""Strong-augmentation ops against the libraries they follow: timm's RandAugment levels,
torchvision's magnitude bins and ColorJitter, timm's random erasing and Mixup/CutMix."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest
import torch
import torchvision.transforms.v2 as T
from timm.data import auto_augment as timm_aa
from torchvision.transforms.v2 import functional as F

from kdcache.views.augment import (
    BOX_STEPS,
    NEGATE,
    TIMM_OPS,
    TORCHVISION_OPS,
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
    op_value,
    parse_timm_policy,
    pixel_box,
    random_bytes,
)

TIMM_NAMES = {"TranslateX": "TranslateXRel", "TranslateY": "TranslateYRel"}
INCREASING = {
    "Posterize": "PosterizeIncreasing",
    "Solarize": "SolarizeIncreasing",
    "Color": "ColorIncreasing",
    "Contrast": "ContrastIncreasing",
    "Brightness": "BrightnessIncreasing",
    "Sharpness": "SharpnessIncreasing",
}


def image(seed: int = 0, channels: int = 3, size: int = 24) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (channels, size, size), dtype=torch.uint8, generator=gen)


@pytest.mark.parametrize("increasing", [False, True])
@pytest.mark.parametrize("name", TIMM_OPS)
def test_timm_levels_map_to_timms_own_arguments(name, increasing):
    """Our level -> argument equals timm's ``LEVEL_TO_ARG`` (magnitude up to sign, which timm
    draws inside the function and we store)."""
    timm_name = TIMM_NAMES.get(name, INCREASING.get(name, name) if increasing else name)
    level_fn = timm_aa.LEVEL_TO_ARG[timm_name]
    cfg = PolicyConfig(increasing=increasing)
    for code in range(0, 81, 3):  # levels 0 .. 10 in 1/8 steps
        ours = op_value(name, code, False, cfg)
        if level_fn is None:
            assert ours == 0.0
            continue
        random.seed(code)
        theirs = level_fn(code / 8, {"translate_pct": 0.45})[0]
        if name in ("ShearX", "ShearY", "Rotate", "TranslateX", "TranslateY"):
            assert ours == pytest.approx(abs(theirs))
        elif increasing and name in INCREASING and name not in ("Posterize", "Solarize"):
            assert ours in (pytest.approx(theirs), pytest.approx(max(0.1, 2.0 - theirs)))
        else:
            assert ours == pytest.approx(theirs)


@pytest.mark.parametrize("wide", [False, True])
def test_torchvision_bins_map_to_torchvisions_augmentation_space(wide):
    space = (T.TrivialAugmentWide if wide else T.RandAugment)._AUGMENTATION_SPACE
    cfg = PolicyConfig(name="trivialaugment") if wide else PolicyConfig(ops="torchvision")
    side = 224
    for name in TORCHVISION_OPS:
        magnitudes_fn, signed = space[name]
        magnitudes = magnitudes_fn(31, side, side)
        for bin_ in range(31):
            ours = op_value(name, bin_, False, cfg)
            if magnitudes is None:
                assert ours == 0.0
                continue
            theirs = float(magnitudes[bin_])
            if name in ("TranslateX", "TranslateY"):
                assert ours * side == pytest.approx(theirs, rel=1e-5, abs=1e-4)
            elif name in ("Brightness", "Color", "Contrast", "Sharpness"):
                assert ours == pytest.approx(1.0 + theirs, rel=1e-5)
            elif name == "Solarize":
                assert ours == pytest.approx(255.0 * theirs, abs=1e-3)
            else:
                assert ours == pytest.approx(theirs, rel=1e-5, abs=1e-6)


def test_policy_draws_follow_the_config():
    rng = np.random.default_rng(0)
    cfg = PolicyConfig(num_ops=2, magnitude=9, magnitude_std=0.5, prob=0.5)
    codes = np.stack([draw_policy(rng, cfg) for _ in range(4000)])
    applied = codes[..., 0] > 0
    assert 0.47 < applied.mean() < 0.53
    ops = (codes[..., 0][applied] & ~np.uint8(NEGATE)) - 1
    counts = np.bincount(ops, minlength=len(TIMM_OPS))
    assert counts.min() > 0.7 * counts.mean()  # uniform over the 15 ops
    levels = codes[..., 1][applied] / 8
    assert abs(levels.mean() - 9) < 0.05 and 0.4 < levels.std() < 0.6
    assert levels.max() <= 10
    trivial = np.stack([draw_policy(rng, PolicyConfig(name="trivialaugment")) for _ in range(500)])
    assert trivial.shape == (500, 1, 2) and (trivial[..., 0] > 0).all()
    assert trivial[..., 1].max() == 30


def test_parse_timm_policy_reads_every_section():
    cfg = parse_timm_policy("rand-m7-n3-mstd1.0-mmax12-p0.8-inc1")
    assert (cfg.magnitude, cfg.num_ops, cfg.magnitude_std, cfg.magnitude_max) == (7, 3, 1.0, 12)
    assert cfg.prob == 0.8 and cfg.increasing
    assert parse_timm_policy("rand-m9").magnitude_std == 0.0


def test_policy_ops_are_deterministic_and_change_the_image():
    cfg = PolicyConfig(num_ops=1, prob=1.0)
    base = image()
    for index in range(len(TIMM_OPS)):
        codes = np.array([[index + 1, 72]], np.uint8)  # level 9
        out = apply_policy(base, codes, cfg, [128.0] * 3)
        assert out.dtype == torch.uint8 and out.shape == base.shape
        assert torch.equal(out, apply_policy(base.clone(), codes, cfg, [128.0] * 3))
    skipped = np.zeros((2, 2), np.uint8)
    assert torch.equal(apply_policy(base, skipped, cfg, [128.0] * 3), base)


def test_jitter_equals_torchvisions_adjustments_in_the_stored_order():
    cfg = JitterConfig(brightness=0.4, contrast=0.3, saturation=0.2, hue=0.1)
    rng = np.random.default_rng(1)
    base = image()
    adjust = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, F.adjust_hue)
    for _ in range(10):
        codes = draw_jitter(rng, cfg)
        expected = base
        for which in list(itertools.permutations(range(4)))[int(codes[0])]:
            lo, hi = cfg.ranges()[which]
            expected = adjust[which](expected, lo + (hi - lo) * int(codes[1 + which]) / 31)
        assert torch.equal(apply_jitter(base, codes, cfg), expected)
    never = draw_jitter(rng, JitterConfig(prob=0.0))
    assert never[0] == 255 and torch.equal(apply_jitter(base, never, cfg), base)


def test_jitter_codes_that_change_nothing_are_stored_canonically():
    """hue 0 (DIST's B3) leaves the hue code 0 and hue last in the order, so the stored codes
    carry no random bytes that no pixel depends on; the rendering is the same as without it."""
    cfg = JitterConfig(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.0)
    rng = np.random.default_rng(3)
    base = image()
    orders = set()
    for _ in range(60):
        state = rng.bit_generator.state
        codes = draw_jitter(rng, cfg)
        assert codes[4] == 0 and list(itertools.permutations(range(4)))[codes[0]][-1] == 3
        orders.add(int(codes[0]))
        rng.bit_generator.state = state
        rng.random()
        raw = np.array([rng.integers(24), *rng.integers(0, 32, 4)], np.uint8)
        assert torch.equal(apply_jitter(base, codes, cfg), apply_jitter(base, raw, cfg))
    assert len(orders) == 6  # the orders of the three active adjustments
    skipped = draw_jitter(rng, JitterConfig(prob=0.0))
    assert skipped.tolist() == [255, 0, 0, 0, 0]


def test_erasing_boxes_follow_timm_and_fills_replay_from_the_seed():
    cfg = ErasingConfig(prob=1.0, area=(0.02, 1 / 3), aspect=(0.3, 1 / 0.3), mode="pixel")
    rng = np.random.default_rng(2)
    boxes = []
    for _ in range(300):
        box, seed = draw_erase(rng, cfg)
        boxes.append(box.astype(int))
        assert box[0] + box[2] <= BOX_STEPS and box[1] + box[3] <= BOX_STEPS
        out = apply_erase(image(), box, seed, cfg, [128.0] * 3)
        top, left, h, w = pixel_box(box, 24, 24)
        patch = torch.from_numpy(random_bytes(seed, 3 * h * w).reshape(3, h, w))
        assert torch.equal(out[:, top : top + h, left : left + w], patch)
    area = np.array([b[2] * b[3] for b in boxes]) / BOX_STEPS**2
    assert area.min() >= 0.015 and area.max() <= 0.34
    const = apply_erase(
        image(), boxes[0], 0, cfg.model_copy(update={"mode": "const"}), [1.0, 2.0, 3.0]
    )
    top, left, h, w = pixel_box(boxes[0], 24, 24)
    assert (const[:, top : top + h, left : left + w] == torch.tensor([1, 2, 3]).view(3, 1, 1)).all()


def test_random_fill_bytes_are_stable_for_a_seed():
    assert random_bytes(7, 12).tolist() == random_bytes(7, 12).tolist()
    assert random_bytes(7, 5).tolist() == random_bytes(7, 12)[:5].tolist()
    assert random_bytes(8, 12).tolist() != random_bytes(7, 12).tolist()


def test_mixup_and_cutmix_combine_two_renderings():
    a = image(0)
    b = image(1)
    mixed = apply_mix(a, b, 100, np.zeros(4, np.uint8))
    lam = 100 / 255
    expected = (a.float() * lam + b.float() * (1 - lam)).round().to(torch.uint8)
    assert torch.equal(mixed, expected)
    box = np.array([51, 102, 102, 51], np.uint8)  # rows 4.8..14.4, columns 9.6..14.4 of 24
    cut = apply_mix(a, b, 175, box)
    top, left, h, w = pixel_box(box, 24, 24)
    inside = torch.zeros_like(a, dtype=torch.bool)
    inside[:, top : top + h, left : left + w] = True
    assert torch.equal(cut[inside], b[inside]) and torch.equal(cut[~inside], a[~inside])


def test_mix_draws_follow_timms_elem_mode():
    cfg = MixConfig(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5, prob=0.8)
    rng = np.random.default_rng(3)
    draws = [draw_mix(rng, cfg, [-1, 1, 2]) for _ in range(4000)]
    partners = np.array([d[0] for d in draws])
    cut = np.array([d[2][0] != 255 for d in draws])
    assert 0.77 < (partners != 0).mean() < 0.83  # prob
    assert set(partners[partners != 0]) == {-1, 1, 2}
    assert 0.45 < cut[partners != 0].mean() < 0.55  # switch_prob
    lam = np.array([d[1] for d in draws])[(partners != 0) & ~cut] / 255
    assert abs(lam.mean() - 0.5) < 0.03  # Beta(0.8, 0.8) is symmetric
    assert draw_mix(rng, cfg, [])[0] == 0  # no valid partner: not mixed


def test_cutmix_boxes_are_clipped_squares_of_area_one_minus_lam():
    """The square of side sqrt(1 - lam) around the centre (timm's rand_bbox), clipped to the
    image; inside, its area is 1 - lam up to the 1/255 grid."""
    centre = np.array([127, 127], np.uint8)  # the middle: no clipping
    for lam_code in (0, 64, 128, 200, 254):
        top, left, h, w = cutmix_boxes(centre, lam_code)
        assert h == w and abs(h * w / 255**2 - (1 - lam_code / 255)) < 0.01
        assert cutmix_weight(np.array([top, left, h, w])) == pytest.approx(1 - h * w / 255**2)
    corner = cutmix_boxes(np.array([0, 254], np.uint8), 64)  # clipped on two sides
    assert (
        corner[0] == 0 and corner[1] + corner[3] == 255 and corner[2] < 255 * (1 - 64 / 255) ** 0.5
    )
    many = cutmix_boxes(np.random.default_rng(0).integers(0, 255, (100, 2)), np.full(100, 90))
    assert many.shape == (100, 4) and (many[:, 0] + many[:, 2] <= 255).all()


def test_one_views_cutmix_box_equals_the_array_path():
    """The scalar path of cutmix_boxes (one view) gives the vectorised path's boxes for every
    centre code and a spread of lam codes."""
    from kdcache.views.augment import cutmix_boxes

    centers = np.stack(np.meshgrid(np.arange(255), np.arange(255), indexing="ij"), -1)
    centers = centers.reshape(-1, 2).astype(np.uint8)
    for lam in (0, 1, 63, 127, 128, 200, 254, 255):
        lams = np.full(len(centers), lam, np.uint8)
        many = cutmix_boxes(centers, lams)
        for i in range(0, len(centers), 97):
            assert np.array_equal(cutmix_boxes(centers[i], lams[i]), many[i]), (centers[i], lam)
