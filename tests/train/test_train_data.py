"""The training data path on real tars and a real Zarr cache: order, splits, views, join,
mismatches."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import pytest
import torch

from kdcache.cache.reader import read_block
from kdcache.core.errors import (
    CacheIncompleteError,
    CacheMismatchError,
    CacheNotFoundError,
    ConfigError,
)
from kdcache.models.build import ModelSpec, build_model
from kdcache.shards.reading import decode_image, iter_shard
from kdcache.train.config import TrainConfig
from kdcache.train.data import (
    ShardStream,
    StreamSpec,
    batch_sizes,
    build_eval_data,
    build_train_data,
    eval_recipe,
    make_loader,
    open_cache,
    slots,
    steps_per_epoch,
    valid_counts,
)
from kdcache.train.student import check_student
from kdcache.views.recipe import center_view, draw_view, epoch_view, render
from tests.support.cachebuild import build_cache, write_shards

INVALID = "train_000005"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """4 train shards x 12 samples (one invalid row), a 20-sample val shard, a cache with 2
    teachers."""
    root = tmp_path_factory.mktemp("data")
    urls = write_shards(root / "shards", unlabelled=(INVALID,))
    val = write_shards(root / "shards", prefix="val", num_shards=1, per_shard=20)
    store = build_cache(root / "cache.zarr", urls, teachers={"tiny": 4, "top2": 2})
    clean = write_shards(root / "clean")
    clean_store = build_cache(root / "clean.zarr", clean, teachers={"tiny": 4})
    keys = sorted(f"train_{i:06d}" for i in range(48) if f"train_{i:06d}" != INVALID)
    return {
        "root": root,
        "urls": urls,
        "val": val,
        "store": store,
        "keys": keys,
        "clean": clean,
        "clean_store": clean_store,
    }


def config(world, **data) -> TrainConfig:
    return TrainConfig.model_validate(
        {
            "data": {
                "shards": world["urls"],
                "val_shards": world["val"],
                "batch_size": 8,
                "num_workers": 0,
                **data,
            },
            "cache": {"path": str(world["root"] / "cache.zarr")},
            "student": {"name": "kd_mlp", "kwargs": {"img_size": 12, "hidden": 16}},
            "teacher": {"name": "tiny"},
            "stages": [{"epochs": 1, "loss": {"name": "kd"}}],
        }
    )


def open_cache_of(cfg: TrainConfig, urls: list[str], teachers: list[str]):
    """``open_cache`` over a config's cache and data sections."""
    return open_cache(cfg.cache, urls, teachers, data=cfg.data)


def spec(world, **kw) -> StreamSpec:
    counts, _ = valid_counts(world["store"])
    base = StreamSpec(
        urls=tuple(world["urls"]),
        counts=tuple(counts),
        recipe=world["store"].meta.recipe,
        num_classes=4,
        batch_size=8,
        rendering=world["store"].meta.recipe.rendering(),
        seed=3,
        num_views=3,
        shuffle_buffer=10,
        shard_shuffle=True,
        cache_path=str(world["root"] / "cache.zarr"),
    )
    return replace(base, **kw)


def batches(s: StreamSpec, epoch: int, teachers=(), skip: int = 0) -> list:
    dataset = ShardStream(s)
    dataset.set_epoch(epoch, teachers, skip)
    return list(make_loader(dataset, pin_memory=False, prefetch_factor=2))


def keys_of(bs) -> list[str]:
    return [k for b in bs for k in b.keys]


# ---- the view schedule ---------------------------------------------------------------------------


def test_view_schedule_is_a_permutation_per_cycle(world):
    for key in world["keys"][:10]:
        for cycle in range(3):
            assert sorted(epoch_view(3, e, key, 3) for e in range(3 * cycle, 3 * cycle + 3)) == [
                0,
                1,
                2,
            ]


@pytest.mark.parametrize("workers", [0, 2])
def test_stream_replays_the_scheduled_view_for_any_worker_count(world, workers):
    seen = {
        k: int(v)
        for b in batches(spec(world, num_workers=workers), 1)
        for k, v in zip(b.keys, b.views, strict=True)
    }
    assert seen == {k: epoch_view(3, 1, k, 3) for k in world["keys"]}


def test_same_pixels_and_targets_for_any_worker_count(world):
    def content(workers):
        out = {}
        for b in batches(spec(world, num_workers=workers), 2, ["top2"]):
            for i, key in enumerate(b.keys):
                out[key] = (
                    b.images[i].numpy().tobytes(),
                    b.targets["top2"].logit[i].numpy().tobytes(),
                )
        return out

    assert content(0) == content(2)


# ---- every sample once ---------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_every_sample_exactly_once_per_epoch(world, workers):
    s = spec(world, num_workers=workers)
    orders = []
    for epoch in (0, 1):
        bs = batches(s, epoch)
        assert sorted(keys_of(bs)) == world["keys"]
        assert len(bs) == steps_per_epoch(s)
        orders.append(keys_of(bs))
    assert orders[0] != orders[1]  # shard order and buffer depend on the epoch


def test_two_ranks_partition_every_epoch(world):
    for epoch in (0, 1, 2):
        per_rank = [
            keys_of(batches(spec(world, rank=r, world_size=2, num_workers=2), epoch))
            for r in (0, 1)
        ]
        assert not set(per_rank[0]) & set(per_rank[1])
        assert sorted(per_rank[0] + per_rank[1]) == world["keys"]


@pytest.mark.parametrize(
    ("ranks", "workers", "batch"), [(2, 1, 8), (2, 2, 4), (3, 2, 5), (5, 2, 3), (4, 2, 8)]
)
def test_uneven_splits_lose_nothing_and_give_every_rank_the_same_steps(
    world, ranks, workers, batch
):
    """3 shards of 12 (36 samples) over ranks x workers that do not divide them evenly: every sample
    once per epoch on one rank, the same step count on every rank (5 x 2 slots of 3 or 4 samples at
    batch 3: one batch each, of 3 or 4)."""
    s = spec(
        world,
        urls=tuple(world["clean"][:3]),
        counts=(12, 12, 12),
        world_size=ranks,
        num_workers=workers,
        batch_size=batch,
        cache_path=None,
        num_views=None,
    )
    for epoch in (0, 1):
        per_rank = [batches(replace(s, rank=r), epoch) for r in range(ranks)]
        assert len({len(b) for b in per_rank}) == 1 and len(per_rank[0]) == steps_per_epoch(s)
        keys = [k for b in per_rank for k in keys_of(b)]
        assert sorted(keys) == sorted(f"train_{i:06d}" for i in range(36))
        assert max(len(b) for bs in per_rank for b in bs) <= batch + 1


def test_slots_cut_the_stream_into_near_equal_consecutive_pieces(world):
    s = spec(
        world,
        urls=tuple(world["clean"][:3]),
        counts=(12, 12, 11),
        world_size=2,
        num_workers=2,
        shard_shuffle=False,
    )
    cut = slots(s, 0)
    sizes = [sum(p.stop - p.start for p in pieces) for rank in cut for pieces in rank]
    assert sizes == [9, 9, 9, 8]
    assert [(p.shard, p.start, p.stop) for p in cut[0][1]] == [(0, 9, 12), (1, 0, 6)]
    # slots of 8 and 9 at batch 4: 2 batches each, the 9-sample slots end with a batch of 5
    assert [batch_sizes(replace(s, batch_size=4), j) for j in range(4)] == [
        [4, 5],
        [4, 5],
        [4, 5],
        [4, 4],
    ]


def test_too_few_samples_for_the_workers_is_refused(world):
    with pytest.raises(
        ConfigError, match=r"data.num_workers: 47 training sample\(s\) cannot feed 5 rank\(s\) x 10"
    ):
        build_train_data(config(world, num_workers=10), 0, 5, ["tiny"], pin_memory=False)


def test_file_order_without_shuffles(world):
    s = spec(world, shuffle_buffer=0, shard_shuffle=False)
    assert keys_of(batches(s, 0)) == world["keys"] == keys_of(batches(s, 5))


# ---- resumption ----------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [0, 2])
def test_skipping_batches_reproduces_the_rest_of_the_epoch(world, workers):
    s = spec(world, num_workers=workers)
    full = batches(s, 1, ["tiny"])
    for skip in (1, 3, 5):
        rest = batches(s, 1, ["tiny"], skip)
        assert [b.keys for b in rest] == [b.keys for b in full[skip:]]
        for a, b in zip(rest, full[skip:], strict=True):
            assert torch.equal(a.images, b.images) and torch.equal(
                a.targets["tiny"].logit, b.targets["tiny"].logit
            )


# ---- the join with the cache ---------------------------------------------------------------------


def test_batches_join_the_cached_row_of_the_replayed_view(world):
    store = world["store"]
    recipe = world["store"].meta.recipe
    images = {s.key: decode_image(s.image, 1) for url in world["urls"] for s in iter_shard(url)}
    blocks = {i: read_block(store, i, ["top2"]) for i in range(4)}
    batch = batches(spec(world), 0, ["top2"])[0]
    assert batch.images.dtype == torch.uint8 and batch.images.shape == (8, 1, 12, 12)
    for i, key in enumerate(batch.keys):
        block = blocks[int(key.split("_")[1]) // 12]
        row = block.row(key)
        view = int(batch.views[i])
        expected = render(
            images[key], block.view_params.view(row, view), recipe, recipe.rendering()
        )
        assert torch.equal(batch.images[i], expected)
        cached = block.teachers["top2"]
        assert batch.targets["top2"].idx[i].tolist() == cached.topk_idx[row, view].tolist()
        assert batch.targets["top2"].lse[i].item() == cached.lse[row, view]
        assert batch.labels[i].item() == block.labels[row]


def test_invalid_rows_are_skipped_and_counted(world):
    counts, invalid = valid_counts(world["store"])
    assert invalid == 1 and counts == [11, 12, 12, 12]
    assert INVALID not in keys_of(batches(spec(world), 0))


def test_build_train_data_uses_the_cache_recipe_and_counts(world):
    data = build_train_data(config(world), 0, 1, ["tiny"], pin_memory=False)
    assert data.recipe == world["store"].meta.recipe and data.invalid == 1 and data.num_classes == 4
    assert sorted(k for b in data.epoch(0, ["tiny"]) for k in b.keys) == world["keys"]


# ---- validation stream ---------------------------------------------------------------------------


def test_eval_stream_center_views_once_over_ranks(world):
    recipe = world["store"].meta.recipe
    seen = []
    for rank in (0, 1):
        cfg = config(world)
        dataset, loader = build_eval_data(
            cfg.data, rank, 2, recipe, 4, pin_memory=False, student=cfg.student
        )
        seen += [(k, b.images[i]) for b in loader for i, k in enumerate(b.keys)]
    assert sorted(k for k, _ in seen) == [f"val_{i:06d}" for i in range(20)]
    center = eval_recipe(recipe)
    first = next(iter_shard(world["val"][0]))
    image = decode_image(first.image, 1)
    view = center_view(tuple(image.shape[1:]), center)
    expected = render(image, view, center, recipe.rendering())
    assert torch.equal(dict(seen)[first.key], expected) and expected.shape == (1, 12, 12)


# ---- refusing caches that do not match -----------------------------------------------------------


def test_other_shards_are_refused(world):
    with pytest.raises(CacheMismatchError, match=r"shards differ: 1 in the cache but not given"):
        open_cache_of(config(world), world["urls"][:3], ["tiny"])


def test_changed_keys_are_refused_with_verify_keys(world, tmp_path):
    other = write_shards(tmp_path, key_prefix="other")
    with pytest.raises(CacheMismatchError, match="sample keys differ"):
        open_cache_of(config(world, verify_keys=True), other, ["tiny"])


def test_changed_shard_counts_are_refused(world, tmp_path):
    shorter = write_shards(tmp_path, per_shard=[12, 12, 12, 10])
    with pytest.raises(
        CacheMismatchError,
        match="'train-000003.tar' has 12 samples in the cache but 10 in the data",
    ):
        open_cache_of(config(world, verify_keys=True), shorter, ["tiny"])
    data = build_train_data(config(world, shards=shorter), 0, 1, ["tiny"], pin_memory=False)
    with pytest.raises(CacheMismatchError, match="has 10 samples in the data but 12 in the cache"):
        list(data.epoch(0, ["tiny"]))


def test_class_count_mismatch_is_refused(world):
    with pytest.raises(
        CacheMismatchError, match="num_classes: the cache has 4, the run asks for 7"
    ):
        open_cache_of(config(world, num_classes=7), world["urls"], ["tiny"])


def test_missing_teacher_is_refused(world):
    with pytest.raises(
        CacheMismatchError,
        match=r"teacher\(s\) \['big'\] not in cache .* it has \['tiny', 'top2'\]",
    ):
        open_cache_of(config(world), world["urls"], ["big"])


def test_incomplete_cache_is_refused(world, tmp_path):
    build_cache(tmp_path / "c.zarr", world["urls"], teachers={"half": 2}, shards=[0, 1])
    cfg = config(world).model_copy(
        update={"cache": config(world).cache.model_copy(update={"path": str(tmp_path / "c.zarr")})}
    )
    expected = (
        r"incomplete \(views: 2 shard\(s\) e.g. \['train-000002.tar', 'train-000003.tar'\]; "
        r"half: 2 shard\(s\)"
    )
    with pytest.raises(CacheIncompleteError, match=expected):
        open_cache_of(cfg, world["urls"], ["half"])


def test_missing_cache_is_refused(world, tmp_path):
    cfg = config(world).model_copy(
        update={
            "cache": config(world).cache.model_copy(update={"path": str(tmp_path / "none.zarr")})
        }
    )
    with pytest.raises(CacheNotFoundError, match="no cache at"):
        open_cache_of(cfg, world["urls"], ["tiny"])


def test_student_that_does_not_fit_its_rendering_is_refused(world):
    rendering = world["store"].meta.recipe.rendering()
    cfg = config(world)
    model = build_model(cfg.student, 4, 1)
    check_student(model, rendering, 1, 4, cfg.student, from_cache=True)
    bigger = rendering.model_copy(update={"size": 32})
    with pytest.raises(
        CacheMismatchError, match=r"student 'kd_mlp' cannot take its views \(1x32x32, student"
    ):
        check_student(model, bigger, 1, 4, cfg.student, from_cache=True)
    wrong = build_model(ModelSpec(name="kd_mlp", kwargs={"img_size": 28}), 4, 1)
    with pytest.raises(CacheMismatchError, match=r"cannot take its views \(1x12x12"):
        check_student(wrong, rendering, 1, 4, cfg.student, from_cache=True)
    with pytest.raises(CacheMismatchError, match=r"outputs \(10,\) logits, the data has 4 classes"):
        check_student(
            build_model(cfg.student, 10, 1), rendering, 1, 4, cfg.student, from_cache=True
        )


def test_labels_out_of_range_without_cache_are_refused(world):
    s = spec(
        world,
        urls=tuple(world["clean"]),
        cache_path=None,
        num_views=None,
        num_classes=3,
        counts=(12,) * 4,
    )
    with pytest.raises(Exception, match="label 3 is not in 0..2"):
        batches(s, 0)


def test_more_ranks_than_shards_share_the_shards(world):
    per_rank = [keys_of(batches(spec(world, rank=r, world_size=6), 0)) for r in range(6)]
    assert (
        sorted(k for keys in per_rank for k in keys) == world["keys"]
        and min(map(len, per_rank)) == 7
    )


def test_fresh_views_without_cache_match_a_cache_made_with_that_seed(world):
    store = world["clean_store"]
    s = spec(
        world,
        urls=tuple(world["clean"]),
        cache_path=None,
        num_views=None,
        view_seed=store.meta.seed,
        shuffle_buffer=0,
        counts=(12,) * 4,
    )
    counts = Counter()
    for b in batches(s, 2):  # view index = epoch = 2: the parameters a cache stores as view 2
        for i, key in enumerate(b.keys):
            assert int(b.views[i]) == 2
            counts[key] += 1
    block = read_block(store, 1, [])
    key = str(block.keys[0])
    image = decode_image(next(x for x in iter_shard(world["clean"][1]) if x.key == key).image, 1)
    fresh = next(b.images[b.keys.index(key)] for b in batches(s, 2) if key in b.keys)
    recipe = store.meta.recipe
    stored = block.view_params.view(0, 2)
    assert torch.equal(fresh, render(image, stored, recipe, recipe.rendering()))
    assert set(counts.values()) == {1} and len(counts) == 48
    assert stored == draw_view(recipe, store.meta.seed, key, 2, (16, 16))
