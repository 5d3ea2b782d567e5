"""View recipes: counter-based parameters, rendering per model, mixing, the epoch schedule."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from kdcache.core.config import validate
from kdcache.core.errors import ConfigError, DataError
from kdcache.shards.reading import decode_image
from kdcache.views.augment import BOX_STEPS
from kdcache.views.recipe import (
    Rendering,
    ViewParams,
    ViewRecipe,
    center_box,
    center_view,
    draw_view,
    epoch_view,
    group_partners,
    grouped,
    param_problems,
    render,
    render_rows,
)

RRC = ViewRecipe(size=16, scale=(0.2, 1.0))
STRONG = ViewRecipe(
    size=16,
    scale=(0.2, 1.0),
    policy="rand-m9-mstd0.5-inc1",
    color_jitter={"brightness": 0.4, "contrast": 0.4, "saturation": 0.4, "hue": 0.1},
    erasing={"prob": 0.5, "mode": "pixel"},
    mix={"mixup_alpha": 0.8, "cutmix_alpha": 1.0, "group_size": 4},
)


def images(n: int, seed: int = 0, hw: tuple[int, int] = (40, 30)) -> dict[int, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {r: torch.randint(0, 256, (3, *hw), dtype=torch.uint8, generator=gen) for r in range(n)}


def drawn(recipe: ViewRecipe, n: int, views: int, hw=(40, 30), seed: int = 0) -> ViewParams:
    """Every view of ``n`` rows (one mixing group per ``group_size`` rows), as precompute draws."""
    params = ViewParams.empty(recipe, n, views)
    for _, group in grouped(range(n), recipe.group_size):
        for row in group:
            for a in range(views):
                view = draw_view(recipe, seed, f"k{row}", a, hw, group_partners(row, group))
                params.put(row, a, view)
    return params


# ---- parameters ----------------------------------------------------------------------------------


def test_params_depend_only_on_seed_key_and_view():
    first = [draw_view(STRONG, 7, "sample_1", a, (40, 30), [1, 2]) for a in range(4)]
    draw_view(STRONG, 7, "sample_0", 0, (40, 30), [1])  # drawing others first changes nothing
    again = [draw_view(STRONG, 7, "sample_1", a, (40, 30), [1, 2]) for a in range(4)]
    assert all(_same(x, y) for x, y in zip(first, again, strict=True))
    assert not _same(draw_view(STRONG, 8, "sample_1", 0, (40, 30), [1, 2]), first[0])
    assert not _same(draw_view(STRONG, 7, "sample_2", 0, (40, 30), [1, 2]), first[0])


def _same(a, b) -> bool:
    fields = ("crop", "flip", "policy", "jitter", "erase", "erase_seed", "mix_partner", "mix_lam")
    return all(np.array_equal(np.asarray(getattr(a, f)), np.asarray(getattr(b, f))) for f in fields)


def test_rrc_boxes_lie_inside_the_image_and_respect_scale():
    views = [draw_view(RRC, 0, f"k{i}", a, (40, 30)) for i in range(200) for a in range(8)]
    crops = np.array([v.crop for v in views])
    top, left, h, w = crops.T
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + h <= 40).all() and (left + w <= 30).all()
    area = h * w / (40 * 30)
    assert area.min() >= 0.2 * 0.9 and area.max() <= 1.0
    assert {v.flip for v in views} == {False, True}


def test_the_mixing_draw_does_not_depend_on_the_image():
    """A streaming reader picks the partner before decoding: same partner, lam and box for any
    image size."""
    small = draw_view(STRONG, 0, "k", 1, (20, 20), [-1, 1, 2])
    large = draw_view(STRONG, 0, "k", 1, (400, 300), [-1, 1, 2])
    assert (small.mix_partner, small.mix_lam) == (large.mix_partner, large.mix_lam)
    assert np.array_equal(small.mix_center, large.mix_center) and small.crop != large.crop


def test_partners_are_valid_rows_of_the_same_group_and_cutmix_lam_is_the_box_area():
    params = drawn(STRONG, 10, 6)
    partners = params.arrays["mix_partner"].astype(int)
    rows = np.arange(10)[:, None]
    assert (partners != 0).all()  # prob 1, and every group has a valid mate
    mixed = partners != 0
    assert (
        (rows + partners)[mixed] // 4 == np.broadcast_to(rows // 4, partners.shape)[mixed]
    ).all()
    views = [params.view(r, a) for r in range(10) for a in range(6)]
    cut = [v for v in views if v.cutmix]
    assert cut and any(v.mixed and not v.cutmix for v in views)  # CutMix and Mixup both drawn
    for v in cut:  # the label weight is one minus the clipped box's area (timm's correct_lam)
        top, left, h, w = v.mix_box
        assert top + h <= BOX_STEPS and left + w <= BOX_STEPS
        assert v.lam == pytest.approx(1 - h * w / BOX_STEPS**2)
        assert v.lam >= v.mix_lam / BOX_STEPS - 0.01  # clipping only shrinks it (up to the grid)
    assert param_problems(params, np.ones(10, bool), STRONG) == []


def test_a_row_without_valid_group_mates_is_not_mixed():
    alone = draw_view(STRONG, 0, "k", 0, (40, 30), partners=[])
    assert not alone.mixed and alone.lam == 1.0


def test_param_problems_name_what_is_out_of_range():
    params = drawn(STRONG, 8, 2)
    params.arrays["crop"][0, 0] = [30, 0, 20, 10]  # 30 + 20 > 40
    params.arrays["policy"][1, 0, 0] = [99, 10]
    params.arrays["mix_partner"][2, 1] = 5  # row 7: another group
    params.arrays["erase"][3, 0] = [200, 0, 100, 10]
    problems = param_problems(params, np.ones(8, bool), STRONG)
    assert "1 view(s): crop box outside its image" in problems
    assert "1 view(s): policy op or magnitude out of range" in problems
    assert "1 view(s): mix partner not a valid row of its group" in problems
    assert "1 view(s): erase box outside the image" in problems
    valid = np.ones(8, bool)
    valid[0] = False  # an invalid row is not checked, and is no partner
    assert "1 view(s): crop box outside its image" not in param_problems(params, valid, STRONG)


# ---- rendering -----------------------------------------------------------------------------------


def test_a_crop_view_renders_as_torchvision_resized_crop_and_flip():
    image = images(1)[0]
    for a in range(6):
        view = draw_view(RRC, 3, "abc", a, (40, 30))
        top, left, h, w = view.crop
        expected = v2.functional.resized_crop(image, top, left, h, w, [16, 16], antialias=True)
        if view.flip:
            expected = v2.functional.horizontal_flip(expected)
        assert torch.equal(render(image, view, RRC, RRC.rendering()), expected)


def test_center_view_is_the_centred_crop_pct_square_at_any_size():
    recipe = ViewRecipe(name="center", size=24, crop_pct=0.875)
    image = images(1, hw=(50, 40))[0]
    view = center_view((50, 40), recipe)
    assert view.crop == center_box(50, 40, 0.875) == (7, 2, 35, 35) and not view.flip
    for size in (24, 48):
        rendering = recipe.rendering().model_copy(update={"size": size})
        expected = v2.functional.resized_crop(image, 7, 2, 35, 35, [size, size], antialias=True)
        assert torch.equal(render(image, view, recipe, rendering), expected)


def test_render_refuses_an_image_of_another_size():
    view = draw_view(RRC, 0, "k", 0, (40, 30))
    with pytest.raises(DataError, match="image is 41x30 but the view was made from a 40x30 image"):
        render(torch.zeros(3, 41, 30, dtype=torch.uint8), view, RRC, RRC.rendering())


def test_each_model_renders_the_same_view_its_own_way():
    """A teacher at 32 px bicubic and a student at 16 px bilinear: the same crop and ops, each at
    its own resolution and interpolation (and the same pixels as resizing the crop directly)."""
    image = images(1)[0]
    view = draw_view(RRC, 0, "k", 2, (40, 30))
    teacher = Rendering(size=32, interpolation="bicubic", mean=(0.5,) * 3, std=(0.5,) * 3)
    student = RRC.rendering()
    big = render(image, view, RRC, teacher)
    small = render(image, view, RRC, student)
    assert big.shape == (3, 32, 32) and small.shape == (3, 16, 16)
    top, left, h, w = view.crop
    bicubic = v2.InterpolationMode.BICUBIC
    expected = v2.functional.resized_crop(
        image, top, left, h, w, [32, 32], interpolation=bicubic, antialias=True
    )
    if view.flip:
        expected = v2.functional.horizontal_flip(expected)
    assert torch.equal(big, expected)


def test_strong_views_replay_bit_exactly_from_stored_parameters():
    """Render twice, and from parameters stored and read back: the same uint8 pixels."""
    imgs = images(8)
    params = drawn(STRONG, 8, 3)
    stored = ViewParams(params.image_hw.copy(), {k: v.copy() for k, v in params.arrays.items()})
    rendering = STRONG.rendering()
    first = render_rows(imgs, params, list(range(8)), STRONG, rendering)
    again = render_rows(imgs, stored, list(range(8)), STRONG, rendering)
    assert torch.equal(first, again) and first.dtype == torch.uint8


def test_precompute_rendering_equals_the_trainers_view_by_view():
    """``render_rows`` (precompute: base renderings reused as partners) equals ``render`` (the
    trainer: one view with its partner) for every view, mixed ones included."""
    imgs = images(8)
    params = drawn(STRONG, 8, 3)
    teacher = Rendering(size=24, interpolation="bicubic", mean=(0.5,) * 3, std=(0.5,) * 3)
    for rendering in (STRONG.rendering(), teacher):
        batch = render_rows(imgs, params, list(range(8)), STRONG, rendering)
        mixed = 0
        for row in range(8):
            for a in range(3):
                view = params.view(row, a)
                partner = None
                if view.mixed:
                    mixed += 1
                    other = row + view.mix_partner
                    partner = (imgs[other], params.view(other, a))
                alone = render(imgs[row], view, STRONG, rendering, partner)
                assert torch.equal(batch[row * 3 + a], alone)
        assert mixed > 10


def test_a_mixed_view_without_its_partner_is_an_error():
    params = drawn(STRONG, 4, 2)
    row, a = next((r, a) for r in range(4) for a in range(2) if params.view(r, a).mixed)
    with pytest.raises(DataError, match="mixed with another sample but no partner image"):
        render(images(1)[0], params.view(row, a), STRONG, STRONG.rendering())


# ---- the epoch schedule --------------------------------------------------------------------------


@pytest.mark.parametrize("num_views", [1, 2, 3, 5])
def test_epoch_view_uses_every_view_once_per_cycle(num_views):
    for key in ("a", "b", "sample_99"):
        for cycle in range(3):
            epochs = range(cycle * num_views, (cycle + 1) * num_views)
            assert sorted(epoch_view(0, e, key, num_views) for e in epochs) == list(
                range(num_views)
            )


def test_epoch_view_varies_across_keys():
    assert {epoch_view(0, 0, f"k{i}", 4) for i in range(50)} == {0, 1, 2, 3}


# ---- recipes -------------------------------------------------------------------------------------


def test_a_timm_policy_string_is_accepted_and_parsed():
    recipe = validate(ViewRecipe, {"policy": "rand-m9-n3-mstd0.5-inc1"})
    policy = recipe.policy
    assert (policy.name, policy.ops, policy.num_ops, policy.magnitude) == (
        "randaugment",
        "timm",
        3,
        9,
    )
    assert policy.magnitude_std == 0.5 and policy.increasing and policy.prob == 0.5
    assert "randaugment (timm) n=3 m=9" in recipe.describe()


@pytest.mark.parametrize(
    "data, match",
    [
        ({"scale": [0.5, 0.2]}, "scale must satisfy"),
        ({"ratio": [0, 1]}, "ratio must satisfy"),
        ({"channels": 1}, "mean and std need 1 values"),
        ({"name": "jitter"}, "name: Input should be 'rrc_flip' or 'center'"),
        ({"size": 0}, "size: Input should be greater than or equal to 1"),
        ({"sizes": 3}, "sizes: unknown key; valid keys here: channels, color_jitter, crop_pct"),
        ({"policy": "rand-m9-q2"}, "unknown section 'q2'"),
        ({"policy": "auto-v0"}, "starting with 'rand-'"),
        ({"mix": {"mixup_alpha": 0, "cutmix_alpha": 0}}, "both 0: set one, or leave mix out"),
        ({"erasing": {"area": [0.5, 0.2]}}, "area must satisfy"),
        ({"interpolation": "lanczos"}, "interpolation: Input should be 'bilinear', 'bicubic'"),
        ({"policy": {"ops": "torchvision", "magnitude": 40}}, "must be a bin 0..30"),
    ],
)
def test_recipe_rejections_name_the_key(data, match):
    with pytest.raises(ConfigError, match=match):
        validate(ViewRecipe, data)


def test_sixteen_bit_pngs_decode_to_scaled_uint8():
    wide = np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000
    buffer = io.BytesIO()
    Image.fromarray(wide).save(buffer, format="PNG")
    image = decode_image(buffer.getvalue(), 1)
    assert image.dtype == torch.uint8 and image.shape == (1, 8, 8)
    assert torch.equal(image[0], torch.from_numpy((wide >> 8).astype(np.uint8)))


def test_epoch_view_is_the_documented_permutation():
    """docs/format.md: blake2b of (seed, key, cycle) keys a Philox whose Generator permutes the
    A views; the fast generator reset gives that exact stream."""
    import hashlib

    for seed, key, num_views in [(0, "a", 2), (7, "sample-000123", 5), (123, "x/y.png", 9)]:
        for epoch in range(3 * num_views):
            cycle, step = divmod(epoch, num_views)
            text = f"{seed}\x1f{key}\x1f{cycle}".encode()
            philox = int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little")
            rng = np.random.Generator(np.random.Philox(key=philox))
            want = int(rng.permutation(num_views)[step])
            assert epoch_view(seed, epoch, key, num_views) == want


def test_normalize_is_the_out_of_place_arithmetic_and_leaves_its_input():
    from kdcache.views.recipe import Rendering, normalize

    rendering = Rendering(size=8, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    pixels = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    mean = torch.tensor(rendering.mean).view(1, -1, 1, 1) * 255.0
    std = torch.tensor(rendering.std).view(1, -1, 1, 1) * 255.0
    assert torch.equal(normalize(pixels, rendering), (pixels.float() - mean) / std)
    floats = pixels.float()
    before = floats.clone()
    normalize(floats, rendering)
    assert torch.equal(floats, before)  # a float input is not normalised in place
