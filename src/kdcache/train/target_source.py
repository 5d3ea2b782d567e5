"""Where a step's soft targets come from, chosen once per run from ``teacher.mode``.

- ``cache`` (:class:`CachedTargets`): the targets the stream joined to the batch from the cache;
  no teacher runs.
- ``online`` (:class:`OnlineTargets`): the teacher runs on the batch's replayed views, its full
  logits become exact k = C sparse targets (A/B and parity runs); forward passes are counted.
- ``none`` (:class:`TargetSource`): plain supervised training, no targets at all.

The trainer asks a source for a batch's targets of one teacher and never looks at the mode again.
A stage's ensemble (``stages.N.teachers``) is asked for by its label; every source answers it
with its members' targets as :class:`~kdcache.targets.sparse.EnsembleTargets`, which the loss mixes.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch

from kdcache.cache.store import CacheStore
from kdcache.core.errors import ConfigError
from kdcache.models.build import ModelSpec, build_teacher, weights_digest
from kdcache.models.ensemble import StageEnsemble
from kdcache.models.runner import ModelRunner
from kdcache.targets.sparse import EnsembleTargets, SparseTargets, from_logits, target_temperature
from kdcache.train.config import RunConfig, TeacherConfig
from kdcache.train.data import Batch, RunData
from kdcache.train.schedule import StageSpan

log = logging.getLogger(__name__)


def stage_teachers(stages: Iterable[StageSpan]) -> list[str]:
    """The teachers the run's stages use (every member of an ensemble), sorted."""
    return sorted({name for stage in stages for name in stage.members})


def stage_ensembles(stages: Iterable[StageSpan]) -> dict[str, StageEnsemble]:
    """Each ensemble stage's label -> its ensemble."""
    return {
        stage.teacher: stage.ensemble
        for stage in stages
        if stage.teacher is not None and stage.ensemble is not None
    }


class TargetSource:
    """``teacher.mode: none``: no teacher and no targets (a distillation loss is refused by the
    config before a run gets here)."""

    mode = "none"

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self.forwards = 0
        """Teacher forward passes (images) on this rank since :meth:`take_forwards`."""
        self.ensembles: dict[str, StageEnsemble] = {}
        """The run's ensembles, by the label a stage asks for them by."""

    @classmethod
    def cache_teachers(cls, stages: list[StageSpan]) -> list[str]:
        """The teachers whose cached targets the training data must hold (opened and checked)."""
        return []

    @classmethod
    def build(
        cls,
        teacher: TeacherConfig,
        stages: list[StageSpan],
        data: RunData,
        device: torch.device,
        *,
        run: RunConfig,
    ) -> TargetSource:
        """The run's source, its ``stages.N.loss.topk`` checked against what it holds. It takes
        the ``teacher`` section (online: the models and their autocast) and the ``run`` section
        (online: channels_last), which the other sources do not use."""
        source = cls(data.num_classes)
        source.check_topk(stages)
        return source

    def stream_teachers(self, teacher: str | None) -> list[str]:
        """The teachers whose targets the epoch's stream joins to each batch."""
        return []

    def members(self, teacher: str | None) -> list[str]:
        """The teachers behind a stage's teacher key: an ensemble's members, or itself."""
        if teacher in self.ensembles:
            return list(self.ensembles[teacher].names)
        return [teacher] if teacher else []

    def topk_limit(self, teacher: str) -> tuple[int, str]:
        """The most classes a target of ``teacher`` holds, and how to say so in an error."""
        return self.num_classes, f"the {self.num_classes} classes"

    def check_topk(self, stages: list[StageSpan]) -> None:
        """Refuse a ``stages.N.loss.topk`` above what the targets hold (the cache's k, or C), and
        ``tail: sample`` where the targets have no draws (:meth:`sample_problem`)."""
        for stage in stages:
            i = stage.index
            loss = stage.config.loss
            topk = getattr(loss, "topk", None)
            for teacher in stage.members:
                held, what = self.topk_limit(teacher)
                if topk is not None and topk > held:
                    raise ConfigError(f"stages.{i}.loss.topk: {topk} is more than {what}")
                if getattr(loss, "tail", None) == "sample":
                    self._check_sample(i, loss, teacher)

    def _check_sample(self, index: int, loss, teacher: str) -> None:
        if getattr(loss, "topk", None) is not None:
            raise ConfigError(
                f"stages.{index}.loss.topk: not with tail 'sample' (its draws stand for every "
                "class outside the stored top-k)"
            )
        problem = self.sample_problem(teacher, target_temperature(loss))
        if problem is not None and not problem.startswith("warning: "):
            raise ConfigError(f"stages.{index}.loss.tail: 'sample' {problem}")
        if problem is not None:
            log.warning("stages.%d.loss: %s", index, problem.removeprefix("warning: "))

    def sample_problem(self, teacher: str, temperature: float) -> str | None:
        """Why ``tail: sample`` cannot use ``teacher``'s targets (None: it can; a message that
        starts with ``warning: ``: it can, as a biased estimate)."""
        return None

    def __call__(self, batch: Batch, teacher: str) -> SparseTargets | EnsembleTargets:
        """The batch's targets from ``teacher`` (on the batch's device); an ensemble's label:
        its members' targets, for the loss to mix."""
        ensemble = self.ensembles.get(teacher)
        if ensemble is None:
            return self.targets_of(batch, teacher)
        members = tuple(self.targets_of(batch, name) for name in ensemble.names)
        return EnsembleTargets(members, ensemble.weights, ensemble.combine)

    def targets_of(self, batch: Batch, teacher: str) -> SparseTargets:
        """The batch's targets from one teacher."""
        raise ConfigError(f"teacher.mode 'none' has no targets (asked for teacher {teacher!r})")

    def take_forwards(self) -> int:
        """Teacher forward passes since the last call (for the logging window)."""
        forwards = self.forwards
        self.forwards = 0
        return forwards


class CachedTargets(TargetSource):
    """``teacher.mode: cache``: the targets the stream read from the cache for the batch."""

    mode = "cache"

    def __init__(self, num_classes: int, store: CacheStore):
        super().__init__(num_classes)
        self.store = store

    @classmethod
    def cache_teachers(cls, stages: list[StageSpan]) -> list[str]:
        return stage_teachers(stages)

    @classmethod
    def build(
        cls,
        teacher: TeacherConfig,
        stages: list[StageSpan],
        data: RunData,
        device: torch.device,
        *,
        run: RunConfig,
    ) -> CachedTargets:
        if data.store is None:  # the config requires cache.path for cached targets
            raise ConfigError("teacher.mode cache: needs a cache (cache.path)")
        source = cls(data.num_classes, data.store)
        source.ensembles = stage_ensembles(stages)
        source.check_topk(stages)
        return source

    def stream_teachers(self, teacher: str | None) -> list[str]:
        return self.members(teacher)

    def topk_limit(self, teacher: str) -> tuple[int, str]:
        k = self.store.teacher_meta(teacher).k
        return k, f"the cache's k={k} for teacher {teacher!r}"

    def sample_problem(self, teacher: str, temperature: float) -> str | None:
        meta = self.store.teacher_meta(teacher)
        if meta.encoding != "sampled" and meta.k < self.num_classes:
            return (
                f"needs teachers stored with encoding 'sampled' (or k equal to the "
                f"{self.num_classes} classes); teacher {teacher!r} is {meta.encoding!r} with "
                f"k={meta.k}"
            )
        stored = meta.unbiased_temperatures()
        if meta.encoding == "sampled" and not any(abs(t - temperature) < 1e-6 for t in stored):
            return (
                f"warning: teacher {teacher!r} stores the normaliser at T={stored}, not at the "
                f"loss's T={temperature:g}: its sampled targets are a self-normalised estimate "
                "there (consistent, not unbiased); draw at that temperature "
                "(draw_temperature) or add it to the teacher's sample_temperatures to make it "
                "unbiased"
            )
        return None

    def targets_of(self, batch: Batch, teacher: str) -> SparseTargets:
        return batch.targets[teacher]


class OnlineTargets(TargetSource):
    """``teacher.mode: online``: each stage's teacher runs on the batch's views."""

    mode = "online"

    def __init__(self, num_classes: int, store: CacheStore | None):
        super().__init__(num_classes)
        self.store = store
        self.runners: dict[str, ModelRunner] = {}

    @classmethod
    def build(
        cls,
        teacher: TeacherConfig,
        stages: list[StageSpan],
        data: RunData,
        device: torch.device,
        *,
        run: RunConfig,
    ) -> OnlineTargets:
        source = cls(data.num_classes, data.store)
        source.ensembles = stage_ensembles(stages)
        source.check_topk(stages)  # before the teachers are built: the cheap refusal first
        for name in stage_teachers(stages):
            source.runners[name] = source._runner(teacher, name, data, device, run=run)
        return source

    def _runner(
        self,
        teacher: TeacherConfig,
        name: str,
        data: RunData,
        device: torch.device,
        *,
        run: RunConfig,
    ) -> ModelRunner:
        spec = online_teacher_spec(teacher, name, self.store)
        model = build_teacher(spec, self.num_classes, data.recipe.channels)
        store = self.store
        if (
            store is not None
            and name in store.teachers
            and store.teacher_meta(name).weights_digest != weights_digest(model)
        ):
            log.warning(
                "online teacher %r has other weights than the cache's teacher of that name", name
            )
        return ModelRunner(
            model,
            data.teacher_renderings[name],
            device=str(device),
            amp=teacher.amp,
            channels_last=run.channels_last,
            name=name,
        )

    def targets_of(self, batch: Batch, teacher: str) -> SparseTargets:
        # the one place a teacher runs during training; clone(): leave inference mode's tensors
        images = batch.teacher_images.get(teacher, batch.images)  # its own rendering, if other
        logits = self.runners[teacher](images).clone()
        self.forwards += len(batch)
        return from_logits(logits, batch.hard_labels(), self.num_classes)


SOURCES: dict[str, type[TargetSource]] = {
    "none": TargetSource,
    "cache": CachedTargets,
    "online": OnlineTargets,
}


def target_source_type(teacher: TeacherConfig) -> type[TargetSource]:
    """The source ``teacher.mode`` asks for (the one place the trainer's path depends on it)."""
    return SOURCES[teacher.mode]


def online_teacher_spec(teacher: TeacherConfig, name: str, store: CacheStore | None) -> ModelSpec:
    """The online teacher's spec: ``teacher.models.<name>`` (of the ``teacher`` section), else
    the spec the cache stored for it."""
    if name in teacher.models:
        return teacher.models[name]
    known = store is not None and name in store.teachers
    stored = store.teacher_meta(name).ensemble if store is not None and known else None
    if stored:
        raise ConfigError(
            f"teacher.models.{name}: teacher {name!r} is stored as an ensemble of "
            f"{len(stored.members)} models; online, train against "
            "its models as an ensemble (stages.N.teachers, each in teacher.models) instead"
        )
    if store is not None and name in store.teachers:
        return ModelSpec.model_validate(store.teacher_meta(name).model)
    raise ConfigError(
        f"teacher.models.{name}: no model spec for online teacher {name!r} "
        "(and the cache has no teacher of that name)"
    )
