"""The training loop over its components: stages, steps, evaluation, metrics, checkpoints.

Outputs in ``run.dir``: ``config.yaml`` (the resolved config), ``metrics.jsonl`` (one line per log
step and per evaluation), ``summary.json`` (at the end: the run's
:class:`~kdcache.core.results.TrainResult`), ``checkpoints/last.pt`` (resume state),
``checkpoints/model_e<N>.pt`` / ``model_final.pt`` (state dicts loadable by
``kdcache.models.build.build_model`` via ``checkpoint:``), and with ``run.tensorboard`` the same
metrics as TensorBoard scalars in ``tensorboard/`` (:mod:`kdcache.train.metrics`).

The :class:`Trainer` builds its parts and runs them; each part lives in its own module and is
given the config section(s) it uses (``config.run``, ``config.teacher`` ...); only the training
stream's builder, where the data, cache, views, student and teacher sections meet, reads the whole
config:

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

import contextlib
import logging
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kdcache.cache.lock import RUN_DIR, WriterLock
from kdcache.core.results import TrainResult
from kdcache.models.runner import autocast_context
from kdcache.train import distributed as D
from kdcache.train.checkpoint import Checkpointer, check_run_dir, run_cache_identity
from kdcache.train.config import RunConfig, TrainConfig, resolved
from kdcache.train.data import (
    Batch,
    RunData,
    build_eval_data,
    build_train_data,
    steps_per_epoch,
    training_threads,
)
from kdcache.train.evaluate import Evaluator
from kdcache.train.hooks import StepHook
from kdcache.train.loggers import build_loggers
from kdcache.train.losses import Criterion, LossParts, stopped
from kdcache.train.metrics import MetricsLog
from kdcache.train.nonfinite import NonFiniteGuard, StepPlace
from kdcache.train.reporting import Reporter
from kdcache.train.schedule import Segment, StageSpan, lr_at, place_stages, stage_at
from kdcache.train.sftn import build_sftn
from kdcache.train.state import RngState, RunState, SegmentOptimizer
from kdcache.train.student import Ema, StudentInput, build_student, compile_student, wrap_ddp
from kdcache.train.target_source import target_source_type
from kdcache.train.workers import worker_death

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EpochSetup:
    """What an epoch trains with: its stage, its loss, and the teacher whose targets the loss
    uses this epoch (None: a CE stage, or early-stopped KD past its ``stop_epoch``)."""

    epoch: int
    stage: StageSpan
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
        torch.set_num_threads(training_threads(config.run.threads, config.data.num_workers))
        main = self.dist.is_main
        self.resolved = resolved(config)
        """The resolved config as plain data (saved and compared on resume by the checkpointer;
        the loggers get their own copy, which a logger's package may keep)."""
        loggers = build_loggers(config.run, resolved(config)) if main else []
        metrics = MetricsLog(
            Path(config.run.dir), main=main, tensorboard=config.run.tensorboard, loggers=loggers
        )
        self.stages, self.segments = place_stages(
            config.stages,
            teacher=config.teacher,
            optimizer=config.optimizer,
            scheduler=config.scheduler,
        )
        source = target_source_type(config.teacher)
        self.data = self._build_data(source.cache_teachers(self.stages))
        self.steps = steps_per_epoch(self.data.spec)
        """Batches per epoch (on every rank)."""
        self.accumulate = config.run.accumulate
        self.updates = math.ceil(self.steps / self.accumulate)
        """Optimizer steps per epoch: one per ``run.accumulate`` batches, the last maybe fewer."""
        self.student_input = StudentInput(
            self.data.rendering, self.device, config.run.channels_last
        )
        self.evaluator = self._build_evaluator()
        self.model = build_student(config.student, self.data, self.dist, run=config.run)
        rendering = self.data.rendering
        channels = self.data.recipe.channels
        classes = self.data.num_classes
        size = rendering.size
        self.sftn = build_sftn(
            config.sftn, self.model, classes, channels, size, run=config.run, student=config.student
        )
        self.trained = self.model if self.sftn is None else self.sftn.net
        """What the optimizer steps: the model, or with SFTN the model and its branches."""
        self.ddp = wrap_ddp(self.trained, self.dist)
        self.forward = compile_student(self.ddp, self.device) if config.run.compile else self.ddp
        """What the step calls: the (DDP-wrapped) student, compiled with ``run.compile``."""
        self.targets = source.build(
            config.teacher, self.stages, self.data, self.device, run=config.run
        )
        self.ema = Ema(self.model, config.ema.decay) if config.ema.enabled else None
        self.state = RunState()
        fp16 = config.run.amp == "fp16"
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=fp16)
        """fp16's loss scaling (disabled otherwise: then it changes nothing)."""
        self.optimizer = SegmentOptimizer(
            self.trained, self.segments, self.state, self.dist.is_main
        )
        self.report = Reporter(config.run, self.dist, self.stages, metrics, teacher=config.teacher)
        self.guard = NonFiniteGuard(config.run.on_nonfinite, self.device)
        self.checkpointer = self._build_checkpointer()
        self.stopped_early = False
        self._group_backward = False
        """Whether a batch of the open accumulation group was backpropagated (not all skipped)."""
        self._setup: EpochSetup | None = None

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
        config = self.config
        val = build_eval_data(
            config.data,
            rank,
            world,
            data.recipe,
            data.num_classes,
            self._pin,
            student=config.student,
        )
        loader = None if val is None else val[1]
        return Evaluator(
            loader, self.device, self.config.run.amp, self.student_input, data.num_classes
        )

    def _build_checkpointer(self) -> Checkpointer:
        """The checkpointer over the run's stateful parts (the resume contract is its module's)."""
        parts = {
            "model": self.model,
            **({} if self.sftn is None else {"sftn_branches": self.sftn.branches}),
            "state": self.state,  # before the optimizer: it is built for state.segment
            "optimizer": self.optimizer,
            "scaler": self.scaler if self.scaler.is_enabled() else None,
            "ema": self.ema,
        }
        # per rank: the open logging window, and the RNG last (nothing may draw after it)
        rank_parts = {"window": self.report.window, "rng": RngState(self.device)}
        cache = run_cache_identity(self.data.store, self.stages)
        run = self.config.run
        return Checkpointer(run, self.dist, parts, rank_parts, cache, resolved=self.resolved)

    # ---- the loop -------------------------------------------------------------------------------

    def run(self) -> TrainResult:
        """Train to the end (or to ``run.max_steps``) and return the result (``summary.json``)."""
        self.start()
        while self.state.epoch < self.config.total_epochs and not self.stopped_early:
            self.train_epoch()
            if not self.stopped_early:
                self.end_epoch()
        self.data.close()  # the loader's persistent workers
        summary = self.report.summary(
            self.state, self.data.invalid, self.data.num_classes, self.data.selection
        )
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
        setup = self._epoch_setup()
        teachers = self.targets.stream_teachers(setup.teacher)
        self.report.begin_epoch(self.state, setup.stage, self.steps)
        tick = time.perf_counter()
        for batch in self.data.epoch(self.state.epoch, teachers, self.state.epoch_step):
            for hook in self.hooks:
                hook.step_start(self, batch)
            parts = self.train_step(batch)
            self._count_step(parts, len(batch), time.perf_counter() - tick)
            if parts is not None:  # a skipped non-finite step: no hooks see it
                for hook in self.hooks:
                    hook.step_end(self, batch, parts)
            tick = time.perf_counter()
            if self.stopped_early:
                break
        self.report.bar.close()

    def train_step(self, batch: Batch) -> LossParts | None:
        """One batch at the current epoch's stage: forward, backward into the open accumulation
        group and, once the group is complete (every batch unless ``run.accumulate``), one
        optimizer step at the group's learning rate. The step :meth:`train_epoch` runs for each
        batch (its counters, lines and checkpoints are the loop's, not the step's). None: the
        loss was not finite and ``run.on_nonfinite: skip`` left the batch out of its group."""
        setup = self._epoch_setup()
        segment = self.segments[setup.stage.segment]
        group = self._group_size()
        if self.state.accumulated == 0:
            self._begin_group(segment)
        batch = batch.to(self.device)
        targets = self.targets(batch, setup.teacher) if setup.teacher else None
        last = self.state.accumulated + 1 == group
        with self._sync(last):
            with autocast_context(self.device, self.config.run.amp):
                output = self.forward(self.student_input(batch.images))
            parts = self._loss(setup, output, batch, targets)
            finite = self._finite(parts.total, batch)
            if finite:
                # a mean-reduced loss over `group` equal batches: the mean over one batch that
                # large
                loss = parts.total / group if group > 1 else parts.total
                self.scaler.scale(loss).backward()
                self._group_backward = True
        self.state.accumulated = 0 if last else self.state.accumulated + 1
        if last:
            self._finish_group(segment)
        return parts if finite else None

    def _loss(self, plan: EpochSetup, output: Any, batch: Batch, targets: Any) -> LossParts:
        """The stage's criterion on the student's logits, or with SFTN its loss over the
        teacher's and the branches' outputs."""
        if self.sftn is not None:
            smoothing = getattr(plan.stage.config.loss, "label_smoothing", 0.0)
            return self.sftn.loss(output, batch.hard_labels(), smoothing)
        return plan.criterion(output.float(), batch.hard_labels(), targets, self.state.epoch)

    def _group_size(self) -> int:
        """Batches in the open accumulation group: ``run.accumulate``, fewer for the epoch's last
        group when the epoch's batch count is not a multiple of it."""
        start = self.state.epoch_step - self.state.accumulated
        return min(self.accumulate, self.steps - start)

    def _begin_group(self, segment: Segment) -> None:
        """A group's learning rate (from the optimizer steps done in the epoch) and fresh
        gradients."""
        done = self.state.epoch_step // self.accumulate  # groups start at multiples of it
        progress = (self.state.epoch - segment.start) + done / self.updates
        self.optimizer.set_lr(lr_at(segment, progress, self.updates))
        self.optimizer.active().zero_grad(set_to_none=True)
        self._group_backward = False

    def _sync(self, last: bool):
        """DDP all-reduces the gradients on a group's last batch only."""
        if last or not isinstance(self.ddp, torch.nn.parallel.DistributedDataParallel):
            return contextlib.nullcontext()
        return self.ddp.no_sync()

    def _finish_group(self, segment: Segment) -> None:
        """The optimizer step of a complete group: unscale (fp16), clip, step, EMA; none when
        every batch of the group was skipped (non-finite)."""
        if not self._group_backward:
            return
        optimizer = self.optimizer.active()
        if segment.optimizer.grad_clip:
            self.scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(self.trained.parameters(), segment.optimizer.grad_clip)
        self.scaler.step(optimizer)
        self.scaler.update()
        if self.ema is not None:
            self.ema.update(self.model)

    def _finite(self, loss: torch.Tensor, batch: Batch) -> bool:
        """Whether to train on the loss (:mod:`~kdcache.train.nonfinite`: skip decides now,
        stop records it on the device and raises at the next check, naming this step)."""
        state = self.state
        place = StepPlace(
            step=state.global_step + 1,
            epoch=state.epoch + 1,
            batch=state.epoch_step + 1,
            shards=tuple(batch.shards),
        )
        return self.guard.ok(loss, place)

    def _epoch_setup(self) -> EpochSetup:
        """The current epoch's setup, made once per epoch (entering its optimizer segment)."""
        epoch = self.state.epoch
        if self._setup is not None and self._setup.epoch == epoch:
            return self._setup
        stage = stage_at(self.stages, epoch)
        self.optimizer.enter(self.segments[stage.segment])
        criterion = Criterion(stage.config.loss, self.data.num_classes)
        uses_teacher = criterion.needs_teacher and not stopped(stage.config.loss, epoch)
        self._setup = EpochSetup(epoch, stage, criterion, stage.teacher if uses_teacher else None)
        self.ddp.train()
        return self._setup

    def _count_step(self, parts: LossParts | None, images: int, seconds: float) -> None:
        """After a step: counters, the window, a train line, a checkpoint, or the stop. A
        skipped step (``parts`` None) moves the stream's position but adds nothing to the
        window: its loss and images are not the run's."""
        state = self.state
        run = self.config.run
        state.epoch_step = state.epoch_step + 1
        state.train_time += seconds
        forwards = self.targets.take_forwards()
        if parts is None:
            state.nonfinite_skipped += 1
        else:
            self.report.step(parts, self.optimizer.lr, images, forwards, seconds)
        if state.accumulated:
            return  # mid-group: no optimizer step yet, so no line, checkpoint or stop
        state.global_step = state.global_step + 1
        line = state.global_step % run.log_every == 0 or state.epoch_step == self.steps
        every = run.ckpt_every_steps
        save = every and state.global_step % every == 0 and state.epoch_step < self.steps
        stop = run.max_steps and state.global_step >= run.max_steps
        if line or save or stop:  # nothing of a non-finite step is reported or saved
            self.guard.check()
        if line:
            self.report.log_train(state)
        if save:
            self.checkpointer.save()
        if stop:
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
            if metrics and self.sftn is not None:
                metrics.update(self.sftn.evaluate(self.evaluator))
            if metrics:
                self.state.last_eval = metrics
                self.report.log_eval(done, self.state.global_step, metrics)
        self.report.end_epoch(done, evaluate, self.state.last_eval)
        if done in self.config.run.save_model_epochs and self.dist.is_main:
            self.checkpointer.save_model(self.model, f"model_e{done}.pt")
        if done == total and self.dist.is_main:
            self.checkpointer.save_model(self.model, "model_final.pt")
            if self.sftn is not None:
                self.sftn.save(self.config.run.dir)
        self.state.epoch = done
        self.state.epoch_step = 0
        self.checkpointer.save()


def train(config: TrainConfig, hooks: Iterable[StepHook] = ()) -> TrainResult:
    """Build a :class:`Trainer`, run it, leave the process group; return its result (what it
    wrote as ``summary.json``). Rank 0 holds ``<run.dir>.lock`` throughout: one run per
    ``run.dir`` (a second is refused naming the first; torchrun stops the other ranks)."""
    check_run_dir(config.run.dir)  # a clear error before the lock beside it is tried
    lock = run_dir_lock(config.run)
    trainer = None
    try:
        trainer = Trainer(config, hooks)
        return trainer.run()
    except RuntimeError as exc:
        death = worker_death(exc, str(config.run.dir))
        if death is None:
            raise
        raise death from exc
    finally:
        if trainer is not None:
            trainer.report.metrics.close()
        D.destroy()
        if lock is not None:
            lock.release()


def run_dir_lock(run: RunConfig) -> WriterLock | None:
    """``run.dir``'s writer lock, taken (rank 0 only: the ranks of one run share it)."""
    if D.env_world()[0] != 0:
        return None
    lock = WriterLock(str(Path(run.dir).absolute()), force=run.force_unlock, subject=RUN_DIR)
    lock.acquire()
    return lock
