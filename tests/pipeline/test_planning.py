"""Planning without reading the payloads: from the manifest, a wids shard index, or tar headers.

Shards planned from a manifest or index have their keys learned by the worker that reads them;
the driver seals the fingerprint's key digest once every shard's keys are stored. Each refusal
of the header path has its counterpart here: a stale index entry is scanned instead, a shard
that differs from its index fails in its worker, keys repeated across shards are refused when
the fingerprint is sealed, and a rerun compares the manifest's per-shard digests with the keys
the cache stores. Precompute runs in-process (no Ray); the request count on an object store is
measured on a local S3 server by its own request log.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest

from kdcache.cache.store import open_store
from kdcache.cache_tools.validate import validate_cache
from kdcache.core.errors import (
    CacheIncompleteError,
    CacheMismatchError,
    ConfigError,
    DataError,
    DuplicateKeyError,
)
from kdcache.pipeline.plan import plan_precompute, seal_fingerprint
from kdcache.pipeline.runner import worker_settings
from kdcache.pipeline.worker import ShardWorker
from kdcache.shards.manifest import Manifest, save_manifest, shard_key_digest
from kdcache.shards.reading import iter_shard, key_digest, scan_shards
from tests.support.cachebuild import assert_same_arrays, cache_arrays
from tests.support.precomputerun import make_config, run_in_process
from tests.support.tarbuild import good, write_tar
from tests.support.trainrun import train_keys


def shards_in(directory: Path, counts: tuple[int, ...] = (6, 6, 6), prefix: str = "s") -> list[str]:
    directory.mkdir(parents=True, exist_ok=True)
    return [
        write_tar(directory / f"{prefix}-{i:06d}.tar", good(f"{prefix}{i}", n))
        for i, n in enumerate(counts)
    ]


def write_manifest(shards: list[str], *, version: int = 2, prefix: str = "s") -> Path:
    """The manifest ``kdcache shards`` would write for these tars (version 1: no sizes or
    digests)."""
    keys = [[sample.key for sample in iter_shard(url)] for url in shards]
    manifest = Manifest(
        version=version,
        split=prefix,
        shards=[Path(u).name for u in shards],
        counts=[len(k) for k in keys],
        num_samples=sum(len(k) for k in keys),
        num_classes=10,
        image_format="png",
        sizes=[os.path.getsize(u) for u in shards] if version >= 2 else None,
        key_digests=[shard_key_digest(k) for k in keys] if version >= 2 else None,
    )
    return save_manifest(manifest, Path(shards[0]).parent, prefix)


def write_wids_index(shards: list[str], path: Path, counts: list[int] | None = None) -> Path:
    """A wids shard index (``widsindex create``'s format); ``counts`` overrides nsamples and drops
    filesize (an index that does not record sizes)."""
    entries = []
    for i, url in enumerate(shards):
        entry = {"url": Path(url).name, "nsamples": len(list(iter_shard(url)))}
        if counts is None:
            entry["filesize"] = os.path.getsize(url)
        else:
            entry["nsamples"] = counts[i]
        entries.append(entry)
    path.write_text(json.dumps({"wids_version": 1, "shardlist": entries}))
    return path


def config(shards: list[str], cache: Path, *overrides: str):
    return make_config(shards, cache, *overrides)


def run_tasks(cfg) -> list[BaseException]:
    """Every task in-process, each failure collected (as the runner does), then the seal."""
    plan = plan_precompute(cfg)
    worker = ShardWorker(worker_settings(cfg, plan))
    failures = []
    for task in plan.tasks:
        try:
            worker(task)
        except DataError as exc:
            failures.append(exc)
    if not failures:
        seal_fingerprint(plan.store)
    return failures


# ---- planning from the manifest ------------------------------------------------------------------


def test_manifest_plans_counts_and_workers_learn_the_keys(tmp_path):
    shards = shards_in(tmp_path / "shards")
    write_manifest(shards)
    plan = plan_precompute(config(shards, tmp_path / "cache"))
    assert plan.data.sources == {str(tmp_path / "shards" / "s-manifest.json"): 3}
    assert [(t.count, t.keys) for t in plan.tasks] == [(6, None)] * 3
    assert plan.data.fingerprint.key_digest == ""  # set once the workers stored the keys
    run_in_process(config(shards, tmp_path / "cache"))
    # the same cache, key digest included, as when planning read every header
    (tmp_path / "shards" / "s-manifest.json").unlink()
    headers = tmp_path / "headers"
    assert plan_precompute(config(shards, headers, "data.num_classes=10")).data.sources == {
        "headers": 3
    }
    run_in_process(config(shards, headers, "data.num_classes=10"))
    assert_same_arrays(cache_arrays(tmp_path / "cache"), cache_arrays(headers))
    digest = key_digest(scan_shards(shards))
    assert open_store(str(tmp_path / "cache")).meta.fingerprint.key_digest == digest
    assert validate_cache(open_store(str(tmp_path / "cache"))).ok
    assert len(train_keys(shards, tmp_path / "cache")) == 18


def test_a_shard_whose_size_changed_is_scanned_from_its_headers(tmp_path, caplog):
    shards = shards_in(tmp_path / "shards")
    write_manifest(shards)
    write_tar(Path(shards[1]), good("s1", 4))  # the manifest still says 6
    caplog.set_level(logging.WARNING)
    plan = plan_precompute(config(shards, tmp_path / "cache"))
    assert "1 shard(s) differ in size from" in caplog.text and "s-000001.tar" in caplog.text
    assert plan.data.fingerprint.counts == [6, 4, 6]
    assert [t.keys is None for t in plan.tasks] == [True, False, True]


def test_a_missing_shard_is_refused_at_planning(tmp_path):
    shards = shards_in(tmp_path / "shards")
    write_manifest(shards)
    Path(shards[2]).unlink()
    with pytest.raises(DataError, match=r"shard '.*s-000002.tar' does not exist"):
        plan_precompute(config(shards, tmp_path / "cache"))
    assert not (tmp_path / "cache").exists()


def test_a_shard_whose_keys_differ_from_the_manifest_fails_in_its_worker(tmp_path):
    shards = shards_in(tmp_path / "shards")
    write_manifest(shards)
    renamed = good("s1")
    renamed[2] = ("s1_xyz", *renamed[2][1:])  # same length: the tar keeps its size
    size = os.path.getsize(shards[1])
    write_tar(Path(shards[1]), renamed)
    assert os.path.getsize(shards[1]) == size
    [failure] = run_tasks(config(shards, tmp_path / "cache"))
    assert "shard 's-000001.tar': its keys differ from those" in str(failure)
    assert "s-manifest.json records (per-shard key digest)" in str(failure)
    store = open_store(str(tmp_path / "cache"))
    assert store.incomplete_shards() == {"views": ["s-000001.tar"], "t1": ["s-000001.tar"]}
    assert store.meta.fingerprint.key_digest == ""


def test_an_old_manifest_without_sizes_plans_from_its_counts(tmp_path):
    shards = shards_in(tmp_path / "shards")
    write_manifest(shards, version=1)
    write_tar(Path(shards[0]), good("s0", 7))  # one more sample than the manifest says
    plan = plan_precompute(config(shards, tmp_path / "cache"))
    assert [t.count for t in plan.tasks] == [6, 6, 6]
    [failure] = run_tasks(config(shards, tmp_path / "cache"))
    assert "shard 's-000000.tar': more than the 6 samples" in str(failure)
    assert "s-manifest.json records (key 's0_006')" in str(failure)


def test_a_malformed_manifest_is_one_error_naming_it(tmp_path):
    shards = shards_in(tmp_path / "shards")
    (tmp_path / "shards" / "s-manifest.json").write_text('{"split": "s", "shards": 3}')
    with pytest.raises(
        DataError, match=r"manifest '.*s-manifest.json' beside the shards is not a v"
    ):
        plan_precompute(config(shards, tmp_path / "cache"))


def test_a_rerun_compares_the_manifest_digests_with_the_stored_keys(tmp_path):
    shards = shards_in(tmp_path / "shards")
    write_manifest(shards)
    run_in_process(config(shards, tmp_path / "cache"))
    renamed = good("s2")
    renamed[0] = ("s2_new", *renamed[0][1:])
    write_tar(Path(shards[2]), renamed)
    write_manifest(shards)  # rewritten with the shards: sizes and digests are current
    with pytest.raises(
        CacheMismatchError,
        match=r"the sample keys differ .*\n  keys changed in shard\(s\) \['s-000002.tar'\]",
    ):
        plan_precompute(config(shards, tmp_path / "cache"))


def test_a_new_teacher_checks_each_shard_against_its_stored_keys(tmp_path):
    shards = shards_in(tmp_path / "shards")
    write_manifest(shards)
    run_in_process(config(shards, tmp_path / "cache"))
    teachers = [{"name": "t2", "model": {"name": "kd_mlp"}, "k": 3}]
    cfg = make_config(shards, tmp_path / "cache", teachers=teachers)
    plan = plan_precompute(cfg)
    assert [(t.make_views, t.source) for t in plan.tasks] == [(False, "the cache")] * 3
    assert plan.tasks[0].keys == tuple(f"s0_{i:03d}" for i in range(6))
    samples = good("s0")
    write_tar(Path(shards[0]), samples[1:] + samples[:1])  # same size, other order
    with pytest.raises(DataError, match=r"sample 0 has key 's0_001', planning found 's0_000'"):
        ShardWorker(worker_settings(cfg, plan))(plan.tasks[0])


# ---- a wids shard index --------------------------------------------------------------------------


def test_a_wids_index_beside_the_shards_or_named_by_data_index(tmp_path):
    shards = shards_in(tmp_path / "shards")
    index = write_wids_index(shards, tmp_path / "shards" / "shardindex.json")
    plan = plan_precompute(config(shards, tmp_path / "a", "data.num_classes=10"))
    assert plan.data.sources == {str(index): 3}
    elsewhere = index.rename(tmp_path / "imagenet-train.json")
    cfg = config(shards, tmp_path / "b", "data.num_classes=10", f"data.index={elsewhere}")
    assert plan_precompute(cfg).data.sources == {str(elsewhere): 3}
    assert run_tasks(cfg) == []
    assert open_store(str(tmp_path / "b")).meta.fingerprint.key_digest == key_digest(
        scan_shards(shards)
    )


def test_bad_data_index_is_one_error_naming_the_key(tmp_path):
    shards = shards_in(tmp_path / "shards")
    missing = tmp_path / "nope.json"
    with pytest.raises(ConfigError, match=r"data.index: '.*nope.json' does not exist"):
        plan_precompute(
            config(shards, tmp_path / "c", "data.num_classes=10", f"data.index={missing}")
        )
    (tmp_path / "bad.json").write_text('{"wids_version": 1, "shardlist": [{"url": "x"}]}')
    with pytest.raises(DataError, match=r"'.*bad.json' is not a WebDataset shard index"):
        plan_precompute(
            config(
                shards,
                tmp_path / "c",
                "data.num_classes=10",
                f"data.index={tmp_path / 'bad.json'}",
            )
        )


def test_keys_repeated_across_shards_are_refused_when_the_fingerprint_is_sealed(tmp_path):
    shards = shards_in(tmp_path / "shards", (6, 6))
    write_tar(Path(shards[1]), good("s1", 5) + [good("s0")[3]])  # s0_003 again
    write_wids_index(shards, tmp_path / "shards" / "shardindex.json", counts=[6, 6])
    cfg = config(shards, tmp_path / "cache", "data.num_classes=10")
    with pytest.raises(
        DuplicateKeyError,
        match=r"key 's0_003' occurs in shard 's-000000.tar' and in shard 's-000001.tar'",
    ):
        run_tasks(cfg)
    store = open_store(str(tmp_path / "cache"))
    assert store.incomplete_shards() == {} and store.meta.fingerprint.key_digest == ""
    with pytest.raises(CacheIncompleteError, match=r"keys were not yet checked across shards"):
        train_keys(shards, tmp_path / "cache")
    assert "the fingerprint's key digest is not set" in "\n".join(validate_cache(store).problems)
    with pytest.raises(DuplicateKeyError, match=r"occurs in shard 's-000000.tar' and in shard"):
        plan_precompute(cfg)  # a rerun finds nothing to do and seals again: still refused


def test_a_key_twice_in_one_shard_fails_in_its_worker(tmp_path):
    shards = shards_in(tmp_path / "shards", (6,))
    samples = good("s0")
    write_tar(Path(shards[0]), samples[:3] + [samples[0]] + samples[4:])
    write_wids_index(shards, tmp_path / "shards" / "shardindex.json", counts=[6])
    [failure] = run_tasks(config(shards, tmp_path / "cache", "data.num_classes=10"))
    assert isinstance(failure, DuplicateKeyError)
    assert "shard 's-000000.tar': key 's0_000' occurs twice" in str(failure)


def test_an_unsealed_cache_is_sealed_by_a_rerun_with_nothing_to_do(tmp_path):
    shards = shards_in(tmp_path / "shards")
    write_manifest(shards)
    cfg = config(shards, tmp_path / "cache")
    plan = plan_precompute(cfg)
    worker = ShardWorker(worker_settings(cfg, plan))
    for task in plan.tasks:  # as a driver killed after the last shard, before its seal
        worker(task)
    assert open_store(str(tmp_path / "cache")).meta.fingerprint.key_digest == ""
    assert plan_precompute(cfg).tasks == []
    store = open_store(str(tmp_path / "cache"))
    assert store.meta.fingerprint.key_digest == key_digest(scan_shards(shards))
    assert not seal_fingerprint(store)  # sealed once


# ---- on an object store: requests counted by the server ------------------------------------------


def test_planning_64_shards_on_s3_makes_at_most_one_request_per_shard(tmp_path):
    pytest.importorskip("s3fs")
    pytest.importorskip("moto.server")
    from benchmarks.planning import measure

    result = measure(tmp_path, num_shards=64, per_shard=3)
    for layout in ("manifest", "wids_index"):
        assert result[layout]["requests_per_shard"] <= 1, result[layout]
        assert result[layout]["shard_reads"] == 0, result[layout]  # no payload byte sent
        assert list(result[layout]["planned_from"].values()) == [64]
    headers = result["headers"]
    assert headers["planned_from"] == {"headers": 64}
    # without an index every header is read, by range requests: never a whole tar
    assert headers["shard_reads"] >= 64 and headers["whole_shard_reads"] == 0
    by_kind = result["manifest"]["by_kind"]
    assert by_kind.get("LIST", 0) <= 2 and np.sum(list(by_kind.values())) <= 4
