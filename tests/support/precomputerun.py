"""Test fixtures: precompute configs over test shards, run through Ray or in this process.

:func:`make_config` is the precompute tests' config (teacher ``t1``, a ``kd_cnn_tiny`` keeping
k=5; 2 views of ``SIZE`` px; 2 actors); :func:`precompute` runs it through the real runner (Ray),
:func:`run_in_process` with one in-process worker, no Ray.
"""

from __future__ import annotations

from pathlib import Path

from kdcache.core.config import apply_overrides, validate
from kdcache.pipeline.config import PrecomputeConfig
from kdcache.pipeline.plan import plan_precompute, seal_fingerprint
from kdcache.pipeline.runner import run_precompute, worker_settings
from kdcache.pipeline.worker import ShardWorker
from tests.support.tarbuild import SIZE


def shards_url(directory: Path, count: int = 4) -> str:
    """The brace URL of ``directory``'s ``train-NNNNNN.tar`` shards 0..count-1."""
    return str(directory / f"train-{{000000..{count - 1:06d}}}.tar")


def make_config(shards: str, cache: Path, *overrides: str, **sections) -> PrecomputeConfig:
    """The precompute tests' config over ``shards`` into ``cache``; dotted ``overrides`` and whole
    ``sections`` replace its parts."""
    data = {
        "data": {"shards": shards},
        "cache": {
            "path": str(cache),
            "num_views": 2,
            "recipe": {"size": SIZE, "scale": [0.3, 1.0]},
        },
        "teachers": [{"name": "t1", "model": {"name": "kd_cnn_tiny"}, "k": 5}],
        "ray": {"num_actors": 2},
        "runtime": {"batch_size": 32},
    }
    data.update(sections)
    return validate(PrecomputeConfig, apply_overrides(data, list(overrides)))


def precompute(cfg: PrecomputeConfig):
    """Plan and run ``cfg`` through the real runner (Ray), without a progress bar."""
    return run_precompute(cfg, plan_precompute(cfg), progress=False)


def run_in_process(cfg: PrecomputeConfig) -> None:
    """Plan and run every shard task in this process (no Ray), then seal the fingerprint as the
    runner does at the end of a run."""
    plan = plan_precompute(cfg)
    worker = ShardWorker(worker_settings(cfg, plan))
    for task in plan.tasks:
        worker(task)
    seal_fingerprint(plan.store)


def input_fault_config(shards, cache: Path, *overrides: str):
    """:func:`make_config` over one shard or a list of shards with ``data.num_classes=10`` (the bad
    input tests' shards have no manifest)."""
    return make_config(
        shards if isinstance(shards, list) else [str(shards)],
        cache,
        "data.num_classes=10",
        *overrides,
    )
