"""The precompute run record: the driver's :class:`~kdcache.core.results.PrecomputeResult`, started
from the config and the plan, filled in by the runner, written into the cache at the end.

Only the driver writes it (``<cache>/runs/<run id>.json``, see :mod:`kdcache.core.results`); shard
workers never do. A record that cannot be written is a warning, not a failed run: the cache it
describes is written and marked either way.
"""

from __future__ import annotations

import logging
from typing import Any

from kdcache.core.results import (
    PrecomputeResult,
    PrecomputeStatus,
    TeacherRun,
    config_digest,
    host_and_pid,
    iso,
    run_id,
    utc_now,
    versions,
)
from kdcache.pipeline.config import PrecomputeConfig
from kdcache.pipeline.plan import PrecomputePlan, ResolvedTeacher, saved_config

logger = logging.getLogger(__name__)


def new_result(cfg: PrecomputeConfig, plan: PrecomputePlan) -> PrecomputeResult:
    """A run's result as it starts: who runs what, on which cache, with which config."""
    started = utc_now()
    host, pid = host_and_pid()
    config = saved_config(cfg)  # storage_options redacted: a record never holds credentials
    store = plan.store
    return PrecomputeResult(
        run_id=run_id(started, host, pid),
        cache_path=plan.cache_path,
        started=iso(started),
        host=host,
        pid=pid,
        config_digest=config_digest(config),
        config=config,
        versions=versions(),
        teachers=[
            TeacherRun(
                name=t.name,
                model=model_name(t),
                k=t.k,
                weights_digest=t.weights_digest,
                rendering=t.rendering_from,
            )
            for t in plan.teachers
        ],
        num_shards=store.num_shards,
        num_views=store.meta.num_views,
        tasks=len(plan.tasks),
        cache_views=store.meta.fingerprint.num_samples * store.meta.num_views,
        cache_teachers=len(store.teachers),
    )


def model_name(teacher: ResolvedTeacher) -> str:
    """What a run record names as a teacher's model: its spec's name, or for a stored ensemble
    (no spec of its own) ``ensemble(<model>,...)``."""
    if teacher.spec is not None:
        return teacher.spec.name
    return "ensemble(" + ", ".join(m.spec.name for m in teacher.members) + ")"


def finish(result: PrecomputeResult, status: PrecomputeStatus, error: str = "") -> PrecomputeResult:
    result.status = status
    result.error = error
    result.finished = iso(utc_now())
    return result


def write_record(result: PrecomputeResult, storage_options: dict[str, Any] | None) -> str | None:
    """Write the run record into the cache; its path, or None (logged) when it cannot be."""
    path = result.record_path()
    try:
        result.write(path, storage_options or None)
    except OSError as exc:
        logger.warning("could not write the run record %s: %s: %s", path, type(exc).__name__, exc)
        return None
    logger.debug("run record: %s", path)
    return path
