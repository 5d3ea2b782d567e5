"""The cache store: a Zarr v3 group of per-row arrays, one chunk per input shard.

Layout (``R = num_shards * rows_per_shard``; shard ``s`` owns rows ``[s*cap, (s+1)*cap)``, padded)::

    <cache>/                      attrs: format, fingerprint, recipe, num_views, classes, seed,
                                  created, config
      keys         str   [R]            written by the shard's worker with its views
      labels       int32 [R]            -1 where the label is missing
      status       int8  [R]            0 padding / not written, 1 valid, 2 invalid (skipped)
      errors       str   [R]            why a row is invalid
      views/                        the view parameters (kdcache.views.recipe,
      kdcache.views.augment)
        image_hw   int32 [R, 2]          the decoded source image's height and width
        crop       int32 [R, A, 4]       top, left, height, width in source pixels
        flip       uint8 [R, A]
        policy     uint8 [R, A, N, 2]    (recipe.policy) op code, magnitude per op slot
        jitter     uint8 [R, A, 5]       (recipe.color_jitter) order, four factor codes
        erase      uint8 [R, A, 4]       (recipe.erasing) box in 1/255 of the side
        erase_seed uint32 [R, A]         (random fills) seed of the fill
        mix_partner int16 [R, A]         (recipe.mix) partner's row offset in the shard, 0: none
        mix_lam    uint8 [R, A]          (recipe.mix) Mixup: own weight; CutMix: lam of the box
        mix_center uint8 [R, A, 2]       (CutMix) centre of the pasted square, 255: Mixup
      views_done   int64 [S]            completion mark per shard (ms since epoch), chunk 1
      views_done_from_<a> int64 [S]     (grown caches) the mark of the views from ``a`` on
      teachers/<name>/              attrs: model spec, weights digest, k, encoding, rendering,
                                    created, config
        (encoding "fp16")
        topk_idx   uint16|int32 [R, A, k]  class indices sorted by logit, descending
        topk_logit float16 [R, A, k]       raw logits
        lse        float32 [R, A]          logsumexp of all logits at T=1
        label_logit float32 [R, A]         logit of the labelled class
        log_tail   float16 [R, A]          log of the mass outside the top-k at T=1 (-inf: none)
        (encoding "q8": see kdcache.targets.encoding; decodes to the same five arrays)
        (encoding "sampled": the q8 arrays, plus sample_idx/sample_count/sample_q [R, A, slots]
        and lse_t [R, A, n]: draws from the tail, kdcache.targets.sampling; draws at a
        draw_temperature other than 1 add draw_tail [R, A], the tail's logsumexp there)
        done       int64 [S]               completion mark per shard, chunk 1
        done_from_<a> int64 [S]            (grown caches) the mark of the views from ``a`` on

**Growing** (:mod:`kdcache.cache.growth`): a cache made with A views can get more (A -> A'). The
arrays with a view axis keep their chunks of A views and are resized to A'; the views from A on are
new chunks (the stored ones are never rewritten) under their own completion marks (``*_from_<A>``),
one per growth; ``view_blocks`` in the root attributes lists the view counts ([A, A']). A part
(the views, a teacher) is complete for a shard when all its blocks' marks are set; readers refuse
a shard that is not. A grown cache has format version 4, so a kdcache that reads only version 3
refuses it instead of reading the new views as fill values; caches never grown stay version 3.

Every chunk ends with a crc32c checksum (Zarr's ``crc32c`` codec), so a damaged chunk is an error
on reading, never wrong values; and a shard marked complete has every chunk its marks vouch for
stored, so a missing one is damage too (:mod:`kdcache.cache.integrity`). Group attributes are
written by the driver only; a worker writes its shard's chunks, then its shard's completion mark,
last. See :mod:`kdcache.cache.reader` for the read side.
"""

from __future__ import annotations

import datetime as _dt
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import zarr
import zarr.codecs
import zarr.errors
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kdcache.cache.hierarchy import subgroups
from kdcache.cache.integrity import ViewBlock, block_marks, part_blocks
from kdcache.core.errors import CacheError, CacheMismatchError, CacheNotFoundError, CacheReadError
from kdcache.targets.encoding import (
    ENCODINGS,  # noqa: F401  (re-exported)
    array_shapes,
    sample_slots,
)
from kdcache.views.recipe import Rendering, ViewRecipe

FORMAT_NAME = "kdcache"
FORMAT_VERSION = 3
"""The version of a new cache. 3: views are op compositions stored under ``views/``, teachers
record their rendering, every chunk carries a crc32c checksum; 2: the tail logsumexp is stored;
1 derived the tail from the top-k."""
GROWN_FORMAT_VERSION = 4
"""The version of a cache that grew (``view_blocks``, per-block marks): version 3 plus growth, so
a kdcache that reads version 3 only refuses it instead of reading unfinished views."""
READ_VERSIONS = (FORMAT_VERSION, GROWN_FORMAT_VERSION)
VIEWS = "views"
STATUS_EMPTY = 0
STATUS_VALID = 1
STATUS_INVALID = 2
TEACHERS = "teachers"


def compressor() -> zarr.codecs.BloscCodec:
    return zarr.codecs.BloscCodec(cname="zstd", clevel=5, shuffle="shuffle")


def codecs(dtype: Any) -> dict[str, Any]:
    """``create_array`` codec arguments: a compressor (blosc-zstd; plain zstd for strings), then
    a crc32c checksum of the stored chunk, so a flipped byte is caught on reading instead of
    decoding to garbage."""
    checksum = zarr.codecs.Crc32cCodec()
    if dtype is str:
        return {"compressors": [zarr.codecs.ZstdCodec(level=5), checksum]}
    return {"compressors": [compressor(), checksum]}


class Fingerprint(BaseModel):
    """What identifies the dataset a cache was made from."""

    model_config = ConfigDict(extra="forbid")
    shards: list[str]
    counts: list[int]
    key_digest: str

    @property
    def num_samples(self) -> int:
        return sum(self.counts)

    def differences(self, other: Fingerprint) -> list[str]:
        """Human-readable differences, ``self`` being the cache and ``other`` the data."""
        if self.shards != other.shards:
            return [_list_diff("shards", self.shards, other.shards)]
        out = [
            f"shard {name!r} has {mine} samples in the cache but {theirs} in the data"
            for name, mine, theirs in zip(self.shards, self.counts, other.counts, strict=True)
            if mine != theirs
        ]
        if not out and self.key_digest != other.key_digest:
            out.append("the sample keys differ (same shards and counts, other keys or order)")
        return out


def _list_diff(what: str, cached: list[str], given: list[str]) -> str:
    missing = [s for s in cached if s not in set(given)]
    extra = [s for s in given if s not in set(cached)]
    parts = []
    if missing:
        parts.append(f"{len(missing)} in the cache but not given (e.g. {missing[:3]})")
    if extra:
        parts.append(f"{len(extra)} given but not in the cache (e.g. {extra[:3]})")
    if not parts:
        parts.append("same names in another order")
    return f"{what} differ: " + "; ".join(parts)


class RootMeta(BaseModel):
    """The cache's root attributes."""

    model_config = ConfigDict(extra="forbid")
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION
    fingerprint: Fingerprint
    rows_per_shard: int
    recipe: ViewRecipe
    num_views: int
    num_classes: int
    class_names: list[str] = []
    seed: int
    created: dict[str, Any] = {}
    config: dict[str, Any] = {}
    view_blocks: list[int] = []
    """The view counts of a grown cache in order, e.g. ``[2, 4]`` (made with 2, grown to 4);
    empty: never grown (one block of ``num_views``)."""


class MemberMeta(BaseModel):
    """One model of a stored ensemble teacher."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    model: dict[str, Any]
    weights_digest: str
    weight: float
    rendering: Rendering


class EnsembleMeta(BaseModel):
    """How a stored ensemble teacher combined its models (:mod:`kdcache.models.ensemble`)."""

    model_config = ConfigDict(extra="forbid")
    combine: str
    members: list[MemberMeta]


class TeacherMeta(BaseModel):
    """A teacher subgroup's attributes."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    name: str
    model: dict[str, Any]
    weights_digest: str
    k: int
    encoding: str = "fp16"
    index_dtype: str = "uint16"
    rendering: Rendering
    """How the teacher saw its views: size, interpolation, mean and std (an ensemble: its first
    model's; each model's is in ``ensemble``)."""
    created: dict[str, Any] = {}
    config: dict[str, Any] = {}
    samples: int = 0
    """Encoding ``sampled``: classes drawn per view from the tail (S)."""
    sample_temperatures: list[float] = []
    """Encoding ``sampled``: the temperatures whose ``logsumexp(l / T)`` is stored."""
    draw_temperature: float = Field(default=1.0, gt=0.0, allow_inf_nan=False)
    """Encoding ``sampled``: the temperature of the tail distribution the draws come from (the
    importance sampler's proposal; caches made before it existed drew at 1). Its normaliser is
    stored with the draws (array ``draw_tail``), so the estimate is unbiased at it too."""
    ensemble: EnsembleMeta | None = None
    """A stored ensemble: its models (specs, weights digests, weights, renderings) and how they
    were combined; ``model`` and ``weights_digest`` then describe the ensemble as a whole."""

    def arrays(self, num_classes: int) -> dict[str, tuple[str, tuple[int, ...], float]]:
        """The arrays this teacher stores: name -> (dtype, shape after ``[rows, A]``, fill)."""
        slots = sample_slots(self.samples, self.k, num_classes)
        n = len(self.sample_temperatures)
        draw_tail = self.encoding == "sampled" and self.draw_temperature != 1.0
        return array_shapes(self.encoding, self.index_dtype, self.k, slots, n, draw_tail)

    def unbiased_temperatures(self) -> list[float]:
        """Encoding ``sampled``: the temperatures at which ``tail: sample`` is unbiased (1, the
        stored ones and the draws' own)."""
        extra = [self.draw_temperature] if self.draw_temperature != 1.0 else []
        return [1.0, *self.sample_temperatures, *extra]


class TeacherSpec(BaseModel):
    """What the caller of :func:`kdcache.cache.writer.add_teacher` decides about a teacher: the
    part of :class:`TeacherMeta` that is not the writer's own (``index_dtype`` follows from the
    class count, ``created`` is stamped when the subgroup is made, and an unset ``rendering`` is
    the recipe's). The writer checks it (encoding, ``k``, sampling) against the store."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())
    name: str
    model: dict[str, Any]
    """The teacher's model spec (an ensemble: the ensemble as a whole)."""
    weights_digest: str
    k: int
    """Classes stored per view (1..num_classes)."""
    rendering: Rendering | None = None
    """How the teacher saw its views (None: the recipe's rendering)."""
    encoding: str = "fp16"
    config: dict[str, Any] = {}
    """The resolved precompute config saved with the teacher."""
    samples: int = 0
    """Encoding ``sampled``: draws per view from the tail."""
    sample_temperatures: tuple[float, ...] = ()
    """Encoding ``sampled``: the temperatures whose ``logsumexp(l / T)`` is stored."""
    draw_temperature: float = 1.0
    """Encoding ``sampled``: the temperature the draws are made at."""
    ensemble: EnsembleMeta | None = None
    """A stored ensemble's models (None: one model)."""


def group_at(group: zarr.Group, path: str) -> zarr.Group:
    """The subgroup at ``path``; an array there is a CacheError (a hierarchy damaged by hand)."""
    node = group[path]
    if not isinstance(node, zarr.Group):
        raise CacheError(f"cache {group.store_path}: {path!r} is an array where a group belongs")
    return node


def array_at(group: zarr.Group, path: str) -> zarr.Array:
    """The array at ``path``; a group there is a CacheError (a hierarchy damaged by hand)."""
    node = group[path]
    if not isinstance(node, zarr.Array):
        raise CacheError(f"cache {group.store_path}: {path!r} is a group where an array belongs")
    return node


def _first_error(exc: ValidationError) -> str:
    """``field: message`` of a validation error's first problem (the message alone at the top)."""
    first = exc.errors()[0]
    where = ".".join(str(part) for part in first["loc"])
    return f"{where}: {first['msg']}" if where else first["msg"]


def creation_info() -> dict[str, Any]:
    import platform

    import torch

    from kdcache import __version__

    return {
        "time": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "id": uuid.uuid4().hex,  # tells apart two caches created at one path in one second
        "kdcache": __version__,
        "torch": torch.__version__,
        "zarr": zarr.__version__,
        "host": platform.node(),
    }


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class CacheStore:
    """An open cache: metadata plus the arrays' handles (read and write halves share it)."""

    path: str
    group: zarr.Group
    meta: RootMeta
    _teacher_groups: dict[str, zarr.Group] = field(default_factory=dict, repr=False)
    _teacher_attr_cache: dict[str, dict[str, Any]] | None = field(default=None, repr=False)
    _teacher_metas: dict[str, TeacherMeta] = field(default_factory=dict, repr=False)
    _arrays: dict[str, zarr.Array] = field(default_factory=dict, repr=False)

    # ---- geometry -------------------------------------------------------------------
    @property
    def num_shards(self) -> int:
        return len(self.meta.fingerprint.shards)

    @property
    def cap(self) -> int:
        return self.meta.rows_per_shard

    def rows(self, shard: int) -> slice:
        """The row range of shard ``shard`` holding real samples (padding excluded)."""
        start = shard * self.cap
        return slice(start, start + self.meta.fingerprint.counts[shard])

    def shard_index(self, name: str) -> int:
        try:
            return self.meta.fingerprint.shards.index(name)
        except ValueError:
            raise CacheMismatchError(f"shard {name!r} is not in cache {self.path!r}") from None

    # ---- teachers ---------------------------------------------------------------------
    @property
    def teachers(self) -> list[str]:
        """The finished teachers (their attributes are written last, when their arrays exist)."""
        return [name for name, attrs in self._teacher_attrs().items() if attrs]

    @property
    def unfinished_teachers(self) -> list[str]:
        """Teacher subgroups without attributes: a precompute stopped while creating them."""
        return [name for name, attrs in self._teacher_attrs().items() if not attrs]

    def _teacher_attrs(self) -> dict[str, dict[str, Any]]:
        """Each teacher subgroup's attributes, read once per store object (``forget_teachers``
        rereads)."""
        if self._teacher_attr_cache is None:
            groups = subgroups(self.group, TEACHERS, self.path) if TEACHERS in self.group else []
            self._teacher_attr_cache = {name: dict(group.attrs) for name, group in sorted(groups)}
        return self._teacher_attr_cache

    def forget_teachers(self) -> None:
        """Drop what is known of the teacher subgroups (after one was created or removed)."""
        self._teacher_attr_cache = None
        self._teacher_groups.clear()
        self._teacher_metas.clear()
        for path in [p for p in self._arrays if p.startswith(f"{TEACHERS}/")]:
            del self._arrays[path]

    def teacher_group(self, name: str) -> zarr.Group:
        """The teacher's subgroup (opened once per store object)."""
        if name not in self._teacher_groups:
            if name not in self.teachers:
                raise CacheMismatchError(
                    f"teacher {name!r} is not in cache {self.path!r}; "
                    f"it has {self.teachers or 'no teachers'}"
                )
            self._teacher_groups[name] = group_at(self.group, f"{TEACHERS}/{name}")
        return self._teacher_groups[name]

    def teacher_meta(self, name: str) -> TeacherMeta:
        if name not in self._teacher_metas:
            try:
                self._teacher_metas[name] = TeacherMeta.model_validate(
                    dict(self.teacher_group(name).attrs)
                )
            except ValidationError as exc:
                raise CacheError(
                    f"cache {self.path!r}: teacher {name!r} has unreadable attributes "
                    f"({exc.error_count()} problem(s), e.g. {_first_error(exc)})"
                ) from None
        return self._teacher_metas[name]

    @property
    def view_group(self) -> zarr.Group:
        """The ``views/`` group of per-view parameter arrays."""
        return group_at(self.group, VIEWS)

    def array(self, path: str) -> zarr.Array:
        """The array at ``path`` (``status``, ``teachers/t1/lse`` ...), opened once per store
        object: opening reads its metadata, which costs about as much as reading a small chunk."""
        if path not in self._arrays:
            if path.startswith(f"{TEACHERS}/"):
                self.teacher_group(path.split("/")[1])  # an unknown teacher is a CacheMismatchError
            try:
                self._arrays[path] = array_at(self.group, path)
            except Exception as exc:  # zarr.json lost (KeyError) or garbled (JSONDecodeError ...)
                raise CacheReadError(
                    f"cache {self.path!r}: cannot open array {path!r} ({type(exc).__name__}: "
                    f"{str(exc)[:200]}): its metadata (zarr.json) is damaged or missing, which a "
                    "precompute rerun does not repair: restore the file, or rebuild the cache "
                    "with `kdcache precompute CONFIG --overwrite`"
                ) from exc
        return self._arrays[path]

    def has(self, path: str) -> bool:
        """Whether the cache has a node (array or group) at ``path``."""
        if path in self._arrays:
            return True
        try:
            return path in self.group
        except Exception:  # a garbled zarr.json: there is something, unreadable
            return True

    # ---- view blocks and completion marks -----------------------------------------------
    @property
    def view_block_ends(self) -> list[int]:
        """The view counts the cache had, in order (``[A]`` for a cache never grown)."""
        return list(self.meta.view_blocks) or [self.meta.num_views]

    def blocks(self, part: str) -> list[ViewBlock]:
        """The view blocks of ``views`` or a teacher, each under its own completion mark."""
        return part_blocks(self, part)

    def views_done(self) -> np.ndarray:
        """The shards whose views are all made (every views block marked)."""
        return self._marks(VIEWS)  # the views part is named as its group

    def rows_done(self) -> np.ndarray:
        """The shards whose rows are made: keys, labels, status and the first views block (a
        grown cache's new views may still be missing)."""
        return self.block_done(self.blocks(VIEWS)[0])

    def teacher_done(self, name: str) -> np.ndarray:
        """The shards the teacher has done on every view (every block marked)."""
        return self._marks(name)

    def block_done(self, block: ViewBlock) -> np.ndarray:
        """The shards marked complete for one view block; a mark that cannot be decoded is a
        CacheReadError naming the shard (a precompute rerun resets it)."""
        try:
            marks, unreadable = block_marks(self, block)
        except CacheReadError:
            raise
        except OSError as exc:  # the store, not the chunk: nothing to name a shard for
            raise CacheReadError(
                f"cache {self.path!r}: cannot read {block.mark!r} (completion marks) "
                f"({type(exc).__name__}: {str(exc)[:200]}): the store could not be read"
            ) from exc
        if unreadable:
            names = [self.meta.fingerprint.shards[i] for i in unreadable]
            raise CacheReadError(
                f"cache {self.path!r}: cannot read {block.mark!r} (completion marks) of "
                f"shard(s) {names[:5]}: the chunk is damaged; a `kdcache precompute` rerun "
                "redoes the shard(s)"
            )
        return marks

    def _marks(self, part: str) -> np.ndarray:
        done = np.ones(self.num_shards, dtype=bool)
        for block in self.blocks(part):
            done &= self.block_done(block)
        return done

    def incomplete_shards(self, teachers: list[str] | None = None) -> dict[str, list[str]]:
        """Shard names lacking a completion mark: ``{"views" | teacher: [shard, ...]}``."""
        names = self.meta.fingerprint.shards
        out = {"views": [names[i] for i in np.flatnonzero(~self.views_done())]}
        for teacher in self.teachers if teachers is None else teachers:
            out[teacher] = [names[i] for i in np.flatnonzero(~self.teacher_done(teacher))]
        return {k: v for k, v in out.items() if v}

    def unfinished_blocks(self, teachers: list[str] | None = None) -> list[tuple[ViewBlock, int]]:
        """The views' and ``teachers``' (default all) view blocks some shards lack, with how many
        shards lack each."""
        parts = [VIEWS, *(self.teachers if teachers is None else teachers)]
        out = []
        for part in parts:
            for block in self.blocks(part):
                missing = int((~self.block_done(block)).sum())
                if missing:
                    out.append((block, missing))
        return out

    # ---- compatibility --------------------------------------------------------------
    def check_compatible(
        self,
        *,
        fingerprint: Fingerprint | None = None,
        recipe: ViewRecipe | None = None,
        num_views: int | None = None,
        num_classes: int | None = None,
        seed: int | None = None,
    ) -> None:
        """Refuse a cache that does not match what the caller is about to do, saying what
        differs."""
        problems: list[str] = []
        if fingerprint is not None:
            problems += self.meta.fingerprint.differences(fingerprint)
        if recipe is not None and recipe != self.meta.recipe:
            problems.append(_recipe_diff(self.meta.recipe, recipe))
        for what, cached, given in (
            ("num_views", self.meta.num_views, num_views),
            ("num_classes", self.meta.num_classes, num_classes),
            ("seed", self.meta.seed, seed),
        ):
            if given is not None and given != cached:
                problems.append(f"{what}: the cache has {cached}, the run asks for {given}")
        if problems:
            raise CacheMismatchError(
                f"cache {self.path!r} does not match:\n  " + "\n  ".join(problems)
            )


def cache_identity(store: CacheStore, teachers: list[str] | None = None) -> dict[str, Any]:
    """What identifies a cache's contents for a reader that must not silently switch caches (a
    resumed training run): creation time, key digest, views (recipe, A, seed) and each teacher's
    weights digest and k. A cache rebuilt at the same path differs in at least its creation id
    (caches written before there was one: its creation time)."""
    names = store.teachers if teachers is None else teachers
    return {
        "path": store.path,
        "created": store.meta.created.get("time"),
        "creation_id": store.meta.created.get("id"),
        "key_digest": store.meta.fingerprint.key_digest,
        "recipe": store.meta.recipe.model_dump(mode="json"),
        "num_views": store.meta.num_views,
        "seed": store.meta.seed,
        "teachers": {
            name: {
                "created": store.teacher_meta(name).created.get("id"),
                "weights_digest": store.teacher_meta(name).weights_digest,
                "k": store.teacher_meta(name).k,
                "rendering": store.teacher_meta(name).rendering.model_dump(mode="json"),
            }
            for name in names
        },
    }


def identity_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``field: saved vs current`` for every field of two :func:`cache_identity` dicts that differs
    (the path is not compared: a cache may move). A field an identity saved by an earlier
    kdcache lacks counts as None, as in a cache made before that field existed."""
    saved = _known(saved)
    current = _known(current)
    return [
        f"{key}: {saved.get(key)!r} vs {current.get(key)!r}"
        for key in sorted(set(saved) | set(current))
        if key != "path" and saved.get(key) != current.get(key)
    ]


def _known(value: Any) -> Any:
    """``value`` with every None-valued dict entry left out, at any depth."""
    if isinstance(value, dict):
        return {k: _known(v) for k, v in value.items() if v is not None}
    return value


def check_same_cache(
    path: str, storage_options: dict | None, expected: dict[str, Any], where: str
) -> None:
    """Refuse to go on reading a cache that is no longer the one ``expected`` identifies (its
    :func:`cache_identity` when a run started): replaced, rebuilt or grown under a running
    reader. ``where``: what was being read (a shard)."""
    try:
        store = open_store(path, "r", storage_options)
        current = cache_identity(store, sorted(expected.get("teachers", {})))
    except (CacheError, KeyError, ValueError, OSError) as exc:  # gone, or half rewritten
        current = {"cache": f"unreadable ({type(exc).__name__}: {exc})"}
    changes = identity_differences(expected, current)
    if changes:
        raise CacheMismatchError(
            f"cache {path!r} changed while this run read it (replaced, rebuilt or grown), at "
            f"{where}: " + "; ".join(changes) + ". The run stopped rather than train on two "
            "caches: start it again against the cache as it is now (run.overwrite=true)"
        )


def _recipe_diff(cached: ViewRecipe, given: ViewRecipe) -> str:
    a = cached.model_dump()
    b = given.model_dump()
    parts = [f"{k}: cache {a[k]!r} vs run {b[k]!r}" for k in a if a[k] != b[k]]
    return "view recipe differs (" + "; ".join(parts) + ")"


def open_store(
    path: str, mode: Literal["r", "r+"] = "r", storage_options: dict | None = None
) -> CacheStore:
    """Open an existing cache (``mode`` ``"r"`` or ``"r+"``), checking its format."""
    try:
        group = zarr.open_group(path, mode=mode, storage_options=storage_options)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, zarr.errors.NodeTypeValidationError):
        raise CacheNotFoundError(f"no cache at {path!r}") from None
    except (FileExistsError, NotADirectoryError):  # mode r+ on a plain file (or a path through one)
        raise CacheNotFoundError(
            f"no cache at {path!r}: it is a file, not a cache directory"
        ) from None
    attrs = dict(group.attrs)
    if attrs.get("format") != FORMAT_NAME:
        raise CacheError(f"{path!r} is a Zarr group but not a kdcache cache (no format attribute)")
    if attrs.get("format_version") not in READ_VERSIONS:
        raise CacheMismatchError(
            f"cache {path!r} has format version {attrs.get('format_version')}, "
            f"this kdcache reads {' and '.join(map(str, READ_VERSIONS))}: "
            "rebuild it with `kdcache precompute CONFIG --overwrite` "
            "(or use the kdcache that wrote it)"
        )
    return CacheStore(path=path, group=group, meta=RootMeta.model_validate(attrs))


def cache_exists(path: str, storage_options: dict | None = None) -> bool:
    try:
        open_store(path, "r", storage_options)
        return True
    except CacheNotFoundError:
        return False
