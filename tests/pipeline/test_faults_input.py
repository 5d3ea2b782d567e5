"""Bad input: broken tars, bad payloads and labels, odd keys, empty shards, shards changed after
the cache.

Each defect gets a clear error naming shard (and key) or, under ``data.on_error: skip``, a recorded
invalid row that the trainer skips. Precompute runs in-process (``ShardWorker(settings)(task)``),
without Ray. Complements tests/pipeline/test_precompute.py (corrupt image, missing and
out-of-range label, duplicate keys across shards, a shard changed between planning and its task)
and tests/train/test_train_data.py (shard counts changed after the cache), which are not repeated
here.
"""

from __future__ import annotations

import re
import tarfile
from pathlib import Path

import numpy as np
import pytest

from kdcache.cache.reader import read_block
from kdcache.cache.store import STATUS_INVALID, open_store
from kdcache.core.errors import CacheMismatchError, DataError, DuplicateKeyError
from kdcache.pipeline.plan import plan_precompute
from kdcache.pipeline.runner import worker_settings
from kdcache.pipeline.worker import ShardWorker
from tests.support.precomputerun import input_fault_config as config
from tests.support.precomputerun import make_config, run_in_process
from tests.support.tarbuild import bomb_png, good, png, write_members, write_tar
from tests.support.trainrun import train_keys

# ---- broken shards: refused at planning, naming the shard ----------------------------------------


def truncated(tmp_path: Path, cut) -> str:
    whole = Path(write_tar(tmp_path / "whole.tar", good("t")))
    with tarfile.open(whole) as tar:
        last = tar.getmembers()[-1]
    data = whole.read_bytes()
    (tmp_path / "cut-000000.tar").write_bytes(data[: cut(last, data)])
    return str(tmp_path / "cut-000000.tar")


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (
            lambda p: truncated(p, lambda last, data: last.offset_data + last.size // 2),
            r"shard 'cut-000000.tar' is not a readable tar \(unexpected end of data\)",
        ),
        (
            lambda p: truncated(p, lambda last, data: last.offset + 100),
            r"shard 'cut-000000.tar' is truncated or damaged at byte \d+ after key 't_005': "
            r"no end-of-archive marker",
        ),
        (
            lambda p: truncated(p, lambda last, data: last.offset),
            r"shard 'cut-000000.tar' is truncated or damaged at byte \d+ after key 't_005'",
        ),
        (
            lambda p: truncated(
                p, lambda last, data: last.offset_data + -(-last.size // 512) * 512
            ),  # no end marker
            r"shard 'cut-000000.tar' is truncated or damaged at byte \d+ after key 't_005'",
        ),
        (
            lambda p: (
                (p / "junk-000000.tar").write_bytes(b"\x89PNG not a tar at all" * 40)
                and str(p / "junk-000000.tar")
            ),
            r"shard 'junk-000000.tar' is not a readable tar",
        ),
        (
            lambda p: (p / "zero-000000.tar").write_bytes(b"") == 0 and str(p / "zero-000000.tar"),
            r"shard 'zero-000000.tar' is not a readable tar \(empty file\)",
        ),
        (lambda p: str(p / "missing-000000.tar"), r"shard '.*missing-000000.tar' does not exist"),
        (
            lambda p: write_tar(p / "empty-000000.tar", []),
            r"data.shards: shard\(s\) without samples: \['empty-000000.tar'\] "
            r"\(every shard needs at least one sample",
        ),
    ],
)
def test_broken_shard_is_refused_at_planning(tmp_path, make, message):
    shard = make(tmp_path)
    with pytest.raises(DataError, match=message):
        plan_precompute(config(shard, tmp_path / "cache"))
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize(
    ("members", "error", "message"),
    [
        (
            [("a.b.png", png(1)), ("a.b.cls", b"1")],
            DataError,
            r"key 'a': expected one image entry .*found \['b.cls', 'b.png'\]; "
            r"entries .* suggest a dot in the key",
        ),
        (
            [("k1.png", png(1)), ("k1.cls", b"1"), ("k2.png", png(2)), ("k1.jpg", png(3))],
            DuplicateKeyError,
            r"shard 'odd-000000.tar': key 'k1' occurs twice",
        ),
        (
            [("k1.png", png(1)), ("k1.jpg", png(2)), ("k1.cls", b"1")],
            DataError,
            r"key 'k1': expected one image entry \(jpg/jpeg/png/webp\), "
            r"found \['cls', 'jpg', 'png'\]",
        ),
        ([("k1.cls", b"1")], DataError, r"key 'k1': expected one image entry .*found \['cls'\]"),
    ],
)
def test_malformed_samples_are_refused_at_planning(tmp_path, members, error, message):
    shard = write_members(tmp_path / "odd-000000.tar", members)
    with pytest.raises(error, match=message):
        plan_precompute(config(shard, tmp_path / "cache"))


# ---- bad payloads and labels: an error naming shard and key, or a recorded skip ------------------


BAD = {  # key -> (image bytes, label bytes, the reason recorded)
    "x_trunc": (png(11)[:60], b"1", "cannot decode the image"),
    "x_empty": (b"", b"2", "cannot decode the image"),
    "x_text": (b"GIF89a but not really", b"3", "cannot decode the image"),
    "x_word": (png(12), b"cat", "label b'cat' is not an integer"),
    "x_neg": (png(13), b"-1", "label -1 is not in 0..9"),
    "x_huge": (  # refused from its header: decoding would allocate 300 MB
        bomb_png(10000, 10000),
        b"4",
        "cannot decode the image (the image is 10000 x 10000 = 100000000 pixels, over the "
        "limit of 89478485 (data.max_pixels",
    ),
    "x_int64": (png(14), b"1" + b"0" * 30, "label 100000000000...(31 digits) is outside int64"),
}


@pytest.mark.parametrize("key", sorted(BAD))
def test_bad_payload_or_label_raises_naming_shard_and_key(tmp_path, key):
    image, label, reason = BAD[key]
    shard = write_tar(tmp_path / "bad-000000.tar", good("ok", 2) + [(key, image, label)])
    with pytest.raises(
        DataError, match=rf"shard 'bad-000000.tar', key '{key}': {re.escape(reason)}"
    ):
        run_in_process(config(shard, tmp_path / "cache"))
    assert open_store(str(tmp_path / "cache")).incomplete_shards() == {
        "views": ["bad-000000.tar"],
        "t1": ["bad-000000.tar"],
    }


def test_bad_samples_are_recorded_and_the_trainer_skips_them(tmp_path):
    shards = [
        write_tar(tmp_path / "ok-000000.tar", good("ok", 4)),
        write_tar(
            tmp_path / "bad-000000.tar", good("b", 3) + [(k, *BAD[k][:2]) for k in sorted(BAD)]
        ),
    ]
    run_in_process(config(shards, tmp_path / "cache", "data.on_error=skip"))
    store = open_store(str(tmp_path / "cache"))
    block = read_block(store, 1, ["t1"])
    recorded = {
        str(block.keys[r]): str(block.errors[r])
        for r in np.flatnonzero(block.status == STATUS_INVALID)
    }
    assert sorted(recorded) == sorted(BAD)
    for key, (_, _, reason) in BAD.items():
        assert f"shard 'bad-000000.tar', key '{key}': {reason}" in recorded[key]
    expected = [f"ok_{i:03d}" for i in range(4)] + [f"b_{i:03d}" for i in range(3)]
    assert sorted(train_keys(shards, tmp_path / "cache")) == sorted(expected)


# ---- shards changed after the cache was built ----------------------------------------------------


@pytest.fixture
def built(tmp_path):
    shards = [write_tar(tmp_path / f"s-{i:06d}.tar", good(f"s{i}")) for i in range(3)]
    run_in_process(config(shards, tmp_path / "cache"))
    return shards, tmp_path / "cache"


def test_rerun_refuses_a_shard_whose_keys_changed_naming_it(built):
    shards, cache = built
    renamed = good("s1")
    renamed[2] = ("s1_renamed", *renamed[2][1:])
    write_tar(Path(shards[1]), renamed)
    with pytest.raises(
        CacheMismatchError,
        match=r"the sample keys differ .*\n  keys changed in shard\(s\) \['s-000001.tar'\]",
    ):
        plan_precompute(config(shards, cache))
    write_tar(Path(shards[2]), good("s2", 5))
    with pytest.raises(
        CacheMismatchError,
        match=r"shard 's-000002.tar' has 6 samples in the cache but 5 in the data",
    ):
        plan_precompute(config(shards, cache))


def test_rerun_refuses_a_shard_whose_label_changed_after_its_views(built):
    shards, cache = built
    samples = good("s1")
    samples[4] = (samples[4][0], samples[4][1], b"9")
    write_tar(Path(shards[1]), samples)
    cfg = make_config(
        shards,
        cache,
        "data.num_classes=10",
        teachers=[{"name": "t2", "model": {"name": "kd_mlp"}, "k": 3}],
    )
    plan = plan_precompute(cfg)
    assert [t.make_views for t in plan.tasks] == [False] * 3
    worker = ShardWorker(worker_settings(cfg, plan))
    with pytest.raises(
        DataError,
        match=r"shard 's-000001.tar', key 's1_004': label 9 but the cache stored 4: the shard "
        r"changed after its views were made",
    ):
        worker(plan.tasks[1])


def test_training_refuses_changed_keys_and_labels_naming_shard_and_key(built):
    shards, cache = built
    assert len(train_keys(shards, cache)) == 18
    original = Path(shards[2]).read_bytes()
    renamed = good("s2")
    renamed[1] = ("s2_renamed", *renamed[1][1:])
    write_tar(Path(shards[2]), renamed)
    with pytest.raises(
        CacheMismatchError,
        match=r"key 's2_renamed' is not in the cache's block for shard 's-000002.tar'",
    ):
        train_keys(shards, cache)
    Path(shards[2]).write_bytes(original)
    relabelled = good("s0")
    relabelled[0] = (relabelled[0][0], relabelled[0][1], b"7")
    write_tar(Path(shards[0]), relabelled)
    with pytest.raises(
        CacheMismatchError,
        match=r"shard 's-000000.tar', key 's0_000': label 7 in the data but 0 in the cache",
    ):
        train_keys(shards, cache)
