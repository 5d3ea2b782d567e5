"""docs/format.md holds: caches of every encoding and recipe decoded by
``examples/read_cache_without_kdcache.py`` (zarr and numpy alone) equal what kdcache's reader
decodes, and plain views re-rendered from the documented codes equal kdcache's rendering."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
import zarr

from kdcache.cache.reader import read_block
from kdcache.shards.reading import decode_image, iter_shard
from kdcache.views.augment import MixConfig
from tests.support.cachebuild import (
    build_cache,
    precompute_config,
    row_views,
    run_precompute,
    tiny_recipe,
    tiny_teacher,
    write_shards,
)

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "read_cache_without_kdcache.py"
CLASSES = 6


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("read_cache_without_kdcache", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def reader() -> ModuleType:
    return load_example()


@pytest.fixture(scope="module")
def urls(tmp_path_factory) -> list[str]:
    return write_shards(tmp_path_factory.mktemp("shards"), num_shards=2, classes=CLASSES)


def test_the_example_imports_nothing_of_kdcache() -> None:
    source = EXAMPLE.read_text()
    assert "kdcache." not in "".join(
        line for line in source.splitlines() if line.lstrip().startswith(("import", "from"))
    )
    assert "import kdcache" not in source


def assert_same_targets(mine, theirs) -> None:
    """The example's decoded arrays equal kdcache's, field by field (valid rows)."""
    names = ["idx", "logit", "lse", "label_logit", "tail_lse"]
    kd = ["topk_idx", "topk_logit", "lse", "label_logit", "tail_lse"]
    for name, kd_name in zip(names, kd, strict=True):
        np.testing.assert_array_equal(getattr(mine, name), getattr(theirs, kd_name), name)
    if theirs.sampled:
        for name in ("sample_idx", "sample_logit", "sample_count", "draw_tail_lse"):
            np.testing.assert_array_equal(getattr(mine, name), getattr(theirs, name), name)
        if theirs.temperatures:
            np.testing.assert_array_equal(mine.lse_t, theirs.lse_t)


@pytest.mark.parametrize("encoding", ["fp16", "q8"])
def test_top_k_encodings_decode_as_kdcache_decodes(reader, urls, tmp_path, encoding) -> None:
    path = tmp_path / "cache.zarr"
    store = build_cache(path, urls, teachers={"t": 3}, classes=CLASSES, encoding=encoding)
    group = zarr.open_group(str(path), mode="r")
    for shard in range(2):
        block = read_block(store, shard, ["t"])
        rows = reader.shard_rows(group, shard)
        n = len(block)
        mine = reader.teacher_targets(group, "t", rows)
        for field in ("idx", "logit", "lse", "label_logit", "tail_lse"):
            setattr(mine, field, getattr(mine, field)[:n])
        assert_same_targets(mine, block.teachers["t"])
        probs = mine.probs_t1().sum(-1) + mine.tail_mass_t1()
        np.testing.assert_allclose(probs[block.status == 1], 1.0, atol=0.05)


def test_sampled_targets_decode_as_kdcache_decodes(reader, urls, tmp_path) -> None:
    path = tmp_path / "cache.zarr"
    spec, _ = tiny_teacher(CLASSES, save_to=f"{path}.t.pt")
    common = {"model": spec.model_dump(), "k": 2, "encoding": "sampled", "samples": 4}
    teachers = [
        {"name": "at1", **common, "sample_temperatures": [4.0]},
        {"name": "at2", **common, "draw_temperature": 2.0},
    ]
    store = run_precompute(precompute_config(path, urls, teachers, classes=CLASSES))
    group = zarr.open_group(str(path), mode="r")
    block = read_block(store, 0, ["at1", "at2"])
    n = len(block)
    for name in ("at1", "at2"):
        mine = reader.teacher_targets(group, name, reader.shard_rows(group, 0))
        for field in vars(mine):
            value = getattr(mine, field)
            if value is not None:
                setattr(mine, field, value[:n])
        assert_same_targets(mine, block.teachers[name])


def test_mixing_weights_follow_the_documented_codes(reader, urls, tmp_path) -> None:
    mix = MixConfig(mixup_alpha=0.4, cutmix_alpha=1.0, prob=1.0, group_size=4)
    path = tmp_path / "cache.zarr"
    store = build_cache(path, urls, recipe=tiny_recipe(mix=mix), classes=CLASSES, num_views=4)
    group = zarr.open_group(str(path), mode="r")
    block = read_block(store, 0)
    weights = reader.own_label_weight(group, reader.shard_rows(group, 0))[: len(block)]
    expected = np.array(
        [[block.view_params.view(r, a).lam for a in range(4)] for r in range(len(block))]
    )
    np.testing.assert_allclose(weights, expected, rtol=0, atol=1e-12)
    assert (weights < 1).any(), "prob=1 mixes every view of a full group"


def test_plain_views_rerender_from_the_documented_codes(reader, urls, tmp_path) -> None:
    path = tmp_path / "cache.zarr"
    store = build_cache(path, urls, classes=CLASSES, num_views=3)
    group = zarr.open_group(str(path), mode="r")
    block = read_block(store, 0)
    recipe = store.meta.recipe
    rendering = group.attrs["recipe"] | {"size": recipe.size}
    samples = list(iter_shard(urls[0]))
    for row in range(3):
        image = decode_image(samples[row].image, recipe.channels)
        stored = row_views(store, block, row, image)
        for a in range(3):
            mine = reader.render_plain_view(image, group, row, a, rendering)
            assert torch.equal(mine, stored[a]), (row, a)


def test_the_page_names_every_array_kdcache_writes() -> None:
    """Each array name kdcache's encodings and recipes define appears in docs/format.md."""
    from kdcache.targets import encoding
    from kdcache.views.recipe import ViewRecipe, param_arrays

    page = (EXAMPLE.parents[1] / "docs" / "format.md").read_text()
    strong = ViewRecipe.model_validate(
        {
            "policy": {"name": "randaugment"},
            "color_jitter": {"brightness": 0.4},
            "erasing": {"prob": 0.5, "mode": "pixel"},
            "mix": {"mixup_alpha": 0.2, "cutmix_alpha": 1.0},
        }
    )
    names = set(param_arrays(strong)) | {"image_hw", "views_done", "keys", "labels", "status"}
    for kind in encoding.ENCODINGS:
        names |= set(encoding.array_specs(kind, "uint16"))
    missing = sorted(name for name in names if f"`{name}`" not in page)
    assert missing == [], f"docs/format.md does not document {missing}"
