"""The training loop over its components: stages, steps, evaluation, metrics, checkpoints.

Outputs in ``run.dir``: ``config.yaml`` (the resolved config), ``metrics.jsonl`` (one line per log
step and per evaluation), ``summary.json`` (at the end: the run's
:class:`~kdcache.core.results.TrainResult`), ``checkpoints/last.pt`` (resume state),
``checkpoints/model_e<N>.pt`` / ``model_final.pt`` (state dicts loadable by
``kdcache.models.build.build_model`` via ``checkpoint:``), and with ``run.tensorboard`` the same
metrics as TensorBoard scalars in ``tensorboard/`` (:mod:`kdcache.train.metrics`).

The :class:`Trainer` builds its parts and runs them; each part lives in its own module:

- the training stream (:mod:`kdcache.train.data`) and the student (:mod:`kdcache.train.student`);
- the target source chosen once from ``teacher.mode`` (:mod:`kdcache.train.target_source`);
- the optimizer segments and the counters (:mod:`kdcache.train.state`,
  :mod:`kdcache.train.schedule`);
- the :class:`~kdcache.train.evaluate.Evaluator`, the :class:`~kdcache.train.reporting.Reporter`
  (metrics lines, log, progress bar, summary) and the
  :class:`~kdcache.train.checkpoint.Checkpointer`, which owns ``run.dir``, saves the stateful
  parts and refuses what cannot be resumed (its module states the resume contract);
- step hooks (:mod:`kdcache.train.hooks`) for code that runs inside the loop.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from kdcache.core.results import TrainResult
from kdcache.models.runner import autocast_context
from kdcache.train import distributed as D
from kdcache.train.checkpoint import Checkpointer, check_run_dir, run_cache_identity
from kdcache.train.config import TrainConfig
from kdcache.train.data import (
    Batch,
    RunData,
    build_eval_data,
    build_train_data,
    steps_per_epoch,
)
from kdcache.train.evaluate import Evaluator
from kdcache.train.hooks import StepHook
from kdcache.train.losses import Criterion, LossParts, stopped
from kdcache.train.metrics import MetricsLog
from kdcache.train.reporting import Reporter
from kdcache.train.schedule import StagePlan, lr_at, plan_stages, stage_at
from kdcache.train.state import RngState, RunState, SegmentOptimizer
from kdcache.train.student import Ema, StudentInput, build_student, wrap_ddp
from kdcache.train.target_source import target_source_type

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EpochPlan:
    """What an epoch trains with: its stage, its loss, and the teacher whose targets the loss
    uses this epoch (None: a CE stage, or early-stopped KD past its ``stop_epoch``)."""

    epoch: int
    stage: StagePlan
    criterion: Criterion
    teacher: str | None


class Trainer:
    """One run of ``kdcache train``: build every part from the config, then :meth:`run`.

    :meth:`run` is :meth:`start`, then :meth:`train_epoch` and :meth:`end_epoch` until the last
    epoch (or ``run.max_steps``), then the summary. ``hooks`` run around every step.
    """

    def __init__(self, config: TrainConfig, hooks: Iterable[StepHook] = ()):
        check_run_dir(config.run.dir)  # before any work
        self.config = config
        self.hooks = list(hooks)
        self.dist = D.init_distributed(config.run.device)
        self.device = self.dist.device
        if config.run.threads:
            torch.set_num_threads(config.run.threads)
        metrics = MetricsLog(
            Path(config.run.dir), main=self.dist.is_main, tensorboard=config.run.tensorboard
        )
        self.stages, self.segments = plan_stages(config)
        source = target_source_type(config)
        self.data = self._build_data(source.cache_teachers(self.stages))
        self.steps = steps_per_epoch(self.data.spec)
        """Optimizer steps per epoch (on every rank)."""
        self.student_input = StudentInput(
            self.data.rendering, self.device, config.run.channels_last
        )
        self.evaluator = self._build_evaluator()
        self.model = build_student(config, self.data, self.dist)
        self.ddp = wrap_ddp(self.model, self.dist)
        self.targets = source.build(config, self.stages, self.data, self.device)
        self.ema = Ema(self.model, config.ema.decay) if config.ema.enabled else None
        self.state = RunState()
        self.optimizer = SegmentOptimizer(self.model, self.segments, self.state, self.dist.is_main)
        self.report = Reporter(config, self.dist, self.stages, metrics)
        self.checkpointer = self._build_checkpointer()
        self.stopped_early = False
        self._plan: EpochPlan | None = None

    @property
    def _pin(self) -> bool:
        return self.config.data.pin_memory and self.device.type == "cuda"

    def _build_data(self, cache_teachers: list[str]) -> RunData:
        rank = self.dist.rank
        world = self.dist.world_size
        return build_train_data(self.config, rank, world, cache_teachers, self._pin)

    def _build_evaluator(self) -> Evaluator:
        data = self.data
        rank = self.dist.rank
        world = self.dist.world_size
        val = build_eval_data(self.config, rank, world, data.recipe, data.num_classes, self._pin)
        loader = None if val is None else val[1]
        return Evaluator(loader, self.device, self.config.run.amp, self.student_input)

    def _build_checkpointer(self) -> Checkpointer:
        """The checkpointer over the run's stateful parts (the resume contract is its module's)."""
        parts = {
            "model": self.model,
            "state": self.state,  # before the optimizer: it is built for state.segment
            "optimizer": self.optimizer,
            "ema": self.ema,
        }
        # per rank: the open logging window, and the RNG last (nothing may draw after it)
        rank_parts = {"window": self.report.window, "rng": RngState(self.device)}
        cache = run_cache_identity(self.data.store, self.stages)
        return Checkpointer(self.config, self.dist, parts, rank_parts, cache)

    # ---- the loop -------------------------------------------------------------------------------

    def run(self) -> TrainResult:
        """Train to the end (or to ``run.max_steps``) and return the result (``summary.json``)."""
        self.start()
        while self.state.epoch < self.config.total_epochs and not self.stopped_early:
            self.train_epoch()
            if not self.stopped_early:
                self.end_epoch()
        summary = self.report.summary(self.state, self.data.invalid)
        if self.dist.is_main:
            summary.write(Path(self.config.run.dir) / "summary.json")
        D.barrier()
        return summary

    def start(self) -> None:
        """Prepare ``run.dir``: a fresh run, or the checkpoint's state restored (resume)."""
        self.checkpointer.start(self.report.metrics)
        self.report.first_epoch = self.state.epoch

    def train_epoch(self) -> None:
        """Train the current epoch's remaining batches (all of them, unless resumed mid-epoch),
        or stop early at ``run.max_steps``."""
        plan = self._epoch_plan()
        teachers = self.targets.stream_teachers(plan.teacher)
        self.report.begin_epoch(self.state, plan.stage, self.steps)
        tick = time.perf_counter()
        for batch in self.data.epoch(self.state.epoch, teachers, self.state.epoch_step):
            for hook in self.hooks:
                hook.step_start(self, batch)
            parts = self.train_step(batch)
            self._count_step(parts, len(batch), time.perf_counter() - tick)
            for hook in self.hooks:
                hook.step_end(self, batch, parts)
            tick = time.perf_counter()
            if self.stopped_early:
                break
        self.report.bar.close()

    def train_step(self, batch: Batch) -> LossParts:
        """One optimizer step on ``batch`` at the current epoch's stage and learning rate: the
        step :meth:`train_epoch` runs for each batch (its counters, lines and checkpoints are the
        loop's, not the step's)."""
        plan = self._epoch_plan()
        segment = self.segments[plan.stage.segment]
        batch = batch.to(self.device)
        progress = (self.state.epoch - segment.start) + self.state.epoch_step / self.steps
        self.optimizer.set_lr(lr_at(segment, progress))
        targets = self.targets(batch, plan.teacher) if plan.teacher else None
        with autocast_context(self.device, self.config.run.amp):
            logits = self.ddp(self.student_input(batch.images))
        parts = plan.criterion(logits.float(), batch.hard_labels(), targets, self.state.epoch)
        optimizer = self.optimizer.active()
        optimizer.zero_grad(set_to_none=True)
        parts.total.backward()
        if segment.optimizer.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), segment.optimizer.grad_clip)
        optimizer.step()
        if self.ema is not None:
            self.ema.update(self.model)
        return parts

    def _epoch_plan(self) -> EpochPlan:
        """The current epoch's plan, made once per epoch (entering its optimizer segment)."""
        epoch = self.state.epoch
        if self._plan is not None and self._plan.epoch == epoch:
            return self._plan
        stage = stage_at(self.stages, epoch)
        self.optimizer.enter(self.segments[stage.segment])
        criterion = Criterion(stage.config.loss, self.data.num_classes)
        uses_teacher = criterion.needs_teacher and not stopped(stage.config.loss, epoch)
        self._plan = EpochPlan(epoch, stage, criterion, stage.teacher if uses_teacher else None)
        self.ddp.train()
        return self._plan

    def _count_step(self, parts: LossParts, images: int, seconds: float) -> None:
        """After a step: counters, the window, a train line, a checkpoint, or the stop."""
        state = self.state
        run = self.config.run
        state.epoch_step = state.epoch_step + 1
        state.global_step = state.global_step + 1
        state.train_time += seconds
        forwards = self.targets.take_forwards()
        self.report.step(parts, self.optimizer.lr, images, forwards, seconds)
        if state.global_step % run.log_every == 0 or state.epoch_step == self.steps:
            self.report.log_train(state)
        every = run.ckpt_every_steps
        if every and state.global_step % every == 0 and state.epoch_step < self.steps:
            self.checkpointer.save()
        if run.max_steps and state.global_step >= run.max_steps:
            log.info("run.max_steps=%d reached: saving a checkpoint and stopping", run.max_steps)
            self.checkpointer.save()
            self.stopped_early = True

    def end_epoch(self) -> None:
        """Evaluate (every ``run.eval_every`` epochs and after the last), save the models asked
        for, move to the next epoch and checkpoint there."""
        done = self.state.epoch + 1
        total = self.config.total_epochs
        evaluate = done % self.config.run.eval_every == 0 or done == total
        if evaluate:
            metrics = self.evaluator.run(self.model, self.ema)
            if metrics:
                self.state.last_eval = metrics
                self.report.log_eval(done, self.state.global_step, metrics)
        self.report.end_epoch(done, evaluate, self.state.last_eval)
        if done in self.config.run.save_model_epochs and self.dist.is_main:
            self.checkpointer.save_model(self.model, f"model_e{done}.pt")
        if done == total and self.dist.is_main:
            self.checkpointer.save_model(self.model, "model_final.pt")
        self.state.epoch = done
        self.state.epoch_step = 0
        self.checkpointer.save()


def train(config: TrainConfig, hooks: Iterable[StepHook] = ()) -> TrainResult:
    """Build a :class:`Trainer`, run it, leave the process group; return its result (what it
    wrote as ``summary.json``)."""
    trainer = None
    try:
        trainer = Trainer(config, hooks)
        return trainer.run()
    finally:
        if trainer is not None:
            trainer.report.metrics.close()
        D.destroy()
