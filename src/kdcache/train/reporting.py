"""The run's account of itself: the logging window, the train and eval lines of
``metrics.jsonl``, the progress bar, the epoch lines of the log and the run's result (its
``summary.json``, a :class:`~kdcache.core.results.TrainResult`)."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from kdcache.core.results import Selection, TrainResult
from kdcache.train import distributed as D
from kdcache.train.config import RunConfig, TeacherConfig
from kdcache.train.losses import LossParts
from kdcache.train.metrics import MetricsLog
from kdcache.train.schedule import StageSpan, stage_at
from kdcache.train.state import RunState

log = logging.getLogger(__name__)

EPOCH_LOG_SECONDS = 10.0
"""Epoch lines in the log: at most one per this many seconds, besides evaluated and last epochs."""
TIMING_KEYS = ("time", "images_per_s")
"""Metric fields that depend on wall time (the rest is deterministic on CPU)."""


class Window:
    """This rank's sums of logged values since the last train line (kept per rank in
    checkpoints)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.steps = 0
        self.images = 0
        self.forwards = 0
        self.time = 0.0

    def add(self, parts: LossParts, lr: float, images: int, forwards: int, seconds: float) -> None:
        values = {
            "loss": parts.total,
            "ce": parts.ce,
            "kd": parts.kd,
            "weight": parts.weight,
            "mining_rate": parts.mining_rate,
            "branch_ce": parts.branch_ce,
            "lr": torch.tensor(lr),
        }
        for name, value in values.items():
            if value is not None:
                zero = torch.zeros((), device=self.device)
                self.sums[name] = self.sums.get(name, zero) + value.detach().float().to(self.device)
        self.steps = self.steps + 1
        self.images = self.images + images
        self.forwards = self.forwards + forwards
        self.time += seconds

    def reduce(self, world_size: int) -> tuple[dict[str, float], int, int]:
        """(means over steps and ranks, images, teacher forwards), summed over ranks (a
        collective)."""
        names = sorted(self.sums)
        # one float64 vector: the sums by name, then the two counts (one all-reduce for all)
        counts = [
            torch.tensor(float(v), dtype=torch.float64, device=self.device)
            for v in (self.images, self.forwards)
        ]
        local = torch.stack([self.sums[n].double() for n in names] + counts)
        total = D.all_reduce_sum(local).tolist()
        means = {n: v / (self.steps * world_size) for n, v in zip(names, total, strict=False)}
        return means, int(total[-2]), int(total[-1])

    def state_dict(self) -> dict[str, Any]:
        return {
            "sums": {k: float(v) for k, v in self.sums.items()},
            "steps": self.steps,
            "images": self.images,
            "forwards": self.forwards,
            "time": self.time,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sums = {
            k: torch.tensor(v, dtype=torch.float32, device=self.device)
            for k, v in state["sums"].items()
        }
        self.steps = state["steps"]
        self.images = state["images"]
        self.forwards = state["forwards"]
        self.time = state["time"]


def branch_top1(metrics: dict[str, float]) -> list[float] | None:
    """SFTN: the student branches' top-1 of an evaluation, in branch order (None: no branches)."""
    found = []
    while f"branch{len(found) + 1}_top1" in metrics:
        found.append(metrics[f"branch{len(found) + 1}_top1"])
    return found or None


class Reporter:
    """Writes what the loop did: train lines from the window (every ``run.log_every`` steps and
    at epoch ends), eval lines, a progress bar, and a few log lines per stage and epoch.

    It takes the ``run`` section (progress bar, run directory) and the ``teacher`` section (the
    mode the summary records); the run's length comes from ``stages``."""

    def __init__(
        self,
        run: RunConfig,
        dist: D.DistInfo,
        stages: list[StageSpan],
        metrics: MetricsLog,
        *,
        teacher: TeacherConfig,
    ):
        self.run = run
        self.teacher = teacher
        self.dist = dist
        self.stages = stages
        self.total_epochs = stages[-1].end
        """The run's epochs (the last stage ends there)."""
        self.metrics = metrics
        self.window = Window(dist.device)
        self.start_time = time.perf_counter()
        self.first_epoch = 0
        """The epoch this process starts at (after a resume, the checkpoint's)."""
        self.last_train: dict[str, Any] | None = None
        """The latest train line (for the epoch's line in the log)."""
        self.last_epoch_log = -float("inf")
        self.bar = tqdm(disable=True)

    def begin_epoch(self, state: RunState, stage: StageSpan, steps: int) -> None:
        """A log line when a stage starts (or the run resumes), and the epoch's progress bar."""
        first = state.epoch in (stage.start, self.first_epoch)
        if self.dist.is_main and first and not state.epoch_step:
            log.info(
                "epoch %d/%d: stage %s (epochs %d-%d, loss %s, teacher %s), %d steps per epoch",
                state.epoch + 1,
                self.total_epochs,
                stage.name,
                stage.start + 1,
                stage.end,
                stage.config.loss.name,
                stage.teacher or "-",
                steps,
            )
        show = self.run.progress and self.dist.is_main and sys.stderr.isatty()
        self.bar = tqdm(
            total=steps,
            initial=state.epoch_step,
            desc=f"epoch {state.epoch + 1}/{self.total_epochs} {stage.name}",
            unit="step",
            disable=not show,
            leave=False,
        )

    def step(self, parts: LossParts, lr: float, images: int, forwards: int, seconds: float) -> None:
        """Count one optimizer step in the window and the bar."""
        self.window.add(parts, lr, images, forwards, seconds)
        self.bar.update(1)
        speed = self.window.images * self.dist.world_size / max(self.window.time, 1e-9)
        self.bar.set_postfix_str(f"{speed:.0f} img/s", refresh=False)

    def log_train(self, state: RunState) -> None:
        """One train line from every rank's window (a collective: all ranks log at the same
        steps); the window starts again."""
        means, images, forwards = self.window.reduce(self.dist.world_size)
        state.images += images
        state.teacher_forwards += forwards
        line = {
            "kind": "train",
            "epoch": state.epoch + 1,
            "step": state.global_step,
            "stage": stage_at(self.stages, state.epoch).name,
            **means,
            "images": images,
            "teacher_forwards": state.teacher_forwards,
            "images_per_s": images / max(self.window.time, 1e-9),
            "time": time.perf_counter() - self.start_time,
        }
        self.metrics.write(line)
        self.last_train = line
        self.window.reset()

    def log_eval(self, epoch: int, step: int, metrics: dict[str, float]) -> None:
        self.metrics.write({"kind": "eval", "epoch": epoch, "step": step, **metrics})

    def end_epoch(self, epoch: int, evaluated: bool, last_eval: dict[str, float]) -> None:
        """A line per epoch (the last train window's loss and speed, the evaluation if there was
        one), at most one per ``EPOCH_LOG_SECONDS`` unless the epoch was evaluated, ends a stage or
        the run: 60 sub-second epochs should not bury the log (metrics.jsonl keeps every line)."""
        line = self.last_train
        if not self.dist.is_main or line is None:
            return
        now = time.perf_counter()
        ends_stage = any(stage.end == epoch for stage in self.stages)
        if not (evaluated or ends_stage or now - self.last_epoch_log >= EPOCH_LOG_SECONDS):
            return
        test = last_eval if evaluated else {}
        self.last_epoch_log = now
        log.info(
            "epoch %d/%d done: loss %.4f, %.0f img/s%s",
            epoch,
            self.total_epochs,
            line.get("loss", float("nan")),  # none: every step of the window was skipped
            line["images_per_s"],
            f", test top-1 {test['top1']:.2f}%" if test.get("top1") is not None else "",
        )

    def summary(
        self,
        state: RunState,
        invalid: int,
        num_classes: int = 0,
        selection: Selection | None = None,
    ) -> TrainResult:
        """The run's result (``summary.json``): what it did, its last evaluation and its speed."""
        final = state.last_eval
        per_class = [final.get(f"top1_class_{c}") for c in range(num_classes)]
        return TrainResult(
            mode=self.teacher.mode,
            epochs=state.epoch,
            steps=state.global_step,
            completed=state.epoch == self.total_epochs,
            top1=final.get("top1"),
            top5=final.get("top5"),
            eval_loss=final.get("loss"),
            ema_top1=final.get("ema_top1"),
            sftn_branch_top1=branch_top1(final),
            images=state.images,
            images_per_s=state.images / max(state.train_time, 1e-9),
            train_time_s=state.train_time,
            time_s=time.perf_counter() - self.start_time,
            teacher_forwards=state.teacher_forwards,
            invalid_rows_skipped_per_epoch=invalid,
            nonfinite_steps_skipped=state.nonfinite_skipped,
            world_size=self.dist.world_size,
            device=str(self.dist.device),
            run_dir=str(Path(self.run.dir)),
            per_class_top1=per_class if final and num_classes else None,
            selection=selection,
        )
