"""The non-finite loss guard: stop the run naming the step, or skip the step.

A NaN or inf loss means broken targets, data or a learning rate too high, and it must never
reach a checkpoint or a summary claiming a finished run. Knowing it needs the loss on the host,
and reading a device value each step stalls a GPU's queue once a step. So the two modes differ:

- ``skip`` must leave the batch out before its backward: one host read per step (all ranks'
  flags summed, so all skip together).
- ``stop`` (the default) records, on the device, the first non-finite step since the last check,
  and checks at the loop's own sync points — before each train line and checkpoint, at an
  epoch's last step, and at least every :data:`CHECK_EVERY` steps. The steps in between may
  have stepped on NaN gradients, but the run stops before anything of them is saved, naming the
  first bad step as it was.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from kdcache.core.errors import TrainingError
from kdcache.train import distributed as D

log = logging.getLogger(__name__)

CHECK_EVERY = 32
"""Most steps a ``stop`` guard leaves unchecked (one host read per this many steps)."""


@dataclass(frozen=True)
class StepPlace:
    """Where a step is, for the message: 1-based step, epoch and batch of the epoch."""

    step: int
    epoch: int
    batch: int
    shards: tuple[str, ...]

    def describe(self, shards: list[str]) -> str:
        return (
            f"step {self.step} (epoch {self.epoch}, batch {self.batch} of the epoch, "
            f"from shard(s) {shards})"
        )


class NonFiniteGuard:
    """``ok(loss, place)`` each step; ``check()`` at the loop's sync points (stop mode)."""

    def __init__(self, mode: str, device: torch.device):
        self.mode = mode
        self.device = device
        self.pending: list[StepPlace] = []
        self.first = torch.full((), -1, dtype=torch.int64, device=device)
        """Index into ``pending`` of the first non-finite step since the last check (-1: none)."""
        self.value = torch.zeros((), dtype=torch.float64, device=device)

    def ok(self, loss: torch.Tensor, place: StepPlace) -> bool:
        """Whether to train on this step's loss (False only in skip mode, for a bad loss)."""
        bad = ~torch.isfinite(loss.detach().reshape(()))
        if self.mode == "skip":
            return self._skip_check(bad, loss, place)
        index = len(self.pending)
        self.pending.append(place)
        newly = bad & (self.first < 0)
        self.first = torch.where(newly, index, self.first)
        self.value = torch.where(newly, loss.detach().to(torch.float64), self.value)
        if len(self.pending) >= CHECK_EVERY:
            self.check()
        return True

    def check(self) -> None:
        """Stop mode: raise for the first non-finite step recorded since the last check on any
        rank (one host read); then start a new record."""
        if not self.pending:
            return
        flag = (self.first >= 0).to(torch.float64).reshape(1)
        if D.all_reduce_sum(flag).item() == 0:
            self.pending = []
            return
        first = int(self.first)
        mine = (first, self.pending[first], float(self.value)) if first >= 0 else None
        found = [r for r in D.all_gather_object(mine) if r is not None]
        index, place, value = min(found, key=lambda r: r[0])
        shards = sorted({s for r in found if r[0] == index for s in r[1].shards})
        raise _nonfinite_error(value, place.describe(shards))

    def _skip_check(self, bad: torch.Tensor, loss: torch.Tensor, place: StepPlace) -> bool:
        if D.all_reduce_sum(bad.to(torch.float64).reshape(1)).item() == 0:
            return True  # a host read per step: the batch must be left out before its backward
        shards = sorted({s for rank in D.all_gather_object(place.shards) for s in rank})
        log.warning(
            "non-finite loss at %s: step skipped (run.on_nonfinite=skip)", place.describe(shards)
        )
        return False


def _nonfinite_error(value: float, where: str) -> TrainingError:
    return TrainingError(
        f"the loss is not finite ({value:g}) at {where}: the cache's targets, the data or "
        "the learning rate give NaN/inf; check the cache with kdcache validate, lower "
        "optimizer.lr, or skip such steps with run.on_nonfinite=skip"
    )
