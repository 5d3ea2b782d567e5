"""Repairing damage at rest before a precompute run: damaged shards lose their marks and are redone.

``kdcache precompute`` on an existing cache checks every shard marked complete before it lists
the shard tasks (:func:`kdcache.cache.integrity.find_damage`): cheaply by default (the chunk files
exist: one listing per array), and with ``cache.check`` (``--check``) by reading every marked
chunk too (its crc32c checksum). Each damaged chunk is logged naming shard and array; then the
damaged part's completion mark is cleared, so :func:`kdcache.pipeline.plan.shard_tasks` lists the
shard again and the run redoes it, with the same values as a clean run (views depend on
``(seed, key, view)`` only). A shard's keys belong to its views: a damaged keys chunk clears the
views mark, and the worker writes the keys again with the views.

A damaged part of a teacher that is not in this run loses its mark too, so readers see the shard
as not done for that teacher (rather than damaged) until a run with that teacher redoes it.
"""

from __future__ import annotations

import logging
import time

from kdcache.cache.integrity import VIEWS, Damage, find_damage
from kdcache.cache.store import CacheStore
from kdcache.cache.writer import clear_mark

logger = logging.getLogger(__name__)


def repair_damage(store: CacheStore, teachers: list[str], *, check: bool) -> list[Damage]:
    """Find the damaged chunks of the shards marked complete (``check``: read them all), log each
    and clear the damaged parts' marks; ``teachers``: this run's (a damaged part of another teacher
    is cleared, not redone)."""
    start = time.perf_counter()
    damage = find_damage(store, check=check)
    for found in damage:
        logger.warning("cache %s: %s; %s", store.path, found, _action(found, teachers))
    for part, start, shard in sorted({(found.part, found.start, found.shard) for found in damage}):
        clear_mark(store, shard, part, start)  # the damaged view block's mark
    logger.info(
        "cache %s: checked the marked shards' chunks (%s) in %.1f s: %s",
        store.path,
        "existence and checksums" if check else "existence; --check reads checksums too",
        time.perf_counter() - start,
        f"{len({found.shard for found in damage})} damaged shard(s)" if damage else "no damage",
    )
    return damage


def _action(found: Damage, teachers: list[str]) -> str:
    views = f" (views from {found.start})" if found.start else ""
    if found.part == VIEWS:
        return f"its views mark{views} is cleared: this run makes those views again"
    if found.part in teachers:
        return f"the mark of teacher {found.part!r}{views} is cleared: this run redoes it there"
    return (
        f"the mark of teacher {found.part!r} is cleared; the teacher is not in this run, so the "
        "shard stays to do for it until a precompute with that teacher runs"
    )
