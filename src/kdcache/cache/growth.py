"""Growing a cache: more views per sample (A -> A') without recomputing what is stored.

``kdcache precompute`` with ``cache.num_views: A'`` above the cache's A and ``cache.grow: true``
(a different count without the flag is refused, so a typo never grows a cache) runs
:func:`grow_views` on the driver, then its shard tasks draw views ``A..A'-1`` of every sample
(from ``(seed, key, view)``, as a cache made with A' views from the start has them) and run the
teachers of the run on those views only. The cache's other teachers fill the new views when a
precompute runs with them; until then readers that use them refuse the cache, naming what to run.

On disk (:mod:`kdcache.cache.store`): the root attributes get ``num_views: A'``, ``view_blocks``
(the view counts in order, e.g. ``[2, 4]``) and format version 4; every array with a view axis (the
``views/*`` parameters, each teacher's targets) is resized to A' along it, keeping its chunks of
the old width, so the new views are new chunks and the stored ones are not rewritten (when A is
a multiple of the view count the array was created with, as for a first growth; otherwise the
chunk holding both the last old and the first new views is rewritten with the old values
unchanged); and each part gets a completion-mark array for the new block
(``views_done_from_<A>``, ``teachers/<t>/done_from_<A>``). A teacher added after the growth has
its views in one block.

The attributes are written first: a growth cut short (the driver killed) leaves a cache whose new
blocks are not done anywhere, which readers refuse, and which the next precompute finishes
(:func:`finish_growth`, on every planning) before it fills the new views.
"""

from __future__ import annotations

import logging

from kdcache.cache.integrity import VIEWS, view_paths
from kdcache.cache.store import GROWN_FORMAT_VERSION, CacheStore, codecs
from kdcache.core.errors import CacheError

logger = logging.getLogger(__name__)


def grow_views(store: CacheStore, num_views: int) -> None:
    """Grow ``store`` (opened for writing, by the driver only) to ``num_views`` views per sample:
    root attributes first, then the arrays and the new blocks' marks (:func:`finish_growth`)."""
    cached = store.meta.num_views
    if num_views <= cached:
        raise CacheError(
            f"cache {store.path!r}: cannot grow to {num_views} views, it has {cached} already"
        )
    ends = [*store.view_block_ends, num_views]
    update = {"num_views": num_views, "view_blocks": ends, "format_version": GROWN_FORMAT_VERSION}
    store.group.attrs.update(update)
    store.meta = store.meta.model_copy(update=update)
    logger.info(
        "cache %s: growing from %d to %d views per sample (views %d..%d are made by this run)",
        store.path,
        cached,
        num_views,
        cached,
        num_views - 1,
    )
    finish_growth(store)


def finish_growth(store: CacheStore) -> list[str]:
    """Make the arrays of a grown cache match its root attributes: every array with a view axis
    resized to ``num_views``, every view block's mark array there. Idempotent (the planner runs
    it on every existing cache); returns the paths it changed."""
    if not store.meta.view_blocks:
        return []
    changed = []
    for part in [VIEWS, *store.teachers]:
        for path in view_paths(store, part):
            array = store.array(path)
            if array.shape[1] < store.meta.num_views:
                array.resize((array.shape[0], store.meta.num_views, *array.shape[2:]))
                changed.append(path)
        for block in store.blocks(part)[1:]:
            if not store.has(block.mark):
                store.group.create_array(
                    block.mark,
                    shape=(store.num_shards,),
                    chunks=(1,),
                    dtype="int64",
                    fill_value=0,
                    **codecs("int64"),
                )
                changed.append(block.mark)
    if changed:
        logger.info("cache %s: resized or created %s", store.path, ", ".join(changed))
    return changed
