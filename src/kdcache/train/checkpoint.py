"""The run directory and its checkpoints: ``last.pt`` over the run's stateful parts, model
snapshots, and every refusal to start or resume.

**Resume contract.** ``checkpoints/last.pt`` is written at every epoch end, every
``run.ckpt_every_steps`` steps and when ``run.max_steps`` stops the run. It holds the model,
optimizer (and which optimizer segment it belongs to), EMA, the counters (epoch, batches done in
the epoch, global step), the open logging window and every rank's torch RNG state, plus the
resolved config, the world size and the identity of the cache trained against. Resuming
(``--resume`` / ``run.resume: auto``) refuses a checkpoint of another format version, another
config (naming the differing dotted keys; only ``RESUME_MUTABLE`` keys may change), another world
size or another cache, trims ``metrics.jsonl`` to the checkpoint's step, re-creates the epoch's
deterministic stream, skips the batches already trained, and continues: on CPU the metrics are
bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any, Protocol

import torch
import yaml
from torch import nn

from kdcache.cache.store import CacheStore, cache_identity, identity_differences
from kdcache.core.errors import ConfigError, KdcacheError, short_reason
from kdcache.train import distributed as D
from kdcache.train.config import (
    RESUME_MUTABLE,
    RunConfig,
    config_differences,
    with_defaults,
)
from kdcache.train.metrics import MetricsLog
from kdcache.train.schedule import StageSpan

log = logging.getLogger(__name__)

CKPT_FORMAT = "kdcache-train"
CKPT_VERSION = 1


class CheckpointError(KdcacheError, ValueError):
    """A checkpoint cannot be resumed by this run (format, config, world size or cache differ)."""


class Stateful(Protocol):
    """A part of the run that a checkpoint saves and restores (torch modules and optimizers are)."""

    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> None: ...


def check_run_dir(path: str | Path) -> None:
    """Refuse a ``run.dir`` that cannot hold a run, before any work: an existing file, a path under
    a file, or a place this process cannot write (a read-only filesystem, no permission)."""
    path = Path(path)
    try:
        _check_run_dir(path)
    except OSError as exc:  # e.g. a parent that cannot even be searched
        raise ConfigError(f"run.dir: {str(path)!r} cannot be checked ({exc})") from None


def _check_run_dir(path: Path) -> None:
    if path.exists() and not path.is_dir():
        raise ConfigError(f"run.dir: {str(path)!r} is a file, not a directory")
    # the directory itself, or the nearest existing parent it would be created in
    existing = next(p for p in (path, *path.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise ConfigError(f"run.dir: {str(path)!r} cannot be created: {str(existing)!r} is a file")
    # os.access also answers for a read-only mount (EROFS), even as root
    if os.access(existing, os.W_OK | os.X_OK):
        return
    read_only = os.statvfs(existing).f_flag & os.ST_RDONLY
    why = "is on a read-only filesystem" if read_only else "is not writable by this user"
    if existing == path:
        raise ConfigError(f"run.dir: {str(path)!r} {why}")
    raise ConfigError(f"run.dir: {str(path)!r} cannot be created: {str(existing)!r} {why}")


class Checkpointer:
    """Owns ``run.dir``: starts a run there (fresh or resumed), saves and loads ``last.pt``.

    ``parts`` are saved under their names and loaded in their order (the counters before the
    optimizer, which needs their segment index); ``None`` is saved for a part that is off (EMA).
    ``rank_parts`` are kept per rank (``ranks`` in the file: the logging window, RNG last).
    ``cache`` identifies the cache trained against (None without one). It takes the ``run``
    section it acts on and the run's resolved config (plain data: what ``config.yaml`` and the
    checkpoint hold, and what a resume is compared with), not the whole :class:`TrainConfig`.
    """

    def __init__(
        self,
        run: RunConfig,
        dist: D.DistInfo,
        parts: dict[str, Stateful | None],
        rank_parts: dict[str, Stateful],
        cache: dict[str, Any] | None,
        *,
        resolved: dict[str, Any],
    ):
        self.run = run
        self.resolved = resolved
        self.dist = dist
        self.parts = parts
        self.rank_parts = rank_parts
        self.cache = cache
        self.run_dir = Path(run.dir)
        self.path = self.run_dir / "checkpoints" / "last.pt"

    def start(self, metrics: MetricsLog) -> None:
        """Resume from ``last.pt`` (``run.resume`` auto or must) or start afresh (refusing to
        replace a run unless ``run.overwrite``); write the resolved config beside the outputs."""
        resume = self.run.resume
        exists = self.path.is_file()
        if resume == "must" and not exists:
            raise CheckpointError(f"--resume: no checkpoint at {self.path}")
        if resume == "never" and exists and not self.run.overwrite:
            raise ConfigError(
                f"run.dir: {str(self.run_dir)!r} already holds a run ({self.path.name}); "
                "resume it with --resume (run.resume=auto), start over with run.overwrite=true, "
                "or choose another run.dir"
            )
        D.barrier()
        if resume != "never" and exists:
            metrics.start(resume_step=self.load())
        elif self.dist.is_main:
            self._fresh(metrics)
            metrics.start(resume_step=None)
        if self.dist.is_main:
            (self.run_dir / "config.yaml").write_text(
                yaml.safe_dump(self.resolved, sort_keys=False)
            )
        D.barrier()

    def _fresh(self, metrics: MetricsLog) -> None:
        """An empty run: the outputs of a replaced run (``run.overwrite``) go first."""
        (self.run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        for path in (metrics.path, self.run_dir / "summary.json", self.path):
            path.unlink(missing_ok=True)
        shutil.rmtree(metrics.tb_dir, ignore_errors=True)

    def save(self) -> None:
        """Write ``last.pt`` (a collective: every rank sends its rank parts to rank 0)."""
        ranks = D.all_gather_object({n: p.state_dict() for n, p in self.rank_parts.items()})
        if not self.dist.is_main:
            return
        payload = {
            "format": CKPT_FORMAT,
            "version": CKPT_VERSION,
            "config": self.resolved,
            "world_size": self.dist.world_size,
            **{n: None if p is None else p.state_dict() for n, p in self.parts.items()},
            "ranks": ranks,
            "cache": self.cache,
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        torch.save(payload, tmp)
        os.replace(tmp, self.path)  # atomic: a kill mid-save leaves the previous last.pt

    def load(self) -> int:
        """Restore every part from ``last.pt`` after its checks; the checkpoint's global step."""
        ckpt = load_resume_checkpoint(self.path, self.resolved, self.dist.world_size)
        self._check_cache(ckpt.get("cache"))
        for name, part in self.parts.items():
            if part is not None:
                part.load_state_dict(ckpt[name])
        own = ckpt["ranks"][self.dist.rank]
        for name, part in self.rank_parts.items():
            part.load_state_dict(own[name])
        state = ckpt["state"]
        log.info(
            "resumed %s at epoch %d, step %d of the epoch (global step %d)",
            self.path,
            state["epoch"] + 1,
            state["epoch_step"],
            state["global_step"],
        )
        return state["global_step"]

    def _check_cache(self, saved: dict[str, Any] | None) -> None:
        """Refuse a cache rebuilt between the checkpoint and now (it would train on other data)."""
        current = self.cache
        if saved is None or current is None or not identity_differences(saved, current):
            return
        raise CheckpointError(
            f"{self.path} was trained against another cache than "
            f"{current.get('path')!r} holds now:\n  "
            + "\n  ".join(identity_differences(saved, current))
        )

    def save_model(self, model: nn.Module, name: str) -> None:
        """``checkpoints/<name>``: the model's state dict, loadable with ``checkpoint:``."""
        path = self.run_dir / "checkpoints" / name
        torch.save(model.state_dict(), path)
        log.info("saved %s", path)


def run_cache_identity(store: CacheStore | None, stages: list[StageSpan]) -> dict[str, Any] | None:
    """What the run trains against, so a resume refuses a cache rebuilt in between: the cache's
    identity with the teachers of the stages that it holds (None without a cache)."""
    if store is None:
        return None
    used = sorted({t for s in stages for t in s.members if t in store.teachers})
    return cache_identity(store, used)


def load_resume_checkpoint(path: Path, resolved: dict[str, Any], world_size: int) -> dict[str, Any]:
    """Load ``last.pt`` and refuse it unless format, config (``resolved``: this run's resolved
    config as plain data) and world size fit this run."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises pickle, zip and runtime errors for damaged files
        raise CheckpointError(
            f"{path} (the run's resume checkpoint) cannot be read: it is truncated, damaged or "
            f"not a checkpoint ({short_reason(exc)}); to start over, rerun without --resume and "
            "with run.overwrite=true, or put back a good copy of it"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CKPT_FORMAT:
        raise CheckpointError(f"{path} is not a kdcache training checkpoint")
    if ckpt.get("version") != CKPT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint version {ckpt.get('version')}, "
            f"this kdcache reads {CKPT_VERSION}"
        )
    diffs = config_differences(with_defaults(ckpt["config"]), resolved, RESUME_MUTABLE)
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
