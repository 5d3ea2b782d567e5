"""Guards around a training run: a non-finite loss, one writer per ``run.dir``, a cache replaced
under a running trainer (issue 25)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from kdcache.cache.store import open_store
from kdcache.core.errors import CacheMismatchError, TrainingError
from kdcache.train.hooks import StepHook
from kdcache.train.trainer import train
from tests.support.cachebuild import build_cache
from tests.support.trainrun import world_train_config, world_train_dict

ROOT = Path(__file__).resolve().parents[2]


def kdcache(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kdcache", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        **kwargs,
    )


def write_config(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


# ---- a non-finite loss -----------------------------------------------------------------------


@pytest.fixture
def nan_cache(world, tmp_path) -> Path:
    """A copy of the world's cache with one NaN in teacher ``tiny``'s stored logits of every view
    of shard ``train-000002.tar`` (a value with a valid checksum: only the loss can tell)."""
    cache = tmp_path / "cache.zarr"
    shutil.copytree(world["root"] / "cache.zarr", cache)
    store = open_store(str(cache), "r+")
    rows = store.rows(store.shard_index("train-000002.tar"))
    logits = store.teacher_group("tiny")["topk_logit"]
    block = np.asarray(logits[rows.start : rows.stop])
    block[:, :, 0] = np.nan
    logits[rows.start : rows.stop] = block
    return cache


def test_a_nan_loss_stops_the_run_naming_step_epoch_and_shard(world, nan_cache, tmp_path):
    data = world_train_dict(world, tmp_path / "run", cache={"path": str(nan_cache)})
    result = kdcache("train", str(write_config(tmp_path / "train.yaml", data)))
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "the loss is not finite (nan) at step " in lines[0]
    assert "(epoch 1, batch " in lines[0] and "'train-000002.tar'" in lines[0]
    assert "run.on_nonfinite=skip" in lines[0]
    assert not (tmp_path / "run" / "summary.json").exists()


def test_skipped_nan_steps_are_counted_and_the_model_stays_finite(world, nan_cache, tmp_path):
    config = world_train_config(
        world, tmp_path / "run", cache={"path": str(nan_cache)}, run={"on_nonfinite": "skip"}
    )
    summary = train(config)
    assert summary.completed and summary.nonfinite_steps_skipped >= 1
    assert summary.nonfinite_steps_skipped < summary.steps
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert saved["nonfinite_steps_skipped"] == summary.nonfinite_steps_skipped
    assert summary.eval_loss is not None and np.isfinite(summary.eval_loss)


# ---- one writer per run.dir --------------------------------------------------------------------

PAUSING_TRAIN = """
import os, sys, time
from pathlib import Path
from kdcache.train.config import load_train_config
from kdcache.train.hooks import StepHook
from kdcache.train.trainer import train

class PauseAt(StepHook):
    def step_end(self, trainer, batch, parts):
        if trainer.state.global_step == 2:  # mid-run: say so, then wait to be killed
            Path(sys.argv[2]).write_text(str(os.getpid()))
            time.sleep(600)

train(load_train_config(sys.argv[1]), hooks=[PauseAt()])
"""


@pytest.fixture
def running_trainer(world, tmp_path):
    """A ``kdcache train`` paused at its step 2 on ``tmp_path/run``: (config file, its pid)."""
    config = write_config(tmp_path / "train.yaml", world_train_dict(world, tmp_path / "run"))
    ready = tmp_path / "ready"
    process = subprocess.Popen(
        [sys.executable, "-c", PAUSING_TRAIN, str(config), str(ready)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert process.poll() is None and time.monotonic() < deadline, "trainer did not start"
            time.sleep(0.2)
        yield config, process
    finally:
        process.kill()
        process.wait()


def test_a_second_trainer_on_a_run_dir_is_refused_naming_the_first(running_trainer, tmp_path):
    config, first = running_trainer
    run_dir = tmp_path / "run"
    before = (run_dir / "metrics.jsonl").read_text()
    for extra in ([], ["run.overwrite=true"], ["--force-unlock"]):
        second = kdcache("train", str(config), *extra)
        assert second.returncode == 2, second.stderr
        error = [line for line in second.stderr.splitlines() if "error:" in line]
        assert len(error) == 1 and f"pid {first.pid} on host" in error[0], second.stderr
        assert f"{run_dir}.lock" in error[0]
    assert "is being written by another kdcache train" in kdcache("train", str(config)).stderr
    assert "--force-unlock refused" in second.stderr  # the holder is alive on this host
    assert (run_dir / "metrics.jsonl").read_text() == before  # overwrite removed nothing
    assert (run_dir / "checkpoints").is_dir()


def test_the_lock_of_a_killed_trainer_is_taken_over(running_trainer, tmp_path):
    config, first = running_trainer
    first.kill()
    first.wait()
    rerun = kdcache("train", str(config), "run.overwrite=true")
    assert rerun.returncode == 0, rerun.stderr
    assert "its holder is gone" in rerun.stderr
    assert not Path(f"{tmp_path / 'run'}.lock").exists()  # released at the end


# ---- a cache replaced under a running trainer ----------------------------------------------------


class ReplaceCacheAfter(StepHook):
    """At the end of ``step``, replaces the cache at ``cache`` by the one at ``other``."""

    def __init__(self, step: int, cache: Path, other: Path):
        self.step = step
        self.cache = cache
        self.other = other

    def step_end(self, trainer, batch, parts):
        if trainer.state.global_step == self.step:
            shutil.rmtree(self.cache)
            shutil.copytree(self.other, self.cache)


def test_a_cache_replaced_mid_run_stops_the_run_naming_what_changed(world, tmp_path):
    cache = tmp_path / "cache.zarr"
    shutil.copytree(world["root"] / "cache.zarr", cache)
    other = tmp_path / "rebuilt.zarr"  # the same shards and teachers, rebuilt with another seed
    build_cache(other, world["urls"], teachers={"tiny": 4, "top2": 2}, seed=1)
    config = world_train_config(
        world,
        tmp_path / "run",
        cache={"path": str(cache)},
        stages=[{"epochs": 2, "loss": {"name": "kd"}}],
    )
    with pytest.raises(
        CacheMismatchError,
        match=rf"cache '{cache}' changed while this run read it \(replaced, rebuilt or grown\), "
        r"at the block of shard 'train-00000\d.tar' \(epoch 2\): .*creation_id: '\w+' vs '\w+'",
    ):
        train(config, hooks=[ReplaceCacheAfter(6, cache, other)])  # 6 steps: the end of epoch 1
    assert not (tmp_path / "run" / "summary.json").exists()


def test_a_cache_copied_back_in_place_is_the_same_cache(world, tmp_path):
    cache = tmp_path / "cache.zarr"
    shutil.copytree(world["root"] / "cache.zarr", cache)
    copy = tmp_path / "copy.zarr"
    shutil.copytree(cache, copy)
    config = world_train_config(
        world,
        tmp_path / "run",
        cache={"path": str(cache)},
        stages=[{"epochs": 2, "loss": {"name": "kd"}}],
    )
    assert train(config, hooks=[ReplaceCacheAfter(6, cache, copy)]).completed


class _FirstNanShardStep(StepHook):
    """Records the 1-based step of the first batch holding a sample of the NaN shard."""

    def __init__(self) -> None:
        self.step: int | None = None
        self.steps = 0

    def step_start(self, trainer, batch) -> None:
        self.steps += 1
        if self.step is None and "train-000002.tar" in batch.shards:
            self.step = self.steps


def test_a_nan_checked_later_still_names_its_own_step(world, nan_cache, tmp_path):
    """Stop mode checks at train lines, checkpoints and every few steps, not each step: with
    no line until the epoch's end, the error still names the first NaN step and nothing of
    the run is saved."""
    config = world_train_config(
        world, tmp_path / "run", cache={"path": str(nan_cache)}, run={"log_every": 10_000}
    )
    first = _FirstNanShardStep()
    with pytest.raises(TrainingError, match=r"the loss is not finite \(nan\) at step (\d+) ") as e:
        train(config, hooks=[first])
    assert first.step is not None
    assert f"at step {first.step} (epoch 1, batch {first.step} of the epoch" in str(e.value)
    assert not (tmp_path / "run" / "summary.json").exists()
    assert not list((tmp_path / "run").glob("model_*.pt"))
