"""Damage at rest (issue 17 items 1-2): chunk files of a finished cache deleted, flipped or cut.

Every reader refuses a damaged shard naming the cache, the array and the shard (never fill values
or garbage), and a precompute rerun redoes exactly the damaged part of exactly that shard, ending
with a cache equal to a clean run's. Real caches made by precompute's own code (planner and
worker, in-process), real files damaged on disk.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import numcodecs
import numpy as np
import pytest
import yaml
import zarr
from zarr.errors import ZarrUserWarning

from kdcache.cache.integrity import find_damage
from kdcache.cache.reader import read_array, read_block
from kdcache.cache.store import open_store
from kdcache.cli import main
from kdcache.core.errors import CacheIncompleteError, CacheReadError, KdcacheError
from kdcache.pipeline.config import PrecomputeConfig, TeacherSection
from kdcache.pipeline.plan import plan_precompute
from kdcache.pipeline.runner import worker_settings
from kdcache.pipeline.worker import ShardWorker
from tests.support.cachebuild import precompute_config, run_precompute, tiny_teacher, write_shards

TEACHERS = {"t1": 4, "t2": 2}
SHARDS = [f"train-{i:06d}.tar" for i in range(4)]


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> dict:
    """4 shards x 12 grey samples, a finished cache with teachers t1 (k=4) and t2 (k=2)."""
    root = tmp_path_factory.mktemp("damage")
    urls = write_shards(root / "shards")
    sections = []
    for seed, (name, k) in enumerate(TEACHERS.items()):
        spec, _ = tiny_teacher(4, seed=seed, save_to=root / f"{name}.pt")
        sections.append({"name": name, "model": spec.model_dump(), "k": k})
    run_precompute(precompute_config(root / "cache", urls, sections))
    return {"root": root, "urls": urls, "sections": sections, "cache": root / "cache"}


def copy_of(clean: dict, tmp_path: Path, check: bool = False) -> tuple[Path, PrecomputeConfig]:
    """A copy of the clean cache and the precompute config that made it, pointed at the copy."""
    cache = tmp_path / "cache"
    shutil.copytree(clean["cache"], cache)
    config = precompute_config(cache, clean["urls"], clean["sections"])
    config.cache.check = check
    return cache, config


def all_arrays(cache: Path) -> dict[str, np.ndarray]:
    """Every array of a cache, read with Zarr directly; completion marks (timestamps) as
    booleans."""
    group = zarr.open_group(str(cache), mode="r")
    out = {}
    with warnings.catch_warnings():  # the run records' folder is no Zarr node: Zarr says so
        warnings.filterwarnings("ignore", "Object at runs is not recognized", ZarrUserWarning)
        members = list(group.members(max_depth=None))
    for path, array in members:
        if isinstance(array, zarr.Array):
            values = np.asarray(array[:])
            out[path] = values > 0 if path.split("/")[-1] in ("views_done", "done") else values
    return out


def assert_equal_caches(a: Path, b: Path) -> None:
    first = all_arrays(a)
    second = all_arrays(b)
    assert sorted(first) == sorted(second)
    for name, values in first.items():
        np.testing.assert_array_equal(values, second[name], err_msg=name)


def marks(cache: Path) -> dict[str, list[int | None]]:
    """The completion marks' timestamps (None: unreadable): a shard redone gets a new one."""
    group = zarr.open_group(str(cache), mode="r")
    paths = {"views": "views_done", **{name: f"teachers/{name}/done" for name in TEACHERS}}
    return {
        part: [_stamp(group[path], i) for i in range(len(SHARDS))] for part, path in paths.items()
    }


def _stamp(array: zarr.Array, shard: int) -> int | None:
    try:
        return int(array[shard])
    except ValueError:  # a damaged mark fails its checksum
        return None


def rerun(config: PrecomputeConfig):
    """The precompute rerun, in-process: plan (which checks and repairs), then run the tasks."""
    plan = plan_precompute(config)
    worker = ShardWorker(worker_settings(config, plan))
    for task in plan.tasks:
        worker(task)
    return plan


# ---- damage on disk -----------------------------------------------------------------------------


def chunk_file(cache: Path, array: str, shard: int) -> Path:
    """The file of shard ``shard``'s chunk of ``array`` (Zarr v3 default keys: c/<shard>/0/...)."""
    path = cache / array / "c" / str(shard)
    while path.is_dir():
        path = path / "0"
    assert path.is_file(), path
    return path


def delete(path: Path) -> None:
    path.unlink()


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


def flip_header(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[0] ^= 0x5A  # the compressor's header: this chunk no longer decompresses
    path.write_bytes(bytes(data))


def flip_payload(path: Path) -> None:
    """Flip a byte in the compressed payload such that, without the checksum, the chunk still
    decompresses, to other values: the case that used to train on garbage."""
    data = path.read_bytes()
    body = data[:-4]  # the last 4 bytes are the crc32c checksum
    original = numcodecs.blosc.decompress(body)
    for position in range(len(body) // 2, len(body)):
        flipped = bytearray(body)
        flipped[position] ^= 0x5A
        try:
            if numcodecs.blosc.decompress(bytes(flipped)) != original:
                path.write_bytes(bytes(flipped) + data[-4:])
                return
        except RuntimeError:
            continue
    raise AssertionError(f"no byte of {path} flips to a chunk that still decompresses")


@dataclass(frozen=True)
class Case:
    array: str
    shard: int
    damage: object
    check: bool
    """Whether the rerun needs --check to see it (the file exists, its bytes are wrong)."""
    teachers: tuple[str, ...]
    """The teachers the rerun redoes on the shard."""
    make_views: bool
    train_teacher: str = "t1"


CASES = {
    "status-chunk-deleted": Case("status", 1, delete, False, ("t1", "t2"), True),
    "topk_logit-chunk-deleted": Case("teachers/t1/topk_logit", 2, delete, False, ("t1",), False),
    "topk_logit-bytes-flipped-still-decompresses": Case(
        "teachers/t1/topk_logit", 3, flip_payload, True, ("t1",), False
    ),
    "lse-bytes-flipped-no-longer-decompresses": Case(
        "teachers/t2/lse", 0, flip_header, True, ("t2",), False, train_teacher="t2"
    ),
    "status-bytes-flipped": Case("status", 2, flip_payload, True, ("t1", "t2"), True),
    "crop-chunk-truncated": Case("views/crop", 1, truncate, True, ("t1", "t2"), True),
    "views-mark-bytes-flipped": Case("views_done", 3, flip_header, False, ("t1", "t2"), True),
}


# ---- the trainer stops, naming shard and array --------------------------------------------------


def train_yaml(clean: dict, cache: Path, tmp_path: Path, teacher: str, workers: int) -> str:
    config = {
        "run": {"dir": str(tmp_path / "run"), "progress": False},
        "data": {
            "shards": clean["urls"],
            "batch_size": 8,
            "num_workers": workers,
            "shuffle_buffer": 10,
        },
        "cache": {"path": str(cache)},
        "student": {"name": "kd_mlp", "kwargs": {"img_size": 12, "hidden": 16}},
        "teacher": {"mode": "cache", "name": teacher},
        "optimizer": {"lr": 0.1},
        "stages": [{"epochs": 1, "loss": {"name": "kd", "alpha": 0.5, "temperature": 2.0}}],
    }
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


@pytest.mark.parametrize("name", list(CASES))
def test_damage_stops_training_naming_shard_and_array_and_a_rerun_redoes_that_shard(
    name, clean, tmp_path, capsys, caplog
):
    case = CASES[name]
    cache, config = copy_of(clean, tmp_path, check=case.check)
    case.damage(chunk_file(cache, case.array, case.shard))
    shard = SHARDS[case.shard]

    config_path = train_yaml(clean, cache, tmp_path, case.train_teacher, workers=0)
    assert main(["train", config_path]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"kdcache train: error: cache {str(cache)!r}")
    assert f"{case.array!r}" in err[0] and shard in err[0]

    before = marks(cache)
    with caplog.at_level(logging.WARNING, logger="kdcache.pipeline.repair"):
        plan = rerun(config)
    assert [(t.index, t.make_views, t.teachers) for t in plan.tasks] == [
        (case.shard, case.make_views, case.teachers)
    ]
    warned = [r.getMessage() for r in caplog.records if r.name == "kdcache.pipeline.repair"]
    assert len(warned) == 1 and f"shard {shard!r}: {case.array!r}" in warned[0], warned
    after = marks(cache)
    for part, stamps in before.items():  # every other shard kept its marks: it was not redone
        others = [i for i in range(len(SHARDS)) if i != case.shard]
        assert [after[part][i] for i in others] == [stamps[i] for i in others], part
    assert_equal_caches(cache, clean["cache"])
    assert plan_precompute(config).tasks == []  # and the repaired cache checks clean


def test_precompute_command_with_check_repairs_and_says_which(
    ray_session, clean, tmp_path, capsys, caplog
):
    """The real command, through Ray: ``kdcache precompute CONFIG --check`` names the damaged
    shard and array, redoes that shard only, and the cache equals the clean one."""
    cache, config = copy_of(clean, tmp_path)
    flip_payload(chunk_file(cache, "teachers/t2/topk_logit", 1))
    delete(chunk_file(cache, "views/flip", 3))
    path = tmp_path / "precompute.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    with caplog.at_level(logging.INFO):
        assert main(["precompute", str(path), "ray.num_actors=1", "--check"]) == 0
    assert "2/2 shard task(s) done" in capsys.readouterr().out
    assert (
        "shard 'train-000001.tar': 'teachers/t2/topk_logit' cannot be decoded (ValueError: "
        "Stored and computed checksum do not match." in caplog.text
    )
    assert "shard 'train-000003.tar': 'views/flip' has no chunk file" in caplog.text
    assert "checked the marked shards' chunks (existence and checksums)" in caplog.text
    assert_equal_caches(cache, clean["cache"])
    assert main(["precompute", str(path), "--check"]) == 0
    assert "nothing to do" in capsys.readouterr().out


def test_damage_without_check_is_still_refused_by_readers(clean, tmp_path):
    """The cheap check (existence) does not see flipped bytes: the rerun finds nothing to do, but
    every reader still refuses the shard; --check then repairs it."""
    cache, config = copy_of(clean, tmp_path, check=False)
    flip_payload(chunk_file(cache, "teachers/t1/topk_logit", 2))
    assert plan_precompute(config).tasks == []
    with pytest.raises(CacheReadError, match=r"'teachers/t1/topk_logit' of shard 'train-000002"):
        read_block(open_store(str(cache)), 2, ["t1"])
    config.cache.check = True
    assert [t.index for t in rerun(config).tasks] == [2]
    assert_equal_caches(cache, clean["cache"])


def test_keys_chunk_deleted_redoes_the_shards_views(clean, tmp_path, capsys, caplog):
    """A shard's keys belong to its views (the worker writes them together): the rerun makes the
    shard's views, keys included, again."""
    cache, config = copy_of(clean, tmp_path)
    delete(chunk_file(cache, "keys", 0))
    assert main(["train", train_yaml(clean, cache, tmp_path, "t1", workers=0)]) == 2
    err = capsys.readouterr().err
    assert "'keys' has no chunk file" in err and "train-000000.tar" in err
    with caplog.at_level(logging.WARNING, logger="kdcache.pipeline.repair"):
        assert [t.index for t in rerun(config).tasks] == [0]
    assert "its views mark is cleared" in caplog.text
    assert_equal_caches(cache, clean["cache"])


def test_keys_chunk_with_a_bad_checksum_beside_a_manifest_is_repaired_by_check(
    data_dir, tmp_path, caplog
):
    """Shards with a manifest (as `kdcache shards` writes them): planning compares the stored keys
    with the manifest's digests; a keys chunk that fails its checksum is damage for the repair,
    not a stop at planning (every rerun, --check included, used to stop there)."""
    urls = sorted(str(p) for p in data_dir.glob("train-*.tar"))
    spec, _ = tiny_teacher(10, seed=0, save_to=tmp_path / "t.pt")
    sections = [{"name": "t", "model": spec.model_dump(), "k": 3}]
    clean, cache = tmp_path / "clean", tmp_path / "cache"
    run_precompute(precompute_config(clean, urls, sections, classes=10))
    shutil.copytree(clean, cache)
    path = chunk_file(cache, "keys", 1)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x5A
    path.write_bytes(bytes(data))
    config = precompute_config(cache, urls, sections, classes=10)
    config.cache.check = True
    with caplog.at_level(logging.WARNING):
        assert [t.index for t in rerun(config).tasks] == [1]
    assert "'keys' of shard 'train-000001.tar'" in caplog.text
    assert_equal_caches(cache, clean)


def test_training_with_dataloader_workers_stops_naming_shard_and_array(clean, tmp_path, capsys):
    """Found inside a DataLoader worker (the shard is read there): still exit 2 and named."""
    cache, _ = copy_of(clean, tmp_path)
    flip_payload(chunk_file(cache, "teachers/t1/topk_logit", 1))
    assert main(["train", train_yaml(clean, cache, tmp_path, "t1", workers=2)]) == 2
    err = capsys.readouterr().err
    assert "CacheReadError" in err or "kdcache train: error: cache" in err
    assert "cannot read 'teachers/t1/topk_logit' of shard 'train-000001.tar'" in err


def test_lost_chunks_are_found_before_any_training(clean, tmp_path, capsys):
    """A lost chunk file is found up front (one listing per array), even with DataLoader
    workers: one line, no run started."""
    cache, _ = copy_of(clean, tmp_path)
    delete(chunk_file(cache, "teachers/t1/label_logit", 3))
    assert main(["train", train_yaml(clean, cache, tmp_path, "t1", workers=2)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"kdcache train: error: cache {str(cache)!r} is damaged: shard 'train-000003.tar': "
        "'teachers/t1/label_logit' has no chunk file for the shard, which is marked complete "
        "(lost after it was written: Zarr would read fill values) (`kdcache validate` lists the "
        "damage; a `kdcache precompute` rerun redoes the shard)"
    ]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_damaged_array_metadata_is_named_and_not_silently_recreated(clean, tmp_path, capsys):
    """An array's zarr.json garbled: one line naming the array from the trainer and the rerun
    alike (the rerun cannot rebuild metadata: the message says how to recover)."""
    cache, config = copy_of(clean, tmp_path)
    (cache / "teachers" / "t1" / "topk_logit" / "zarr.json").write_text("{garbled")
    assert main(["train", train_yaml(clean, cache, tmp_path, "t1", workers=0)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot open array 'teachers/t1/topk_logit'" in err[0], err
    with pytest.raises(CacheReadError, match=r"'teachers/t1/topk_logit'.*--overwrite"):
        plan_precompute(config)


# ---- the other readers --------------------------------------------------------------------------


def test_inspect_verify_and_validate_name_the_damage(clean, tmp_path, capsys):
    cache, _ = copy_of(clean, tmp_path)
    delete(chunk_file(cache, "teachers/t2/topk_idx", 1))
    flip_payload(chunk_file(cache, "status", 2))
    assert main(["inspect", str(cache), "--teacher", "t2"]) == 2
    err = capsys.readouterr().err
    assert "cannot read 'teachers/t2/topk_idx' of shard 'train-000001.tar'" in err
    assert main(["verify", str(cache), "--teacher", "t1", "--num", "4"]) == 2
    assert "cannot read 'status' of shard 'train-000002.tar'" in capsys.readouterr().err
    assert main(["validate", str(cache)]) == 1
    out = capsys.readouterr().out
    assert "shard 'train-000001.tar': 'teachers/t2/topk_idx' has no chunk file" in out
    assert "cannot read 'status' of shard 'train-000002.tar' (ValueError" in out


def test_worker_adding_a_teacher_refuses_damaged_stored_views(clean, tmp_path):
    """Precompute's worker reads the stored views to add a teacher: a damaged chunk there fails
    the shard by name instead of running the teacher on fill values."""
    cache, config = copy_of(clean, tmp_path)
    spec, _ = tiny_teacher(4, seed=7, save_to=tmp_path / "t3.pt")
    config.teachers = [
        *config.teachers,
        TeacherSection.model_validate({"name": "t3", "model": spec.model_dump(), "k": 4}),
    ]
    flip_payload(chunk_file(cache, "views/crop", 2))
    plan = plan_precompute(config)
    assert [(t.index, t.make_views) for t in plan.tasks] == [(i, False) for i in range(4)]
    worker = ShardWorker(worker_settings(config, plan))
    with pytest.raises(CacheReadError, match=r"'views/crop' of shard 'train-000002.tar'"):
        worker(plan.tasks[2])


def test_missing_marks_are_not_done_not_damage(clean, tmp_path, caplog):
    """A shard never finished has no mark chunks and none of its data chunks: readers see it
    as incomplete (validate too), never as damaged, and the rerun simply does it."""
    cache, config = copy_of(clean, tmp_path)
    delete(chunk_file(cache, "views_done", 1))
    delete(chunk_file(cache, "teachers/t1/done", 2))
    delete(chunk_file(cache, "teachers/t1/topk_logit", 2))  # never written: not done, not lost
    store = open_store(str(cache))
    assert find_damage(store) == []
    with pytest.raises(CacheIncompleteError, match=r"'train-000001.tar' has no views yet"):
        read_block(store, 1, ["t1"])
    block = read_block(store, 2, ["t1"], require_complete=False)  # what validate reads
    assert (block.teachers["t1"].topk_logit == 0).all()
    assert read_array(store, "status").shape == (48,)
    with caplog.at_level(logging.WARNING, logger="kdcache.pipeline.repair"):
        plan = rerun(config)
    assert not caplog.records
    assert [(t.index, t.make_views, t.teachers) for t in plan.tasks] == [
        (1, True, ("t1", "t2")),
        (2, False, ("t1",)),
    ]
    assert_equal_caches(cache, clean["cache"])


# ---- fuzz ---------------------------------------------------------------------------------------


FUZZ_ROUNDS = int(os.environ.get("KDCACHE_DAMAGE_FUZZ_ROUNDS", "6"))


def test_random_byte_flips_are_always_refused_and_repaired(clean, tmp_path):
    """Random bytes of random chunk files flipped (marks, keys, views, targets): reading every
    shard as the trainer does either raises a KdcacheError naming a shard, or returns exactly
    the clean values; a precompute rerun with --check then restores the clean cache. Seeded;
    ``KDCACHE_DAMAGE_FUZZ_ROUNDS=200`` explores longer."""
    store = open_store(str(clean["cache"]))
    expected = [read_block(store, i, list(TEACHERS)) for i in range(len(SHARDS))]
    chunks = sorted(p for p in clean["cache"].rglob("*") if p.is_file() and "/c/" in str(p))
    rng = random.Random(int(os.environ.get("KDCACHE_DAMAGE_FUZZ_SEED", "17")))
    for round_ in range(FUZZ_ROUNDS):
        where = tmp_path / str(round_)
        cache, config = copy_of(clean, where, check=True)
        damaged = rng.sample(chunks, rng.randint(1, 3))
        for original in damaged:
            path = cache / original.relative_to(clean["cache"])
            data = bytearray(path.read_bytes())
            for _ in range(rng.randint(1, 4)):
                data[rng.randrange(len(data))] ^= rng.randint(1, 255)
            if data == original.read_bytes():  # two flips of one byte cancelled out
                data[0] ^= 1
            path.write_bytes(bytes(data))
        refused = read_every_shard(cache, expected)
        assert refused, f"round {round_}: {damaged} damaged, every shard read"
        rerun(config)
        assert_equal_caches(cache, clean["cache"])
        assert read_every_shard(cache, expected) == []


def read_every_shard(cache: Path, expected: list) -> list[str]:
    """Read every shard as the trainer does (marks, status column, blocks); the errors raised.
    A read that completes must return the clean values."""
    errors = []
    try:
        store = open_store(str(cache))
        store.incomplete_shards()
        read_array(store, "status")
    except KdcacheError as exc:
        assert any(shard in str(exc) for shard in SHARDS), exc
        errors.append(str(exc))
        store = open_store(str(cache))
    for index, clean_block in enumerate(expected):
        try:
            block = read_block(store, index, list(TEACHERS))
        except KdcacheError as exc:
            assert SHARDS[index] in str(exc), exc
            errors.append(str(exc))
            continue
        assert_same_block(block, clean_block)
    return errors


def assert_same_block(block, clean) -> None:
    for name in ("keys", "labels", "status", "errors"):
        np.testing.assert_array_equal(getattr(block, name), getattr(clean, name), err_msg=name)
    np.testing.assert_array_equal(block.view_params.image_hw, clean.view_params.image_hw)
    for name, values in clean.view_params.arrays.items():
        np.testing.assert_array_equal(block.view_params.arrays[name], values, err_msg=name)
    for teacher, targets in clean.teachers.items():
        for name in ("topk_idx", "topk_logit", "lse", "label_logit", "tail_lse"):
            np.testing.assert_array_equal(
                getattr(block.teachers[teacher], name), getattr(targets, name), err_msg=name
            )
