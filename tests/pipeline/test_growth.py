"""Growing a cache from A to A' views: stored views and targets untouched, the new views equal to
those of a cache made with A' from the start, readers refusing until the teachers filled them.

In-process precomputes (the planner and ShardWorker, no Ray) over tiny grey shards with a strong
recipe (RandAugment, erasing, Mixup/CutMix within groups of 6)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from kdcache.cache.integrity import find_damage
from kdcache.cache.reader import incomplete_error, read_block
from kdcache.cache.store import FORMAT_VERSION, GROWN_FORMAT_VERSION, open_store
from kdcache.cache_tools.verify import verify_cache
from kdcache.core.errors import CacheIncompleteError, CacheMismatchError, CacheReadError
from kdcache.pipeline.plan import plan_precompute, seal_fingerprint
from kdcache.train.config import TrainConfig
from kdcache.train.data import build_train_data
from tests.support.cachebuild import (
    assert_same_arrays,
    cache_arrays,
    precompute_config,
    run_precompute,
    tiny_recipe,
    tiny_teacher,
    write_shards,
)

STRONG = {
    "policy": "rand-m9-mstd0.5-inc1",
    "erasing": {"prob": 0.25, "mode": "pixel"},
    "mix": {"mixup_alpha": 0.8, "cutmix_alpha": 1.0, "group_size": 6},
}
ROW_ARRAYS = ("keys", "labels", "status", "errors", "views/image_hw", "views_done")
"""Arrays of :func:`cache_arrays` without a view axis."""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """4 grey shards of 12 samples (one unlabelled: an invalid row), two saved tiny teachers."""
    root = tmp_path_factory.mktemp("growth")
    urls = write_shards(root / "shards", unlabelled=("train_000005",))
    teachers = []
    for seed, name in enumerate(("t1", "t2")):
        spec, _ = tiny_teacher(4, seed=seed, save_to=root / f"{name}.pt")
        teachers.append({"name": name, "model": spec.model_dump(), "k": 3})
    return {"root": root, "urls": urls, "teachers": teachers}


def config(setup, path: Path, views: int, teachers=("t1", "t2"), grow: bool = False):
    sections = [t for t in setup["teachers"] if t["name"] in teachers]
    cfg = precompute_config(
        path, setup["urls"], sections, recipe=tiny_recipe(**STRONG), num_views=views
    )
    return cfg.model_copy(update={"cache": cfg.cache.model_copy(update={"grow": grow})})


def chunk_bytes(path: Path) -> dict[str, bytes]:
    """Every stored chunk file of the views' and teachers' arrays, by path."""
    files = [f for top in ("views", "teachers") for f in (path / top).rglob("*") if f.is_file()]
    return {str(f.relative_to(path)): f.read_bytes() for f in files if "/c/" in str(f)}


@pytest.fixture(scope="module")
def made_with_four(setup):
    """The reference: a cache made with 4 views from the start."""
    path = setup["root"] / "four.zarr"
    run_precompute(config(setup, path, 4))
    return cache_arrays(path)


def test_a_cache_grown_from_two_to_four_views_keeps_the_first_two_and_equals_one_made_with_four(
    setup, made_with_four, tmp_path
):
    path = tmp_path / "cache.zarr"
    run_precompute(config(setup, path, 2))
    before = cache_arrays(path)
    stored = chunk_bytes(path)
    assert open_store(str(path)).meta.format_version == FORMAT_VERSION

    with pytest.raises(CacheMismatchError, match=r"num_views: the cache has 2, the run asks for 4"):
        plan_precompute(config(setup, path, 4))  # no flag: a typo never grows a cache
    with pytest.raises(CacheMismatchError, match="cache.grow: true"):
        plan_precompute(config(setup, path, 4))

    plan = plan_precompute(config(setup, path, 4, grow=True))
    assert [(t.make_views, t.new_views, t.teachers, t.teacher_views) for t in plan.tasks] == [
        (False, ((2, 4),), ("t1", "t2"), (((2, 4),), ((2, 4),)))
    ] * 4
    store = open_store(str(path))
    assert store.meta.format_version == GROWN_FORMAT_VERSION
    assert store.meta.view_blocks == [2, 4] and store.meta.num_views == 4
    with pytest.raises(CacheIncompleteError, match=r"lacks its views 2\.\.3 .* grew to 4 views"):
        read_block(store, 0, ["t1"])
    message = str(incomplete_error(store, ["t1"]))
    assert "the views lack views 2..3 on 4 shard(s)" in message
    assert "cache.num_views=4" in message and "'t1'" in message

    run_precompute(config(setup, path, 4, grow=True))
    grown = cache_arrays(path)
    for name, array in before.items():  # the first two views: the very same values
        new = grown[name] if name in ROW_ARRAYS or name.endswith("/done") else grown[name][:, :2]
        np.testing.assert_array_equal(new, array, err_msg=name)
    after = chunk_bytes(path)
    assert {k: after[k] for k in stored} == stored  # and their chunk files untouched
    assert len(after) > len(stored)  # the new views are new chunks
    assert_same_arrays(grown, made_with_four)  # views depend on (seed, key, view) only

    store = open_store(str(path))
    assert store.incomplete_shards() == {} and find_damage(store, check=True) == []
    for result in verify_cache(store, num=48).teachers:
        assert result.ok, result
    assert plan_precompute(config(setup, path, 4)).tasks == []  # done: a rerun needs no flag


def test_a_teacher_left_out_of_the_growth_fills_its_new_views_later(setup, tmp_path):
    path = tmp_path / "cache.zarr"
    run_precompute(config(setup, path, 2))
    run_precompute(config(setup, path, 4, teachers=("t1",), grow=True))
    store = open_store(str(path))
    assert store.incomplete_shards(["t1"]) == {}
    read_block(store, 1, ["t1"])
    with pytest.raises(CacheIncompleteError, match=r"teacher 't2''s targets for views 2\.\.3"):
        read_block(store, 1, ["t2"])
    message = str(incomplete_error(store, ["t1", "t2"]))
    assert "teacher 't2' lack views 2..3 on 4 shard(s)" in message and "'t2'" in message

    t1_before = cache_arrays(path)
    plan = plan_precompute(config(setup, path, 4))
    assert [(t.new_views, t.teachers, t.teacher_views) for t in plan.tasks] == [
        ((), ("t2",), (((2, 4),),))
    ] * 4
    run_precompute(config(setup, path, 4))
    after = cache_arrays(path)
    for name in [n for n in after if n.startswith("t1/")]:
        np.testing.assert_array_equal(after[name], t1_before[name], err_msg=name)
    assert open_store(str(path)).incomplete_shards() == {}


def test_a_teacher_added_after_the_growth_has_one_block_and_the_cache_grows_again(
    setup, made_with_four, tmp_path
):
    path = tmp_path / "cache.zarr"
    run_precompute(config(setup, path, 2, teachers=("t1",)))
    run_precompute(config(setup, path, 4, grow=True))  # t2 is new: all 4 views at once
    store = open_store(str(path))
    assert [(b.start, b.stop) for b in store.blocks("t1")] == [(0, 2), (2, 4)]
    assert [(b.start, b.stop) for b in store.blocks("t2")] == [(0, 4)]
    assert_same_arrays(cache_arrays(path), made_with_four)

    run_precompute(config(setup, path, 5, grow=True))
    store = open_store(str(path))
    assert store.meta.view_blocks == [2, 4, 5]
    assert [(b.start, b.stop) for b in store.blocks("t2")] == [(0, 4), (4, 5)]
    assert store.incomplete_shards() == {} and find_damage(store, check=True) == []
    for result in verify_cache(store, num=48, seed=1).teachers:
        assert result.ok, result
    with pytest.raises(CacheMismatchError, match="a cache cannot lose views: it keeps its 5"):
        plan_precompute(config(setup, path, 4, grow=True))


def train_config(setup, path: Path, run_dir: Path, teacher: str) -> TrainConfig:
    return TrainConfig.model_validate(
        {
            "run": {"dir": str(run_dir), "progress": False},
            "data": {"shards": setup["urls"], "batch_size": 8, "num_workers": 0},
            "cache": {"path": str(path)},
            "student": {"name": "kd_mlp", "kwargs": {"img_size": 12, "hidden": 8}},
            "teacher": {"mode": "cache", "name": teacher},
            "stages": [{"epochs": 1, "loss": {"name": "kd", "alpha": 0.5, "temperature": 2.0}}],
        }
    )


def test_the_trainer_uses_every_view_of_a_grown_cache_once_its_teacher_filled_them(setup, tmp_path):
    path = tmp_path / "cache.zarr"
    run_precompute(config(setup, path, 2))
    run_precompute(config(setup, path, 4, teachers=("t1",), grow=True))
    seal_fingerprint(open_store(str(path), "r+"))  # as the runner does at the end of a run
    with pytest.raises(CacheIncompleteError, match=r"teacher 't2' lack views 2\.\.3 on 4 shard"):
        build_train_data(train_config(setup, path, tmp_path / "t2", "t2"), 0, 1, ["t2"], False)
    data = build_train_data(train_config(setup, path, tmp_path / "t1", "t1"), 0, 1, ["t1"], False)
    assert data.spec.num_views == 4
    seen = {
        int(v) for epoch in range(8) for batch in data.epoch(epoch, ["t1"]) for v in batch.views
    }
    assert seen == {0, 1, 2, 3}


def test_a_growth_cut_short_is_refused_by_readers_and_finished_by_the_next_run(setup, tmp_path):
    path = tmp_path / "cache.zarr"
    run_precompute(config(setup, path, 2))
    store = open_store(str(path), "r+")
    # the driver died right after writing the root attributes: no array resized, no new marks
    store.group.attrs.update({"num_views": 4, "view_blocks": [2, 4], "format_version": 4})
    store = open_store(str(path))
    with pytest.raises(CacheIncompleteError, match=r"views 2\.\.3"):
        read_block(store, 0, ["t1"])
    run_precompute(config(setup, path, 4))  # the count is the cache's now: no flag needed
    store = open_store(str(path))
    assert store.incomplete_shards() == {} and find_damage(store, check=True) == []


def test_damage_in_the_new_views_redoes_only_them(setup, tmp_path):
    path = tmp_path / "cache.zarr"
    run_precompute(config(setup, path, 2))
    run_precompute(config(setup, path, 4, grow=True))
    clean = cache_arrays(path)
    (path / "teachers/t2/lse/c/1/1").unlink()  # shard 1's chunk of views 2..3
    [damage] = find_damage(open_store(str(path)))
    assert (damage.part, damage.shard, damage.start) == ("t2", 1, 2)
    plan = plan_precompute(config(setup, path, 4))
    assert [(t.index, t.make_views, t.teachers, t.teacher_views) for t in plan.tasks] == [
        (1, False, ("t2",), (((2, 4),),))
    ]
    run_precompute(config(setup, path, 4))
    assert_same_arrays(cache_arrays(path), clean)


def test_sampled_and_ensemble_teachers_grow_like_the_others(setup, tmp_path):
    """The draws of a grown view are keyed by its view index like any other view's, and a stored
    ensemble's new views combine its models as the first ones did: growing 2 -> 4 equals a cache
    made with 4, and verify recomputes both."""
    t1, t2 = (dict(t) for t in setup["teachers"])
    members = [{"model": t1["model"], "weight": 1.0}, {"model": t2["model"], "weight": 2.0}]
    beyond = [
        {"name": "drawn", "model": t1["model"], "k": 1, "encoding": "sampled", "samples": 3},
        {"name": "ens", "ensemble": {"members": members}, "k": 2},
    ]
    setup = {**setup, "teachers": beyond}
    run_precompute(config(setup, tmp_path / "four.zarr", 4, teachers=("drawn", "ens")))
    path = tmp_path / "grown.zarr"
    run_precompute(config(setup, path, 2, teachers=("drawn", "ens")))
    run_precompute(config(setup, path, 4, teachers=("drawn", "ens"), grow=True))
    assert_same_arrays(cache_arrays(path), cache_arrays(tmp_path / "four.zarr"))
    results = verify_cache(open_store(str(path)), num=40).teachers
    assert sorted(r.teacher for r in results) == ["drawn", "ens"]
    assert all(r.ok for r in results)
    assert next(r for r in results if r.teacher == "drawn").draws_agreement == 1.0


# ---- repairs of a grown cache: any damaged chunk, the rerun its reader names ---------------------


@pytest.fixture(scope="module")
def grown(setup, tmp_path_factory):
    """A cache made with 2 views and grown to 4, its arrays, and every chunk file it holds (marks
    included), as paths relative to the cache."""
    path = tmp_path_factory.mktemp("grown") / "cache.zarr"
    run_precompute(config(setup, path, 2))
    run_precompute(config(setup, path, 4, grow=True))
    chunks = sorted(str(f.relative_to(path)) for f in path.rglob("*") if "/c/" in str(f))
    chunks = [c for c in chunks if (path / c).is_file()]
    return {"path": path, "arrays": cache_arrays(path), "chunks": chunks}


def damage_chunk(path: Path, how: str, position: float) -> None:
    data = path.read_bytes()
    if how == "delete":
        path.unlink()
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "truncate":
        path.write_bytes(data[: len(data) // 2])
    else:  # flip one byte anywhere: the chunk's crc32c no longer matches
        flipped = bytearray(data)
        flipped[min(int(position * len(data)), len(data) - 1)] ^= 0x5A
        path.write_bytes(bytes(flipped))


def named_rerun(cache: Path) -> bool | None:
    """Read every shard as the trainer does: None if none is refused, else whether the refusal
    names ``--check`` (a plain rerun otherwise)."""
    store = open_store(str(cache))
    for shard in range(store.num_shards):
        try:
            read_block(store, shard, ["t1", "t2"])
        except CacheReadError as exc:
            return "--check" in str(exc)
    return None


@settings(
    max_examples=8,
    deadline=None,
    derandomize=True,
    phases=[Phase.explicit, Phase.generate],  # no shrinking: each example rebuilds a shard
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    pick=st.integers(0, 2**20),
    how=st.sampled_from(["delete", "empty", "truncate", "flip"]),
    position=st.floats(0, 1),
)
def test_any_damaged_chunk_of_a_grown_cache_is_repaired_by_the_rerun_its_reader_names(
    setup, grown, pick, how, position
):
    chunk = grown["chunks"][pick % len(grown["chunks"])]
    assert_named_rerun_repairs(setup, grown, chunk, how, position)


@pytest.mark.parametrize(
    ("chunk", "how"),
    [
        ("views/erase_seed/c/1/1", "flip"),  # a new view's parameters: cleared, re-read, failed
        ("views/mix_center/c/2/1/0", "truncate"),
        ("teachers/t1/lse/c/2/1", "empty"),  # a 0-byte chunk: passed the cheap check
        ("keys/c/3", "flip"),
    ],
)
def test_named_rerun_repairs_the_new_views_of_a_grown_cache(setup, grown, chunk, how):
    assert_named_rerun_repairs(setup, grown, chunk, how, 0.5)


def test_the_cheap_check_finds_a_zero_byte_chunk(grown, tmp_path):
    cache = tmp_path / "cache.zarr"
    shutil.copytree(grown["path"], cache)
    (cache / "teachers/t1/lse/c/2/1").write_bytes(b"")
    [damage] = find_damage(open_store(str(cache)))  # no --check: existence and size only
    assert (damage.part, damage.shard, damage.start, damage.array) == (
        "t1",
        2,
        2,
        "teachers/t1/lse",
    )


def assert_named_rerun_repairs(setup, grown, chunk: str, how: str, position: float) -> None:
    """Damage ``chunk`` of a copy of the grown cache; the rerun a reader's refusal names (plain, or
    ``--check``) leaves no refusal and a cache equal to the clean one."""
    with tempfile.TemporaryDirectory(dir=grown["path"].parent) as scratch:
        cache = Path(scratch) / "cache.zarr"
        shutil.copytree(grown["path"], cache)
        damage_chunk(cache / chunk, how, position)
        check = named_rerun(cache)
        rerun = config(setup, cache, 4)
        rerun.cache.check = bool(check)
        run_precompute(rerun)
        assert named_rerun(cache) is None, chunk
        assert_same_arrays(cache_arrays(cache), grown["arrays"])
