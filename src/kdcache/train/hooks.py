"""Step hooks: code that runs inside the training loop without a loop of its own.

A hook is called by :meth:`kdcache.train.trainer.Trainer.train_epoch` around every optimizer step:
``step_start`` before the step, ``step_end`` after the step's counters, metrics line and
checkpoint (``trainer.state.global_step`` is the step just done). Benchmarks count and time steps
with hooks; fault tests stop a run at a chosen step. Subclass and override what you need::

    class LossEvery100(StepHook):
        def step_end(self, trainer, batch, parts):
            if trainer.state.global_step % 100 == 0:
                log.info("step %d: loss %.4f", trainer.state.global_step, parts.total.item())

    train(config, hooks=[LossEvery100()])
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kdcache.train.data import Batch
from kdcache.train.losses import LossParts

if TYPE_CHECKING:
    from kdcache.train.trainer import Trainer


class StepHook:
    """Called around each optimizer step; the defaults do nothing."""

    def step_start(self, trainer: Trainer, batch: Batch) -> None:
        """Before the step on ``batch`` (as the loader delivered it, on the host)."""

    def step_end(self, trainer: Trainer, batch: Batch, parts: LossParts) -> None:
        """After the step: its loss parts, the counters advanced, metrics and checkpoint written."""
