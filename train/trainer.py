"""The training loop: stages, steps, evaluation, metrics, checkpoints, EMA, resumption.

Outputs in ``run.dir``: ``config.yaml`` (the resolved config), ``metrics.jsonl`` (one line per log
step and per evaluation), ``summary.json`` (at the end), ``checkpoints/last.pt`` (resume state),
``checkpoints/model_e<N>.pt`` / ``model_final.pt`` (state dicts loadable by
``kdcache.models.build_model`` via ``checkpoint:``), and with ``run.tensorboard`` the same
metrics as TensorBoard scalars in ``tensorboard/`` (:mod:`kdcache.train.metrics`).

**Resume contract.** ``checkpoints/last.pt`` is written at every epoch end, every
``run.ckpt_every_steps`` steps and when ``run.max_steps`` stops the run. It holds the model,
optimizer (and which optimizer segment it belongs to), EMA, the counters (epoch, batches done in
the epoch, global step), the open logging window and every rank's torch RNG state, plus the
resolved config and the world size. Resuming (``--resume`` / ``run.resume: auto``) refuses a
checkpoint of another format version, another config (naming the differing dotted keys; only
``RESUME_MUTABLE`` keys may change) or another world size, trims ``metrics.jsonl`` to the
checkpoint's step, re-creates the epoch's deterministic stream, skips the batches already
trained, and continues: on CPU the metrics are bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from kdcache.errors import CacheMismatchError, ConfigError, KdcacheError
from kdcache.models import ModelSpec, build_model, build_teacher, weights_digest
from kdcache.store import CacheStore, cache_identity, identity_differences
from kdcache.targets import SparseTargets, from_logits
from kdcache.teacher import ModelRunner, autocast_context
from kdcache.train import distributed as D
from kdcache.train.config import (
    RESUME_MUTABLE,
    TrainConfig,
    config_differences,
    resolved,
    stage_teacher,
)
from kdcache.train.data import Batch, RunData, build_eval_data, build_train_data, steps_per_epoch
from kdcache.train.losses import Criterion, LossParts, stopped
from kdcache.train.metrics import MetricsLog
from kdcache.train.schedule import (
    Segment,
    StagePlan,
    build_optimizer,
    lr_at,
    plan_stages,
    set_lr,
    stage_at,
)
from kdcache.views import Rendering, normalize

log = logging.getLogger(__name__)
EPOCH_LOG_SECONDS = 10.0
"""Epoch lines in the log: at most one per this many seconds, besides evaluated and last epochs."""

CKPT_FORMAT = "kdcache-train"
CKPT_VERSION = 1
TIMING_KEYS = ("time", "images_per_s")
"""Metric fields that depend on wall time (the rest is deterministic on CPU)."""


class CheckpointError(KdcacheError, ValueError):
    """A checkpoint cannot be resumed by this run (format, config or world size differ)."""


@dataclass
class RunState:
    """The counters a checkpoint restores."""

    epoch: int = 0
    epoch_step: int = 0
    global_step: int = 0
    segment: int = -1
    images: int = 0
    teacher_forwards: int = 0
    train_time: float = 0.0
    last_eval: dict[str, float] = field(default_factory=dict)


class Ema:
    """Exponential moving average of a model's floating-point state (buffers copied as they are)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(model).eval()
        for param in self.module.parameters():
            param.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for ema, live in zip(
            self.module.state_dict().values(), model.state_dict().values(), strict=True
        ):
            if ema.dtype.is_floating_point:
                ema.mul_(self.decay).add_(live.detach(), alpha=1.0 - self.decay)
            else:
                ema.copy_(live)


class Window:
    """This rank's sums of logged values since the last train line (kept per rank in
    checkpoints)."""

    def __init__(self, device: torch.device):
        self.device = device
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
            "lr": torch.tensor(lr),
        }
        for name, value in values.items():
            if value is not None:
                self.sums[name] = self.sums.get(
                    name, torch.zeros((), device=self.device)
                ) + value.detach().float().to(self.device)
        self.steps = self.steps + 1
        self.images = self.images + images
        self.forwards = self.forwards + forwards
        self.time += seconds

    def reduce(self, world_size: int) -> tuple[dict[str, float], int, int]:
        """(means over steps and ranks, images, teacher forwards), summed over ranks (a
        collective)."""
        names = sorted(self.sums)
        local = torch.stack(
            [self.sums[n].double() for n in names]
            + [
                torch.tensor(float(v), dtype=torch.float64, device=self.device)
                for v in (self.images, self.forwards)
            ]
        )
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


class Trainer:
    """One run of ``kdcache train``: build everything from the config, then :meth:`run`."""

    def __init__(self, config: TrainConfig):
        self.config = config
        self.dist = D.init_distributed(config.run.device)
        self.device = self.dist.device
        if config.run.threads:
            torch.set_num_threads(config.run.threads)
        self.run_dir = Path(config.run.dir)
        self.metrics = MetricsLog(
            self.run_dir, main=self.dist.is_main, tensorboard=config.run.tensorboard
        )
        self.stages, self.segments = plan_stages(config)
        self.data = self._build_data()
        self.num_classes = self.data.num_classes
        self.recipe = self.data.recipe
        self.eval_data = build_eval_data(
            config, self.dist.rank, self.dist.world_size, self.recipe, self.num_classes, self._pin
        )
        check_topk(config, self.data.store, self.num_classes)
        self.model = self._build_student()
        self.ddp = self._wrap(self.model)
        self.teachers = self._build_online_teachers()
        self.ema = Ema(self.model, config.ema.decay) if config.ema.enabled else None
        self.state = RunState()
        self.window = Window(self.device)
        self.optimizer: torch.optim.Optimizer | None = None
        self.forwards = 0
        """Teacher forward passes (images) on this rank since the last train line."""
        self.stopped_early = False
        self.start_time = time.perf_counter()
        self.last_train: dict[str, Any] | None = None
        """The latest train metrics line (for the epoch summary in the log)."""
        self.first_epoch = 0
        """The epoch this process starts at (after a resume, the checkpoint's)."""
        self.last_epoch_log = -float("inf")

    # ---- building -----------------------------------------------------------------------------

    @property
    def _pin(self) -> bool:
        return self.config.data.pin_memory and self.device.type == "cuda"

    def _build_data(self) -> RunData:
        cache_teachers = (
            sorted({s.teacher for s in self.stages if s.teacher})
            if self.config.teacher.mode == "cache"
            else []
        )
        return build_train_data(
            self.config, self.dist.rank, self.dist.world_size, cache_teachers, self._pin
        )

    def _build_student(self) -> nn.Module:
        torch.manual_seed(self.config.run.seed)
        model = build_model(self.config.student, self.num_classes, self.recipe.channels)
        check_student(
            model,
            self.data.rendering,
            self.recipe.channels,
            self.num_classes,
            self.config,
            self.data.store is not None,
        )
        torch.manual_seed(
            self.config.run.seed * 1000 + self.dist.rank + 1
        )  # dropout etc., per rank
        model = model.to(self.device)
        if self.device.type == "cuda" and self.config.run.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model

    def _wrap(self, model: nn.Module) -> nn.Module:
        if not self.dist.distributed:
            return model
        return DistributedDataParallel(
            model, device_ids=[self.device] if self.device.type == "cuda" else None
        )

    def _build_online_teachers(self) -> dict[str, ModelRunner]:
        if self.config.teacher.mode != "online":
            return {}
        names = sorted({s.teacher for s in self.stages if s.teacher})
        return {name: self._online_teacher(name) for name in names}

    def _online_teacher(self, name: str) -> ModelRunner:
        spec = online_teacher_spec(self.config, name, self.data.store)
        model = build_teacher(spec, self.num_classes, self.recipe.channels)
        store = self.data.store
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
            self.data.teacher_renderings[name],
            device=str(self.device),
            amp=self.config.teacher.amp,
            channels_last=self.config.run.channels_last,
            name=name,
        )

    # ---- the run ------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Train to the end (or to ``run.max_steps``) and return the summary."""
        self._prepare_run_dir()
        self.first_epoch = self.state.epoch
        total = self.config.total_epochs
        while self.state.epoch < total and not self.stopped_early:
            self._train_epoch()
            if not self.stopped_early:
                self._end_epoch()
        summary = self._summary()
        if self.dist.is_main:
            _write_json(self.run_dir / "summary.json", summary)
        D.barrier()
        return summary

    def _train_epoch(self) -> None:
        epoch = self.state.epoch
        stage, criterion, uses_teacher, cache_teachers = self._epoch_setup(epoch)
        steps = steps_per_epoch(self.data.spec)
        self._log_epoch_start(stage, steps)
        bar = self._bar(steps, f"epoch {epoch + 1}/{self.config.total_epochs} {stage.name}")
        tick = time.perf_counter()
        for batch in self.data.epoch(epoch, cache_teachers, self.state.epoch_step):
            lr = lr_at(
                self.segments[stage.segment],
                (epoch - self.segments[stage.segment].start) + self.state.epoch_step / steps,
            )
            parts = self._step(batch, stage, criterion, uses_teacher, lr)
            tick = self._after_step(parts, lr, len(batch), tick, steps, bar)
            if self.stopped_early:
                break
        bar.close()

    def _epoch_setup(self, epoch: int) -> tuple[StagePlan, Criterion, bool, list[str]]:
        """The epoch's stage (entering its optimizer segment), loss, whether it uses the teacher,
        cache teachers."""
        stage = stage_at(self.stages, epoch)
        self._enter_segment(self.segments[stage.segment])
        criterion = Criterion(stage.config.loss, self.num_classes)
        uses_teacher = criterion.needs_teacher and not stopped(stage.config.loss, epoch)
        cache_teachers = (
            [stage.teacher] if uses_teacher and self.config.teacher.mode == "cache" else []
        )
        self.ddp.train()
        return stage, criterion, uses_teacher, cache_teachers

    def step_batches(self, epoch: int, batches: Iterable[Batch] | None = None) -> Iterator[int]:
        """Train epoch ``epoch``'s batches one optimizer step at a time, yielding each batch's size.

        The same data path, loss and step as :meth:`run`, without logging, checkpoints, evaluation
        or counters (only ``state.epoch`` is set): ``kdcache bench train`` times these steps.
        ``batches``: step on these instead of the epoch's stream (to time the step alone).
        """
        self.state.epoch = epoch
        stage, criterion, uses_teacher, cache_teachers = self._epoch_setup(epoch)
        segment = self.segments[stage.segment]
        steps = steps_per_epoch(self.data.spec)
        stream = self.data.epoch(epoch, cache_teachers) if batches is None else batches
        for step, batch in enumerate(stream):
            lr = lr_at(segment, (epoch - segment.start) + min(step / steps, 1.0))
            self._step(batch, stage, criterion, uses_teacher, lr)
            yield len(batch)

    def _step(
        self, batch: Batch, stage: StagePlan, criterion: Criterion, uses_teacher: bool, lr: float
    ) -> LossParts:
        batch = batch.to(self.device)
        set_lr(self.optimizer, lr)
        targets = self._targets(batch, stage) if uses_teacher else None
        x = self._input(batch.images)
        with autocast_context(self.device, self.config.run.amp):
            logits = self.ddp(x)
        parts = criterion(logits.float(), batch.hard_labels(), targets, self.state.epoch)
        self.optimizer.zero_grad(set_to_none=True)
        parts.total.backward()
        clip = self.segments[stage.segment].optimizer.grad_clip
        if clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update(self.model)
        return parts

    def _input(self, images: torch.Tensor) -> torch.Tensor:
        x = normalize(images, self.data.rendering)
        if self.device.type == "cuda" and self.config.run.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def _targets(self, batch: Batch, stage: StagePlan) -> SparseTargets:
        """Cached targets, or the online teacher's full logits as exact k = C sparse targets."""
        if self.config.teacher.mode == "cache":
            return batch.targets[stage.teacher]
        images = batch.teacher_images.get(stage.teacher, batch.images)
        logits = self.teachers[stage.teacher](images).clone()  # leave inference mode's tensors
        self.forwards += len(batch)
        return from_logits(logits, batch.hard_labels(), self.num_classes)

    def _after_step(
        self, parts: LossParts, lr: float, images: int, tick: float, steps: int, bar: tqdm
    ) -> float:
        now = time.perf_counter()
        state = self.state
        state.epoch_step = state.epoch_step + 1
        state.global_step = state.global_step + 1
        state.train_time += now - tick
        self.window.add(parts, lr, images, self.forwards, now - tick)
        self.forwards = 0
        bar.update(1)
        bar.set_postfix_str(
            f"{self.window.images * self.dist.world_size / max(self.window.time, 1e-9):.0f} img/s",
            refresh=False,
        )
        if state.global_step % self.config.run.log_every == 0 or state.epoch_step == steps:
            self._log_train()
        every = self.config.run.ckpt_every_steps
        if every and state.global_step % every == 0 and state.epoch_step < steps:
            self._save_checkpoint()
        if self.config.run.max_steps and state.global_step >= self.config.run.max_steps:
            log.info(
                "run.max_steps=%d reached: saving a checkpoint and stopping",
                self.config.run.max_steps,
            )
            self._save_checkpoint()
            self.stopped_early = True
        return time.perf_counter()

    def _end_epoch(self) -> None:
        done = self.state.epoch + 1
        evaluate = done % self.config.run.eval_every == 0 or done == self.config.total_epochs
        if evaluate:
            self._evaluate_and_log(done)
        self._log_epoch_end(done, evaluate)
        if done in self.config.run.save_model_epochs and self.dist.is_main:
            self._save_model(f"model_e{done}.pt")
        if done == self.config.total_epochs and self.dist.is_main:
            self._save_model("model_final.pt")
        self.state.epoch = done
        self.state.epoch_step = 0
        self._save_checkpoint()

    def _enter_segment(self, segment: Segment) -> None:
        """A new optimizer (fresh state) when the stage starts another optimizer segment."""
        if self.optimizer is not None and self.state.segment == segment.index:
            return
        self.optimizer = build_optimizer(self.model, segment.optimizer)
        if self.state.segment != segment.index and self.dist.is_main:
            log.info(
                "optimizer segment %d: %s lr %g over epochs %d-%d",
                segment.index,
                segment.optimizer.name,
                segment.optimizer.lr,
                segment.start + 1,
                segment.end,
            )
        self.state.segment = segment.index

    # ---- evaluation -----------------------------------------------------------------------------

    def _evaluate_and_log(self, epoch: int) -> None:
        metrics = self.evaluate(self.model)
        if self.ema is not None and metrics:
            metrics.update(
                {f"ema_{k}": v for k, v in self.evaluate(self.ema.module).items() if k != "n"}
            )
        if metrics:
            self.state.last_eval = metrics
            self.metrics.write(
                {"kind": "eval", "epoch": epoch, "step": self.state.global_step, **metrics}
            )

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Top-1, top-5 and CE on the validation shards (center views), summed over ranks."""
        if self.eval_data is None:
            return {}
        model.eval()
        sums = torch.zeros(4, dtype=torch.float64, device=self.device)
        for batch in self.eval_data[1]:
            batch = batch.to(self.device)
            with autocast_context(self.device, self.config.run.amp):
                logits = model(self._input(batch.images)).float()
            sums += eval_sums(logits, batch.labels)
        model.train()
        correct1, correct5, loss, n = D.all_reduce_sum(sums).tolist()
        if n == 0:
            return {}
        return {
            "top1": 100.0 * correct1 / n,
            "top5": 100.0 * correct5 / n,
            "loss": loss / n,
            "n": int(n),
        }

    # ---- logging ---------------------------------------------------------------------------------

    def _log_train(self) -> None:
        """One train line from every rank's window (a collective: all ranks log at the same
        steps)."""
        means, images, forwards = self.window.reduce(self.dist.world_size)
        self.state.images += images
        self.state.teacher_forwards += forwards
        line = {
            "kind": "train",
            "epoch": self.state.epoch + 1,
            "step": self.state.global_step,
            "stage": stage_at(self.stages, self.state.epoch).name,
            **means,
            "images": images,
            "teacher_forwards": self.state.teacher_forwards,
            "images_per_s": images / max(self.window.time, 1e-9),
            "time": time.perf_counter() - self.start_time,
        }
        self.metrics.write(line)
        self.last_train = line
        self.window = Window(self.device)

    def _log_epoch_start(self, stage: StagePlan, steps: int) -> None:
        """A line when a stage starts (or the run resumes)."""
        if not self.dist.is_main or self.state.epoch_step:
            return
        if self.state.epoch != stage.start and self.state.epoch != self.first_epoch:
            return
        log.info(
            "epoch %d/%d: stage %s (epochs %d-%d, loss %s, teacher %s), %d steps per epoch",
            self.state.epoch + 1,
            self.config.total_epochs,
            stage.name,
            stage.start + 1,
            stage.end,
            stage.config.loss.name,
            stage.teacher or "-",
            steps,
        )

    def _log_epoch_end(self, epoch: int, evaluated: bool) -> None:
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
        self.last_epoch_log = now
        test = self.state.last_eval if evaluated else {}
        log.info(
            "epoch %d/%d done: loss %.4f, %.0f img/s%s",
            epoch,
            self.config.total_epochs,
            line["loss"],
            line["images_per_s"],
            f", test top-1 {test['top1']:.2f}%" if test.get("top1") is not None else "",
        )

    def _bar(self, steps: int, desc: str) -> tqdm:
        show = self.config.run.progress and self.dist.is_main and sys.stderr.isatty()
        return tqdm(
            total=steps,
            initial=self.state.epoch_step,
            desc=desc,
            unit="step",
            disable=not show,
            leave=False,
        )

    def _summary(self) -> dict[str, Any]:
        forwards = self.state.teacher_forwards
        if self.config.teacher.mode == "cache" and forwards != 0:
            raise RuntimeError(
                f"cache mode ran {forwards} teacher forward passes; it must run none"
            )
        final = self.state.last_eval
        return {
            "mode": self.config.teacher.mode,
            "epochs": self.state.epoch,
            "steps": self.state.global_step,
            "completed": self.state.epoch == self.config.total_epochs,
            "top1": final.get("top1"),
            "top5": final.get("top5"),
            "eval_loss": final.get("loss"),
            "ema_top1": final.get("ema_top1"),
            "images": self.state.images,
            "images_per_s": self.state.images / max(self.state.train_time, 1e-9),
            "train_time_s": self.state.train_time,
            "time_s": time.perf_counter() - self.start_time,
            "teacher_forwards": forwards,
            "invalid_rows_skipped_per_epoch": self.data.invalid,
            "world_size": self.dist.world_size,
            "device": str(self.device),
            "run_dir": str(self.run_dir),
        }

    # ---- checkpoints -----------------------------------------------------------------------------

    @property
    def ckpt_path(self) -> Path:
        return self.run_dir / "checkpoints" / "last.pt"

    def _prepare_run_dir(self) -> None:
        resume = self.config.run.resume
        exists = self.ckpt_path.is_file()
        if resume == "must" and not exists:
            raise CheckpointError(f"--resume: no checkpoint at {self.ckpt_path}")
        if resume == "never" and exists and not self.config.run.overwrite:
            raise ConfigError(
                f"run.dir: {str(self.run_dir)!r} already holds a run ({self.ckpt_path.name}); "
                "resume it with --resume (run.resume=auto), start over with run.overwrite=true, "
                "or choose another run.dir"
            )
        D.barrier()
        if resume != "never" and exists:
            self._resume()
            self.metrics.start(resume_step=self.state.global_step)
        elif self.dist.is_main:
            self._fresh_run_dir()
            self.metrics.start(resume_step=None)
        if self.dist.is_main:
            (self.run_dir / "config.yaml").write_text(
                yaml.safe_dump(resolved(self.config), sort_keys=False)
            )
        D.barrier()

    def _fresh_run_dir(self) -> None:
        (self.run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        for name in ("metrics.jsonl", "summary.json"):
            (self.run_dir / name).unlink(missing_ok=True)
        shutil.rmtree(self.metrics.tb_dir, ignore_errors=True)
        self.ckpt_path.unlink(missing_ok=True)

    def _save_checkpoint(self) -> None:
        ranks = D.all_gather_object({"rng": _rng_state(), "window": self.window.state_dict()})
        if not self.dist.is_main:
            return
        payload = {
            "format": CKPT_FORMAT,
            "version": CKPT_VERSION,
            "config": resolved(self.config),
            "world_size": self.dist.world_size,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "state": asdict(self.state),
            "ema": self.ema.module.state_dict() if self.ema is not None else None,
            "ranks": ranks,
            "cache": self._cache_identity(),
        }
        self.ckpt_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.ckpt_path.with_suffix(".tmp")
        torch.save(payload, tmp)
        os.replace(tmp, self.ckpt_path)

    def _cache_identity(self) -> dict[str, Any] | None:
        """What the run trains against, so a resume refuses a cache rebuilt in between."""
        store = self.data.store
        if store is None:
            return None
        used = sorted({s.teacher for s in self.stages if s.teacher and s.teacher in store.teachers})
        return cache_identity(store, used)

    def _resume(self) -> None:
        ckpt = load_resume_checkpoint(self.ckpt_path, self.config, self.dist.world_size)
        saved = ckpt.get("cache")
        current = self._cache_identity()
        if saved is not None and current is not None and identity_differences(saved, current):
            raise CheckpointError(
                f"{self.ckpt_path} was trained against another cache than "
                f"{current.get('path')!r} holds now:\n  "
                + "\n  ".join(identity_differences(saved, current))
            )
        self.model.load_state_dict(ckpt["model"])
        self.state = RunState(**ckpt["state"])
        if self.state.segment >= 0:
            self.optimizer = build_optimizer(
                self.model, self.segments[self.state.segment].optimizer
            )
            self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.ema is not None:
            self.ema.module.load_state_dict(ckpt["ema"])
        own = ckpt["ranks"][self.dist.rank]
        self.window.load_state_dict(own["window"])
        _set_rng_state(own["rng"], self.device)
        log.info(
            "resumed %s at epoch %d, step %d of the epoch (global step %d)",
            self.ckpt_path,
            self.state.epoch + 1,
            self.state.epoch_step,
            self.state.global_step,
        )

    def _save_model(self, name: str) -> None:
        path = self.run_dir / "checkpoints" / name
        torch.save(self.model.state_dict(), path)
        log.info("saved %s", path)


# ---- helpers -------------------------------------------------------------------------------------


def check_student(
    model: nn.Module,
    rendering: Rendering,
    channels: int,
    num_classes: int,
    config: TrainConfig,
    from_cache: bool,
) -> None:
    """Refuse a student that cannot take its rendering of the views or does not output
    ``num_classes`` logits."""
    error = CacheMismatchError if from_cache else ConfigError
    size = rendering.size
    where = f"its views ({channels}x{size}x{size}, student.render.size / student.input_size)"
    try:
        with torch.no_grad():
            out = model.eval()(torch.zeros(2, channels, size, size))
    except Exception as exc:  # any shape error of any model
        raise error(
            f"student {config.student.name!r} cannot take {where}: {str(exc)[:300]}"
        ) from None
    finally:
        model.train()
    if tuple(out.shape) != (2, num_classes):
        raise error(
            f"student {config.student.name!r} outputs {tuple(out.shape)[1:]} logits, "
            f"the data has {num_classes} classes"
        )


def check_topk(config: TrainConfig, store: CacheStore | None, num_classes: int) -> None:
    """Refuse a ``stages.N.loss.topk`` above what the targets hold: the cache's k, or C online."""
    for i, stage in enumerate(config.stages):
        topk = getattr(stage.loss, "topk", None)
        teacher = stage_teacher(config, i)
        if topk is None or teacher is None:
            continue
        cached = config.teacher.mode == "cache" and store is not None
        held = store.teacher_meta(teacher).k if cached else num_classes
        if topk > held:
            what = (
                f"the cache's k={held} for teacher {teacher!r}" if cached else f"the {held} classes"
            )
            raise ConfigError(f"stages.{i}.loss.topk: {topk} is more than {what}")


def online_teacher_spec(config: TrainConfig, name: str, store: CacheStore | None) -> ModelSpec:
    """The online teacher's spec: ``teacher.models.<name>``, else the spec the cache stored for
    it."""
    if name in config.teacher.models:
        return config.teacher.models[name]
    if store is not None and name in store.teachers:
        return ModelSpec.model_validate(store.teacher_meta(name).model)
    raise ConfigError(
        f"teacher.models.{name}: no model spec for online teacher {name!r} "
        "(and the cache has no teacher of that name)"
    )


def eval_sums(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``[top-1 correct, top-5 correct, CE sum, count]`` of one batch (float64)."""
    k = min(5, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    correct1 = (top[:, 0] == labels).sum()
    correct5 = (top == labels.unsqueeze(1)).any(dim=1).sum()
    loss = torch.nn.functional.cross_entropy(logits, labels, reduction="sum")
    count = torch.tensor(float(len(labels)), dtype=torch.float64, device=logits.device)
    return torch.stack([correct1.double(), correct5.double(), loss.double(), count])


def load_resume_checkpoint(path: Path, config: TrainConfig, world_size: int) -> dict[str, Any]:
    """Load ``last.pt`` and refuse it unless format, config and world size fit this run."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises pickle, zip and runtime errors for damaged files
        raise CheckpointError(
            f"{path} cannot be read as a checkpoint ({type(exc).__name__}: {str(exc)[:200]})"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CKPT_FORMAT:
        raise CheckpointError(f"{path} is not a kdcache training checkpoint")
    if ckpt.get("version") != CKPT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint version {ckpt.get('version')}, "
            f"this kdcache reads {CKPT_VERSION}"
        )
    diffs = config_differences(ckpt["config"], resolved(config), RESUME_MUTABLE)
    if diffs:
        raise CheckpointError(
            f"{path} was written by another config; differing keys:\n  " + "\n  ".join(diffs)
        )
    if ckpt["world_size"] != world_size:
        raise CheckpointError(
            f"{path} was written with world size {ckpt['world_size']}, found {world_size} "
            "(the data split depends on it)"
        )
    return ckpt


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def train(config: TrainConfig) -> dict[str, Any]:
    """Build a :class:`Trainer`, run it, leave the process group; return the summary."""
    trainer = None
    try:
        trainer = Trainer(config)
        return trainer.run()
    finally:
        if trainer is not None:
            trainer.metrics.close()
        D.destroy()
