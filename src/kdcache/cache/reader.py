"""The read half of the cache contract: one shard's block, keyed by sample.

The trainer, inspect, validate, verify and precompute's worker (adding a teacher over stored views)
all read through :func:`read_block`, which fetches each array's one chunk for the shard and trims
the padding. Damage at rest is an error here, never data: a chunk that fails its checksum, or a
missing chunk of a shard marked complete (Zarr would read fill values; see
:mod:`kdcache.cache.integrity`), is a :class:`~kdcache.core.errors.CacheReadError` naming the
cache, the array and the shard.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from kdcache.cache.integrity import (
    VIEWS,
    ViewBlock,
    block_arrays,
    find_damage,
    missing_chunks,
    stored_shards,
)
from kdcache.cache.store import STATUS_VALID, CacheStore
from kdcache.core.errors import CacheIncompleteError, CacheMismatchError, CacheReadError
from kdcache.targets.encoding import decode
from kdcache.views.recipe import ViewParams, param_arrays


@dataclass
class TeacherBlock:
    """One teacher's targets for the rows of a shard: arrays ``[n, A, k]`` and ``[n, A]``."""

    topk_idx: np.ndarray
    topk_logit: np.ndarray
    lse: np.ndarray
    label_logit: np.ndarray
    tail_lse: np.ndarray
    """logsumexp of the logits outside the top-k (``-inf``: no tail)."""
    sample_idx: np.ndarray | None = None
    """Encoding ``sampled``: the classes drawn from the tail ``[n, A, slots]`` (and below: their
    logits, their counts, 0 for an empty slot, and ``logsumexp(l / T)`` ``[n, A, T]``)."""
    sample_logit: np.ndarray | None = None
    sample_count: np.ndarray | None = None
    lse_t: np.ndarray | None = None
    draw_tail_lse: np.ndarray | None = None
    """Encoding ``sampled``: ``logsumexp(l / τ)`` over the tail the draws came from ``[n, A]``
    (τ = 1: ``tail_lse``)."""
    temperatures: tuple[float, ...] = ()
    """The temperatures of ``lse_t``'s last axis."""
    draw_temperature: float = 1.0
    """Encoding ``sampled``: τ, the temperature the draws came from."""

    @property
    def sampled(self) -> bool:
        return self.sample_idx is not None

    def fields(self) -> tuple[np.ndarray, ...]:
        """The arrays in the order of :class:`~kdcache.targets.sparse.SparseTargets` (sampled:
        :class:`~kdcache.targets.sparse.SampledTargets`, the temperatures broadcast to ``lse_t``
        and τ to ``lse``)."""
        head = (self.topk_idx, self.topk_logit, self.lse, self.label_logit, self.tail_lse)
        if (  # not sampled: the encoding sets all five draw arrays or none
            self.sample_idx is None
            or self.sample_logit is None
            or self.sample_count is None
            or self.lse_t is None
            or self.draw_tail_lse is None
        ):
            return head
        temps = np.broadcast_to(np.asarray(self.temperatures, np.float32), self.lse_t.shape).copy()
        tau = np.full(self.lse.shape, self.draw_temperature, np.float32)
        draws = (self.sample_idx, self.sample_logit, self.sample_count, self.lse_t, temps)
        return head + draws + (self.draw_tail_lse, tau)


@dataclass
class ShardBlock:
    """Everything the cache holds for one shard, padding trimmed."""

    shard: str
    index: int
    keys: np.ndarray
    labels: np.ndarray
    status: np.ndarray
    errors: np.ndarray
    view_params: ViewParams
    """The shard's stored view parameters (its rows of the ``views/`` group)."""
    teachers: dict[str, TeacherBlock] = field(default_factory=dict)
    _rows: dict[str, int] | None = None

    def __len__(self) -> int:
        return len(self.keys)

    def row(self, key: str) -> int:
        """Row of ``key`` within the block; an unknown key is an error (never a misalignment)."""
        if self._rows is None:
            self._rows = {str(k): i for i, k in enumerate(self.keys)}
        try:
            return self._rows[key]
        except KeyError:
            raise CacheMismatchError(
                f"key {key!r} is not in the cache's block for shard {self.shard!r}"
            ) from None

    def valid(self, row: int) -> bool:
        return int(self.status[row]) == STATUS_VALID


def read_block(
    store: CacheStore,
    shard: int | str,
    teachers: list[str] | None = None,
    *,
    require_complete: bool = True,
    check_values: bool = True,
    skip_views: tuple[int, ...] = (),
) -> ShardBlock:
    """Read one shard's rows: keys, labels, status, view params and the named teachers' targets.

    What the shard's marks vouch for must be stored whole: a missing chunk of a part marked
    complete (its views, a teacher), or a chunk that fails its checksum, is a
    :class:`CacheReadError` naming the cache, the array and the shard, never fill values. With
    ``require_complete=False`` unmarked parts are read too, as fill values where never written.
    Labels of valid rows and class indices out of range are a :class:`CacheReadError` naming the
    array (``check_values=False``: left to the caller, ``kdcache validate``, which lists them).
    ``skip_views``: views whose parameters are not read but left at their fill values (a grown
    cache's new views that the caller draws again: their chunks may be the damage it repairs)."""
    index = store.shard_index(shard) if isinstance(shard, str) else shard
    name = store.meta.fingerprint.shards[index]
    teachers = list(teachers or [])
    marked = marked_blocks(store, index, [VIEWS, *teachers])
    if require_complete:
        _require_done(store, index, [VIEWS, *teachers], marked)
    require_chunks(store, index, marked)
    rows = store.rows(index)
    arrays = {
        key: read_path(store, key, rows, name) for key in ("keys", "labels", "status", "errors")
    }
    view_params = read_views(store, rows, name, skip_views)
    block = ShardBlock(
        shard=name,
        index=index,
        keys=arrays["keys"],
        labels=arrays["labels"],
        status=arrays["status"],
        errors=arrays["errors"],
        view_params=view_params,
    )
    if check_values:
        valid_labels = block.labels[block.status == STATUS_VALID]
        require_in_range(store, "labels", valid_labels, name, low=NO_LABEL)
    for teacher in teachers:
        block.teachers[teacher] = read_teacher_rows(store, teacher, rows, name, check_values)
    return block


def read_views(
    store: CacheStore, rows: slice, shard: str, skip: tuple[int, ...] = ()
) -> ViewParams:
    """The stored view parameters of a row range (the views in ``skip``, a tail of them, left at
    their fill values and their chunks never read)."""
    image_hw = read_path(store, f"{VIEWS}/image_hw", rows, shard)
    stop = min(skip, default=store.meta.num_views)
    params = ViewParams.empty(store.meta.recipe, rows.stop - rows.start, store.meta.num_views)
    for name in param_arrays(store.meta.recipe):
        # the view axis is chunked by block: reading [:, :stop] touches no skipped block's chunk
        params.arrays[name][:, :stop] = read_path(
            store, f"{VIEWS}/{name}", (rows, slice(0, stop)), shard
        )
    return ViewParams(image_hw, params.arrays)


def read_teacher_rows(
    store: CacheStore, teacher: str, rows: slice, shard: str, check_values: bool = True
) -> TeacherBlock:
    """One teacher's targets for a row range, decoded from its encoding."""
    meta = store.teacher_meta(teacher)
    arrays = {
        name: read_path(store, f"teachers/{teacher}/{name}", rows, shard)
        for name in meta.arrays(store.meta.num_classes)
    }
    temperatures = tuple(meta.sample_temperatures)
    tau = meta.draw_temperature
    block = TeacherBlock(
        *decode(meta.encoding, arrays, temperatures, tau),
        temperatures=temperatures,
        draw_temperature=tau,
    )
    if check_values:
        require_targets_in_range(store, teacher, block, shard)
    return block


def require_targets_in_range(
    store: CacheStore, teacher: str, block: TeacherBlock, shard: str
) -> None:
    """Class indices in ``[0, C)`` and at most S draws per view: values that pass their checksum
    but would index past a row of C classes, or weigh the draws wrongly, in every reader."""
    group = f"teachers/{teacher}"
    require_in_range(store, f"{group}/topk_idx", block.topk_idx, shard)
    if block.sample_idx is None or block.sample_count is None:  # not sampled (decode sets both)
        return
    used = block.sample_count > 0
    require_in_range(store, f"{group}/sample_idx", block.sample_idx[used], shard)
    samples = store.teacher_meta(teacher).samples
    totals = block.sample_count.astype(np.int64).sum(-1)
    if (totals > samples).any():
        raise CacheReadError(
            f"cache {store.path!r}: {group + '/sample_count'!r} of shard {shard!r} holds "
            f"{int(totals.max())} draws for a view, more than the teacher's {samples}; "
            f"{OUT_OF_RANGE}"
        )


def require_in_range(
    store: CacheStore, path: str, values: np.ndarray, shard: str, low: int = 0
) -> None:
    """Every value a class index in ``[low, C)`` (labels: ``low`` -1, a sample without one),
    else a CacheReadError naming the array and the shard."""
    classes = store.meta.num_classes
    bad = (values < low) | (values >= classes)
    if bad.any():
        raise CacheReadError(
            f"cache {store.path!r}: {path!r} of shard {shard!r} holds {int(values[bad].flat[0])}, "
            f"outside the {classes} classes [{low}, {classes}) ({int(bad.sum())} value(s)); "
            f"{OUT_OF_RANGE}"
        )


def read_path(store: CacheStore, path: str, rows: slice | tuple, shard: str) -> np.ndarray:
    """Rows of the array at ``path`` (``status``, ``teachers/t1/lse`` ...); a chunk that fails its
    checksum or cannot be fetched is a :class:`CacheReadError` naming array and shard."""
    try:
        return np.asarray(store.array(path)[rows])  # a slice: already an ndarray
    except Exception as exc:  # codecs raise RuntimeError/ValueError, stores OSError: all one here
        raise CacheReadError(
            f"cache {store.path!r}: cannot read {path!r} of shard {shard!r} "
            f"({type(exc).__name__}: {str(exc)[:200]}); the chunk is damaged or unreachable "
            f"({REPAIR_CHECK})"
        ) from exc


NO_LABEL = -1
"""The label of a valid row whose sample has none (``labels`` holds -1)."""
REPAIR = "`kdcache validate` lists the damage; a `kdcache precompute` rerun redoes the shard"
OUT_OF_RANGE = (
    "the values pass their checksum, so the cache was altered or written by other code: "
    "`kdcache validate` lists every such problem; delete the shard's chunk file of that array and "
    "rerun `kdcache precompute` to redo it"
)
REPAIR_CHECK = "`kdcache precompute --check` finds damaged chunks and redoes their shards"


def marked_blocks(store: CacheStore, index: int, parts: list[str]) -> list[ViewBlock]:
    """The view blocks of ``parts`` (``views``, teachers) that shard ``index`` has its completion
    mark for; a mark that cannot be decoded is a :class:`CacheReadError`, a missing one (or a
    later block's mark array not there yet) "not done"."""
    name = store.meta.fingerprint.shards[index]
    mark = slice(index, index + 1)
    blocks = [block for part in parts for block in store.blocks(part)]
    present = [block for block in blocks if block.start == 0 or store.has(block.mark)]
    return [block for block in present if read_path(store, block.mark, mark, name)[0] > 0]


def marked_parts(store: CacheStore, index: int, parts: list[str]) -> list[str]:
    """Those of ``parts`` (``views``, teachers) that shard ``index`` has every completion mark
    for (all their view blocks)."""
    marked = marked_blocks(store, index, parts)
    return [part for part in parts if all(b in marked for b in store.blocks(part))]


def require_chunks(store: CacheStore, index: int, blocks: list[ViewBlock]) -> None:
    """Shard ``index`` holds its chunks of every array of ``blocks``, else a
    :class:`CacheReadError` naming the arrays: one ``exists`` per chunk, issued together."""
    held = [item for block in blocks for item in block_arrays(store, block)]
    missing = missing_chunks(held, index)
    if missing:
        name = store.meta.fingerprint.shards[index]
        paths = ", ".join(dict.fromkeys(repr(item.path) for item in missing))
        raise CacheReadError(
            f"cache {store.path!r}: cannot read {paths} of shard {name!r}: the chunk file is "
            f"missing though the shard is marked complete, so the cache is damaged ({REPAIR})"
        )


def require_stored(store: CacheStore, teachers: list[str]) -> None:
    """Every shard marked complete holds every chunk of its keys, views and ``teachers``, else a
    :class:`CacheReadError` naming the first damaged ones: one listing per array, for a reader
    that wants damage found before any work (the trainer)."""
    damage = find_damage(store, teachers)
    if damage:
        shown = "; ".join(str(d) for d in damage[:3])
        more = f" (and {len(damage) - 3} more)" if len(damage) > 3 else ""
        raise CacheReadError(f"cache {store.path!r} is damaged: {shown}{more} ({REPAIR})")


def read_array(store: CacheStore, path: str) -> np.ndarray:
    """All rows of a per-row array under the first views mark (``status``, ``labels`` ...): each
    shard marked complete must hold its chunk (one listing) and every chunk must decode, else a
    :class:`CacheReadError` naming the shard."""
    array = store.array(path)
    names = store.meta.fingerprint.shards
    stored = stored_shards(array, store.num_shards)
    lost = [names[i] for i in np.flatnonzero(store.rows_done()) if i not in stored]
    if lost:
        raise CacheReadError(
            f"cache {store.path!r}: cannot read {path!r} of shard(s) {lost[:5]}: the chunk file "
            f"is missing though the shard is marked complete, so the cache is damaged ({REPAIR})"
        )
    try:
        return np.asarray(array[:])
    except Exception:  # name the shard: read chunk by chunk, the damaged one raises
        for index in range(store.num_shards):
            chunk = slice(index * store.cap, (index + 1) * store.cap)
            read_path(store, path, chunk, names[index])
        raise


def _require_done(store: CacheStore, index: int, parts: list[str], marked: list[ViewBlock]) -> None:
    name = store.meta.fingerprint.shards[index]
    for part in parts:
        missing = [block for block in store.blocks(part) if block not in marked]
        if not missing:
            continue
        if missing[0].start > 0:  # the cache grew: the first views are there, the new ones not
            raise CacheIncompleteError(
                f"shard {name!r} lacks {_what(part)} {missing[0].describe()} in cache "
                f"{store.path!r}, which grew to {store.meta.num_views} views: "
                f"{fill_hint(store, [part])}"
            )
        if part == VIEWS:
            raise CacheIncompleteError(
                f"shard {name!r} has no views yet in cache {store.path!r}: "
                "run precompute to finish it"
            )
        raise CacheIncompleteError(
            f"shard {name!r} is not complete for teacher {part!r} in cache "
            f"{store.path!r}: run precompute to finish it"
        )


def _what(part: str) -> str:
    return "its" if part == VIEWS else f"teacher {part!r}'s targets for"


def incomplete_error(store: CacheStore, teachers: list[str]) -> CacheIncompleteError | None:
    """Why a reader of ``teachers`` cannot use the cache yet (None: every shard is complete for
    them): the parts and shards missing, and what to run; for a grown cache whose new views are
    all that is missing, which views of which teachers."""
    incomplete = store.incomplete_shards(teachers)
    if not incomplete:
        return None
    blocks = store.unfinished_blocks(teachers)
    if blocks and all(block.start > 0 for block, _ in blocks):
        missing = "; ".join(
            f"{'the views' if b.part == VIEWS else f'teacher {b.part!r}'} lack "
            f"{b.describe()} on {count} shard(s)"
            for b, count in blocks
        )
        return CacheIncompleteError(
            f"cache {store.path!r} grew to {store.meta.num_views} views and its new views are not "
            f"filled yet ({missing}): {fill_hint(store, [b.part for b, _ in blocks])}"
        )
    parts = "; ".join(
        f"{what}: {len(names)} shard(s) e.g. {names[:3]}" for what, names in incomplete.items()
    )
    return CacheIncompleteError(
        f"cache {store.path!r} is incomplete ({parts}): run precompute to finish it"
    )


def fill_hint(store: CacheStore, parts: list[str]) -> str:
    """What to run to finish a grown cache's new views for ``parts`` (views, teachers)."""
    teachers = [p for p in parts if p != VIEWS] or store.teachers
    listed = ", ".join(repr(t) for t in teachers)
    return (
        f"run `kdcache precompute` on it with cache.num_views={store.meta.num_views} and "
        f"teacher(s) {listed} (as stored: same model, weights and k) to fill them"
    )
