"""Shards as WebDataset datasets have them: labels in ``.cls``, ``.json`` or ``.txt`` entries, and
shard URLs that are ``pipe:`` commands (with brace lists).

Real tars, real Zarr caches; precompute runs in-process (``ShardWorker(settings)(task)``), training
through the real DataLoader (and its worker processes where it matters).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from kdcache.cache.reader import read_block
from kdcache.cache.store import STATUS_INVALID, STATUS_VALID, open_store
from kdcache.core.errors import ConfigError, DataError
from kdcache.pipeline.plan import plan_precompute
from kdcache.shards.manifest import find_manifest
from kdcache.shards.reading import expand_shards, iter_shard, scan_shard, shard_name
from kdcache.train.config import TrainConfig
from kdcache.train.data import build_train_data
from kdcache.train.trainer import train
from tests.support.cachebuild import cache_arrays
from tests.support.precomputerun import input_fault_config, run_in_process
from tests.support.tarbuild import SIZE, good, png, write_members, write_tar
from tests.support.trainrun import minimal_train_config


def labelled(path: Path, samples: list[tuple[str, str, bytes]]) -> str:
    """A shard whose sample ``key`` has an image and one label entry ``<key>.<ext>``."""
    members = []
    for i, (key, ext, raw) in enumerate(samples):
        members += [(f"{key}.png", png(40 + i)), (f"{key}.{ext}", raw)]
    return write_members(path, members)


def streamed_labels(shards: list[str], cache: Path, *overrides: str) -> dict[str, int]:
    """key -> label, as one training epoch streams them (in-process, no DataLoader workers)."""
    base = minimal_train_config(shards, cache).model_dump(exclude_unset=True)
    for item in overrides:
        key, _, value = item.partition("=")
        base["data"][key.removeprefix("data.")] = value
    data = build_train_data(TrainConfig.model_validate(base), 0, 1, ["t1"], pin_memory=False)
    return {
        key: int(label)
        for batch in data.epoch(0, ["t1"])
        for key, label in zip(batch.keys, batch.labels, strict=True)
    }


# ---- labels from .cls, .json and .txt -----------------------------------------------------------

MIXED = [
    ("m_cls", "cls", b"3"),
    ("m_json", "json", json.dumps({"label": 7, "caption": "a shoe"}).encode()),
    ("m_jstr", "json", b'{"label": "5"}'),
    ("m_txt", "txt", b"2\n"),
    ("m_both", "cls", b"1"),
]
EXPECTED = {"m_cls": 3, "m_json": 7, "m_jstr": 5, "m_txt": 2, "m_both": 1}


def test_labels_from_cls_json_and_txt_are_stored_and_trained_on(tmp_path):
    shard = labelled(tmp_path / "mixed-000000.tar", MIXED)
    run_in_process(input_fault_config(shard, tmp_path / "cache"))
    block = read_block(open_store(str(tmp_path / "cache")), 0, ["t1"])
    assert dict(zip(block.keys.tolist(), block.labels.tolist(), strict=True)) == EXPECTED
    assert (block.status == STATUS_VALID).all()
    assert streamed_labels([shard], tmp_path / "cache") == EXPECTED


def test_cls_wins_over_json_and_the_other_entries_stay_extras(tmp_path):
    shard = write_members(
        tmp_path / "both-000000.tar",
        [("k.png", png(1)), ("k.cls", b"4"), ("k.json", b'{"label": 9}'), ("k.txt", b"hi")],
    )
    (sample,) = iter_shard(shard)
    assert sample.label == 4 and sorted(sample.extras) == ["json", "txt"]


def test_the_json_label_key_is_chosen_in_both_configs(tmp_path):
    shard = labelled(
        tmp_path / "keyed-000000.tar",
        [
            (f"j_{i}", "json", json.dumps({"class_id": i % 10, "label": "x"}).encode())
            for i in range(6)
        ],
    )
    run_in_process(input_fault_config(shard, tmp_path / "cache", "data.label_key=class_id"))
    assert read_block(open_store(str(tmp_path / "cache")), 0).labels.tolist() == [0, 1, 2, 3, 4, 5]
    labels = streamed_labels([shard], tmp_path / "cache", "data.label_key=class_id")
    assert labels == {f"j_{i}": i for i in range(6)}
    with pytest.raises(
        DataError,
        match=r"shard 'keyed-000000.tar', key 'j_\d': label 'x' \(key 'label' of the .json entry\) "
        r"is not an integer",
    ):
        streamed_labels([shard], tmp_path / "cache")  # the default key holds no integer


BAD_LABELS = {  # key -> (ext, raw entry, the reason)
    "b_notjson": ("json", b"{label: 3", r"the .json entry is not JSON \("),
    "b_nokey": ("json", b'{"cls": 3}', r"the .json entry has no key 'label' \(data.label_key; "),
    "b_list": ("json", b"[3]", r"the .json entry has no key 'label' .*found list"),
    "b_word": ("json", b'{"label": "cat"}', r"label 'cat' \(key 'label' of the .json entry\) is "),
    "b_float": ("json", b'{"label": 1.5}', r"label 1.5 \(key 'label' of the .json entry\) is not"),
    "b_bool": ("json", b'{"label": true}', r"label True \(key 'label' of the .json entry\) is not"),
    "b_txt": ("txt", b"a shoe", r"label b'a shoe' \(in the .txt entry\) is not an integer"),
    "b_range": ("json", b'{"label": 12}', r"label 12 is not in 0..9"),
}


@pytest.mark.parametrize("key", sorted(BAD_LABELS))
def test_bad_json_and_txt_labels_raise_naming_shard_and_key(tmp_path, key):
    ext, raw, reason = BAD_LABELS[key]
    shard = labelled(tmp_path / "bad-000000.tar", [("ok_0", "cls", b"1"), (key, ext, raw)])
    with pytest.raises(DataError, match=rf"shard 'bad-000000.tar', key '{key}': {reason}"):
        run_in_process(input_fault_config(shard, tmp_path / "cache"))
    assert open_store(str(tmp_path / "cache")).incomplete_shards()["views"] == ["bad-000000.tar"]


def test_bad_json_and_txt_labels_are_skipped_as_invalid_rows(tmp_path):
    samples = [("ok_0", "json", b'{"label": 1}'), ("ok_1", "txt", b"2")]
    samples += [(key, ext, raw) for key, (ext, raw, _) in sorted(BAD_LABELS.items())]
    shard = labelled(tmp_path / "bad-000000.tar", samples)
    run_in_process(input_fault_config(shard, tmp_path / "cache", "data.on_error=skip"))
    block = read_block(open_store(str(tmp_path / "cache")), 0, ["t1"])
    invalid = {
        str(block.keys[r]): str(block.errors[r])
        for r in np.flatnonzero(block.status == STATUS_INVALID)
    }
    assert sorted(invalid) == sorted(BAD_LABELS)
    assert "key 'b_nokey': the .json entry has no key 'label'" in invalid["b_nokey"]
    assert streamed_labels([shard], tmp_path / "cache") == {"ok_0": 1, "ok_1": 2}


def test_a_sample_without_any_label_entry_names_the_accepted_entries(tmp_path):
    shard = write_members(tmp_path / "none-000000.tar", [("k.png", png(1)), ("k.caption", b"x")])
    with pytest.raises(DataError, match=r"key 'k': no label \(no .cls, .json or .txt entry\)"):
        run_in_process(input_fault_config(shard, tmp_path / "cache"))


# ---- pipe: shard URLs ---------------------------------------------------------------------------


@pytest.fixture
def shard_dir(tmp_path) -> Path:
    for i in range(3):
        write_tar(tmp_path / f"p-{i:06d}.tar", good(f"p{i}", 6))
    write_tar(tmp_path / "val-000000.tar", good("v", 5))
    return tmp_path


def pipe_pattern(shard_dir: Path) -> str:
    return f"pipe:cat {shard_dir.absolute()}/p-{{000000..000002}}.tar"


def test_pipe_urls_expand_their_brace_lists_and_are_named_by_their_tar(shard_dir):
    urls = expand_shards(pipe_pattern(shard_dir))
    assert urls == [f"pipe:cat {shard_dir.absolute()}/p-{i:06d}.tar" for i in range(3)]
    assert [shard_name(u) for u in urls] == ["p-000000.tar", "p-000001.tar", "p-000002.tar"]
    assert shard_name("pipe:curl -s -L 'https://h/d/train-000007.tar?dl=1'") == "train-000007.tar"
    assert shard_name("pipe:aws s3 cp s3://b/x/train-000001.tar -") == "train-000001.tar"
    assert scan_shard(urls[1]).keys == [f"p1_{i:03d}" for i in range(6)]
    assert [s.key for s in iter_shard(urls[2])] == [f"p2_{i:03d}" for i in range(6)]
    with pytest.raises(ConfigError, match=r"data.shards: the command 'pipe:echo hi' names no .tar"):
        expand_shards("pipe:echo hi")


def test_a_pipe_shard_list_is_precomputed_and_trained_like_the_files(shard_dir, tmp_path):
    pipe = input_fault_config(pipe_pattern(shard_dir), tmp_path / "pipe.zarr")
    run_in_process(pipe)
    run_in_process(
        input_fault_config([str(shard_dir / f"p-{i:06d}.tar") for i in range(3)], tmp_path / "f")
    )
    piped = cache_arrays(tmp_path / "pipe.zarr")
    files = cache_arrays(tmp_path / "f")
    assert sorted(piped) == sorted(files)
    for name in piped:
        np.testing.assert_array_equal(piped[name], files[name], err_msg=name)
    store = open_store(str(tmp_path / "pipe.zarr"))
    assert store.meta.config["data"]["shards"] == [pipe_pattern(shard_dir)]  # not made a path
    assert plan_precompute(pipe).tasks == []  # a rerun: nothing to do

    run = minimal_train_config([pipe_pattern(shard_dir)], tmp_path / "pipe.zarr").model_dump(
        exclude_unset=True
    )
    run["data"].update(num_workers=2, val_shards=f"pipe:cat {shard_dir.absolute()}/val-000000.tar")
    run["run"] = {"dir": str(tmp_path / "run"), "progress": False}
    run["student"] = {"name": "kd_mlp", "kwargs": {"img_size": SIZE, "hidden": 16}}
    summary = train(TrainConfig.model_validate(run))  # DataLoader workers run the commands
    assert summary.completed and summary.images == 18 and summary.top1 is not None


def test_a_pipe_command_reading_a_local_file_finds_the_manifest_beside_it(tmp_path):
    from kdcache.shards.writing import make_synthetic_shards

    make_synthetic_shards(tmp_path, 8, 0, classes=3, size=8, channels=1, seed=0, shard_size=8)
    found = find_manifest(f"pipe:cat {tmp_path.absolute()}/train-000000.tar")
    assert found is not None and found.num_classes == 3
    assert find_manifest("pipe:curl -s https://host/train-000000.tar") is None


def test_a_failing_pipe_command_names_the_shard_the_command_and_its_status(shard_dir, tmp_path):
    missing = f"pipe:cat {shard_dir.absolute()}/gone-000000.tar"
    with pytest.raises(
        DataError,
        match=r"shard 'gone-000000.tar': the command 'cat .*/gone-000000.tar' failed "
        r"\(exit status 1\)",
    ):
        plan_precompute(input_fault_config(missing, tmp_path / "cache"))
    cut = shard_dir / "cut-000000.tar"
    cut.write_bytes((shard_dir / "p-000000.tar").read_bytes()[:1500])
    with pytest.raises(DataError, match=r"shard 'cut-000000.tar' is not a readable tar"):
        scan_shard(f"pipe:cat {cut}")
    with pytest.raises(DataError, match=r"shard 'cut-000000.tar' could not be read to the end"):
        list(iter_shard(f"pipe:cat {cut}"))


def test_a_pipe_shard_read_in_part_stops_its_command_quietly(shard_dir):
    big = shard_dir / "big-000000.tar"
    write_tar(big, [(f"b_{i:03d}", bytes(300_000), b"1") for i in range(20)])  # > a pipe buffer
    samples = iter_shard(f"pipe:cat {big}")
    assert next(samples).key == "b_000"
    samples.close()  # the command dies of SIGPIPE: no error
    assert len(scan_shard(f"pipe:cat {big}")) == 20
