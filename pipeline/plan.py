"""Planning a precompute: scan the shards, open or create the cache, list the shard tasks.

The driver alone runs this module, and it is the only place that writes group attributes
(through :func:`kdcache.writer.create_store` and :func:`kdcache.writer.add_teacher`).
A shard task is a shard lacking its views mark or the mark of any teacher of this run; shards
whose marks are all set are skipped, which is what makes a rerun resume.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from typing import Any

import fsspec

from kdcache.config import dump_config
from kdcache.ensemble import ENSEMBLE_MODEL, ensemble_digest, ensemble_meta
from kdcache.errors import (
    CacheError,
    CacheMismatchError,
    CacheNotFoundError,
    ConfigError,
    DataError,
    TeacherError,
)
from kdcache.lock import WriterLock, check_unlocked
from kdcache.manifest import find_manifest
from kdcache.models import ModelSpec, build_teacher, weights_digest
from kdcache.pipeline.config import PrecomputeConfig, TeacherSection, check_with_classes
from kdcache.preprocess import resolve as resolve_rendering
from kdcache.shards import ShardIndex, expand_shards, key_digest, scan_shards
from kdcache.store import CacheStore, EnsembleMeta, Fingerprint, open_store
from kdcache.views import Rendering, ViewRecipe
from kdcache.writer import add_teacher, create_store

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MemberPlan:
    """One model a teacher runs: its spec, weight in the teacher, weights digest and rendering."""

    spec: ModelSpec
    weight: float
    weights_digest: str
    rendering: Rendering


@dataclass(frozen=True)
class TeacherPlan:
    """A teacher as the workers need it: spec, k and the weights digest the driver computed."""

    name: str
    spec: ModelSpec | None
    """The teacher's model (None for a stored ensemble: its models are ``members``)."""
    k: int
    weights_digest: str
    rendering: Rendering
    """The teacher's resolved rendering (its input size, interpolation, mean and std)."""
    members: tuple[MemberPlan, ...] = ()
    """A stored ensemble's models (empty: the teacher is ``spec``)."""
    combine: str = "probs"
    """A stored ensemble: how its models' distributions combine (:mod:`kdcache.ensemble`)."""

    def models(self) -> tuple[MemberPlan, ...]:
        """What a worker runs: the ensemble's models, or the teacher itself with weight 1."""
        if self.members:
            return self.members
        return (MemberPlan(self.spec, 1.0, self.weights_digest, self.rendering),)


@dataclass(frozen=True)
class ShardTask:
    """One shard to process: which teachers to run and whether its views must be made."""

    index: int
    url: str
    name: str
    keys: tuple[str, ...]
    make_views: bool
    teachers: tuple[str, ...]


@dataclass
class DataPlan:
    """The scanned input: shard URLs (absolute for local files), their keys and the fingerprint."""

    urls: list[str]
    indexes: list[ShardIndex]
    fingerprint: Fingerprint


@dataclass
class Plan:
    """Everything the runner needs: the open cache, the teachers and the shard tasks."""

    store: CacheStore
    data: DataPlan
    num_classes: int
    class_names: list[str]
    teachers: list[TeacherPlan]
    tasks: list[ShardTask]
    created: bool

    @property
    def cache_path(self) -> str:
        return self.store.path


def local_path(path: str) -> str:
    """Absolute path for a local file (Ray workers may run elsewhere); URLs unchanged."""
    return path if "://" in path else os.path.abspath(os.path.expanduser(path))


def writer_lock(cfg: PrecomputeConfig) -> WriterLock:
    """The cache's writer lock (``<cache.path>.lock``): hold it around :func:`make_plan` and the
    run."""
    return WriterLock(
        local_path(cfg.cache.path), cfg.cache.storage_options or None, force=cfg.cache.force_unlock
    )


def make_plan(cfg: PrecomputeConfig) -> Plan:
    """Scan shards, resolve classes, build teachers once, open or create the cache, list tasks.

    Refused (CacheLockedError) while another live precompute holds the cache's writer lock; the
    ``kdcache precompute`` command holds it itself (:func:`writer_lock`)."""
    check_unlocked(local_path(cfg.cache.path), cfg.cache.storage_options or None)
    data = scan_data(cfg.data.shards, cfg.data.storage_options or None)
    num_classes, class_names = resolve_classes(cfg, data.urls)
    check_with_classes(cfg, num_classes)
    teachers = [
        _teacher_plan_at(i, t, num_classes, cfg.cache.recipe) for i, t in enumerate(cfg.teachers)
    ]
    store, created = open_or_create(cfg, data, num_classes, class_names)
    for teacher, section in zip(teachers, cfg.teachers, strict=True):
        add_teacher(
            store,
            teacher.name,
            model=section.model.model_dump(mode="json") if section.model else ENSEMBLE_MODEL,
            weights_digest=teacher.weights_digest,
            k=teacher.k,
            rendering=teacher.rendering,
            encoding=section.encoding,
            config=saved_config(cfg),
            samples=section.samples or 0,
            sample_temperatures=tuple(section.sample_temperatures),
            ensemble=stored_ensemble(teacher),
        )
    tasks = shard_tasks(store, data, [t.name for t in teachers])
    plan = Plan(store, data, num_classes, class_names, teachers, tasks, created)
    logger.info("%s", describe(plan))
    return plan


def saved_config(cfg: PrecomputeConfig) -> dict[str, Any]:
    """The resolved config the cache keeps, with local shard patterns made absolute:
    ``kdcache verify`` replays views from them, from whatever directory it runs in."""
    data = dump_config(cfg)
    shards = data["data"]["shards"]
    absolute = lambda p: p if "://" in p else os.path.abspath(p)  # noqa: E731
    data["data"]["shards"] = (
        absolute(shards) if isinstance(shards, str) else [absolute(p) for p in shards]
    )
    return data


def scan_data(shards: str | list[str], storage_options: dict[str, Any] | None = None) -> DataPlan:
    """Expand and scan the shards (tar headers only): keys per shard, duplicates refused.
    ``storage_options``: fsspec's, for shard URLs (``data.storage_options``)."""
    urls = [local_path(u) for u in expand_shards(shards, "data.shards", storage_options)]
    indexes = scan_shards(urls, storage_options=storage_options)
    empty = [index.name for index in indexes if not index.keys]
    if empty:
        raise DataError(
            f"data.shards: shard(s) without samples: {empty[:5]} (every shard needs at least one "
            "sample: leave the empty ones out of data.shards)"
        )
    fingerprint = Fingerprint(
        shards=[i.name for i in indexes],
        counts=[len(i) for i in indexes],
        key_digest=key_digest(indexes),
    )
    return DataPlan(urls=urls, indexes=indexes, fingerprint=fingerprint)


def resolve_classes(cfg: PrecomputeConfig, urls: list[str]) -> tuple[int, list[str]]:
    """``num_classes`` and class names from the config and the manifest beside the shards."""
    num = cfg.data.num_classes
    names = list(cfg.data.class_names)
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


def _teacher_plan_at(
    index: int, section: TeacherSection, num_classes: int, recipe: ViewRecipe
) -> TeacherPlan:
    """:func:`teacher_plan` of ``teachers.<index>``, its errors naming that key and the teacher
    (a stored ensemble: each of its models, named ``teachers.<index>.ensemble.members.<j>``)."""
    if section.ensemble is not None:
        return _ensemble_plan_at(index, section, num_classes, recipe)
    rendering = resolve_rendering(section.render, recipe, section.model, f"teachers.{index}.render")
    try:
        return teacher_plan(section.name, section.model, section.k, num_classes, recipe, rendering)
    except TeacherError as exc:
        raise TeacherError(f"teachers.{index}.model (teacher {section.name!r}): {exc}") from exc


def _ensemble_plan_at(
    index: int, section: TeacherSection, num_classes: int, recipe: ViewRecipe
) -> TeacherPlan:
    """A stored ensemble: every model built once to fingerprint it, the ensemble's digest over
    theirs."""
    members = []
    for j, member in enumerate(section.ensemble.members):
        key = f"teachers.{index}.ensemble.members.{j}"
        rendering = resolve_rendering(member.render, recipe, member.model, f"{key}.render")
        try:
            plan = teacher_plan(section.name, member.model, section.k, num_classes, recipe)
        except TeacherError as exc:
            raise TeacherError(f"{key}.model (teacher {section.name!r}): {exc}") from exc
        members.append(MemberPlan(member.model, member.weight, plan.weights_digest, rendering))
    teacher = TeacherPlan(
        name=section.name,
        spec=None,
        k=section.k,
        weights_digest="",
        rendering=members[0].rendering,
        members=tuple(members),
        combine=section.ensemble.combine,
    )
    digest = ensemble_digest(teacher.combine, stored_ensemble(teacher).members)
    return replace(teacher, weights_digest=digest)


def stored_ensemble(teacher: TeacherPlan) -> EnsembleMeta | None:
    """The ensemble metadata a teacher records (None: not an ensemble)."""
    if not teacher.members:
        return None
    return ensemble_meta(
        teacher.combine,
        [m.spec for m in teacher.members],
        [m.weights_digest for m in teacher.members],
        [m.weight for m in teacher.members],
        [m.rendering for m in teacher.members],
    )


def teacher_plan(
    name: str,
    spec: ModelSpec,
    k: int,
    num_classes: int,
    recipe: ViewRecipe,
    rendering: Rendering | None = None,
) -> TeacherPlan:
    """Build the teacher once on CPU to fingerprint its weights (rendering: default the
    recipe's)."""
    digest = weights_digest(build_teacher(spec, num_classes, recipe.channels))
    rendering = rendering or recipe.rendering()
    return TeacherPlan(name=name, spec=spec, k=k, weights_digest=digest, rendering=rendering)


def open_or_create(
    cfg: PrecomputeConfig, data: DataPlan, num_classes: int, class_names: list[str]
) -> tuple[CacheStore, bool]:
    """The existing cache checked against this run, or a new one (``cache.overwrite`` starts
    over)."""
    path = local_path(cfg.cache.path)
    options = cfg.cache.storage_options or None
    if not cfg.cache.overwrite:
        store = _open_existing(path, options)
        if store is not None:
            _check_compatible(store, cfg, data, num_classes)
            return store, False
    _refuse_foreign(path, options)
    store = create_store(
        path,
        fingerprint=data.fingerprint,
        keys=[list(i.keys) for i in data.indexes],
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
    store: CacheStore, cfg: PrecomputeConfig, data: DataPlan, num_classes: int
) -> None:
    try:
        store.check_compatible(
            fingerprint=data.fingerprint,
            recipe=cfg.cache.recipe,
            num_views=cfg.cache.num_views,
            num_classes=num_classes,
            seed=cfg.cache.seed,
        )
    except CacheMismatchError as exc:
        changed = changed_key_shards(store, data)
        where = (
            f"\n  keys changed in shard(s) {changed[:5]}{' ...' if len(changed) > 5 else ''}"
            if changed
            else ""
        )
        raise CacheMismatchError(
            f"{exc}{where}\n(use another cache.path, or --overwrite to start this cache over)"
        ) from None


def changed_key_shards(store: CacheStore, data: DataPlan) -> list[str]:
    """Shards (same name and count in cache and data) whose stored keys differ from the scanned
    ones."""
    cached = store.meta.fingerprint
    if cached.shards != data.fingerprint.shards or cached.key_digest == data.fingerprint.key_digest:
        return []
    changed = []
    for shard, index in enumerate(data.indexes):
        if cached.counts[shard] == len(index.keys):
            stored = [str(k) for k in store.group["keys"][store.rows(shard)]]
            if stored != list(index.keys):
                changed.append(index.name)
    return changed


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


def shard_tasks(store: CacheStore, data: DataPlan, teachers: list[str]) -> list[ShardTask]:
    """Shards lacking the views mark or any run teacher's mark, in shard order."""
    views = store.views_done()
    done = {name: store.teacher_done(name) for name in teachers}
    tasks = []
    for i, (url, index) in enumerate(zip(data.urls, data.indexes, strict=True)):
        missing = tuple(name for name in teachers if not done[name][i])
        if missing or not views[i]:
            make = not bool(views[i])
            tasks.append(
                ShardTask(
                    index=i,
                    url=url,
                    name=index.name,
                    keys=tuple(index.keys),
                    make_views=make,
                    teachers=tuple(teachers) if make else missing,
                )
            )
    return tasks


def describe(plan: Plan) -> str:
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
