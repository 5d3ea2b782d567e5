"""Planning a precompute: list the shards, open or create the cache, list the shard tasks.

The driver alone runs this module, and it is the only place that writes group attributes
(through :func:`kdcache.cache.writer.create_store`, :func:`kdcache.cache.writer.add_teacher` and
:func:`kdcache.cache.writer.set_key_digest`). A shard task is a shard lacking its views mark or the
mark of any teacher of this run; shards whose marks are all set are skipped, which is what makes a
rerun resume.

**Planning without reading the payloads.** The cache needs each shard's name and sample count
before any work (one chunk per shard, padded to the largest); it does not need the keys. So the
shards are planned by :func:`kdcache.shards.index.index_shards` from the manifest ``kdcache shards``
wrote, a WebDataset shard index, or, failing both, the tar headers read with range requests that
skip the payloads. With a manifest or index, planning reads the manifest and lists the shard
directory (sizes checked, a stale shard scanned instead): a couple of requests in all, no shard
bytes. The keys of such shards are learned by the workers:

* a worker checks what it streams against the plan (:class:`ShardKeys`): the keys themselves when
  planning read them (headers) or the cache stores them (views made earlier), else the sample
  count, no key twice in the shard, and the shard's key digest when the manifest records one;
  a shard that differs fails by name, its marks unset;
* it writes the shard's keys (:func:`kdcache.cache.writer.write_keys`) with the shard's views,
before
  the views mark;
* the fingerprint's key digest is then left empty at creation, and the driver sets it once every
  shard's views are made (:func:`seal_fingerprint`, at the end of a run, or when a rerun finds
  nothing to do): it reads the stored keys, refuses a key found in two shards (naming both), and
  writes the digest. The trainer refuses a cache whose digest is not set yet.

What is refused stays what was refused: shard names and counts are compared with the cache's at
planning; keys are compared at planning where they are known on both sides (headers read, or
the manifest's per-shard digests against the keys the cache stores), and otherwise by the worker
that reads the shard, and by the trainer as it streams (a key not in the cache's block is an
error). Duplicate keys across shards are refused at planning when the headers were read, else
when the fingerprint is sealed, before any training can use the cache.

**Repair.** On an existing cache the marked shards are checked first
(:mod:`kdcache.pipeline.repair`): damaged ones lose their marks, so they are redone.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import fsspec
import numpy as np

from kdcache.cache.growth import finish_growth, grow_views
from kdcache.cache.integrity import VIEWS, ViewBlock
from kdcache.cache.lock import WriterLock, check_unlocked
from kdcache.cache.reader import read_path
from kdcache.cache.store import CacheStore, EnsembleMeta, Fingerprint, TeacherSpec, open_store
from kdcache.cache.writer import add_teacher, create_store, set_key_digest
from kdcache.core.config import dump_config
from kdcache.core.errors import (
    CacheError,
    CacheMismatchError,
    CacheNotFoundError,
    CacheReadError,
    ConfigError,
    DataError,
    DuplicateKeyError,
    TeacherError,
)
from kdcache.models.build import ModelSpec, build_teacher, weights_digest
from kdcache.models.ensemble import ENSEMBLE_MODEL, ensemble_digest, ensemble_meta
from kdcache.models.preprocess import describe as describe_rendering
from kdcache.models.preprocess import resolve_sourced as resolve_rendering
from kdcache.pipeline.config import (
    EnsembleSection,
    PrecomputeConfig,
    TeacherSection,
    check_with_classes,
)
from kdcache.pipeline.repair import repair_damage
from kdcache.shards.index import ShardInfo, index_shards
from kdcache.shards.manifest import Manifest, find_manifest
from kdcache.shards.reading import (
    ShardIndex,
    check_unique_keys,
    expand_shards,
    is_url,
    key_digest,
    shard_key_digest,
)
from kdcache.views.recipe import Rendering, ViewRecipe

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResolvedMember:
    """One model a teacher runs: its spec, weight in the teacher, weights digest and rendering."""

    spec: ModelSpec
    weight: float
    weights_digest: str
    rendering: Rendering


@dataclass(frozen=True)
class ResolvedTeacher:
    """A teacher as the workers need it: spec, k and the weights digest the driver computed."""

    name: str
    spec: ModelSpec | None
    """The teacher's model (None for a stored ensemble: its models are ``members``)."""
    k: int
    weights_digest: str
    rendering: Rendering
    """The teacher's resolved rendering (its input size, interpolation, mean and std)."""
    members: tuple[ResolvedMember, ...] = ()
    """A stored ensemble's models (empty: the teacher is ``spec``)."""
    combine: str = "probs"
    """A stored ensemble: how its models' distributions combine (:mod:`kdcache.models.ensemble`)."""
    rendering_from: str = ""
    """The rendering in words, each field with its source (config, recipe, timm pretrained_cfg,
    checkpoint): logged at plan time, recorded in the run record, named by the teacher check."""

    def models(self) -> tuple[ResolvedMember, ...]:
        """What a worker runs: the ensemble's models, or the teacher itself with weight 1."""
        if self.members or self.spec is None:  # a stored ensemble has members and no spec
            return self.members
        return (ResolvedMember(self.spec, 1.0, self.weights_digest, self.rendering),)


@dataclass(frozen=True)
class ShardTask:
    """One shard to process: which teachers to run and whether its views must be made."""

    index: int
    url: str
    name: str
    count: int
    keys: tuple[str, ...] | None
    """The keys in file order, when known (headers read, or stored with the shard's views);
    None: the worker learns them (:class:`ShardKeys`)."""
    make_views: bool
    teachers: tuple[str, ...]
    key_digest: str = ""
    """The shard's key digest its manifest records ("" unknown), checked by the worker."""
    source: str = "headers"
    """Where planning got the count: ``headers``, ``the cache``, or a manifest or index path."""
    new_views: tuple[tuple[int, int], ...] = ()
    """A grown cache's views blocks ``(start, stop)`` to draw and write here (the rows and first
    views are stored; with ``make_views`` every view is drawn instead)."""
    teacher_views: tuple[tuple[tuple[int, int], ...], ...] = ()
    """Per teacher of ``teachers``, its view blocks ``(start, stop)`` to run (empty: all views)."""

    def teacher_blocks(self, name: str, num_views: int) -> tuple[tuple[int, int], ...]:
        """The view blocks ``(start, stop)`` teacher ``name`` runs on here."""
        index = self.teachers.index(name)
        if index < len(self.teacher_views) and self.teacher_views[index]:
            return self.teacher_views[index]
        return ((0, num_views),)

    def views_of(self, name: str, num_views: int) -> list[int]:
        """The views teacher ``name`` runs on here."""
        return [
            a for start, stop in self.teacher_blocks(name, num_views) for a in range(start, stop)
        ]


class ShardKeys:
    """The keys of one shard as its worker streams it, checked against the plan.

    Known keys (``task.keys``) must come in the same order. Otherwise the count must match, no
    key may occur twice, and the keys must match the manifest's digest of the shard, if any.
    ``keys`` holds what was read, for :func:`kdcache.cache.writer.write_keys`."""

    def __init__(self, task: ShardTask):
        self.task = task
        self.keys: list[str] = []
        self._seen: set[str] = set()

    def add(self, key: str) -> None:
        """The next sample's key; a DataError naming the shard when it differs from the plan."""
        task = self.task
        position = len(self.keys)
        if task.keys is not None:
            expected = task.keys[position] if position < len(task.keys) else None
            if key != expected:
                raise DataError(
                    f"shard {task.name!r}: sample {position} has key {key!r}, planning found "
                    f"{expected!r}: the shard changed since planning"
                )
        elif position >= task.count:
            raise DataError(
                f"shard {task.name!r}: more than the {task.count} samples {task.source} records "
                f"(key {key!r}): the shard changed since it was written"
            )
        elif key in self._seen:
            raise DuplicateKeyError(f"shard {task.name!r}: key {key!r} occurs twice")
        self._seen.add(key)
        self.keys.append(key)

    def finish(self) -> None:
        """The shard ended: its count, and its key digest where the manifest records one."""
        task = self.task
        if len(self.keys) != task.count:
            raise DataError(
                f"shard {task.name!r}: {len(self.keys)} samples, planning found {task.count}"
                f"{'' if task.keys is not None else f' ({task.source})'}: the shard changed"
            )
        learned = task.keys is None and task.key_digest
        if learned and shard_key_digest(self.keys) != task.key_digest:
            raise DataError(
                f"shard {task.name!r}: its keys differ from those {task.source} records "
                "(per-shard key digest): the shard changed after it was written"
            )


@dataclass
class ShardListing:
    """The listed input: shard URLs (absolute for local files), what planning knows of each
    shard (counts; keys where headers were read) and the fingerprint (its key digest empty
    unless every shard's keys are known)."""

    urls: list[str]
    indexes: list[ShardInfo]
    fingerprint: Fingerprint
    manifest: Manifest | None = None
    """The manifest beside the shards, when planning read it."""
    sources: dict[str, int] = field(default_factory=dict)


@dataclass
class PrecomputePlan:
    """Everything the runner needs: the open cache, the teachers and the shard tasks."""

    store: CacheStore
    data: ShardListing
    num_classes: int
    class_names: list[str]
    teachers: list[ResolvedTeacher]
    tasks: list[ShardTask]
    created: bool

    @property
    def cache_path(self) -> str:
        return self.store.path


def local_path(path: str) -> str:
    """Absolute path for a local file (Ray workers may run elsewhere); URLs unchanged."""
    return path if is_url(path) else os.path.abspath(os.path.expanduser(path))


def writer_lock(cfg: PrecomputeConfig) -> WriterLock:
    """The cache's writer lock (``<cache.path>.lock``): hold it around
    :func:`plan_precompute` and the run."""
    return WriterLock(
        local_path(cfg.cache.path), cfg.cache.storage_options or None, force=cfg.cache.force_unlock
    )


def plan_precompute(cfg: PrecomputeConfig) -> PrecomputePlan:
    """Scan shards, resolve classes, build teachers once, open or create the cache, list tasks.

    Refused (CacheLockedError) while another live precompute holds the cache's writer lock; the
    ``kdcache precompute`` command holds it itself (:func:`writer_lock`)."""
    check_unlocked(local_path(cfg.cache.path), cfg.cache.storage_options or None)
    data = scan_data(cfg.data.shards, cfg.data.storage_options or None, cfg.data.index)
    num_classes, class_names = resolve_classes(cfg, data)
    check_with_classes(cfg, num_classes)
    teachers = [
        _resolve_teacher_at(i, t, num_classes, cfg.cache.recipe) for i, t in enumerate(cfg.teachers)
    ]
    store, created = open_or_create(cfg, data, num_classes, class_names)
    for teacher, section in zip(teachers, cfg.teachers, strict=True):
        add_teacher(store, teacher_spec(teacher, section, saved_config(cfg)))
    if not created:  # damaged shards lose their marks here, so shard_tasks lists them again
        repair_damage(store, [t.name for t in teachers], check=cfg.cache.check)
    tasks = shard_tasks(store, data, [t.name for t in teachers])
    if not tasks:
        seal_fingerprint(store)  # an earlier run stopped before it, or ran in-process
    plan = PrecomputePlan(store, data, num_classes, class_names, teachers, tasks, created)
    logger.info("%s", describe(plan))
    return plan


def saved_config(cfg: PrecomputeConfig) -> dict[str, Any]:
    """The resolved config the cache keeps, with local shard patterns made absolute:
    ``kdcache verify`` replays views from them, from whatever directory it runs in."""
    data = dump_config(cfg)
    shards = data["data"]["shards"]
    absolute = lambda p: p if is_url(p) else os.path.abspath(p)  # noqa: E731
    data["data"]["shards"] = (
        absolute(shards) if isinstance(shards, str) else [absolute(p) for p in shards]
    )
    return data


def scan_data(
    shards: str | list[str],
    storage_options: dict[str, Any] | None = None,
    index: str | None = None,
) -> ShardListing:
    """List the shards and their counts without reading payloads where a manifest or index has
    them (see the module docstring); duplicates refused where keys are read. ``storage_options``:
    fsspec's, for shard URLs (``data.storage_options``); ``index``: ``data.index``."""
    urls = [local_path(u) for u in expand_shards(shards, "data.shards", storage_options)]
    listing = index_shards(urls, storage_options, local_path(index) if index else None)
    empty = [shard.name for shard in listing.shards if not shard.count]
    if empty:
        raise DataError(
            f"data.shards: shard(s) without samples: {empty[:5]} (every shard needs at least one "
            "sample: leave the empty ones out of data.shards)"
        )
    known = [ShardIndex(s.url, list(s.keys)) for s in listing.shards if s.keys is not None]
    fingerprint = Fingerprint(
        shards=[shard.name for shard in listing.shards],
        counts=[shard.count for shard in listing.shards],
        key_digest=key_digest(known) if len(known) == len(listing.shards) else "",
    )
    logger.info("planned %d shard(s) from %s", len(urls), _sources(listing.sources))
    return ShardListing(urls, listing.shards, fingerprint, listing.manifest, listing.sources)


def _sources(sources: dict[str, int]) -> str:
    parts = []
    for source, count in sources.items():
        if source == "headers":
            parts.append(f"their tar headers ({count})")
        else:
            parts.append(f"{source} ({count}; keys learned as workers read them)")
    return ", ".join(parts)


def resolve_classes(cfg: PrecomputeConfig, data: ShardListing) -> tuple[int, list[str]]:
    """``num_classes`` and class names from the config and the manifest beside the shards."""
    num = cfg.data.num_classes
    names = list(cfg.data.class_names)
    urls = data.urls
    manifest = data.manifest
    if manifest is None and cfg.data.index is not None:  # the index was read, not the manifest
        manifest = find_manifest(urls[0], cfg.data.storage_options or None)
    if manifest is not None:
        if num is not None and num != manifest.num_classes:
            raise ConfigError(
                f"data.num_classes: {num} in the config but {manifest.num_classes} in the "
                f"manifest beside {urls[0]!r}"
            )
        if names and manifest.class_names and names != manifest.class_names:
            raise ConfigError(
                f"data.class_names: differ from the manifest beside {urls[0]!r} "
                f"({names[:3]}... vs {manifest.class_names[:3]}...)"
            )
        num = num or manifest.num_classes
        names = names or list(manifest.class_names)
    if num is None:
        raise ConfigError(
            f"data.num_classes: required key is missing (no manifest beside {urls[0]!r})"
        )
    return num, names


def _resolve_teacher_at(
    index: int, section: TeacherSection, num_classes: int, recipe: ViewRecipe
) -> ResolvedTeacher:
    """:func:`resolve_teacher` of ``teachers.<index>``, its errors naming that key and the teacher
    (a stored ensemble: each of its models, named ``teachers.<index>.ensemble.members.<j>``)."""
    if section.ensemble is not None:
        return _resolve_ensemble_at(index, section, section.ensemble, num_classes, recipe)
    model = section.model
    if model is None:  # TeacherSection's validator requires a model where there is no ensemble
        raise ConfigError(f"teachers.{index}: needs model or ensemble")
    key = f"teachers.{index}.render"
    rendering, sources = resolve_rendering(section.render, recipe, model, key)
    said = describe_rendering(rendering, sources)
    logger.info("teacher %s renders views at %s", section.name, said)
    try:
        resolved = resolve_teacher(section.name, model, section.k, num_classes, recipe, rendering)
    except TeacherError as exc:
        raise TeacherError(f"teachers.{index}.model (teacher {section.name!r}): {exc}") from exc
    return replace(resolved, rendering_from=said)


def _resolve_ensemble_at(
    index: int,
    section: TeacherSection,
    ensemble: EnsembleSection,
    num_classes: int,
    recipe: ViewRecipe,
) -> ResolvedTeacher:
    """A stored ensemble: every model built once to fingerprint it, the ensemble's digest over
    theirs."""
    members = []
    said: list[str] = []
    for j, member in enumerate(ensemble.members):
        key = f"teachers.{index}.ensemble.members.{j}"
        rendering, sources = resolve_rendering(member.render, recipe, member.model, f"{key}.render")
        model_name = member.model.name or member.model.checkpoint
        said.append(f"{model_name}: {describe_rendering(rendering, sources)}")
        try:
            resolved = resolve_teacher(section.name, member.model, section.k, num_classes, recipe)
        except TeacherError as exc:
            raise TeacherError(f"{key}.model (teacher {section.name!r}): {exc}") from exc
        members.append(
            ResolvedMember(member.model, member.weight, resolved.weights_digest, rendering)
        )
    teacher = ResolvedTeacher(
        name=section.name,
        spec=None,
        k=section.k,
        weights_digest="",
        rendering=members[0].rendering,
        members=tuple(members),
        combine=ensemble.combine,
        rendering_from="; ".join(said),
    )
    logger.info("teacher %s (ensemble) renders views at %s", section.name, teacher.rendering_from)
    digest = ensemble_digest(teacher.combine, members_meta(teacher.combine, members).members)
    return replace(teacher, weights_digest=digest)


def stored_ensemble(teacher: ResolvedTeacher) -> EnsembleMeta | None:
    """The ensemble metadata a teacher records (None: not an ensemble)."""
    if not teacher.members:
        return None
    return members_meta(teacher.combine, teacher.members)


def teacher_spec(
    teacher: ResolvedTeacher, section: TeacherSection, config: dict[str, Any]
) -> TeacherSpec:
    """What the cache records of a planned teacher (``config``: the saved precompute config)."""
    return TeacherSpec(
        name=teacher.name,
        model=section.model.model_dump(mode="json") if section.model else ENSEMBLE_MODEL,
        weights_digest=teacher.weights_digest,
        k=teacher.k,
        rendering=teacher.rendering,
        encoding=section.encoding,
        config=config,
        samples=section.samples or 0,
        sample_temperatures=tuple(section.sample_temperatures),
        draw_temperature=section.draw_temperature or 1.0,
        ensemble=stored_ensemble(teacher),
    )


def members_meta(combine: str, members: Sequence[ResolvedMember]) -> EnsembleMeta:
    """The ensemble metadata of ``members`` combined by ``combine``."""
    return ensemble_meta(
        combine,
        [m.spec for m in members],
        [m.weights_digest for m in members],
        [m.weight for m in members],
        [m.rendering for m in members],
    )


def resolve_teacher(
    name: str,
    spec: ModelSpec,
    k: int,
    num_classes: int,
    recipe: ViewRecipe,
    rendering: Rendering | None = None,
) -> ResolvedTeacher:
    """Build the teacher once on CPU to fingerprint its weights (rendering: default the
    recipe's)."""
    digest = weights_digest(build_teacher(spec, num_classes, recipe.channels))
    rendering = rendering or recipe.rendering()
    return ResolvedTeacher(name=name, spec=spec, k=k, weights_digest=digest, rendering=rendering)


def open_or_create(
    cfg: PrecomputeConfig, data: ShardListing, num_classes: int, class_names: list[str]
) -> tuple[CacheStore, bool]:
    """The existing cache checked against this run, or a new one (``cache.overwrite`` starts
    over)."""
    path = local_path(cfg.cache.path)
    options = cfg.cache.storage_options or None
    if not cfg.cache.overwrite:
        store = _open_existing(path, options)
        if store is not None:
            _check_compatible(store, cfg, data, num_classes)
            if cfg.cache.num_views > store.meta.num_views:  # cache.grow, checked above
                grow_views(store, cfg.cache.num_views)
            finish_growth(store)  # a growth cut short is finished here
            return store, False
    _refuse_foreign(path, options)
    store = create_store(
        path,
        fingerprint=data.fingerprint,
        keys=[[] for _ in data.indexes],  # each worker writes its shard's keys with its views
        recipe=cfg.cache.recipe,
        num_views=cfg.cache.num_views,
        num_classes=num_classes,
        class_names=class_names,
        seed=cfg.cache.seed,
        config=saved_config(cfg),
        overwrite=cfg.cache.overwrite,
        storage_options=options,
    )
    logger.info("created cache %s", path)
    return store, True


def _check_compatible(
    store: CacheStore, cfg: PrecomputeConfig, data: ShardListing, num_classes: int
) -> None:
    """Refuse a cache made from other data, or with other views or classes, saying what differs.

    Key digests are compared when both sides have one; otherwise (keys learned by workers) the
    keys the cache stores are compared shard by shard with what planning knows."""
    cached = store.meta.fingerprint
    given = data.fingerprint
    both = bool(given.key_digest and cached.key_digest)
    if not both:
        given = given.model_copy(update={"key_digest": cached.key_digest})
    growing = cfg.cache.grow and cfg.cache.num_views > store.meta.num_views
    try:
        store.check_compatible(
            fingerprint=given,
            recipe=cfg.cache.recipe,
            num_views=None if growing else cfg.cache.num_views,
            num_classes=num_classes,
            seed=cfg.cache.seed,
        )
    except CacheMismatchError as exc:
        hint = _views_hint(store, cfg)
        raise _mismatch(str(exc) + hint, changed_key_shards(store, data)) from None
    if not both:
        changed = changed_key_shards(store, data)
        if changed:
            raise _mismatch(
                f"cache {store.path!r} does not match:\n  the sample keys differ (same shards and "
                "counts, other keys or order)",
                changed,
            )


def _views_hint(store: CacheStore, cfg: PrecomputeConfig) -> str:
    """Why a view count that differs from the cache's is refused, and how to add views."""
    cached = store.meta.num_views
    wanted = cfg.cache.num_views
    if wanted > cached:
        return (
            f"\n  to add views {cached}..{wanted - 1} to this cache (its stored views and "
            "targets are kept), set cache.grow: true (`cache.grow=true`)"
        )
    if wanted < cached:
        return f"\n  a cache cannot lose views: it keeps its {cached} (cache.num_views={cached})"
    return ""


def _mismatch(message: str, changed: list[str]) -> CacheMismatchError:
    where = (
        f"\n  keys changed in shard(s) {changed[:5]}{' ...' if len(changed) > 5 else ''}"
        if changed
        else ""
    )
    return CacheMismatchError(
        f"{message}{where}\n(use another cache.path, or --overwrite to start this cache over)"
    )


def changed_key_shards(store: CacheStore, data: ShardListing) -> list[str]:
    """Shards (same name and count in cache and data) whose stored keys differ from what planning
    knows of them: their keys (headers read) or their manifest's key digest. Shards whose keys the
    cache does not store yet (views not made) are not compared."""
    cached = store.meta.fingerprint
    given = data.fingerprint
    if cached.shards != given.shards:
        return []
    if cached.key_digest and cached.key_digest == given.key_digest:
        return []
    comparable = [
        i
        for i, shard in enumerate(data.indexes)
        if cached.counts[i] == shard.count and (shard.keys is not None or shard.key_digest)
    ]
    if not comparable:
        return []
    changed = []
    for i in comparable:
        shard = data.indexes[i]
        try:
            keys = stored_keys(store, i)
        except CacheReadError as exc:  # damage, not a change: the repair redoes the shard's views
            logger.warning("%s; comparing its keys is left to the repair of that damage", exc)
            continue
        if not keys or not keys[0]:
            continue  # not written yet
        same = (
            keys == list(shard.keys)
            if shard.keys is not None
            else (shard_key_digest(keys) == shard.key_digest)
        )
        if not same:
            changed.append(shard.name)
    return changed


def stored_keys(store: CacheStore, shard: int) -> list[str]:
    """A shard's keys as the cache stores them (one chunk; a shard whose views were not made yet
    may have none). A damaged chunk is a CacheReadError naming the shard."""
    name = store.meta.fingerprint.shards[shard]
    return [str(k) for k in read_path(store, "keys", store.rows(shard), name)]


def _open_existing(path: str, options: dict[str, Any] | None) -> CacheStore | None:
    try:
        return open_store(path, "r+", options)
    except CacheNotFoundError:
        return None
    except CacheError as exc:
        if (
            type(exc) is CacheError
        ):  # a Zarr group without kdcache attributes: creation was cut short
            raise CacheError(
                f"{exc}; if an earlier precompute was interrupted while creating it, "
                "rerun with --overwrite"
            ) from None
        raise


def _refuse_foreign(path: str, options: dict[str, Any] | None) -> None:
    """Never create (or wipe, with overwrite) a cache over a file or a non-Zarr directory."""
    fs, root = fsspec.core.url_to_fs(path, **(options or {}))
    if not fs.exists(root):
        return
    if not fs.isdir(root):
        raise CacheError(f"cache.path: {path!r} is a file, not a cache directory")
    names = {str(p).rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)}
    if names and "zarr.json" not in names:
        raise CacheError(
            f"cache.path: {path!r} exists, is not empty and is not a Zarr group; "
            "refusing to write a cache there"
        )


def shard_tasks(store: CacheStore, data: ShardListing, teachers: list[str]) -> list[ShardTask]:
    """Shards lacking a views mark or any mark of a run teacher, in shard order: each of their
    view blocks (:mod:`kdcache.cache.growth`) is a mark. A shard whose first views are stored is
    checked against its stored keys; one whose first views are not is made whole, every run
    teacher on every view."""
    view_blocks = [(block, store.block_done(block)) for block in store.blocks(VIEWS)]
    done = {
        name: [(block, store.block_done(block)) for block in store.blocks(name)]
        for name in teachers
    }
    tasks = []
    for i, (url, shard) in enumerate(zip(data.urls, data.indexes, strict=True)):
        make = not bool(view_blocks[0][1][i])
        new_views = () if make else _undone(view_blocks[1:], i)
        todo = {name: () if make else _undone(blocks, i) for name, blocks in done.items()}
        todo = {name: blocks for name, blocks in todo.items() if make or blocks}
        if not (make or new_views or todo):
            continue
        keys, source = shard.keys, shard.source
        if not make:
            keys, source = tuple(stored_keys(store, i)), "the cache"
        tasks.append(
            ShardTask(
                index=i,
                url=url,
                name=shard.name,
                count=shard.count,
                keys=keys,
                make_views=make,
                teachers=tuple(todo),
                key_digest=shard.key_digest,
                source=source,
                new_views=new_views,
                teacher_views=tuple(todo.values()),
            )
        )
    return tasks


def _undone(blocks: list[tuple[ViewBlock, np.ndarray]], shard: int) -> tuple[tuple[int, int], ...]:
    """The view blocks (``(start, stop)``) not marked for ``shard``."""
    return tuple((block.start, block.stop) for block, marks in blocks if not marks[shard])


def seal_fingerprint(store: CacheStore) -> bool:
    """Once every shard's views (and keys) are stored, refuse keys repeated across shards and set
    the fingerprint's key digest (the driver; a no-op when it is set). True if it set it."""
    fingerprint = store.meta.fingerprint
    if fingerprint.key_digest or not store.rows_done().all():
        return False
    indexes = [
        ShardIndex(url=name, keys=keys)
        for name, keys in zip(
            fingerprint.shards,
            (stored_keys(store, i) for i in range(store.num_shards)),
            strict=True,
        )
    ]
    try:
        check_unique_keys(indexes)
    except DuplicateKeyError as exc:
        raise DuplicateKeyError(
            f"cache {store.path!r}: {exc} (keys of shards planned from a manifest or index are "
            "checked across shards once every shard was read; the cache cannot be used: fix the "
            "shards and start over with --overwrite)"
        ) from None
    set_key_digest(store, key_digest(indexes))
    logger.info("cache %s: every shard's keys stored and unique; key digest set", store.path)
    return True


def describe(plan: PrecomputePlan) -> str:
    """One line: what this run will do."""
    fp = plan.data.fingerprint
    views = sum(t.make_views for t in plan.tasks)
    teachers = ", ".join(f"{t.name} (k={t.k})" for t in plan.teachers)
    state = "new cache" if plan.created else "existing cache"
    return (
        f"{state} {plan.cache_path}: {len(fp.shards)} shards, {fp.num_samples} samples, "
        f"{plan.num_classes} classes; teachers {teachers}; {len(plan.tasks)} shard(s) to do "
        f"({views} need views)"
    )
