"""Test fixtures: train configs over the test caches, and what a run leaves behind.

:func:`world_train_dict` and :func:`world_train_config` are the trainer tests' config over
conftest's ``world`` (student ``kd_mlp``, cached teacher ``tiny``); :func:`minimal_train_config`
trains on any shards and cache with teacher ``t1`` (the precompute tests' teacher).
"""

from __future__ import annotations

import json
from pathlib import Path

from kdcache.train.config import TrainConfig
from kdcache.train.data import build_train_data
from kdcache.train.reporting import TIMING_KEYS


def world_train_dict(world, run_dir, **sections) -> dict:
    """The trainer tests' train config as data: ``world``'s shards and cache, one KD stage; each
    of ``sections`` updates that section (a dict) or replaces it."""
    data = {
        "run": {"dir": str(run_dir), "log_every": 2, "progress": False},
        "data": {
            "shards": world["urls"],
            "val_shards": world["val"],
            "batch_size": 8,
            "num_workers": 0,
            "shuffle_buffer": 10,
        },
        "cache": {"path": str(world["root"] / "cache.zarr")},
        "student": {"name": "kd_mlp", "kwargs": {"img_size": 12, "hidden": 16}},
        "teacher": {"mode": "cache", "name": "tiny"},
        "optimizer": {"lr": 0.1},
        "stages": [{"epochs": 1, "loss": {"name": "kd", "alpha": 0.5, "temperature": 2.0}}],
    }
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    return data


def world_train_config(world, run_dir, **sections) -> TrainConfig:
    """:func:`world_train_dict`, validated."""
    return TrainConfig.model_validate(world_train_dict(world, run_dir, **sections))


def read_metrics(run_dir: Path) -> list[dict]:
    """A run's ``metrics.jsonl`` lines without their timings (which differ from run to run)."""
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in line.items() if k not in TIMING_KEYS} for line in lines]


def minimal_train_config(shards: list[str], cache: Path) -> TrainConfig:
    """One KD epoch of ``kd_mlp`` on ``shards`` against teacher ``t1`` of ``cache``, batches of 4,
    no DataLoader workers, no shuffling."""
    return TrainConfig.model_validate(
        {
            "data": {"shards": shards, "batch_size": 4, "num_workers": 0, "shuffle_buffer": 0},
            "cache": {"path": str(cache)},
            "student": {"name": "kd_mlp"},
            "teacher": {"name": "t1"},
            "stages": [{"epochs": 1, "loss": {"name": "kd"}}],
        }
    )


def train_keys(shards: list[str], cache: Path) -> list[str]:
    """Every key one training epoch streams (in-process, no DataLoader workers)."""
    data = build_train_data(minimal_train_config(shards, cache), 0, 1, ["t1"], pin_memory=False)
    return [key for batch in data.epoch(0, ["t1"]) for key in batch.keys]
