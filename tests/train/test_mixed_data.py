"""The training data path's speed-ups on real tars and a real Zarr cache of Mixup/CutMix views:
each image decoded once per epoch (a mixing group rendered together), persistent DataLoader
workers that keep the epoch's order, views, targets and resumption, the torch thread default."""

from __future__ import annotations

import os

import pytest
import torch

import kdcache.train.data as data_module
from kdcache.cache.reader import read_block
from kdcache.cache.store import open_store
from kdcache.shards.reading import decode_image, iter_shard, shard_name
from kdcache.train.config import TrainConfig
from kdcache.train.data import build_train_data, training_threads
from kdcache.views.recipe import render
from tests.support.cachebuild import build_cache, tiny_recipe, write_shards

MIX = {"mixup_alpha": 0.8, "cutmix_alpha": 1.0, "group_size": 4, "prob": 0.5}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """4 shards x 12 samples, a 2-teacher cache of Mixup/CutMix views (groups of 4)."""
    root = tmp_path_factory.mktemp("mixed")
    urls = write_shards(root / "shards")
    build_cache(
        root / "mix.zarr", urls, teachers={"tiny": 4, "top2": 2}, recipe=tiny_recipe(mix=MIX)
    )
    return {"root": root, "urls": urls}


def config(world, cached: bool = True, **data) -> TrainConfig:
    body = {
        "run": {"seed": 3},
        "data": {
            "shards": world["urls"],
            "batch_size": 8,
            "num_workers": 0,
            "shuffle_buffer": 10,
            **data,
        },
        "student": {"name": "kd_mlp", "kwargs": {"img_size": 12, "hidden": 16}},
        "teacher": {"name": "tiny"},
        "stages": [{"epochs": 3, "loss": {"name": "kd" if cached else "ce"}}],
    }
    if cached:
        body["cache"] = {"path": str(world["root"] / "mix.zarr")}
    else:
        body["data"]["num_classes"] = 4
        body["views"] = {"recipe": tiny_recipe(mix=MIX).model_dump(mode="json"), "num_views": None}
        body["teacher"] = {"mode": "none"}
    return TrainConfig.model_validate(body)


@pytest.fixture
def decodes(monkeypatch):
    """Every image the data path decodes (the real decoder, counted)."""
    seen: list[bytes] = []

    def counting(image: bytes, channels: int, max_pixels: int | None = None) -> torch.Tensor:
        seen.append(image)
        return decode_image(image, channels, max_pixels)

    monkeypatch.setattr(data_module, "decode_image", counting)
    return seen


def mixed_views(batches) -> int:
    return sum(int((b.lam < 1).sum()) for b in batches)


# ---- each image decoded once per epoch -----------------------------------------------------------


@pytest.mark.parametrize("cached", [True, False], ids=["cache", "no-cache"])
def test_under_mixup_cutmix_each_image_is_decoded_once_per_epoch(world, decodes, cached):
    teachers = ["tiny"] if cached else []
    data = build_train_data(config(world, cached), 0, 1, teachers, pin_memory=False)
    for epoch in range(2):
        decodes.clear()
        batches = list(data.epoch(epoch, teachers))
        assert sum(len(b) for b in batches) == 48
        assert mixed_views(batches) > 5  # partners are needed: decoding them again would show
        assert len(decodes) == 48


def test_groups_are_rendered_at_the_pace_of_the_batches(world, decodes):
    """The shuffle gives out whole groups into a small pool: the first batch decodes about a
    pool and a batch's worth of images, not everything the shuffle buffer holds (which stalled
    the training process at every epoch's start)."""
    cfg = config(world, shuffle_buffer=48, batch_size=16)
    data = build_train_data(cfg, 0, 1, ["tiny"], pin_memory=False)
    pool = data_module.group_pool(data.spec)
    assert pool == 16  # four groups of 4, a batch
    at_first = None
    for _ in data.epoch(0, ["tiny"]):
        if at_first is None:
            at_first = len(decodes)
    # at most the groups in the pool when it first gives out, and those entering while the
    # first batch leaves it (an item-level buffer over the epoch rendered 40 of the 48)
    assert at_first is not None and at_first <= pool + 16
    assert len(decodes) == 48  # still once each


def test_views_rendered_with_their_group_are_those_rendered_alone(world):
    """Every mixed view's pixels are its own image and its partner's, rendered from the cache's
    stored parameters, whatever the order the group was rendered in."""
    cfg = config(world)
    data = build_train_data(cfg, 0, 1, ["tiny"], pin_memory=False)
    store = open_store(str(world["root"] / "mix.zarr"))
    recipe = store.meta.recipe
    samples = {}
    blocks = {}
    for url in world["urls"]:
        name = shard_name(url)
        blocks[name] = read_block(store, name, [])
        for row, sample in enumerate(iter_shard(url)):
            samples[sample.key] = (name, row, sample)
    by_row = {(name, row): s for name, row, s in samples.values()}
    checked = 0
    for batch in data.epoch(1, ["tiny"]):
        for i, key in enumerate(batch.keys):
            name, row, sample = samples[key]
            view = blocks[name].view_params.view(row, int(batch.views[i]))
            image = decode_image(sample.image, recipe.channels)
            partner = None
            if view.mixed:
                other = by_row[(name, row + view.mix_partner)]
                other_image = decode_image(other.image, recipe.channels)
                other_view = blocks[name].view_params.view(
                    row + view.mix_partner, int(batch.views[i])
                )
                partner = (other_image, other_view)
                checked += 1
            alone = render(image, view, recipe, data.rendering, partner)
            assert torch.equal(batch.images[i], alone), key
    assert checked > 5


# ---- persistent workers --------------------------------------------------------------------------


def worker_pids(data) -> list[int]:
    return sorted(w.pid for w in data.loader._iterator._workers)


def same_batches(ours: list, theirs: list) -> None:
    assert [b.keys for b in ours] == [b.keys for b in theirs]
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a.images, b.images) and torch.equal(a.views, b.views)
        assert torch.equal(a.lam, b.lam) and torch.equal(a.partner_labels, b.partner_labels)
        assert a.targets.keys() == b.targets.keys()
        for name in a.targets:
            for x, y in zip(a.targets[name].tensors(), b.targets[name].tensors(), strict=True):
                assert torch.equal(x, y)


def test_persistent_workers_serve_every_epoch_exactly_and_resume(world):
    persistent = build_train_data(config(world, num_workers=2), 0, 1, ["tiny"], False)
    fresh = build_train_data(
        config(world, num_workers=2, persistent_workers=False), 0, 1, ["tiny"], False
    )
    assert persistent.loader.persistent_workers and not fresh.loader.persistent_workers
    pids = None
    for epoch in range(3):
        ours = list(persistent.epoch(epoch, ["tiny"]))
        same_batches(ours, list(fresh.epoch(epoch, ["tiny"])))
        assert pids is None or worker_pids(persistent) == pids  # the same workers, not restarted
        pids = worker_pids(persistent)
        # a resumed epoch on the running workers: the batches after the 3 done, bit for bit
        same_batches(list(persistent.epoch(epoch, ["tiny"], skip_batches=3)), ours[3:])
        assert worker_pids(persistent) == pids
    # another teacher (a new stage): the workers restart and the batches carry its targets
    top2 = list(persistent.epoch(1, ["top2"]))
    assert worker_pids(persistent) != pids
    assert [b.keys for b in top2] == [b.keys for b in list(fresh.epoch(1, ["tiny"]))]
    assert all(b.targets.keys() == {"top2"} and b.targets["top2"].idx.shape[1] == 2 for b in top2)
    persistent.close()
    fresh.close()


# ---- threads -------------------------------------------------------------------------------------


def test_torch_threads_default_to_the_cores_shared_with_the_workers(monkeypatch):
    cores = len(os.sched_getaffinity(0))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert training_threads(None, 0) == cores
    assert training_threads(None, 1) == max(1, cores // 2)
    assert training_threads(None, 2 * cores) == 1  # never 0
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert training_threads(None, 0) == max(1, cores // 2)
    assert training_threads(3, 2) == 3  # run.threads overrides
