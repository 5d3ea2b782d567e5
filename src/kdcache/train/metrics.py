"""Where training metrics go: ``metrics.jsonl`` always, TensorBoard scalars on request.

One :class:`MetricsLog` per run, written by rank 0 only. Each metric line is a JSON object with
``kind`` (``train`` or ``eval``), ``epoch`` and ``step``; with ``run.tensorboard`` its other
numeric fields also become the scalars ``<kind>/<field>`` at ``step`` in ``run.dir/tensorboard``.
On resume both are cut back to the checkpoint's step (a killed run may have logged past it), so
a resumed run's logs read as if it had never stopped.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kdcache.core.errors import ConfigError

log = logging.getLogger(__name__)

NOT_SCALARS = ("kind", "epoch", "step", "stage")
"""Fields of a metric line that are coordinates or labels, not TensorBoard scalars."""


class MetricsLog:
    """``run_dir/metrics.jsonl`` plus, with ``tensorboard``, an event file in
    ``run_dir/tensorboard``."""

    def __init__(
        self, run_dir: Path, *, main: bool, tensorboard: bool, loggers: Sequence[Any] = ()
    ):
        self.path = run_dir / "metrics.jsonl"
        self.loggers = list(loggers) if main else []
        """Further destinations of every line (:mod:`kdcache.train.loggers`), rank 0 only."""
        self.tb_dir = run_dir / "tensorboard"
        self.main = main
        self.tensorboard = tensorboard
        self._writer = None
        if tensorboard and main:
            _summary_writer_class()  # fail at start-up, not at the first log line

    def start(self, resume_step: int | None) -> None:
        """Open for a new run (``None``: the file is expected gone) or cut back to
        ``resume_step``."""
        if not self.main:
            return
        if resume_step is not None:
            trim_metrics(self.path, resume_step)
        if self.tensorboard:
            purge = (
                None if resume_step is None else resume_step + 1
            )  # events after the checkpoint's step
            self._writer = _summary_writer_class()(str(self.tb_dir), purge_step=purge)
            log.info(
                "TensorBoard scalars in %s (tensorboard --logdir %s)", self.tb_dir, self.tb_dir
            )
        for logger in self.loggers:
            logger.start(resume_step)

    def write(self, line: dict[str, Any]) -> None:
        if not self.main:
            return
        with open(self.path, "a") as handle:
            handle.write(json.dumps(line) + "\n")
        if self._writer is not None:
            for name, value in line.items():
                if (
                    name not in NOT_SCALARS
                    and isinstance(value, (int, float))
                    and not isinstance(value, bool)
                ):
                    self._writer.add_scalar(f"{line['kind']}/{name}", value, line["step"])
        for logger in self.loggers:
            logger.write(line)

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def trim_metrics(path: Path, step: int) -> None:
    """Drop metric lines written after the checkpoint's step (a killed run may have logged more)."""
    if not path.is_file():
        return
    lines = [
        line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step
    ]
    path.write_text("".join(line + "\n" for line in lines))


def _summary_writer_class():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise ConfigError(
            f"run.tensorboard: needs the tensorboard package ({exc}); install it with "
            "`pip install tensorboard` (or kdcache[tensorboard]), or set run.tensorboard=false"
        ) from None
    return SummaryWriter
