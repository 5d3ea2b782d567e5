"""The run's own stateful parts: its counters, the current segment's optimizer, each rank's RNG.

Each has ``state_dict()`` / ``load_state_dict()`` (the :class:`~kdcache.train.checkpoint.Stateful`
protocol) and is saved in ``checkpoints/last.pt`` by the
:class:`~kdcache.train.checkpoint.Checkpointer`, beside the model and the EMA.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
from torch import nn

from kdcache.train.schedule import Segment, build_optimizer, set_lr

log = logging.getLogger(__name__)


@dataclass
class RunState:
    """The counters a checkpoint restores (``state`` in ``last.pt``)."""

    epoch: int = 0
    epoch_step: int = 0
    global_step: int = 0
    segment: int = -1
    """The optimizer segment the optimizer belongs to (-1: none built yet)."""
    accumulated: int = 0
    """Batches whose gradients the open accumulation group holds (``run.accumulate``); 0 at
    every checkpoint, which is written only after an optimizer step."""
    images: int = 0
    teacher_forwards: int = 0
    train_time: float = 0.0
    last_eval: dict[str, float] = field(default_factory=dict)
    nonfinite_skipped: int = 0
    """Steps skipped for a non-finite loss (``run.on_nonfinite: skip``)."""

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """In place: other parts (the optimizer) hold this object. A counter that an older
        checkpoint lacks keeps its default (``accumulated``: 0)."""
        for f in fields(self):
            if f.name in state:
                setattr(self, f.name, state[f.name])


class SegmentOptimizer:
    """The optimizer of the current optimizer segment: a new one, with fresh state, whenever a
    stage starts another segment (EffDstl's stage 2 restarts SGD). Its segment index lives in
    :class:`RunState`, so a checkpoint knows which optimizer its state belongs to."""

    def __init__(self, model: nn.Module, segments: list[Segment], state: RunState, announce: bool):
        self.model = model
        self.segments = segments
        self.state = state
        self.announce = announce
        """Log each new segment (rank 0)."""
        self.current: torch.optim.Optimizer | None = None
        self._lr = 0.0

    def enter(self, segment: Segment) -> None:
        """Keep the optimizer within a segment; build a new one when the segment changes."""
        if self.current is not None and self.state.segment == segment.index:
            return
        self.current = build_optimizer(self.model, segment.optimizer)
        if self.state.segment != segment.index and self.announce:
            log.info(
                "optimizer segment %d: %s lr %g over epochs %d-%d",
                segment.index,
                segment.optimizer.name,
                segment.optimizer.lr,
                segment.start + 1,
                segment.end,
            )
        self.state.segment = segment.index

    def active(self) -> torch.optim.Optimizer:
        """The current segment's optimizer (:meth:`enter` builds it)."""
        if self.current is None:
            raise RuntimeError("no optimizer yet: enter a segment first")
        return self.current

    def set_lr(self, lr: float) -> None:
        set_lr(self.active(), lr)
        self._lr = lr

    @property
    def lr(self) -> float:
        """The learning rate of the latest step (before any group's layer-decay scale)."""
        return self._lr

    def state_dict(self) -> dict[str, Any]:
        return self.active().state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The saved segment's optimizer with the saved state (load :class:`RunState` first)."""
        if self.state.segment < 0:
            return
        self.current = build_optimizer(self.model, self.segments[self.state.segment].optimizer)
        self.current.load_state_dict(state)


class RngState:
    """This rank's torch RNG (and CUDA's, when in use): dropout and other global draws continue
    on resume as if the run had never stopped. The data loader draws from its own generator."""

    def __init__(self, device: torch.device):
        self.device = device

    def state_dict(self) -> dict[str, Any]:
        state = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        torch.set_rng_state(state["torch"])
        if "cuda" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda"], self.device)
