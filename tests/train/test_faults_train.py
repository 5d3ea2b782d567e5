"""Fault injection in training: a SIGKILLed ``kdcache train`` resumed, swapped caches, bad
checkpoints.

Complements tests/train/test_trainer.py (a run stopped by ``run.max_steps`` and resumed bit for
bit; a checkpoint from another config refused naming the keys), which is not repeated here.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from kdcache.core.errors import CacheMismatchError, KdcacheError
from kdcache.train.checkpoint import CheckpointError
from kdcache.train.trainer import train
from tests.support.cachebuild import build_cache, write_shards
from tests.support.processes import kill_session
from tests.support.trainrun import read_metrics, world_train_config, world_train_dict

ROOT = Path(__file__).resolve().parents[2]

PAUSING_TRAIN = """
import os, sys, time
from pathlib import Path
from kdcache.train.config import load_train_config
from kdcache.train.hooks import StepHook
from kdcache.train.trainer import train

class PauseAt(StepHook):
    def __init__(self):
        self.step = int(os.environ["KDCACHE_TEST_PAUSE_AT"])
        self.ready = Path(os.environ["KDCACHE_TEST_READY"])

    def step_end(self, trainer, batch, parts):
        # metrics written, last checkpoint behind us: wait to be killed
        if trainer.state.global_step == self.step:
            self.ready.write_text(str(os.getpid()))
            time.sleep(600)

train(load_train_config(sys.argv[1]), hooks=[PauseAt()])
"""


def kdcache(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kdcache", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        **kwargs,
    )


def killable_config(world, run_dir: Path) -> dict:
    """2 epochs x 12 steps, a checkpoint every 5 steps, DataLoader workers, one torch thread."""
    return world_train_dict(
        world,
        run_dir,
        run={"ckpt_every_steps": 5, "log_every": 1, "threads": 1},
        data={"batch_size": 4, "num_workers": 2},
        stages=[{"epochs": 2, "loss": {"name": "kd"}}],
    )


@pytest.mark.slow
def test_sigkilled_train_resumes_to_the_uninterrupted_result(world, tmp_path):
    data = killable_config(world, tmp_path / "cut")
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump(data))
    env = {
        **os.environ,
        "KDCACHE_TEST_PAUSE_AT": "17",
        "KDCACHE_TEST_READY": str(tmp_path / "ready"),
    }
    process = subprocess.Popen(
        [sys.executable, "-c", PAUSING_TRAIN, str(config)],
        cwd=ROOT,
        env=env,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while (
            not (tmp_path / "ready").exists()
            and process.poll() is None
            and time.monotonic() < deadline
        ):
            time.sleep(0.02)
        assert (tmp_path / "ready").exists(), (
            process.communicate()[0][-3000:] if process.poll() is not None else "timeout"
        )
    finally:
        kill_session(process.pid)  # SIGKILL: the trainer and its DataLoader workers, mid-epoch 2
        process.wait()
    state = torch.load(tmp_path / "cut" / "checkpoints" / "last.pt", weights_only=True)["state"]
    assert (state["epoch"], state["epoch_step"], state["global_step"]) == (1, 3, 15)
    assert (
        max(line["step"] for line in read_metrics(tmp_path / "cut")) == 17
    )  # logged after the checkpoint
    assert not (tmp_path / "cut" / "summary.json").exists()

    resumed = kdcache("train", str(config), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "2 epochs, 24 steps" in resumed.stdout
    threads = torch.get_num_threads()
    try:
        full = train(
            world_train_config(
                world,
                tmp_path / "full",
                **{
                    k: v
                    for k, v in killable_config(world, tmp_path / "full").items()
                    if k in ("run", "data", "stages")
                },
            )
        )
    finally:
        torch.set_num_threads(threads)
    assert full.completed and full.steps == 24
    assert read_metrics(tmp_path / "cut") == read_metrics(tmp_path / "full")
    a = torch.load(tmp_path / "cut" / "checkpoints" / "model_final.pt", weights_only=True)
    b = torch.load(tmp_path / "full" / "checkpoints" / "model_final.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---- the cache changed under a run ---------------------------------------------------------------


@pytest.fixture
def stopped_run(world, tmp_path):
    """A run stopped after 3 steps against a private copy of the cache (so the test may swap it)."""
    cache = tmp_path / "cache.zarr"
    shutil.copytree(world["root"] / "cache.zarr", cache)
    config = world_train_config(
        world, tmp_path / "run", cache={"path": str(cache)}, run={"max_steps": 3}
    )
    assert not train(config).completed
    return config, cache


def resume(config):
    return train(
        config.model_copy(
            update={"run": config.run.model_copy(update={"resume": "must", "max_steps": None})}
        )
    )


def test_resume_against_a_cache_of_other_shards_is_refused(world, stopped_run, tmp_path):
    config, cache = stopped_run
    shutil.rmtree(cache)
    other = write_shards(tmp_path / "other", per_shard=[12, 12, 12, 11])
    build_cache(cache, other, teachers={"tiny": 4, "top2": 2})
    streamed = r"key 'train_000047' is not in the cache's block for shard 'train-000003.tar'"
    with pytest.raises(
        (CacheMismatchError, CheckpointError), match=rf"{streamed}|trained against another cache"
    ):
        resume(
            config
        )  # names and counts are checked up front only with data.verify_keys; keys as they stream
    verified = config.model_copy(
        update={"data": config.data.model_copy(update={"verify_keys": True})}
    )
    with pytest.raises(
        CacheMismatchError,
        match=r"shard 'train-000003.tar' has 11 samples in the cache but 12 in the data",
    ):
        resume(verified)


def test_resume_against_a_rebuilt_cache_is_refused(world, stopped_run):
    config, cache = stopped_run
    shutil.rmtree(cache)
    build_cache(
        cache,
        world["urls"],
        teachers={"tiny": 4, "top2": 2},
        seed=1,
    )
    try:
        resume(config)
    except KdcacheError as exc:
        assert "cache" in str(exc) and str(cache) in str(exc)
    else:
        raise AssertionError("resumed against a different cache")


# ---- checkpoints that cannot be resumed ----------------------------------------------------------


def edit_checkpoint(path: Path, **changes) -> None:
    ckpt = torch.load(path, weights_only=True)
    ckpt.update(changes)
    torch.save(ckpt, path)


def test_checkpoint_of_another_version_or_world_size_is_refused(stopped_run):
    config, _ = stopped_run
    last = Path(config.run.dir) / "checkpoints" / "last.pt"
    edit_checkpoint(last, world_size=2)
    with pytest.raises(CheckpointError, match=r"last.pt was written with world size 2, found 1"):
        resume(config)
    edit_checkpoint(last, version=99)
    with pytest.raises(
        CheckpointError, match=r"last.pt has checkpoint version 99, this kdcache reads 1"
    ):
        resume(config)
    edit_checkpoint(last, format="something-else")
    with pytest.raises(CheckpointError, match=r"last.pt is not a kdcache training checkpoint"):
        resume(config)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_unreadable_checkpoint_is_refused_naming_the_file(stopped_run, damage):
    config, _ = stopped_run
    last = Path(config.run.dir) / "checkpoints" / "last.pt"
    data = last.read_bytes()
    last.write_bytes(b"not a checkpoint" if damage == "garbage" else data[: len(data) // 2])
    try:
        resume(config)
    except CheckpointError as exc:
        assert "last.pt" in str(exc)
    except Exception as exc:
        raise AssertionError(f"{type(exc).__name__}: {exc}") from None
