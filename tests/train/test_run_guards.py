"""Guards around a training run: a non-finite loss, one writer per ``run.dir``, a cache replaced
under a running trainer (issue 25)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from kdcache.cache.store import open_store
from kdcache.train.trainer import train
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
