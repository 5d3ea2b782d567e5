"""Stages, optimizers and learning-rate schedules.

A run is a list of stages (epochs, loss, teacher). A stage that sets ``optimizer`` starts a new
*segment*: a fresh optimizer and its own LR schedule spanning the epochs of that stage and of the
following stages that keep it (EffDstl: stage 2 restarts SGD at 0.05 with cosine decay to 5e-4;
early-stopped KD as two stages keeps one schedule). The LR is a pure function of the progress in
epochs within the segment, set before every step, so a resumed run needs only the step counters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from kdcache.models.ensemble import StageEnsemble
from kdcache.train.config import (
    BUILTIN_SCHEDULERS,
    OptimizerConfig,
    SchedulerConfig,
    StageConfig,
    TeacherConfig,
    TrainConfig,
    segment_starts,
    stage_ensemble,
    stage_starts,
    stage_teacher,
    timm_name,
)


@dataclass(frozen=True)
class Segment:
    """One optimizer and its schedule over epochs ``[start, end)``."""

    index: int
    start: int
    end: int
    optimizer: OptimizerConfig
    scheduler: SchedulerConfig

    @property
    def epochs(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class StageSpan:
    """A stage placed on the run's epoch axis ``[start, end)``."""

    index: int
    name: str
    start: int
    end: int
    segment: int
    config: StageConfig
    teacher: str | None
    """The teacher's name, or an ensemble's label (None: a CE stage)."""
    ensemble: StageEnsemble | None = None
    """The stage's ensemble of teachers (None: one teacher, or none)."""

    @property
    def members(self) -> tuple[str, ...]:
        """The teachers whose targets the stage reads."""
        if self.ensemble is not None:
            return self.ensemble.names
        return (self.teacher,) if self.teacher else ()


def place_stages(
    stages: list[StageConfig],
    *,
    teacher: TeacherConfig,
    optimizer: OptimizerConfig,
    scheduler: SchedulerConfig,
) -> tuple[list[StageSpan], list[Segment]]:
    """Stages with their epoch ranges, and the optimizer segments they belong to. The other
    sections give the defaults a stage may leave out: ``teacher`` its teacher's name,
    ``optimizer`` and ``scheduler`` the first segment's (and any stage's without its own)."""
    plans: list[StageSpan] = []
    bounds: list[tuple[int, OptimizerConfig, SchedulerConfig]] = []
    firsts = set(segment_starts(stages))
    for i, (stage, epoch) in enumerate(zip(stages, stage_starts(stages), strict=True)):
        if i in firsts:
            bounds.append((epoch, stage.optimizer or optimizer, stage.scheduler or scheduler))
        name = stage.name or f"stage{i}"
        plans.append(
            StageSpan(
                i,
                name,
                epoch,
                epoch + stage.epochs,
                len(bounds) - 1,
                stage,
                stage_teacher(stage, teacher=teacher),
                stage_ensemble(stage),
            )
        )
    total = sum(stage.epochs for stage in stages)
    ends = [start for start, _, _ in bounds[1:]] + [total]
    segments = [
        Segment(j, start, end, opt, sched)
        for j, ((start, opt, sched), end) in enumerate(zip(bounds, ends, strict=True))
    ]
    return plans, segments


def optimizer_segments(config: TrainConfig) -> list[Segment]:
    """The run's optimizers with their LR schedules over their epochs (one unless a stage starts
    a new optimizer): what :func:`lr_at` and :func:`build_optimizer` take in a loop of one's
    own (a public entry point, so it takes the whole config a loop of one's own holds)."""
    return place_stages(
        config.stages,
        teacher=config.teacher,
        optimizer=config.optimizer,
        scheduler=config.scheduler,
    )[1]


def stage_at(stages: list[StageSpan], epoch: int) -> StageSpan:
    """The stage that trains ``epoch`` (0-based)."""
    for stage in stages:
        if stage.start <= epoch < stage.end:
            return stage
    raise IndexError(f"epoch {epoch} is past the last stage (ends at {stages[-1].end})")


def param_groups(model: nn.Module, weight_decay: float, decay_norm_and_bias: bool) -> list[dict]:
    """Two groups: decayed weights and (unless ``decay_norm_and_bias``) undecayed 1-d parameters."""
    decay = []
    no_decay = []
    for _, param in sorted(model.named_parameters(), key=lambda item: item[0]):
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 and not decay_norm_and_bias else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(model: nn.Module, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    """SGD (momentum, optional Nesterov), AdamW or RMSprop over :func:`param_groups`; any other
    name (or layer decay) through timm's factory (:func:`build_timm_optimizer`)."""
    if cfg.from_timm:
        return build_timm_optimizer(model, cfg)
    groups = param_groups(model, cfg.weight_decay, cfg.decay_norm_and_bias)
    if cfg.name == "sgd":
        return torch.optim.SGD(
            groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0
        )
    if cfg.name == "rmsprop":
        return torch.optim.RMSprop(
            groups, lr=cfg.lr, alpha=cfg.alpha, eps=cfg.eps, momentum=cfg.momentum
        )
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)


def build_timm_optimizer(model: nn.Module, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    """``timm.optim.create_optimizer_v2`` with the config's settings: ``eps`` and ``betas`` only
    where the config sets them (timm's defaults differ per optimizer), ``kwargs`` as given."""
    # timm.optim re-exports it without __all__ or an alias, which pyright reads as private
    from timm.optim import create_optimizer_v2  # pyright: ignore[reportPrivateImportUsage]

    extra = {k: getattr(cfg, k) for k in ("eps", "betas") if k in cfg.model_fields_set}
    return create_optimizer_v2(
        model,
        opt=timm_name(cfg.name),
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        momentum=cfg.momentum,
        filter_bias_and_bn=not cfg.decay_norm_and_bias,
        layer_decay=cfg.layer_decay,
        **extra,
        **cfg.kwargs,
    )


def timm_lr(segment: Segment, progress: float, updates_per_epoch: int) -> float:
    """The peak-relative LR of a timm scheduler at ``progress`` epochs into the segment: timm's
    scheduler over a one-parameter optimizer, stepped per update (``step_update``), so the LR
    stays a pure function of the progress."""
    from timm.scheduler.scheduler_factory import create_scheduler_v2

    sched = segment.scheduler
    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=segment.optimizer.lr)
    scheduler, _ = create_scheduler_v2(
        probe,
        sched=timm_name(sched.name),
        num_epochs=segment.epochs,
        decay_epochs=sched.every,
        decay_milestones=sched.milestones,
        decay_rate=sched.gamma,
        min_lr=sched.min_lr,
        warmup_lr=sched.warmup_start * segment.optimizer.lr,
        # timm annotates an int, but steps per update here: it scales by updates_per_epoch
        warmup_epochs=sched.warmup_epochs,  # pyright: ignore[reportArgumentType]
        step_on_epochs=False,
        updates_per_epoch=updates_per_epoch,
        **sched.kwargs,
    )
    if scheduler is not None:
        scheduler.step_update(round(progress * updates_per_epoch))
    return probe.param_groups[0]["lr"]


def lr_factor(sched: SchedulerConfig, progress: float, total: float) -> float:
    """The LR multiplier (of the peak LR) at ``progress`` epochs into a ``total``-epoch schedule,
    ignoring ``min_lr`` (see :func:`lr_at`)."""
    if sched.warmup_epochs > 0 and progress < sched.warmup_epochs:
        return sched.warmup_start + (1.0 - sched.warmup_start) * progress / sched.warmup_epochs
    if sched.name == "constant":
        return 1.0
    if sched.name == "step" and sched.every is not None:
        return sched.gamma ** math.floor(progress / sched.every)
    if sched.name == "step":
        return sched.gamma ** sum(1 for m in sched.milestones if progress >= m)
    span = max(total - sched.warmup_epochs, 1e-12)
    t = min(max((progress - sched.warmup_epochs) / span, 0.0), 1.0)
    return 0.5 * (1.0 + math.cos(math.pi * t))


def lr_at(segment: Segment, progress: float, updates_per_epoch: int | None = None) -> float:
    """The learning rate ``progress`` epochs into the segment (cosine decays to ``min_lr``).

    The schedule of ``kdcache train``, public for a loop of one's own. A timm scheduler
    (``scheduler.name`` not kdcache's) counts optimizer steps: it needs ``updates_per_epoch``.
    """
    if segment.scheduler.name not in BUILTIN_SCHEDULERS:
        if not updates_per_epoch:
            raise ValueError(
                f"scheduler {segment.scheduler.name!r} is timm's: lr_at needs updates_per_epoch"
            )
        return timm_lr(segment, progress, updates_per_epoch)
    peak = segment.optimizer.lr
    sched = segment.scheduler
    factor = lr_factor(sched, progress, segment.epochs)
    in_warmup = sched.warmup_epochs > 0 and progress < sched.warmup_epochs
    if sched.name == "cosine" and not in_warmup:
        return sched.min_lr + (peak - sched.min_lr) * factor
    return peak * factor


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every group at ``lr``, times its ``lr_scale`` where it has one (timm's layer decay)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
