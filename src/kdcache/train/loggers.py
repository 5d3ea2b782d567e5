"""Where else the metrics go: CSV files, Weights & Biases, MLflow (``run.csv``, ``run.wandb``,
``run.mlflow``).

Each logger receives every line :class:`~kdcache.train.metrics.MetricsLog` writes to
``metrics.jsonl`` (rank 0 only). ``metrics.jsonl`` stays the record: the CSV files are rebuilt
from it at every start, so after a resume they hold exactly its (trimmed) lines. W&B and MLflow
runs are continued on resume (their ids are kept in ``run.dir``); points that a killed run logged
past its checkpoint stay in those services (W&B ignores steps below its latest).
"""

from __future__ import annotations

import csv
import json
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Any, Protocol

from kdcache.core.errors import ConfigError
from kdcache.train.config import MlflowConfig, RunConfig, WandbConfig

log = logging.getLogger(__name__)

NOT_SCALARS = ("kind", "epoch", "step", "stage")
"""Fields of a metric line that are coordinates or labels, not scalars."""


class MetricsLogger(Protocol):
    """A place metric lines go besides ``metrics.jsonl``."""

    def start(self, resume_step: int | None) -> None: ...

    def write(self, line: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def scalars(line: dict[str, Any]) -> dict[str, float]:
    """A line's numeric fields as ``<kind>/<field>`` (``train/loss``, ``eval/top1``)."""
    return {
        f"{line['kind']}/{name}": float(value)
        for name, value in line.items()
        if name not in NOT_SCALARS
        and isinstance(value, (int, float))
        and not isinstance(value, bool)
    }


def build_loggers(run: RunConfig, params: dict[str, Any]) -> list[MetricsLogger]:
    """The loggers ``run`` asks for; ``params`` (the resolved config) goes to W&B and MLflow."""
    run_dir = Path(run.dir)
    loggers: list[MetricsLogger] = []
    if run.csv:
        loggers.append(CsvLogger(run_dir))
    if run.wandb is not None:
        loggers.append(WandbLogger(run_dir, run.wandb, params))
    if run.mlflow is not None:
        loggers.append(MlflowLogger(run_dir, run.mlflow, params))
    return loggers


class CsvLogger:
    """``train.csv`` and ``eval.csv`` in the run directory: one row per line of that kind, the
    columns in order of first appearance (a file is rewritten when a later line adds one, e.g. a
    stage whose loss logs more parts)."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.rows: dict[str, list[dict[str, Any]]] = {}
        self.columns: dict[str, list[str]] = {}

    def path(self, kind: str) -> Path:
        return self.run_dir / f"{kind}.csv"

    def start(self, resume_step: int | None) -> None:
        """Rebuild both files from ``metrics.jsonl`` (already cut back to ``resume_step``)."""
        for kind in ("train", "eval"):
            self.path(kind).unlink(missing_ok=True)
        self.rows = {}
        self.columns = {}
        source = self.run_dir / "metrics.jsonl"
        lines = source.read_text().splitlines() if source.is_file() else []
        for text in lines:
            line = json.loads(text)
            self._add(line)
        for kind in self.rows:
            self._rewrite(kind)

    def _add(self, line: dict[str, Any]) -> bool:
        """Keep the line; whether it adds a column to its kind's file."""
        kind = line["kind"]
        columns = self.columns.setdefault(kind, [])
        new = [name for name in line if name not in columns]
        columns.extend(new)
        self.rows.setdefault(kind, []).append(line)
        return bool(new)

    def _rewrite(self, kind: str) -> None:
        with open(self.path(kind), "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=self.columns[kind])
            writer.writeheader()
            writer.writerows(self.rows[kind])

    def write(self, line: dict[str, Any]) -> None:
        kind = line["kind"]
        if self._add(line):
            self._rewrite(kind)
            return
        with open(self.path(kind), "a", newline="") as handle:
            csv.DictWriter(handle, fieldnames=self.columns[kind]).writerow(line)

    def close(self) -> None:
        pass


def _import(module: str, key: str, extra: str) -> Any:
    """Import an optional logger's package, or one error naming the config key and the extra."""
    try:
        return __import__(module, fromlist=["_"])
    except ImportError as exc:
        raise ConfigError(
            f"{key}: needs the {module.split('.')[0]} package ({exc}); install it with "
            f"`pip install 'kdcache[{extra}]'`, or remove {key}"
        ) from None


def _run_id(path: Path, resume_step: int | None) -> str | None:
    """The id a resumed run continues (None: a fresh run, or no id saved)."""
    if resume_step is None or not path.is_file():
        return None
    return path.read_text().strip() or None


class WandbLogger:
    """A W&B run (``wandb.init`` in ``run.dir``; ``WANDB_MODE=offline`` writes it locally);
    its id in ``run.dir/wandb_id``, so a resume continues it."""

    def __init__(self, run_dir: Path, cfg: WandbConfig, params: dict[str, Any]):
        self.wandb = _import("wandb", "run.wandb", "wandb")
        self.run_dir = run_dir
        self.cfg = cfg
        self.params = params
        self.run = None

    def start(self, resume_step: int | None) -> None:
        id_file = self.run_dir / "wandb_id"
        run_id = _run_id(id_file, resume_step) or uuid.uuid4().hex[:12]
        id_file.write_text(run_id)
        self.run = self.wandb.init(
            project=self.cfg.project,
            entity=self.cfg.entity,
            name=self.cfg.name or self.run_dir.name,
            tags=self.cfg.tags,
            config=self.params,
            dir=str(self.run_dir),
            id=run_id,
            resume="allow",
        )
        log.info("W&B run %s (%s)", run_id, self.run.dir)

    def write(self, line: dict[str, Any]) -> None:
        self.run = _started(self.run, "W&B")
        self.run.log(scalars(line), step=line["step"])

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


class MlflowLogger:
    """An MLflow run in ``experiment`` at ``tracking_uri``; its id in ``run.dir/mlflow_run_id``,
    so a resume continues it. A ``file:`` store is in maintenance mode in MLflow 3 and refused
    unless ``MLFLOW_ALLOW_FILE_STORE`` is set: naming one in ``run.mlflow.tracking_uri`` sets it
    for this process."""

    def __init__(self, run_dir: Path, cfg: MlflowConfig, params: dict[str, Any]):
        self.tracking = _import("mlflow.tracking", "run.mlflow", "mlflow")
        self.entities = _import("mlflow.entities", "run.mlflow", "mlflow")
        self.run_dir = run_dir
        self.cfg = cfg
        self.params = params
        self.client = None
        self.run_id: str | None = None

    def start(self, resume_step: int | None) -> None:
        uri = self.cfg.tracking_uri
        if uri and uri.startswith("file:"):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = self.tracking.MlflowClient(tracking_uri=uri)
        id_file = self.run_dir / "mlflow_run_id"
        self.run_id = _run_id(id_file, resume_step)
        if self.run_id is None:
            self.run_id = self._create()
            id_file.write_text(self.run_id)
        else:
            self.client.update_run(self.run_id, status="RUNNING")
        log.info("MLflow run %s in experiment %r", self.run_id, self.cfg.experiment)

    def _create(self) -> str:
        self.client = _started(self.client, "MLflow")
        found = self.client.get_experiment_by_name(self.cfg.experiment)
        experiment = (
            found.experiment_id if found else self.client.create_experiment(self.cfg.experiment)
        )
        run = self.client.create_run(experiment, run_name=self.cfg.run_name or self.run_dir.name)
        self.client.log_dict(run.info.run_id, self.params, "config.json")
        return run.info.run_id

    def write(self, line: dict[str, Any]) -> None:
        self.client = _started(self.client, "MLflow")
        now = int(time.time() * 1000)
        metrics = [
            self.entities.Metric(name, value, now, line["step"])
            for name, value in scalars(line).items()
        ]
        self.client.log_batch(self.run_id, metrics=metrics)

    def close(self) -> None:
        if self.client is not None and self.run_id is not None:
            self.client.set_terminated(self.run_id)
            self.client = None


def _started(handle: Any, what: str) -> Any:
    """The logger's open run or client; a logger used before ``start`` or after ``close`` is a
    bug of the caller, said as an error (not an assert: those can be switched off)."""
    if handle is None:
        raise RuntimeError(f"the {what} logger was used before start() or after close()")
    return handle
