"""kdcache precompute end to end: real WebDataset tars, a real Zarr cache, a real local Ray.

Ray starts once for the module (the runner reuses it). Bad-input and planning tests run the
worker in-process, without Ray.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
import yaml

from kdcache.cache.integrity import find_damage
from kdcache.cache.reader import read_block
from kdcache.cache.store import STATUS_INVALID, STATUS_VALID, open_store
from kdcache.cache_tools.validate import validate_cache
from kdcache.cache_tools.verify import verify_cache
from kdcache.cli import main as cli_main
from kdcache.core.config import load_config
from kdcache.core.errors import (
    CacheError,
    CacheMismatchError,
    ConfigError,
    DataError,
    DuplicateKeyError,
    TeacherError,
)
from kdcache.core.results import PrecomputeResult, config_digest, read_run_records
from kdcache.models.build import build_model, build_teacher, weights_digest
from kdcache.models.runner import ModelRunner
from kdcache.pipeline.config import PrecomputeConfig
from kdcache.pipeline.plan import plan_precompute
from kdcache.pipeline.runner import ShardsFailedError, run_precompute, worker_settings
from kdcache.pipeline.worker import FAULT_ENV, ShardWorker
from kdcache.shards.reading import decode_image, iter_shard
from kdcache.shards.writing import make_synthetic_shards
from kdcache.targets.sparse import from_logits
from tests.support.cachebuild import assert_same_arrays, cache_arrays, row_views
from tests.support.precomputerun import make_config, precompute, run_in_process, shards_url
from tests.support.processes import kill_session
from tests.support.tarbuild import good, write_tar

# ---- fixtures and helpers ---------------------------------------------------------------


def assert_complete(path: Path, teachers: list[str]) -> None:
    store = open_store(str(path))
    assert store.incomplete_shards(teachers) == {}
    assert (np.asarray(store.group["status"][:])[: store.meta.fingerprint.num_samples] >= 0).all()


@pytest.fixture(scope="module")
def clean_cache(ray_session, data_dir, tmp_path_factory) -> Path:
    """A clean precompute of the 4 shards with 2 actors."""
    cache = tmp_path_factory.mktemp("clean") / "cache"
    summary = precompute(make_config(shards_url(data_dir), cache))
    assert summary.failed == 0 and summary.views == 160 * 2
    return cache


# ---- 1. replay exactness ------------------------------------------------------------------


def test_stored_views_replay_to_the_stored_targets(clean_cache, data_dir):
    store = open_store(str(clean_cache))
    recipe = store.meta.recipe
    model = build_teacher(make_config("x", clean_cache).teachers[0].model, 10, 3)
    runner = ModelRunner(model, recipe.rendering(), device="cpu")
    block = read_block(store, 1, ["t1"])
    samples = list(iter_shard(str(data_dir / "train-000001.tar")))[:12]
    views = torch.cat(
        [row_views(store, block, block.row(s.key), decode_image(s.image, 3)) for s in samples]
    )
    labels = torch.tensor([s.label for s in samples]).repeat_interleave(2)
    fresh = from_logits(runner(views), labels, 5)
    cached = block.teachers["t1"]
    rows = [block.row(s.key) for s in samples]
    np.testing.assert_array_equal(cached.topk_idx[rows].reshape(-1, 5), fresh.idx.numpy())
    np.testing.assert_allclose(
        cached.topk_logit[rows].reshape(-1, 5).astype(np.float32),
        fresh.logit.numpy().astype(np.float16).astype(np.float32),
        rtol=1e-3,
        atol=1e-3,
    )
    np.testing.assert_allclose(cached.lse[rows].reshape(-1), fresh.lse.numpy(), rtol=1e-4)
    np.testing.assert_allclose(
        cached.label_logit[rows].reshape(-1), fresh.label_logit.numpy(), rtol=1e-4, atol=1e-6
    )
    assert (block.status == STATUS_VALID).all()
    np.testing.assert_array_equal(block.labels[rows], [s.label for s in samples])


# ---- 2. independence of actor count -------------------------------------------------------


def test_one_actor_gives_the_same_cache_as_two(clean_cache, data_dir, tmp_path):
    summary = precompute(make_config(shards_url(data_dir), tmp_path / "one", "ray.num_actors=1"))
    assert summary.tasks == 4 and summary.failed == 0
    assert_same_arrays(cache_arrays(tmp_path / "one"), cache_arrays(clean_cache))


# ---- 3. a worker killed mid-shard -----------------------------------------------------------


def test_worker_killed_mid_shard_is_retried(clean_cache, data_dir, tmp_path, monkeypatch):
    marker = tmp_path / "crashed"
    monkeypatch.setenv(FAULT_ENV, f"train-000001.tar:{marker}")
    summary = precompute(make_config(shards_url(data_dir), tmp_path / "cache"))
    assert marker.exists(), "the fault hook did not fire"
    assert summary.failed == 0
    assert_complete(tmp_path / "cache", ["t1"])
    assert_same_arrays(cache_arrays(tmp_path / "cache"), cache_arrays(clean_cache))


def assert_run_record(record: PrecomputeResult, store, views: int, done: int) -> None:
    """A complete run's record: what ran, with which config, what it did, in which versions."""
    assert (record.status, record.error, record.tasks, record.done, record.failed) == (
        "complete",
        "",
        done,
        done,
        0,
    )
    assert record.cache_path == store.path and record.record_path().startswith(
        f"{store.path}/runs/"
    )
    assert [(t.name, t.model, t.k) for t in record.teachers] == [("t1", "kd_cnn_tiny", 5)]
    assert record.teachers[0].weights_digest == store.teacher_meta("t1").weights_digest
    assert record.config_digest == config_digest(record.config)
    assert record.config["cache"]["num_views"] == record.num_views == store.meta.num_views
    assert (record.views, record.invalid_views, record.incomplete) == (views, 0, {})
    assert record.wall_seconds >= record.busy_seconds > 0 and record.store_bytes > 0
    assert record.cache_views == views and record.cache_teachers == 1
    assert record.pid == os.getpid() and record.run_id.endswith(f"-{os.getpid()}")
    assert record.started <= record.finished and {"kdcache", "torch", "zarr", "ray"} <= set(
        record.versions
    )


def test_failed_shard_is_reported_and_the_others_finish(ray_session, bad_dir):
    shards = [str(bad_dir / "good-000000.tar"), str(bad_dir / "corrupt-000000.tar")]
    cfg = make_config(shards, bad_dir / "cache", "data.num_classes=10")
    with pytest.raises(
        ShardsFailedError,
        match=r"1 of 2 shard task\(s\) failed.*\n  corrupt-000000.tar: DataError: .*'c_bad'",
    ) as info:
        precompute(cfg)
    assert isinstance(info.value.failures["corrupt-000000.tar"], DataError)
    record = read_run_records(str(bad_dir / "cache"))[-1]  # written before the error was raised
    assert record == info.value.result and record.status == "shards_failed"
    assert record.shards_done == ["good-000000.tar"] and list(record.shards_failed) == [
        "corrupt-000000.tar"
    ]
    assert record.shards_failed["corrupt-000000.tar"].startswith("DataError: ")
    assert record.incomplete == {"views": ["corrupt-000000.tar"], "t1": ["corrupt-000000.tar"]}
    store = open_store(str(bad_dir / "cache"))
    assert store.incomplete_shards() == {
        "views": ["corrupt-000000.tar"],
        "t1": ["corrupt-000000.tar"],
    }


def test_actors_that_cannot_start_fail_every_shard_with_the_reason(ray_session, bad_dir, tmp_path):
    checkpoint = tmp_path / "teacher.pth"
    torch.save(
        build_model(make_config("x", tmp_path).teachers[0].model, 10, 3).state_dict(), checkpoint
    )
    cfg = make_config(
        str(bad_dir / "good-000000.tar"),
        tmp_path / "cache",
        "data.num_classes=10",
        f"teachers.0.model.checkpoint={checkpoint}",
    )
    plan = plan_precompute(cfg)
    checkpoint.unlink()
    with pytest.raises(
        ShardsFailedError,
        match=r"good-000000.tar: no shard actor left to run it: actor could not "
        r"start: kdcache.core.errors.WeightsError: checkpoint '.*teacher.pth' does not exist",
    ):
        run_precompute(cfg, plan, progress=False)


# ---- 4. rerun after an interrupted run (CLI) ------------------------------------------------


def test_cli_runs_then_rerun_does_nothing(ray_session, clean_cache, data_dir, tmp_path, capsys):
    config = tmp_path / "precompute.yaml"
    config.write_text(
        yaml.safe_dump(
            make_config(shards_url(data_dir), tmp_path / "cache").model_dump(mode="json")
        )
    )
    assert cli_main(["precompute", str(config), "ray.num_actors=2", "--overwrite"]) == 0
    out = capsys.readouterr().out
    assert "4/4 shard task(s) done" in out and "B per view per teacher" in out
    assert_same_arrays(cache_arrays(tmp_path / "cache"), cache_arrays(clean_cache))
    store = open_store(str(tmp_path / "cache"))
    assert store.meta.config["ray"]["num_actors"] == 2
    [record] = read_run_records(str(tmp_path / "cache"))
    assert f"  run record: {record.record_path()}" in out.splitlines()
    assert_run_record(record, store, views=160 * 2, done=4)
    assert validate_cache(store).ok and find_damage(store, check=True) == []  # runs/ is no array
    assert cli_main(["precompute", str(config)]) == 0
    assert "nothing to do: 0 shards to do" in capsys.readouterr().out
    assert read_run_records(str(tmp_path / "cache")) == [record]  # nothing done, nothing recorded
    assert cli_main(["precompute", str(config), "cache.num_views=3"]) == 2
    assert "num_views: the cache has 2, the run asks for 3" in capsys.readouterr().err


@pytest.mark.slow
def test_killed_run_resumes_to_the_clean_result(ray_session, tmp_path):
    shards_dir = tmp_path / "shards"
    make_synthetic_shards(
        shards_dir, 8 * 200, 0, classes=10, size=32, channels=3, seed=1, shard_size=200
    )
    url = shards_url(shards_dir, 8)
    overrides = [
        "ray.num_actors=1",
        "cache.num_views=4",
        "cache.recipe.size=32",
        "runtime.batch_size=16",
        "runtime.torch_threads=1",
        "teachers.0.model.name=kd_cnn_small",
    ]
    config = tmp_path / "precompute.yaml"
    config.write_text(
        yaml.safe_dump(make_config(url, tmp_path / "cache", *overrides).model_dump(mode="json"))
    )
    ray_temp = tempfile.mkdtemp(
        prefix="kdr", dir="/tmp"
    )  # short: Ray's socket paths have a length limit
    try:
        check_interrupted_run(tmp_path, url, overrides, config, ray_temp)
    finally:
        shutil.rmtree(ray_temp, ignore_errors=True)


def check_interrupted_run(
    tmp_path: Path, url: str, overrides: list[str], config: Path, ray_temp: str
) -> None:
    command = [
        sys.executable,
        "-m",
        "kdcache",
        "precompute",
        str(config),
        f"ray.temp_dir={ray_temp}",
    ]
    log = tmp_path / "interrupted.log"
    with open(log, "wb") as sink:
        interrupted = subprocess.Popen(
            command, start_new_session=True, stdout=sink, stderr=subprocess.STDOUT
        )
    try:
        wait_for_partial(tmp_path / "cache", interrupted, log)
    finally:
        kill_session(interrupted.pid)  # the driver and every Ray process it started, as in a crash
        interrupted.wait()
    before = mark_times(tmp_path / "cache")
    done = int((before["t1"] > 0).sum())
    assert 0 < done < 8, f"the run was not interrupted mid-way ({done} of 8 shards done)"
    assert Path(f"{tmp_path / 'cache'}.lock").exists()  # the killed driver's writer lock, now stale
    finished = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr
    assert f"{8 - done}/{8 - done} shard task(s) done" in finished.stdout
    assert "removing the writer lock" in finished.stderr and "its holder is gone" in finished.stderr
    after = mark_times(tmp_path / "cache")
    for name, times in before.items():  # a shard finished before the kill is never written again
        np.testing.assert_array_equal(
            after[name][times > 0], times[times > 0], err_msg=f"{name}: a finished shard was redone"
        )
    precompute(make_config(url, tmp_path / "clean", *overrides))
    assert_same_arrays(cache_arrays(tmp_path / "cache"), cache_arrays(tmp_path / "clean"))
    again = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "nothing to do: 0 shards to do" in again.stdout


def mark_times(path: Path) -> dict[str, np.ndarray]:
    """The completion marks as written (ms timestamps, 0 where unset): views and teacher t1."""
    store = open_store(str(path))
    return {
        "views": np.asarray(store.group["views_done"][:]),
        "t1": np.asarray(store.teacher_group("t1")["done"][:]),
    }


def wait_for_partial(
    cache: Path, process: subprocess.Popen, log: Path, timeout: float = 180.0
) -> None:
    """Poll (cheaply: the marks' chunk files) until at least one shard of teacher t1 is done."""
    marks = cache / "teachers" / "t1" / "done" / "c"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        if marks.is_dir() and any(marks.iterdir()):
            return
        time.sleep(0.01)
    pytest.fail(f"no shard finished before the run ended or timed out: {log.read_text()[-2000:]}")


# ---- 5. a second teacher, and refused mismatches -----------------------------------------------


def test_second_teacher_reuses_the_stored_views(clean_cache, data_dir, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(clean_cache, cache)
    before = cache_arrays(cache)
    second = [{"name": "t2", "model": {"name": "kd_cnn_small"}, "k": 3}]
    cfg = make_config(shards_url(data_dir), cache, teachers=second)
    summary = precompute(cfg)
    assert summary.tasks == 4 and summary.made_view_shards == 0
    after = cache_arrays(cache)
    assert_same_arrays({k: v for k, v in after.items() if not k.startswith("t2/")}, before)
    assert_complete(cache, ["t1", "t2"])
    store = open_store(str(cache))
    block = read_block(store, 0, ["t2"])
    sample = next(iter_shard(str(data_dir / "train-000000.tar")))
    views = row_views(store, block, 0, decode_image(sample.image, 3))
    rendering = store.meta.recipe.rendering()
    fresh = from_logits(
        ModelRunner(build_teacher(cfg.teachers[0].model, 10, 3), rendering)(views),
        torch.tensor([sample.label] * 2),
        3,
    )
    np.testing.assert_array_equal(block.teachers["t2"].topk_idx[0], fresh.idx.numpy())
    np.testing.assert_allclose(block.teachers["t2"].lse[0], fresh.lse.numpy(), rtol=1e-4)


def test_torchvision_and_torchscript_teachers_are_cached_and_verify(
    clean_cache, data_dir, tmp_path
):
    """The two other teacher sources: a torchvision model with a state-dict checkpoint and a
    TorchScript file, added in-process to a copy of the clean cache, then recomputed by `kdcache
    verify` from their stored specs."""
    cache = tmp_path / "cache"
    shutil.copytree(clean_cache, cache)
    torch.manual_seed(1)
    resnet = torchvision.models.resnet18(num_classes=10)
    torch.save(resnet.state_dict(), tmp_path / "resnet18.pth")
    scripted = torch.jit.script(
        build_model(make_config("x", cache).teachers[0].model, 10, 3).eval()
    )
    scripted.save(str(tmp_path / "tiny.pt"))
    teachers = [
        {
            "name": "tv",
            "model": {
                "source": "torchvision",
                "name": "resnet18",
                "checkpoint": str(tmp_path / "resnet18.pth"),
            },
            "k": 4,
        },
        {
            "name": "ts",
            "model": {"source": "torchscript", "checkpoint": str(tmp_path / "tiny.pt")},
            "k": 10,
        },
    ]
    run_in_process(make_config(shards_url(data_dir), cache, teachers=teachers))
    assert_complete(cache, ["t1", "tv", "ts"])
    store = open_store(str(cache))
    assert store.teacher_meta("tv").weights_digest == weights_digest(resnet)
    block = read_block(store, 2, ["tv", "ts"])
    sample = next(iter_shard(str(data_dir / "train-000002.tar")))
    views = row_views(store, block, 0, decode_image(sample.image, 3))
    for name, model, k in (("tv", resnet, 4), ("ts", scripted, 10)):
        runner = ModelRunner(model, store.meta.recipe.rendering())
        fresh = from_logits(runner(views), torch.tensor([sample.label] * 2), k)
        np.testing.assert_array_equal(block.teachers[name].topk_idx[0], fresh.idx.numpy())
        np.testing.assert_allclose(block.teachers[name].lse[0], fresh.lse.numpy(), rtol=1e-4)
    results = verify_cache(store, teachers=["tv", "ts"], num=16, seed=0).teachers
    assert [(r.teacher, r.ok, r.topk_agreement) for r in results] == [
        ("tv", True, 1.0),
        ("ts", True, 1.0),
    ]


def test_torchvision_teacher_needs_three_channels(data_dir, tmp_path):
    teachers = [{"name": "tv", "model": {"source": "torchvision", "name": "resnet18"}, "k": 4}]
    cfg = make_config(
        shards_url(data_dir),
        tmp_path / "cache",
        "cache.recipe.channels=1",
        "cache.recipe.mean=[0.5]",
        "cache.recipe.std=[0.25]",
        teachers=teachers,
    )
    with pytest.raises(
        TeacherError, match=r"torchvision model 'resnet18' takes 3 channels; the recipe has 1"
    ):
        run_in_process(cfg)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.shards=SUBSET", r"shards differ: 1 in the cache but not given"),
        ("cache.recipe.size=12", r"view recipe differs \(size: cache 16 vs run 12\)"),
        ("cache.num_views=3", r"num_views: the cache has 2, the run asks for 3"),
        ("cache.seed=5", r"seed: the cache has 0, the run asks for 5"),
    ],
)
def test_changed_run_is_refused(clean_cache, data_dir, override, message):
    override = override.replace("SUBSET", str(data_dir / "train-{000000..000002}.tar"))
    with pytest.raises(CacheMismatchError, match=message):
        plan_precompute(make_config(shards_url(data_dir), clean_cache, override))


def test_changed_num_classes_is_refused(bad_dir):
    shards = str(bad_dir / "good-000000.tar")
    plan_precompute(make_config(shards, bad_dir / "cache", "data.num_classes=10"))
    with pytest.raises(
        CacheMismatchError, match=r"num_classes: the cache has 10, the run asks for 12"
    ):
        plan_precompute(make_config(shards, bad_dir / "cache", "data.num_classes=12"))


def test_same_teacher_name_with_other_weights_is_refused(bad_dir, tmp_path):
    checkpoint = tmp_path / "teacher.pth"
    torch.save(
        build_model(make_config("x", tmp_path).teachers[0].model, 10, 3).state_dict(), checkpoint
    )
    overrides = ("data.num_classes=10", f"teachers.0.model.checkpoint={checkpoint}")
    plan_precompute(make_config(str(bad_dir / "good-000000.tar"), tmp_path / "cache", *overrides))
    torch.save(
        build_model(make_config("x", tmp_path).teachers[0].model, 10, 3).state_dict(), checkpoint
    )
    with pytest.raises(
        CacheMismatchError,
        match=r"teacher 't1' already exists .*weights_digest: cache '[0-9a-f]+' vs run",
    ):
        plan_precompute(
            make_config(str(bad_dir / "good-000000.tar"), tmp_path / "cache", *overrides)
        )


def test_overwrite_refuses_a_foreign_directory(bad_dir, tmp_path):
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("keep me")
    with pytest.raises(
        Exception, match=r"cache.path: .*precious' exists, is not empty and is not a Zarr group"
    ):
        plan_precompute(
            make_config(
                str(bad_dir / "good-000000.tar"),
                tmp_path / "precious",
                "data.num_classes=10",
                "cache.overwrite=true",
            )
        )
    assert (tmp_path / "precious" / "notes.txt").exists()


# ---- 6. bad input ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shard", "message"),
    [
        ("corrupt", r"shard 'corrupt-000000.tar', key 'c_bad': cannot decode the image"),
        ("nolabel", r"shard 'nolabel-000000.tar', key 'n_bad': no label"),
        ("range", r"shard 'range-000000.tar', key 'r_bad': label 99 is not in 0..9"),
    ],
)
def test_bad_sample_raises_naming_shard_and_key(bad_dir, shard, message):
    cfg = make_config(
        str(bad_dir / f"{shard}-000000.tar"), bad_dir / "cache", "data.num_classes=10"
    )
    with pytest.raises(DataError, match=message):
        run_in_process(cfg)
    assert open_store(str(bad_dir / "cache")).incomplete_shards() == {
        "views": [f"{shard}-000000.tar"],
        "t1": [f"{shard}-000000.tar"],
    }


def test_bad_samples_are_skipped_as_invalid_rows(bad_dir):
    shards = [
        str(bad_dir / f"{name}-000000.tar") for name in ("good", "corrupt", "nolabel", "range")
    ]
    cfg = make_config(shards, bad_dir / "cache", "data.num_classes=10", "data.on_error=skip")
    run_in_process(cfg)
    store = open_store(str(bad_dir / "cache"))
    assert store.incomplete_shards() == {}
    reasons = {}
    for shard in range(4):
        block = read_block(store, shard, ["t1"])
        for row in np.flatnonzero(block.status == STATUS_INVALID):
            reasons[str(block.keys[row])] = str(block.errors[row])
            assert (block.teachers["t1"].lse[row] == 0).all()
            assert (block.view_params.arrays["crop"][row] == 0).all()
        assert (block.status[block.status != STATUS_INVALID] == STATUS_VALID).all()
    assert sorted(reasons) == ["c_bad", "n_bad", "r_bad"]
    assert "cannot decode the image" in reasons["c_bad"] and "no label" in reasons["n_bad"]
    assert "label 99 is not in 0..9" in reasons["r_bad"]
    assert int(read_block(store, 3).labels[2]) == 99


def test_nan_teacher_fails_the_shard_naming_shard_and_teacher(bad_dir, tmp_path):
    model = build_model(make_config("x", tmp_path).teachers[0].model, 10, 3)
    state = model.state_dict()
    state["head.bias"] = torch.full_like(state["head.bias"], float("nan"))
    torch.save(state, tmp_path / "nan.pth")
    cfg = make_config(
        str(bad_dir / "good-000000.tar"),
        tmp_path / "cache",
        "data.num_classes=10",
        f"teachers.0.model.checkpoint={tmp_path / 'nan.pth'}",
    )
    with pytest.raises(
        TeacherError,
        match=r"shard 'good-000000.tar', teacher 't1': the teacher produced NaN or inf",
    ):
        run_in_process(cfg)


def test_logits_beyond_fp16_fail_the_shard_before_anything_is_written(bad_dir, tmp_path):
    model = build_model(make_config("x", tmp_path).teachers[0].model, 10, 3)
    state = model.state_dict()
    state["head.bias"][2] = 1e5  # finite in fp32, inf in fp16
    torch.save(state, tmp_path / "big.pth")
    cfg = make_config(
        str(bad_dir / "good-000000.tar"),
        tmp_path / "cache",
        "data.num_classes=10",
        f"teachers.0.model.checkpoint={tmp_path / 'big.pth'}",
    )
    with pytest.raises(
        TeacherError,
        match=r"shard 'good-000000.tar', teacher 't1': the teacher produced a logit of "
        r"magnitude 1e\+05, beyond what the cache stores in fp16",
    ):
        run_in_process(cfg)
    assert open_store(str(tmp_path / "cache")).incomplete_shards()["t1"] == ["good-000000.tar"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["teachers.0.model.name=nonexist"],
            r"teachers.0.model \(teacher 't1'\): unknown timm model 'nonexist'",
        ),
        (
            ["teachers.0.model.checkpoint=/nonexist.pt"],
            r"teachers.0.model \(teacher 't1'\): checkpoint '/nonexist.pt' does not exist",
        ),
        (
            [
                "teachers.0.model.name=resnet18",
                "teachers.0.model.pretrained=true",
            ],  # refused before any download
            r"teachers.0.model \(teacher 't1'\): timm model 'resnet18': "
            r"its pretrained weights classify 1000 classes but the data has 10",
        ),
    ],
)
def test_teacher_errors_name_the_teacher_key(bad_dir, tmp_path, overrides, message):
    cfg = make_config(
        str(bad_dir / "good-000000.tar"), tmp_path / "cache", "data.num_classes=10", *overrides
    )
    with pytest.raises(TeacherError, match=message):
        plan_precompute(cfg)


def test_shard_changed_since_planning_is_refused(bad_dir):
    cfg = make_config(str(bad_dir / "good-000000.tar"), bad_dir / "cache", "data.num_classes=10")
    plan = plan_precompute(cfg)
    write_tar(bad_dir / "good-000000.tar", good("g")[::-1])
    with pytest.raises(
        DataError,
        match=r"shard 'good-000000.tar': sample 0 has key 'g_005', planning found 'g_000'",
    ):
        ShardWorker(worker_settings(cfg, plan))(plan.tasks[0])


def test_duplicate_keys_across_shards_are_refused_at_planning(bad_dir):
    write_tar(bad_dir / "dup-000000.tar", good("g")[:1])
    cfg = make_config(
        [str(bad_dir / "good-000000.tar"), str(bad_dir / "dup-000000.tar")],
        bad_dir / "cache",
        "data.num_classes=10",
    )
    with pytest.raises(
        DuplicateKeyError,
        match=r"key 'g_000' occurs in shard 'good-000000.tar' and in shard 'dup-000000.tar'",
    ):
        plan_precompute(cfg)
    assert not (bad_dir / "cache").exists()


def test_num_classes_comes_from_the_manifest_or_is_required(data_dir, bad_dir, tmp_path):
    with pytest.raises(
        ConfigError, match=r"data.num_classes: 12 in the config but 10 in the manifest"
    ):
        plan_precompute(make_config(shards_url(data_dir), tmp_path / "a", "data.num_classes=12"))
    with pytest.raises(
        ConfigError, match=r"data.num_classes: required key is missing \(no manifest beside"
    ):
        plan_precompute(make_config(str(bad_dir / "good-000000.tar"), tmp_path / "b"))
    with pytest.raises(ConfigError, match=r"teachers.0.k: 20 is more than num_classes=10"):
        plan_precompute(make_config(shards_url(data_dir), tmp_path / "c", "teachers.0.k=20"))


MINIMAL = """
data: {shards: "x-{000000..000001}.tar"}
cache: {path: /tmp/c}
teachers: [{name: t1, model: {name: kd_cnn_tiny}}]
"""


@pytest.mark.parametrize(
    ("text", "overrides", "message"),
    [
        (
            MINIMAL,
            ["cache.pathh=/tmp/c"],
            r"cache.pathh: unknown key; valid keys here: .*num_views, overwrite, path",
        ),
        (
            MINIMAL,
            ["ray.num_actors=0"],
            r"ray.num_actors: Input should be greater than or equal to 1 \(found 0\)",
        ),
        (
            MINIMAL,
            ["runtime.amp=fp8"],
            r"runtime.amp: Input should be 'auto', 'bf16', 'fp16' or 'off'",
        ),
        (MINIMAL, ["data.on_error=ignore"], r"data.on_error: Input should be 'raise' or 'skip'"),
        (
            MINIMAL.replace("cache: {path: /tmp/c}", "cache: {seed: 1}"),
            [],
            r"cache.path: required key is missing",
        ),
        (
            MINIMAL,
            ["teachers.0.name=a.b"],
            r"teachers.0.name: Value error, expected letters, digits",
        ),
        (
            MINIMAL,
            ["teachers.0.encoding=int8"],
            r"teachers.0.encoding: Value error, expected one of fp16",
        ),
        (
            MINIMAL,
            ["data.num_classes=3", "teachers.0.k=5"],
            r"teachers.0.k: 5 is more than num_classes=3",
        ),
        (
            MINIMAL.replace("teachers: [", "teachers: [{name: t1, model: {name: kd_mlp}}, "),
            [],
            r"teachers.1.name: 't1' is already used by teachers.0",
        ),
        (
            MINIMAL.replace("teachers: [{name: t1, model: {name: kd_cnn_tiny}}]", "teachers: []"),
            [],
            r"teachers: List should have at least 1 item",
        ),
        (MINIMAL, ["cache.recipe.channels=2"], r"cache.recipe.channels: Input should be 1 or 3"),
    ],
)
def test_config_errors_name_the_dotted_key(tmp_path, text, overrides, message):
    path = tmp_path / "precompute.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(PrecomputeConfig, path, overrides)


def _keys(model, prefix: str = "") -> list[str]:
    out = []
    for name, info in model.model_fields.items():
        annotation = info.annotation
        if (
            isinstance(annotation, type)
            and hasattr(annotation, "model_fields")
            and name not in ("recipe", "model")
        ):
            out += _keys(annotation, f"{prefix}{name}.")
        else:
            out.append(f"{prefix}{name}")
    return out


def test_config_schema_is_pinned():
    """A change to the precompute config's keys must be deliberate: update this list with it."""
    assert _keys(PrecomputeConfig) == [
        "data.shards",
        "data.storage_options",
        "data.index",
        "data.num_classes",
        "data.class_names",
        "data.label_key",
        "data.on_error",
        "data.max_pixels",
        "cache.path",
        "cache.storage_options",
        "cache.seed",
        "cache.num_views",
        "cache.grow",
        "cache.recipe",
        "cache.overwrite",
        "cache.check",
        "cache.force_unlock",
        "teachers",
        "ray.mode",
        "ray.address",
        "ray.connect_timeout_s",
        "ray.num_actors",
        "ray.cpus_per_actor",
        "ray.gpus_per_actor",
        "ray.max_restarts",
        "ray.max_task_retries",
        "ray.wait_for_resources_s",
        "ray.temp_dir",
        "runtime.batch_size",
        "runtime.device",
        "runtime.amp",
        "runtime.channels_last",
        "runtime.torch_threads",
        "runtime.data_workers",
    ]
    assert list(PrecomputeConfig.model_fields["teachers"].annotation.__args__[0].model_fields) == [
        "name",
        "model",
        "ensemble",
        "k",
        "render",
        "encoding",
        "samples",
        "sample_temperatures",
        "draw_temperature",
        "expect_top1",
        "accept_low_accuracy",
    ]


def test_smoke_config_is_valid():
    cfg = load_config(
        PrecomputeConfig, Path(__file__).resolve().parents[2] / "configs/smoke/precompute.yaml"
    )
    assert cfg.teachers[0].model.name == "kd_cnn_tiny" and cfg.cache.num_views == 2


def test_cache_path_that_is_a_file_is_refused(bad_dir, tmp_path):
    (tmp_path / "notes.txt").write_text("not a cache")
    cfg = make_config(
        str(bad_dir / "good-000000.tar"), tmp_path / "notes.txt", "data.num_classes=10"
    )
    with pytest.raises(
        CacheError, match=r"cache.path: '.*notes.txt' is a file, not a cache directory"
    ):
        plan_precompute(cfg)
