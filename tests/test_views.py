"""View recipes: counter-based parameters, replay, the epoch schedule."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.transforms import v2

from kdcache.config import validate
from kdcache.errors import ConfigError, DataError
from kdcache.views import (
    P_FLIP,
    P_H,
    P_IMG_H,
    P_IMG_W,
    P_LEFT,
    P_TOP,
    P_W,
    ViewRecipe,
    epoch_view,
    replay,
    replay_views,
    view_params,
)

RRC = ViewRecipe(size=16, scale=(0.2, 1.0))


def test_params_depend_only_on_seed_key_and_view():
    first = view_params(RRC, 7, "sample_1", 4, (40, 30))
    # computing other samples first, or fewer views, changes nothing
    view_params(RRC, 7, "sample_0", 4, (40, 30))
    again = view_params(RRC, 7, "sample_1", 4, (40, 30))
    np.testing.assert_array_equal(first, again)
    np.testing.assert_array_equal(view_params(RRC, 7, "sample_1", 2, (40, 30)), first[:2])
    assert not np.array_equal(view_params(RRC, 8, "sample_1", 4, (40, 30)), first)
    assert not np.array_equal(view_params(RRC, 7, "sample_2", 4, (40, 30)), first)


def test_rrc_boxes_lie_inside_the_image_and_respect_scale_and_ratio():
    params = np.concatenate([view_params(RRC, 0, f"k{i}", 8, (40, 30)) for i in range(200)])
    assert (params[:, P_TOP] >= 0).all() and (params[:, P_LEFT] >= 0).all()
    assert (params[:, P_TOP] + params[:, P_H] <= 40).all()
    assert (params[:, P_LEFT] + params[:, P_W] <= 30).all()
    area = params[:, P_H] * params[:, P_W] / (40 * 30)
    assert area.min() >= 0.2 * 0.9 and area.max() <= 1.0
    assert set(params[:, P_FLIP]) == {0, 1}
    assert (params[:, P_IMG_H] == 40).all() and (params[:, P_IMG_W] == 30).all()


def test_replay_equals_torchvision_v2_resized_crop_and_flip():
    image = torch.randint(0, 256, (3, 40, 30), dtype=torch.uint8)
    for p in view_params(RRC, 3, "abc", 6, (40, 30)):
        expected = v2.functional.resized_crop(
            image, int(p[P_TOP]), int(p[P_LEFT]), int(p[P_H]), int(p[P_W]), [16, 16], antialias=True
        )
        if p[P_FLIP]:
            expected = v2.functional.horizontal_flip(expected)
        assert torch.equal(replay(image, p, RRC), expected)


def test_center_recipe_matches_resize_then_center_crop():
    recipe = ViewRecipe(name="center", size=24, crop_pct=0.875)
    image = torch.randint(0, 256, (3, 50, 40), dtype=torch.uint8)
    params = view_params(recipe, 0, "k", 1, (50, 40))
    expected = v2.functional.center_crop(
        v2.functional.resize(image, [27], antialias=True), [24, 24]
    )
    assert torch.equal(replay(image, params[0], recipe), expected)
    assert replay_views(image, params, recipe).shape == (1, 3, 24, 24)


def test_replay_refuses_an_image_of_another_size():
    params = view_params(RRC, 0, "k", 1, (40, 30))
    with pytest.raises(DataError, match="image is 41x30 but the view was made from a 40x30 image"):
        replay(torch.zeros(3, 41, 30, dtype=torch.uint8), params[0], RRC)


@pytest.mark.parametrize("num_views", [1, 2, 3, 5])
def test_epoch_view_uses_every_view_once_per_cycle(num_views):
    for key in ("a", "b", "sample_99"):
        for cycle in range(3):
            chosen = [
                epoch_view(0, cycle * num_views + e, key, num_views) for e in range(num_views)
            ]
            assert sorted(chosen) == list(range(num_views))


def test_epoch_view_varies_across_keys():
    firsts = {epoch_view(0, 0, f"k{i}", 4) for i in range(50)}
    assert firsts == {0, 1, 2, 3}


@pytest.mark.parametrize(
    "data, match",
    [
        ({"scale": [0.5, 0.2]}, "scale must satisfy"),
        ({"ratio": [0, 1]}, "ratio must satisfy"),
        ({"channels": 1}, "mean and std need 1 values"),
        ({"name": "jitter"}, "name: Input should be 'rrc_flip' or 'center'"),
        ({"size": 0}, "size: Input should be greater than or equal to 1"),
        ({"sizes": 3}, "sizes: unknown key; valid keys here: channels, crop_pct"),
    ],
)
def test_recipe_rejections_name_the_key(data, match):
    with pytest.raises(ConfigError, match=match):
        validate(ViewRecipe, data)


def test_sixteen_bit_pngs_decode_to_scaled_uint8():
    import io

    from PIL import Image

    from kdcache.shards import decode_image

    wide = np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000
    buffer = io.BytesIO()
    Image.fromarray(wide).save(buffer, format="PNG")
    image = decode_image(buffer.getvalue(), 1)
    assert image.dtype == torch.uint8 and image.shape == (1, 8, 8)
    assert torch.equal(image[0], torch.from_numpy((wide >> 8).astype(np.uint8)))
