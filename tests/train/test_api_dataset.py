"""The public dataset (``kdcache.CacheDataset``) on real tars and real Zarr caches: the trainer's
samples, views and targets per epoch, rank and worker; the epoch guard; evaluation; mixing."""

from __future__ import annotations

import pytest
import torch

import kdcache
from kdcache.core.errors import CacheMismatchError, ConfigError, DataError
from kdcache.targets.sparse import MixedLabels, SampledTargets
from kdcache.train.config import TrainConfig
from kdcache.train.data import build_eval_data, build_train_data
from kdcache.views.recipe import normalize
from tests.support.cachebuild import build_cache, tiny_recipe, write_shards

INVALID = "train_000005"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """4 train shards x 12 samples (one invalid row), a val shard, a 2-teacher cache, and a cache
    of Mixup/CutMix views."""
    root = tmp_path_factory.mktemp("api")
    urls = write_shards(root / "shards", unlabelled=(INVALID,))
    val = write_shards(root / "shards", prefix="val", num_shards=1, per_shard=20)
    build_cache(root / "cache.zarr", urls, teachers={"tiny": 4, "top2": 2})
    mix = {"mixup_alpha": 0.8, "cutmix_alpha": 1.0, "group_size": 4, "prob": 0.5}
    mixing = tiny_recipe(mix=mix)
    build_cache(root / "mix.zarr", urls, teachers={"tiny": 4}, recipe=mixing)
    return {"root": root, "urls": urls, "val": val}


def config(world, cache: str = "cache.zarr", **data) -> TrainConfig:
    return TrainConfig.model_validate(
        {
            "run": {"seed": 3},
            "data": {
                "shards": world["urls"],
                "val_shards": world["val"],
                "batch_size": 8,
                "num_workers": 0,
                "shuffle_buffer": 10,
                **data,
            },
            "cache": {"path": str(world["root"] / cache)},
            "student": {"name": "kd_mlp", "kwargs": {"img_size": 12, "hidden": 16}},
            "teacher": {"name": "tiny"},
            "stages": [{"epochs": 2, "loss": {"name": "kd"}}],
        }
    )


def trainer_batches(cfg: TrainConfig, epoch: int, rank: int = 0, world_size: int = 1) -> list:
    data = build_train_data(cfg, rank, world_size, ["tiny"], pin_memory=False)
    return list(data.epoch(epoch, ["tiny"]))


def assert_same_batches(ours: list, theirs: list, rendering) -> None:
    assert [len(b) for b in ours] == [len(b) for b in theirs]
    for a, b in zip(ours, theirs, strict=True):
        assert a.keys == b.keys
        assert torch.equal(a.views, b.views) and torch.equal(a.labels, b.labels)
        assert torch.equal(a.images, normalize(b.images, rendering))
        assert a.targets.keys() == b.targets.keys()
        for name in a.targets:
            for x, y in zip(a.targets[name].tensors(), b.targets[name].tensors(), strict=True):
                assert torch.equal(x, y)


@pytest.mark.parametrize("workers", [0, 2])
def test_the_dataset_gives_the_trainers_batches_epoch_after_epoch(world, workers):
    cfg = config(world, num_workers=workers)
    dataset = kdcache.CacheDataset.from_config(cfg)
    assert dataset.teachers == ("tiny",) and dataset.batches_per_epoch() == 6
    for epoch in (0, 1):
        dataset.set_epoch(epoch)
        ours = list(dataset.loader())
        assert_same_batches(ours, trainer_batches(cfg, epoch), dataset.rendering)
    assert len({k for b in ours for k in b.keys}) == 47  # every valid sample once


def test_two_ranks_get_the_trainers_halves(world):
    cfg = config(world, num_workers=2)
    seen = []
    for rank in (0, 1):
        dataset = kdcache.CacheDataset.from_config(cfg, rank=rank, world_size=2, epoch=1)
        ours = list(dataset.loader())
        assert_same_batches(ours, trainer_batches(cfg, 1, rank, 2), dataset.rendering)
        assert len(ours) == dataset.batches_per_epoch()
        seen += [k for b in ours for k in b.keys]
    assert len(seen) == len(set(seen)) == 47


def test_keywords_plan_as_the_config_does(world):
    """The keyword constructor is the config's data section under other names."""
    dataset = kdcache.CacheDataset(
        world["urls"],
        str(world["root"] / "cache.zarr"),
        teachers=["tiny"],
        seed=3,
        batch_size=8,
        shuffle_buffer=10,
        epoch=1,
    )
    assert dataset.num_classes == 4 and dataset.channels == 1 and dataset.rendering.size == 12
    assert_same_batches(
        list(dataset.loader()), trainer_batches(config(world), 1), dataset.rendering
    )


def test_a_second_pass_without_set_epoch_fails_loudly(world):
    dataset = kdcache.CacheDataset.from_config(config(world))
    first = [k for b in dataset.loader() for k in b.keys]
    with pytest.raises(DataError, match="epoch 0 was already iterated; call dataset.set_epoch"):
        list(dataset.loader())
    dataset.set_epoch(0)  # the same epoch again, said explicitly
    assert [k for b in dataset.loader() for k in b.keys] == first
    with pytest.raises(ValueError, match="epoch must be >= 0"):
        dataset.set_epoch(-1)


def test_persistent_workers_follow_set_epoch(world):
    cfg = config(world, num_workers=2)
    dataset = kdcache.CacheDataset.from_config(cfg)
    loader = dataset.loader(persistent_workers=True)
    for epoch in (0, 1):
        dataset.set_epoch(epoch)
        assert_same_batches(list(loader), trainer_batches(cfg, epoch), dataset.rendering)
    with pytest.raises(DataError, match="epoch 1 was already iterated"):
        list(loader)


def test_the_eval_dataset_is_the_trainers_validation_stream(world):
    cfg = config(world, num_workers=2)
    dataset = kdcache.CacheDataset.from_config(cfg)
    evaluation = dataset.eval_dataset()
    recipe = dataset.spec.recipe
    _, loader = build_eval_data(cfg.data, 0, 1, recipe, 4, pin_memory=False, student=cfg.student)
    for _ in range(2):  # evaluation needs no set_epoch: every pass is the same
        ours = list(evaluation.loader())
        assert_same_batches(ours, list(loader), dataset.rendering)
    assert sum(len(b) for b in ours) == 20 and not ours[0].targets


def test_mixed_views_carry_both_labels_and_lam(world):
    cfg = config(world, cache="mix.zarr")
    dataset = kdcache.CacheDataset.from_config(cfg)
    batches = list(dataset.loader())
    assert_same_batches(batches, trainer_batches(cfg, 0), dataset.rendering)
    labels = batches[0].hard_labels()
    assert isinstance(labels, MixedLabels)
    lam = torch.cat([b.lam for b in batches])
    assert (lam < 1).any() and (lam == 1).any()
    trainer = trainer_batches(cfg, 0)
    partners = torch.cat([b.partner_labels for b in batches])
    assert torch.equal(partners, torch.cat([b.partner_labels for b in trainer]))


def test_uneven_ranks_under_a_dataloader_are_refused_with_batch_sizes_that_work(world):
    # 47 samples over 2 ranks: slots of 24 and 23; batch 23 would give rank 0 one more batch
    with pytest.raises(ConfigError, match=r"use a batch size that does not divide 23, e.g. 22"):
        kdcache.CacheDataset.from_config(config(world, batch_size=23), rank=1, world_size=2)
    dataset = kdcache.CacheDataset.from_config(config(world, batch_size=22), rank=1, world_size=2)
    assert dataset.batches_per_epoch() == 2


def test_a_subset_of_the_cache_shards_needs_saying_so(world):
    cache = str(world["root"] / "cache.zarr")
    with pytest.raises(CacheMismatchError, match="set cache.shard_subset: true"):
        kdcache.CacheDataset(world["urls"][1:2], cache, teachers=["tiny"])
    subset = kdcache.CacheDataset(world["urls"][1:2], cache, teachers=["tiny"], shard_subset=True)
    keys = [k for b in subset.loader() for k in b.keys]
    assert sorted(keys) == [f"train_{i:06d}" for i in range(12, 24)]


def test_without_a_cache_views_are_drawn_and_no_targets_come(world, tmp_path):
    clean = write_shards(tmp_path / "clean")
    dataset = kdcache.CacheDataset(
        clean, num_classes=4, views={"recipe": tiny_recipe().model_dump()}, batch_size=16
    )
    batches = list(dataset.loader())
    assert sum(len(b) for b in batches) == 48 and not batches[0].targets
    with pytest.raises(ConfigError, match="data.num_classes: required when no cache.path"):
        kdcache.CacheDataset(clean)


def test_a_sampled_teacher_keeps_its_draws_through_the_dataset(world, tmp_path):
    """Samples and collate carry every field of sampled targets, as the trainer's batches do."""
    build_cache(
        tmp_path / "drawn.zarr", world["urls"], teachers={"tiny": 1}, encoding="sampled", samples=3
    )
    cfg = config(world)
    cfg.cache.path = str(tmp_path / "drawn.zarr")
    dataset = kdcache.CacheDataset.from_config(cfg)
    dataset.set_epoch(0)
    ours = list(dataset.loader())
    assert isinstance(ours[0].targets["tiny"], SampledTargets)
    assert_same_batches(ours, trainer_batches(cfg, 0), dataset.rendering)


def test_collate_refuses_nothing_to_stack():
    with pytest.raises(ValueError, match="no samples"):
        kdcache.collate([])
