"""The write half of the cache contract, used by precompute.

The driver creates the store and the teacher subgroups (the only attribute writes); a shard task
writes its shard's chunks with :func:`write_views` / :func:`write_teacher`, each of which sets the
shard's completion mark last, after the data is stored. A failed write raises
:class:`~kdcache.core.errors.CacheWriteError` naming shard and array, and the mark stays unset.
Damage found when a precompute is planned is repaired by the driver: :func:`clear_mark` unsets a
damaged part's mark (the run redoes it) and :func:`write_keys` rewrites a damaged keys chunk.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import zarr
import zarr.errors

from kdcache.cache.integrity import ViewBlock, mark_path
from kdcache.cache.store import (
    ENCODINGS,
    STATUS_EMPTY,
    TEACHERS,
    VIEWS,
    CacheStore,
    Fingerprint,
    RootMeta,
    TeacherMeta,
    TeacherSpec,
    array_at,
    codecs,
    creation_info,
    now_ms,
    open_store,
)
from kdcache.core.errors import CacheError, CacheMismatchError, CacheWriteError
from kdcache.targets.encoding import encode
from kdcache.targets.sparse import SampledTargets, SparseTargets
from kdcache.views.recipe import ViewParams, ViewRecipe, param_arrays

log = logging.getLogger(__name__)


def create_store(
    path: str,
    *,
    fingerprint: Fingerprint,
    keys: list[list[str]],
    recipe: ViewRecipe,
    num_views: int,
    num_classes: int,
    class_names: list[str],
    seed: int,
    config: dict[str, Any],
    overwrite: bool = False,
    storage_options: dict | None = None,
) -> CacheStore:
    """Create an empty cache: root metadata, the shared per-row arrays and the shards' keys
    given (an empty list: the shard's keys are written by its worker, :func:`write_keys`)."""
    cap = max(fingerprint.counts)
    rows = cap * len(fingerprint.shards)
    meta = RootMeta(
        fingerprint=fingerprint,
        rows_per_shard=cap,
        recipe=recipe,
        num_views=num_views,
        num_classes=num_classes,
        class_names=class_names,
        seed=seed,
        created=creation_info(),
        config=config,
    )
    try:
        group = zarr.open_group(
            path, mode="w" if overwrite else "w-", storage_options=storage_options
        )
    except (zarr.errors.ContainsGroupError, zarr.errors.ContainsArrayError, FileExistsError):
        raise CacheError(
            f"{path!r} already holds data; pass --overwrite (cache.overwrite=true) to start over"
        ) from None
    _array(group, "keys", (rows,), (cap,), str, "")
    _array(group, "labels", (rows,), (cap,), "int32", -1)
    _array(group, "status", (rows,), (cap,), "int8", STATUS_EMPTY)
    _array(group, "errors", (rows,), (cap,), str, "")
    _view_arrays(group.require_group(VIEWS), recipe, num_views, rows, cap)
    _array(group, "views_done", (len(keys),), (1,), "int64", 0)
    for shard, shard_keys in enumerate(keys):
        if shard_keys:  # planned from a manifest or index: the workers write them
            shard_rows = slice(shard * cap, (shard + 1) * cap)
            array = array_at(group, "keys").with_config({"write_empty_chunks": True})
            array[shard_rows] = _pad(np.array(shard_keys, dtype=object), cap, "")
    # root attrs last: the store is a cache from here on
    group.attrs.update(meta.model_dump(mode="json"))
    return CacheStore(path=path, group=group, meta=meta)


def _view_arrays(
    group: zarr.Group, recipe: ViewRecipe, num_views: int, rows: int, cap: int
) -> None:
    """``views/image_hw`` and one array per op family of the recipe, a shard per chunk."""
    _array(group, "image_hw", (rows, 2), (cap, 2), "int32", 0)
    for name, spec in param_arrays(recipe).items():
        shape = (rows, num_views, *spec.tail)
        chunks = (cap, num_views, *spec.tail)
        _array(group, name, shape, chunks, spec.dtype, spec.fill)


def _array(group: zarr.Group, name: str, shape, chunks, dtype, fill) -> zarr.Array:
    return group.create_array(
        name, shape=shape, chunks=chunks, dtype=dtype, fill_value=fill, **codecs(dtype)
    )


def _pad(values: np.ndarray, cap: int, fill: Any) -> np.ndarray:
    """Pad the first axis to ``cap`` rows so a whole chunk is written (no read-modify-write)."""
    if len(values) == cap:
        return values
    pad = np.full((cap - len(values),) + values.shape[1:], fill, dtype=values.dtype)
    return np.concatenate([values, pad])


def index_dtype(num_classes: int) -> str:
    return "uint16" if num_classes <= np.iinfo(np.uint16).max + 1 else "int32"


def add_teacher(store: CacheStore, spec: TeacherSpec) -> TeacherMeta:
    """Create the teacher subgroup ``spec`` describes, or check an existing one against the same
    spec, weights and rendering (default: the recipe's). Encoding ``sampled`` stores
    ``spec.samples`` draws per view from the tail at ``spec.draw_temperature`` and the logsumexp
    at ``spec.sample_temperatures``; ``spec.ensemble``: a stored ensemble's models. The stored
    :class:`TeacherMeta` adds what the writer decides (index dtype, rendering default, creation
    stamp)."""
    name = spec.name
    _check_spec(store, spec)
    meta = TeacherMeta(
        name=name,
        model=spec.model,
        weights_digest=spec.weights_digest,
        k=spec.k,
        encoding=spec.encoding,
        index_dtype=index_dtype(store.meta.num_classes),
        rendering=spec.rendering or store.meta.recipe.rendering(),
        created=creation_info(),
        config=spec.config or {},
        samples=spec.samples,
        sample_temperatures=list(spec.sample_temperatures),
        draw_temperature=spec.draw_temperature,
        ensemble=spec.ensemble,
    )
    if name in store.teachers:
        _check_same_teacher(store.teacher_meta(name), meta)
        return store.teacher_meta(name)
    if name in store.unfinished_teachers:
        # an earlier run stopped while creating it: nothing in it is marked
        log.warning(
            "cache %s: teacher %r was left half-created by an earlier run; creating it again",
            store.path,
            name,
        )
        del store.group[f"{TEACHERS}/{name}"]
    _create_teacher_arrays(store, meta)
    store.forget_teachers()
    return meta


def _check_spec(store: CacheStore, spec: TeacherSpec) -> None:
    """Refuse an unknown encoding, a ``k`` outside 1..C and sampling settings that do not fit."""
    name = spec.name
    num_classes = store.meta.num_classes
    if spec.encoding not in ENCODINGS:
        raise CacheError(
            f"teacher {name!r}: unknown encoding {spec.encoding!r}; valid: {', '.join(ENCODINGS)}"
        )
    if not 1 <= spec.k <= num_classes:
        raise CacheError(
            f"teacher {name!r}: k={spec.k} must be between 1 and num_classes={num_classes}"
        )
    _check_sampling(name, spec.encoding, spec.samples, spec.k, num_classes)
    _check_draw_temperature(name, spec.encoding, spec.draw_temperature, spec.sample_temperatures)


def _check_sampling(name: str, encoding: str, samples: int, k: int, num_classes: int) -> None:
    """Encoding ``sampled`` needs draws (1..255) and a tail to draw from; others take none."""
    if encoding != "sampled":
        if samples:
            raise CacheError(f"teacher {name!r}: samples={samples} needs encoding 'sampled'")
        return
    if not 1 <= samples <= 255:
        raise CacheError(f"teacher {name!r}: samples={samples} must be between 1 and 255")
    if k >= num_classes:
        raise CacheError(
            f"teacher {name!r}: encoding 'sampled' draws from the classes outside the top-k; "
            f"k={k} leaves none of the {num_classes}"
        )


def _check_draw_temperature(
    name: str, encoding: str, draw_temperature: float, sample_temperatures: tuple[float, ...]
) -> None:
    """Draws at a finite temperature > 0, other than 1 only for encoding ``sampled``, and not
    one of ``sample_temperatures`` too (its normaliser comes with the draws)."""
    if not (math.isfinite(draw_temperature) and draw_temperature > 0):
        raise CacheError(
            f"teacher {name!r}: draw_temperature={draw_temperature} must be finite and > 0"
        )
    if draw_temperature != 1.0 and encoding != "sampled":
        raise CacheError(
            f"teacher {name!r}: draw_temperature={draw_temperature:g} needs encoding 'sampled'"
        )
    if draw_temperature != 1.0 and any(
        math.isclose(t, draw_temperature) for t in sample_temperatures
    ):
        raise CacheError(
            f"teacher {name!r}: draw_temperature={draw_temperature:g} is also among "
            f"sample_temperatures {list(sample_temperatures)}: its normaliser is stored with the "
            "draws already"
        )


SAME_TEACHER = (
    "model",
    "weights_digest",
    "k",
    "encoding",
    "rendering",
    "samples",
    "sample_temperatures",
    "draw_temperature",
    "ensemble",
)
"""What a run's teacher must share with the cache's teacher of the same name."""


def _check_same_teacher(cached: TeacherMeta, given: TeacherMeta) -> None:
    diffs = [
        f"{field}: cache {getattr(cached, field)!r} vs run {getattr(given, field)!r}"
        for field in SAME_TEACHER
        if getattr(cached, field) != getattr(given, field)
    ]
    if diffs:
        raise CacheMismatchError(
            f"teacher {given.name!r} already exists in the cache with other settings: "
            + "; ".join(diffs)
            + " (use another teacher name, or --overwrite to start the cache over)"
        )


def _create_teacher_arrays(store: CacheStore, meta: TeacherMeta) -> None:
    a = store.meta.num_views
    cap = store.cap
    rows = store.cap * store.num_shards
    group = store.group.require_group(f"{TEACHERS}/{meta.name}")
    for name, (dtype, tail, fill) in meta.arrays(store.meta.num_classes).items():
        _array(group, name, (rows, a) + tail, (cap, a) + tail, dtype, fill)
    _array(group, "done", (store.num_shards,), (1,), "int64", 0)
    # attrs last: a teacher without them is unfinished
    group.attrs.update(meta.model_dump(mode="json"))


def shard_chunk(store: CacheStore, shard: int) -> slice:
    return slice(shard * store.cap, (shard + 1) * store.cap)


def write_views(
    store: CacheStore,
    shard: int,
    *,
    labels: np.ndarray,
    status: np.ndarray,
    errors: list[str],
    params: ViewParams,
) -> None:
    """Write a shard's labels, row status, errors and view parameters (all A views), then its
    views marks (every view block's, on a grown cache)."""
    _check_rows(store, shard, labels, "labels")
    chunk = shard_chunk(store, shard)
    cap = store.cap
    values = {
        "labels": _pad(labels.astype(np.int32), cap, -1),
        "status": _pad(status.astype(np.int8), cap, STATUS_EMPTY),
        "errors": _pad(np.array(errors, dtype=object), cap, ""),
    }
    for name, data in values.items():
        _store_chunk(store, shard, store.group, name, chunk, data)
    view_group = store.view_group
    _store_chunk(store, shard, view_group, "image_hw", chunk, _pad(params.image_hw, cap, 0))
    for name, spec in param_arrays(store.meta.recipe).items():
        data = _pad(params.arrays[name].astype(spec.dtype), cap, spec.fill)
        _store_chunk(store, shard, view_group, name, chunk, data)
    for block in reversed(store.blocks(VIEWS)):  # the first block's mark last
        _store_chunk(store, shard, store.group, block.mark, shard, now_ms())


def write_view_block(store: CacheStore, shard: int, block: ViewBlock, params: ViewParams) -> None:
    """Write the parameters of a later views block of a shard (a grown cache's new views: its
    rows, labels and first views are stored already), then the block's mark. ``params``: the
    shard's rows x all A views; only the block's views are written, into the block's own chunks.
    """
    _check_block(store, block)
    _check_rows(store, shard, params.image_hw, "view parameters")
    where = (shard_chunk(store, shard), slice(block.start, block.stop))
    for name, spec in param_arrays(store.meta.recipe).items():
        values = params.arrays[name][:, block.start : block.stop].astype(spec.dtype)
        _store_chunk(
            store, shard, store.view_group, name, where, _pad(values, store.cap, spec.fill)
        )
    _store_chunk(store, shard, store.group, block.mark, shard, now_ms())


def _check_block(store: CacheStore, block: ViewBlock) -> None:
    if block not in store.blocks(block.part):
        raise CacheError(
            f"cache {store.path!r}: {block.part!r} has no view block {block.describe()} "
            f"(its blocks: {', '.join(b.describe() for b in store.blocks(block.part))})"
        )


def write_keys(store: CacheStore, shard: int, keys: list[str]) -> None:
    """Write a shard's keys as its worker read them, before the shard's views mark (planning
    counted the shard from a manifest or index, without its keys; see kdcache.pipeline.plan)."""
    _check_rows(store, shard, keys, "keys")
    values = _pad(np.array(keys, dtype=object), store.cap, "")
    _store_chunk(store, shard, store.group, "keys", shard_chunk(store, shard), values)


def set_key_digest(store: CacheStore, digest: str) -> None:
    """Set the fingerprint's key digest in the root attributes: the driver only, once every
    shard's keys are stored and checked unique across shards (kdcache.pipeline.plan)."""
    fingerprint = store.meta.fingerprint.model_copy(update={"key_digest": digest})
    store.group.attrs.update({"fingerprint": fingerprint.model_dump(mode="json")})
    store.meta = store.meta.model_copy(update={"fingerprint": fingerprint})


def write_teacher(
    store: CacheStore,
    shard: int,
    teacher: str,
    *,
    topk_idx: np.ndarray,
    topk_logit: np.ndarray,
    lse: np.ndarray,
    label_logit: np.ndarray,
    tail_lse: np.ndarray,
    samples: tuple[np.ndarray, ...] | None = None,
    start: int = 0,
) -> None:
    """Write one teacher's targets for a shard, then that teacher's mark for the shard
    (encoding ``sampled``: with ``samples`` = (classes, logits, counts, lse_t, the draws' tail
    logsumexp), each ``[n, views, ...]``).

    ``start``: the first view of the teacher's view block the targets are for (a grown cache's
    new views; 0: its first block); the arrays hold the block's views, ``[n, views, ...]``."""
    _check_rows(store, shard, lse, f"teacher {teacher!r} lse")
    group = store.teacher_group(teacher)
    meta = store.teacher_meta(teacher)
    block = ViewBlock(teacher, start, start + lse.shape[1])
    _check_block(store, block)
    where = (shard_chunk(store, shard), slice(block.start, block.stop))
    cap = store.cap
    specs = meta.arrays(store.meta.num_classes)
    head = (topk_idx, topk_logit, lse, label_logit, tail_lse)
    temperatures = tuple(meta.sample_temperatures)
    arrays = encode(meta.encoding, *head, samples, temperatures, meta.draw_temperature)
    for name, values in arrays.items():
        dtype, _, fill = specs[name]
        _store_chunk(store, shard, group, name, where, _pad(values.astype(dtype), cap, fill))
    _store_chunk(store, shard, store.group, block.mark, shard, now_ms())


def write_targets(store: CacheStore, shard: int, teacher: str, targets: SparseTargets) -> None:
    """:func:`write_teacher` from torch targets of the shard's views, flat ``[n * A]``
    (row-major)."""
    n = store.meta.fingerprint.counts[shard]
    a = store.meta.num_views
    k = targets.k
    scalars = {
        name: getattr(targets, name).detach().cpu().numpy().reshape(n, a)
        for name in ("lse", "label_logit", "tail_lse")
    }
    samples = None
    if isinstance(targets, SampledTargets):
        tensors = (targets.sample_idx, targets.sample_logit, targets.sample_count, targets.lse_t)
        samples = tuple(x.detach().cpu().numpy().reshape(n, a, -1) for x in tensors)
        samples += (targets.draw_tail_lse.detach().cpu().numpy().reshape(n, a),)
    write_teacher(
        store,
        shard,
        teacher,
        topk_idx=targets.idx.cpu().numpy().reshape(n, a, k),
        topk_logit=targets.logit.detach().cpu().numpy().reshape(n, a, k),
        samples=samples,
        **scalars,
    )


def clear_mark(store: CacheStore, shard: int, part: str, start: int = 0) -> None:
    """Unset a shard's completion mark for its views (``part="views"``) or a teacher, of the view
    block from view ``start``: its data is damaged, and a rerun redoes it. Written as 0 (not
    deleted), so an unreadable mark chunk is replaced too."""
    if part != VIEWS:
        store.teacher_group(part)  # an unknown teacher is a CacheMismatchError
    _store_chunk(store, shard, store.group, mark_path(part, start), shard, 0)


def _store_chunk(
    store: CacheStore,
    shard: int,
    group: zarr.Group,
    name: str,
    where: slice | int | tuple[slice, slice],
    values: Any,
) -> None:
    """One chunk write; a failure (full disk, permissions, object store) is a CacheWriteError that
    names the shard and the array, and leaves the shard's mark unset (the mark is written last).

    The chunk is stored even when it equals the fill value (zarr skips such chunks by default),
    so every shard marked complete has every chunk: a missing one is damage, not a default."""
    try:
        array_at(group, name).with_config({"write_empty_chunks": True})[where] = values
    except OSError as exc:
        array = f"{group.path}/{name}".lstrip("/")
        shard_name = store.meta.fingerprint.shards[shard]
        raise CacheWriteError(
            f"cache {store.path!r}: writing {array!r} of shard {shard_name!r} failed "
            f"({type(exc).__name__}: {exc}); "
            "the shard's completion mark is not set, so a rerun redoes it"
        ) from exc


def _check_rows(store: CacheStore, shard: int, values: np.ndarray | list, what: str) -> None:
    expected = store.meta.fingerprint.counts[shard]
    if len(values) != expected:
        name = store.meta.fingerprint.shards[shard]
        raise CacheError(f"shard {name!r}: {what} has {len(values)} rows, the shard has {expected}")


def reopen_for_writing(path: str, storage_options: dict | None = None) -> CacheStore:
    return open_store(path, "r+", storage_options)
