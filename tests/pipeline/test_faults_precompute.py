"""Fault injection in precompute: the writer lock, failed writes, bad teachers, actors that keep
dying.

Complements tests/pipeline/test_precompute.py (a worker killed once mid-shard, a failed shard
reported while the others finish, a driver killed mid-run and resumed: not repeated here). Lock and
write-failure tests run without Ray; the ones that need Ray actors are marked slow.
"""

from __future__ import annotations

import datetime as dt
import errno
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from kdcache.cache.lock import (
    LockHolder,
    WriterLock,
    _boot_id,
    _start_time,
    lock_path,
    read_holder,
)
from kdcache.cache.reader import read_block
from kdcache.cache.store import open_store
from kdcache.cache_tools.validate import validate_cache
from kdcache.cli import main as cli_main
from kdcache.core.errors import (
    CacheIncompleteError,
    CacheLockedError,
    CacheWriteError,
    TeacherError,
)
from kdcache.core.results import PrecomputeResult
from kdcache.models.build import build_model
from kdcache.pipeline.plan import plan_precompute, seal_fingerprint, writer_lock
from kdcache.pipeline.runner import (
    Progress,
    ShardsFailedError,
    precompute,
    worker_settings,
)
from kdcache.pipeline.worker import FAULT_ENV, ShardResult, ShardWorker
from tests.support.cachebuild import assert_same_arrays, cache_arrays
from tests.support.precomputerun import make_config, run_in_process, shards_url
from tests.support.processes import kill_session
from tests.support.tarbuild import good, write_tar


@pytest.fixture
def shards(tmp_path: Path) -> list[str]:
    """Three tiny shards without a manifest (10 classes, 6 samples each)."""
    return [write_tar(tmp_path / f"s-{i:06d}.tar", good(f"s{i}")) for i in range(3)]


def config(shards: list[str], cache: Path, *overrides: str):
    return make_config(shards, cache, "data.num_classes=10", *overrides)


def write_lock(cache: Path, **fields) -> None:
    """A lock file as another precompute would have written it."""
    holder = {
        "host": platform.node(),
        "pid": 1,
        "token": "someone-else",
        "boot_id": _boot_id(),
        "time": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": "kdcache precompute other.yaml",
        **fields,
    }
    Path(lock_path(str(cache))).write_text(json.dumps(holder))


@pytest.fixture
def live_pid():
    """A live process that is not this one (the other precompute's driver)."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield process.pid
    process.kill()
    process.wait()


# ---- two precomputes on one cache: the writer lock -----------------------------------------------


def test_second_precompute_is_refused_naming_the_lock_holder(shards, tmp_path, live_pid, capsys):
    cache = tmp_path / "cache"
    write_lock(cache, pid=live_pid, start=_start_time(live_pid))
    cfg = config(shards, cache)
    holder = (
        rf"pid {live_pid} on host '{platform.node()}' since .*, "
        r"command 'kdcache precompute other.yaml'"
    )
    with pytest.raises(
        CacheLockedError, match=rf"is being written by another precompute: {holder} holds its lock"
    ):
        precompute(cfg, progress=False)
    with pytest.raises(CacheLockedError, match=r"--force-unlock"):
        plan_precompute(cfg)  # the library path checks the lock too
    config_file = tmp_path / "precompute.yaml"
    config_file.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    assert cli_main(["precompute", str(config_file)]) == 2
    assert (
        f"error: cache '{cache}' is being written by another precompute: pid {live_pid}"
        in capsys.readouterr().err
    )
    assert (
        not cache.exists() and read_holder(str(cache)).pid == live_pid
    )  # nothing written, the lock kept


def test_lock_of_a_dead_or_replaced_process_is_taken_over(shards, tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    cache = tmp_path / "cache"
    cfg = config(shards, cache)
    for stale in (
        {"pid": dead.pid},
        {"pid": 1, "start": -1},
    ):  # gone; or the pid now belongs to another process
        write_lock(cache, **stale)
        with (
            caplog.at_level(logging.WARNING, logger="kdcache.cache.lock"),
            writer_lock(cfg) as lock,
        ):
            assert read_holder(str(cache)).token == lock.holder.token
            plan_precompute(cfg)  # our own lock does not stop us
        assert "its holder is gone" in caplog.text
        assert not Path(lock_path(str(cache))).exists()  # released at the end


def test_lock_from_another_host_is_refused_until_forced(shards, tmp_path, caplog):
    cache = tmp_path / "cache"
    write_lock(cache, host="gpu-node-7", pid=4242)
    with pytest.raises(
        CacheLockedError, match=r"pid 4242 on host 'gpu-node-7' since .* --force-unlock"
    ):
        precompute(config(shards, cache), progress=False)
    with (
        caplog.at_level(logging.WARNING, logger="kdcache.cache.lock"),
        writer_lock(config(shards, cache, "cache.force_unlock=true")),
    ):
        assert read_holder(str(cache)).pid != 4242
    assert "--force-unlock" in caplog.text and not Path(lock_path(str(cache))).exists()


def test_force_unlock_refuses_a_holder_alive_on_this_host(shards, tmp_path, live_pid):
    cache = tmp_path / "cache"
    write_lock(cache, pid=live_pid, start=_start_time(live_pid))
    with pytest.raises(
        CacheLockedError,
        match=rf"cache.path: --force-unlock refused: cache '{cache}' is held by a live precompute "
        rf"on this host \(pid {live_pid} on host",
    ):
        writer_lock(config(shards, cache, "cache.force_unlock=true")).acquire()
    assert read_holder(str(cache)).pid == live_pid  # the live holder keeps its lock


def test_unreadable_lock_is_refused_and_lock_released_after_a_failed_plan(shards, tmp_path):
    cache = tmp_path / "cache"
    Path(lock_path(str(cache))).write_text("{not json")
    with pytest.raises(CacheLockedError, match=r"command 'unreadable lock file'"):
        precompute(config(shards, cache), progress=False)
    Path(lock_path(str(cache))).unlink()
    with pytest.raises(
        Exception, match=r"teachers.0.k: 20 is more than num_classes=10 \(data.num_classes\)"
    ):
        precompute(
            config(shards, cache, "teachers.0.k=20"), progress=False
        )  # fails inside the lock
    assert not Path(lock_path(str(cache))).exists()


def test_lock_on_an_fsspec_filesystem_is_exclusive():
    first = WriterLock("memory://locks/cache.zarr")
    with (
        first,
        pytest.raises(
            CacheLockedError,
            match=r"memory://locks/cache.zarr' is being written by another precompute: "
            rf"pid \d+ on host '{platform.node()}'",
        ),
    ):
        WriterLock(
            "memory://locks/cache.zarr"
        ).acquire()  # same host and pid, another holder: refused
    assert read_holder("memory://locks/cache.zarr") is None


# ---- a write that fails: never a shard marked complete -------------------------------------------


def planned_worker(shards: list[str], cache: Path):
    cfg = config(shards, cache)
    plan = plan_precompute(cfg)
    return plan, ShardWorker(worker_settings(cfg, plan))


def test_failed_chunk_write_names_shard_and_array_and_sets_no_mark(shards, tmp_path):
    plan, worker = planned_worker(shards, tmp_path / "cache")
    (tmp_path / "cache" / "teachers" / "t1" / "topk_logit" / "c").mkdir(parents=True)
    (tmp_path / "cache" / "teachers" / "t1" / "topk_logit" / "c" / "1").write_text(
        "in the way"
    )  # shard 1's chunk
    worker(plan.tasks[0])
    with pytest.raises(
        CacheWriteError,
        match=r"writing 'teachers/t1/topk_logit' of shard 's-000001.tar' failed "
        r"\(.*Error: .*\); the shard's completion mark is not set",
    ):
        worker(plan.tasks[1])
    worker(plan.tasks[2])
    store = open_store(str(tmp_path / "cache"))
    assert store.incomplete_shards() == {
        "t1": ["s-000001.tar"]
    }  # its views were written before: marked
    with pytest.raises(
        CacheIncompleteError, match=r"shard 's-000001.tar' is not complete for teacher 't1'"
    ):
        read_block(store, 1, ["t1"])
    assert not validate_cache(store).ok
    (tmp_path / "cache" / "teachers" / "t1" / "topk_logit" / "c" / "1").unlink()
    rerun = plan_precompute(config(shards, tmp_path / "cache"))
    assert [(t.name, t.make_views) for t in rerun.tasks] == [("s-000001.tar", False)]
    worker(rerun.tasks[0])
    run_in_process(config(shards, tmp_path / "clean"))
    assert_same_arrays(cache_arrays(tmp_path / "cache"), cache_arrays(tmp_path / "clean"))


@contextmanager
def small_filesystem(path: Path, size_kb: int) -> Iterator[Path]:
    """A real tmpfs of ``size_kb`` mounted at ``path``: a disk that can really fill up (needs
    root)."""
    path.mkdir(parents=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(
            f"cannot mount a small tmpfs to fill up: {mounted.stderr.strip() or mounted.returncode}"
        )
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill_up(disk: Path, leave_pages: int) -> Path:
    """Fill ``disk`` with one file until ENOSPC, then give back ``leave_pages`` pages of 4 KiB."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as handle, pytest.raises(OSError) as full:
        while True:
            handle.write(b"\0" * 4096)
    assert full.value.errno == errno.ENOSPC
    os.truncate(filler, max(0, filler.stat().st_size - leave_pages * 4096))
    return filler


# Each chunk file takes one tmpfs page: with zarr 3.1 these fail at the first write ('labels'), at
# the views' completion mark, mid-teacher ('teachers/t1/lse') and at the teacher's completion mark.
@pytest.mark.parametrize("leave_pages", [0, 3, 6, 9])
def test_full_disk_mid_shard_sets_no_mark_and_a_rerun_after_freeing_space_completes(
    shards, tmp_path, leave_pages
):
    with small_filesystem(tmp_path / "disk", 4096) as disk:
        plan, worker = planned_worker(shards, disk / "cache")
        filler = fill_up(disk, leave_pages)
        with pytest.raises(
            CacheWriteError,
            match=r"writing '[a-z_/0-9]+' of shard 's-000000.tar' failed \(OSError: "
            r".*No space left on device.*\); the shard's completion mark is not set",
        ):
            worker(plan.tasks[0])
        store = open_store(str(disk / "cache"))
        assert "s-000000.tar" in store.incomplete_shards()["t1"]
        assert int(np.asarray(store.teacher_group("t1")["done"][0])) == 0
        filler.unlink()
        rerun = plan_precompute(config(shards, disk / "cache"))
        assert [t.name for t in rerun.tasks] == ["s-000000.tar", "s-000001.tar", "s-000002.tar"]
        for task in rerun.tasks:
            worker(task)
        assert validate_cache(open_store(str(disk / "cache"))).ok
        run_in_process(config(shards, tmp_path / "clean"))
        assert_same_arrays(cache_arrays(disk / "cache"), cache_arrays(tmp_path / "clean"))


def test_inf_teacher_fails_the_shard_and_writes_nothing(shards, tmp_path):
    model = build_model(make_config("x", tmp_path).teachers[0].model, 10, 3)
    state = model.state_dict()
    state["head.bias"][3] = float("inf")
    torch.save(state, tmp_path / "inf.pth")
    cfg = config(
        shards[:1], tmp_path / "cache", f"teachers.0.model.checkpoint={tmp_path / 'inf.pth'}"
    )
    with pytest.raises(
        TeacherError, match=r"shard 's-000000.tar', teacher 't1': the teacher produced NaN or inf"
    ):
        run_in_process(cfg)
    assert open_store(str(tmp_path / "cache")).incomplete_shards() == {
        "views": ["s-000000.tar"],
        "t1": ["s-000000.tar"],
    }


# ---- with Ray actors (slow) ----------------------------------------------------------------------


@contextmanager
def every_attempt_dies(monkeypatch, marker: Path, shard: str) -> Iterator[list[float]]:
    """The fault hook on ``shard``, re-armed each time it fires: every attempt at the shard kills
    its actor.

    Yields the times of the deaths; the hook is off again afterwards (an in-process worker would
    exit)."""
    monkeypatch.setenv(FAULT_ENV, f"{shard}:{marker}")
    deaths = []
    stop = threading.Event()

    def rearm() -> None:  # the hook fires once per marker: remove it each time
        while not stop.is_set():
            if marker.exists():
                marker.unlink()
                deaths.append(time.monotonic())
            time.sleep(0.005)

    thread = threading.Thread(target=rearm, daemon=True)
    thread.start()
    try:
        yield deaths
    finally:
        stop.set()
        thread.join()
        monkeypatch.delenv(FAULT_ENV)


def dying_config(data_dir: Path, cache: Path, actors: int, restarts: int, retries: int):
    return make_config(
        shards_url(data_dir),
        cache,
        f"ray.num_actors={actors}",
        f"ray.max_restarts={restarts}",
        f"ray.max_task_retries={retries}",
    )


def died_on_every_attempt(retries: int) -> str:
    return (
        r"1 of 4 shard task\(s\) failed .*\n"
        r"  train-000000.tar: its shard actor died while processing it on "
        rf"every attempt \({retries + 1}, ray.max_task_retries={retries}\): [^\n]*$"
    )


@pytest.mark.slow
def test_actor_that_keeps_dying_on_one_shard_fails_it_and_the_rest_finish(
    ray_session, data_dir, tmp_path, monkeypatch
):
    cfg = dying_config(data_dir, tmp_path / "cache", actors=2, restarts=1, retries=1)
    with (
        every_attempt_dies(monkeypatch, tmp_path / "crashed", "train-000000.tar") as deaths,
        pytest.raises(ShardsFailedError, match=died_on_every_attempt(1)) as info,
    ):
        precompute(cfg, progress=False)
    assert list(info.value.failures) == ["train-000000.tar"] and len(deaths) == 2
    store = open_store(str(tmp_path / "cache"))
    assert store.incomplete_shards() == {"views": ["train-000000.tar"], "t1": ["train-000000.tar"]}
    assert not Path(lock_path(str(tmp_path / "cache"))).exists()


# (1, 0): fewer retries than restarts; the actor used to be given up after the shard's one attempt
@pytest.mark.slow
@pytest.mark.parametrize("restarts, retries", [(1, 1), (1, 0)])
def test_single_actor_dying_on_one_shard_is_replaced_and_every_other_shard_completes(
    ray_session, data_dir, tmp_path, monkeypatch, restarts, retries
):
    cache = tmp_path / "cache"
    cfg = dying_config(data_dir, cache, actors=1, restarts=restarts, retries=retries)
    with (
        every_attempt_dies(monkeypatch, tmp_path / "crashed", "train-000000.tar") as deaths,
        pytest.raises(ShardsFailedError, match=died_on_every_attempt(retries)) as info,
    ):
        precompute(cfg, progress=False)
    assert list(info.value.failures) == ["train-000000.tar"] and len(deaths) == retries + 1
    assert open_store(str(cache)).incomplete_shards() == {
        "views": ["train-000000.tar"],
        "t1": ["train-000000.tar"],
    }
    # the failed shard, done in-process: the whole cache then equals a clean run's
    rerun = plan_precompute(cfg)
    assert [task.name for task in rerun.tasks] == ["train-000000.tar"]
    ShardWorker(worker_settings(cfg, rerun))(rerun.tasks[0])
    seal_fingerprint(rerun.store)
    assert validate_cache(open_store(str(cache))).ok
    run_in_process(make_config(shards_url(data_dir), tmp_path / "clean"))
    assert_same_arrays(cache_arrays(cache), cache_arrays(tmp_path / "clean"))


@pytest.mark.slow
def test_dead_actor_is_not_replaced_beyond_max_restarts(
    ray_session, data_dir, tmp_path, monkeypatch
):
    cfg = dying_config(data_dir, tmp_path / "cache", actors=1, restarts=0, retries=1)
    with (
        every_attempt_dies(monkeypatch, tmp_path / "crashed", "train-000000.tar") as deaths,
        pytest.raises(ShardsFailedError, match=r"4 of 4 shard task\(s\) failed") as info,
    ):
        precompute(cfg, progress=False)
    spent = (
        "no shard actor left to run it: its actor died 1 time(s), "
        "ray.max_restarts=0 replacement(s) spent"
    )
    assert str(info.value).splitlines()[1:] == [
        "  train-000000.tar: its shard actor died while processing it (1 of 2 attempts), "
        f"then {spent}",
        f"  train-000001.tar, train-000002.tar, train-000003.tar: {spent}",
    ]
    assert len(deaths) == 1


def test_progress_without_a_terminal_logs_shards_views_per_second_and_eta(caplog):
    now = [0.0]
    progress = Progress(
        PrecomputeResult(cache_path="c", tasks=4),
        4,
        enabled=False,
        interval=30.0,
        clock=lambda: now[0],
    )
    now[0] = 5.0
    progress.actors_up()  # rates and the ETA count from here
    with caplog.at_level(logging.INFO, logger="kdcache.pipeline.runner"):
        for seconds, shard in [(10.0, "a"), (35.0, "b"), (50.0, None), (80.0, "d")]:
            now[0] = seconds
            if shard is None:
                progress.shard_failed("c")
            else:
                progress.shard_done(ShardResult(shard, 100, 0, 1.0, 0.5, True, ("t1",)))
    messages = [record.getMessage() for record in caplog.records]
    assert [
        m for m in messages if m.startswith("precompute: ")
    ] == [  # at most every 30 s, and at the end
        "precompute: 2/4 shards done, 7 views/s, 30s elapsed, ETA 30s",
        "precompute: 3/4 shards done (1 failed), 4 views/s, 1m15s elapsed, ETA 0s",
    ]
    assert "shard a done (1/4): 100 views, 0 invalid, 1.0 s (teacher forward 0.5 s)" in messages


@pytest.mark.slow
def test_failed_write_in_an_actor_fails_only_that_shard(ray_session, shards, tmp_path):
    cfg = config(shards, tmp_path / "cache")
    plan = plan_precompute(cfg)
    (tmp_path / "cache" / "status" / "c" / "2" / "x").mkdir(
        parents=True
    )  # a directory where shard 2's chunk goes
    from kdcache.pipeline.runner import run_precompute

    with pytest.raises(
        ShardsFailedError,
        match=r"1 of 3 .*\n  s-000002.tar: CacheWriteError: .*writing 'status' of "
        r"shard 's-000002.tar' failed",
    ):
        run_precompute(cfg, plan, progress=False)
    store = open_store(str(tmp_path / "cache"))
    assert store.incomplete_shards() == {"views": ["s-000002.tar"], "t1": ["s-000002.tar"]}


@pytest.mark.slow
def test_two_precomputes_at_once_one_is_refused(tmp_path, data_dir):
    cfg = make_config(shards_url(data_dir), tmp_path / "cache", "ray.num_actors=1")
    config_file = tmp_path / "precompute.yaml"
    config_file.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    ray_temp = tempfile.mkdtemp(
        prefix="kdr", dir="/tmp"
    )  # short: Ray's socket paths have a length limit
    command = [
        sys.executable,
        "-m",
        "kdcache",
        "precompute",
        str(config_file),
        f"ray.temp_dir={ray_temp}",
    ]
    first = subprocess.Popen(
        command, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.monotonic() + 120
        while (
            read_holder(str(tmp_path / "cache")) is None
            and first.poll() is None
            and time.monotonic() < deadline
        ):
            time.sleep(0.01)
        holder = read_holder(str(tmp_path / "cache"))
        assert holder is not None and holder.pid == first.pid, (
            first.stdout.read() if first.poll() is not None else ""
        )
        second = subprocess.run(command, capture_output=True, text=True, timeout=120)
        out, _ = first.communicate(timeout=300)
    finally:
        kill_session(first.pid)
        shutil.rmtree(ray_temp, ignore_errors=True)
    assert (
        second.returncode == 2
        and f"is being written by another precompute: pid {first.pid}" in second.stderr
    )
    assert first.returncode == 0, out
    assert "4/4 shard task(s) done" in out and not Path(lock_path(str(tmp_path / "cache"))).exists()
    assert validate_cache(open_store(str(tmp_path / "cache"))).ok


def test_lock_holder_round_trip():
    me = LockHolder.this_process()
    assert LockHolder.parse(json.dumps(asdict(me)).encode()) == me and not me.is_stale()
