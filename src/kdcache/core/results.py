"""Typed results: what each ``kdcache`` command returns, prints and writes as JSON.

The library functions return these pydantic models; the command line only formats them for people
and writes their JSON where other tools (the demo, the benchmarks, a user's script) read it, never
the printed text:

- ``shards``: a :class:`~kdcache.shards.manifest.Manifest` per split
  (``kdcache.shards.writing.make_*_shards``) -> ``<out>/<prefix>-manifest.json``;
- ``precompute``: :class:`PrecomputeResult` (``kdcache.pipeline.runner.precompute``) -> the run
  record ``<cache>/runs/<run id>.json``;
- ``train``: :class:`TrainResult` (``kdcache.train.trainer.train``) -> ``<run.dir>/summary.json``;
- ``validate``, ``verify``, ``inspect``: :class:`ValidateResult`, :class:`VerifyResult`,
  :class:`InspectResult` (:mod:`kdcache.cache_tools`) -> ``--json FILE``;
- ``demo``: ``DemoResult`` (:mod:`kdcache.cli.demo`) -> ``<out>/summary.json``;
- ``bench``: each benchmark's results (``benchmarks/``) -> ``--json FILE``.

Every result reads back with ``Result.read(path)``; fields a newer kdcache adds are ignored by an
older reader.

**Run records.** Each precompute run that runs shard tasks leaves one record inside the cache,
``<cache>/runs/<UTC time>-<host>-<pid>.json`` (:class:`PrecomputeResult`: config digest and the
resolved config with credentials redacted, teachers, shard tasks done and failed, views, bytes,
wall and busy seconds, versions), written by the driver at the end of the run, also when shards
failed or the run stopped on an error; workers never write it, and the writer lock keeps one
driver per cache. A run that finds nothing to do leaves none. ``runs/`` is outside the Zarr
hierarchy (it has no ``zarr.json``): kdcache's readers never list the cache's root, so they never
see it; Zarr's own listing of the root (``group.members()``) warns that it does not recognise
``runs`` and goes on. :func:`read_run_records` lists a cache's records, oldest first.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import re
from importlib import metadata
from pathlib import Path
from typing import Any, Literal, TypeVar, cast

import fsspec
from fsspec.core import OpenFile
from pydantic import BaseModel, ConfigDict, Field, ValidationError, computed_field

from kdcache.core.errors import ResultError
from kdcache.core.inspect_report import PairReport, TeacherReport

RUNS = "runs"
"""The folder of run records inside a cache."""
RUN_RECORD_VERSION = 1
VERSIONED = ("torch", "torchvision", "timm", "zarr", "numpy", "ray", "webdataset", "pydantic")
"""Packages whose versions a run record names (those installed)."""
R = TypeVar("R", bound="Result")


class Result(BaseModel):
    """A command's result. ``to_json()`` is what the command writes; ``read`` reads it back."""

    model_config = ConfigDict(extra="ignore")

    def to_json(self, indent: int = 2) -> str:
        return self.model_dump_json(indent=indent) + "\n"

    def write(self, path: str | os.PathLike, storage_options: dict | None = None) -> str:
        """Write :meth:`to_json` to ``path`` (a local path or an fsspec URL), whole: locally
        through a temporary file renamed into place, so a reader never sees half of it."""
        write_text(str(path), self.to_json(), storage_options)
        return str(path)

    @classmethod
    def read(cls: type[R], path: str | os.PathLike, storage_options: dict | None = None) -> R:
        """The result written at ``path``; a ResultError when it cannot be read or is not one."""
        try:
            # a cast: fsspec.open is unannotated, so pyright infers a list too (one path: one file)
            opened = cast(OpenFile, fsspec.open(str(path), "r", **(storage_options or {})))
            with opened as f:
                text = f.read()
        except OSError as exc:
            raise ResultError(f"cannot read {str(path)!r}: {exc}") from None
        try:
            return cls.model_validate_json(text)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(map(str, first["loc"])) or "(the document)"
            raise ResultError(
                f"{str(path)!r} is not a {cls.__name__}: {exc.error_count()} problem(s), "
                f"e.g. {where}: {first['msg']}"
            ) from None


def write_text(path: str, text: str, storage_options: dict | None = None) -> None:
    """``text`` at ``path``: a local file through a temporary file renamed into place (parents
    created), a URL with one put (an object store's put is whole)."""
    if "://" in path:
        fs, root = fsspec.core.url_to_fs(path, **(storage_options or {}))
        fs.pipe_file(root, text.encode())
        return
    target = Path(path).expanduser()
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    temporary.write_text(text)
    os.replace(temporary, target)


# ---- precompute ---------------------------------------------------------------------------------


class TeacherRun(BaseModel):
    """A teacher that a precompute run computed."""

    model_config = ConfigDict(extra="ignore")

    name: str
    model: str
    """The model's name in its spec (its checkpoint, if any, is in the run's ``config``)."""
    k: int
    weights_digest: str
    rendering: str = ""
    """How it rendered the views, each field with its source (config, recipe, timm
    pretrained_cfg, checkpoint)."""
    views_checked: int = 0
    """Views of this run with a label: the teacher check's sample (mixed views count for the
    label with the larger weight)."""
    views_correct: int = 0
    unmixed_checked: int = 0
    """Of them, views that mix no second image."""
    unmixed_correct: int = 0
    check: str = ""
    """The teacher check: ``passed``, ``not judged: ...``, ``accepted: ...`` or ``failed: ...``."""

    @property
    def top1(self) -> float | None:
        """Top-1 on the views this run computed (None: none had a label)."""
        return self.views_correct / self.views_checked if self.views_checked else None

    @property
    def top1_unmixed(self) -> float | None:
        """Top-1 on the unmixed views this run computed."""
        return self.unmixed_correct / self.unmixed_checked if self.unmixed_checked else None

    def add_counts(self, counts: tuple[int, int, int, int]) -> None:
        """Add a shard's (correct, checked, unmixed correct, unmixed checked)."""
        self.views_correct += counts[0]
        self.views_checked += counts[1]
        self.unmixed_correct += counts[2]
        self.unmixed_checked += counts[3]


PrecomputeStatus = Literal["running", "complete", "shards_failed", "error", "nothing_to_do"]


class PrecomputeResult(Result):
    """What one precompute run did: its run record, ``<cache>/runs/<run_id>.json``.

    ``status``: ``complete`` (every shard task done), ``shards_failed`` (``shards_failed`` names
    them and why; a rerun redoes exactly them), ``error`` (the run stopped: ``error`` says why),
    ``nothing_to_do`` (every shard was complete: no record is written).
    """

    format_version: int = RUN_RECORD_VERSION
    run_id: str = ""
    """``<UTC start time>-<host>-<pid>``, e.g. ``20250301T101502.123Z-gpu-node-3-4242``; names the
    record file (records sort by it in time order)."""
    cache_path: str
    status: PrecomputeStatus = "running"
    error: str = ""
    started: str = ""
    """UTC start time, ISO 8601."""
    finished: str = ""
    host: str = ""
    pid: int = 0
    config_digest: str = ""
    """``sha256:`` of the resolved config (:func:`config_digest`), credentials redacted."""
    config: dict[str, Any] = Field(default_factory=dict)
    """The resolved config, ``storage_options`` values redacted."""
    versions: dict[str, str] = Field(default_factory=dict)
    """Python, kdcache and the packages that make the numbers (:func:`versions`)."""
    teachers: list[TeacherRun] = Field(default_factory=list)
    """The teachers this run computed."""
    num_shards: int = 0
    """Shards in the cache."""
    num_views: int = 0
    """A, views per sample."""
    tasks: int = 0
    """Shard tasks planned (shards lacking their views or a teacher's targets)."""
    shards_done: list[str] = Field(default_factory=list)
    """The shards whose task finished, in the order they did."""
    shards_failed: dict[str, str] = Field(default_factory=dict)
    """Shard -> why its task failed (its marks are not set)."""
    made_view_shards: int = 0
    """Finished shard tasks that made the shard's views (the others reused stored views)."""
    views: int = 0
    """Views the teachers processed (each counted once, however many teachers ran)."""
    invalid_views: int = 0
    forward_seconds: float = 0.0
    """Teacher forward time summed over the actors."""
    wall_seconds: float = 0.0
    busy_seconds: float = 0.0
    """Seconds since the first actor was up (actor start-up left out)."""
    store_bytes: int = 0
    """Bytes under the cache after the run (0 if it cannot be listed)."""
    cache_views: int = 0
    """Views in the cache: samples x A."""
    cache_teachers: int = 0
    """Teachers in the cache (all of them, not only this run's)."""
    incomplete: dict[str, list[str]] = Field(default_factory=dict)
    """After the run: ``views`` or a teacher of this run -> its shards still without a
    completion mark (empty: all complete)."""

    @property
    def done(self) -> int:
        return len(self.shards_done)

    @property
    def failed(self) -> int:
        return len(self.shards_failed)

    @property
    def ok(self) -> bool:
        return self.status in ("complete", "nothing_to_do")

    @property
    def views_per_s(self) -> float:
        """Views per second over the whole run (Ray start-up included)."""
        return self.views / self.wall_seconds if self.wall_seconds else 0.0

    @property
    def busy_views_per_s(self) -> float:
        """Views per second once the actors were up."""
        return self.views / self.busy_seconds if self.busy_seconds else 0.0

    @property
    def bytes_per_view(self) -> float:
        """Cache bytes per view per teacher (the whole store: view parameters included)."""
        return self.store_bytes / max(1, self.cache_views * max(1, self.cache_teachers))

    def record_path(self) -> str:
        """Where this run's record is (or goes): ``<cache>/runs/<run_id>.json``."""
        return run_record_path(self.cache_path, self.run_id)


def run_id(started: _dt.datetime, host: str, pid: int) -> str:
    """``<UTC time to the millisecond>-<host>-<pid>``: sortable in time, unique per driver (the
    writer lock allows one per cache at a time)."""
    utc = started.astimezone(_dt.UTC)
    stamp = f"{utc:%Y%m%dT%H%M%S}.{utc.microsecond // 1000:03d}Z"
    return f"{stamp}-{re.sub(r'[^A-Za-z0-9-]+', '-', host) or 'host'}-{pid}"


def run_record_path(cache_path: str, run: str) -> str:
    return f"{cache_path.rstrip('/')}/{RUNS}/{run}.json"


def read_run_records(
    cache_path: str, storage_options: dict | None = None
) -> list[PrecomputeResult]:
    """The run records of a cache, oldest first ([] when there are none)."""
    fs, root = fsspec.core.url_to_fs(cache_path, **(storage_options or {}))
    folder = f"{root.rstrip('/')}/{RUNS}"
    try:
        names = sorted(p for p in fs.ls(folder, detail=False) if str(p).endswith(".json"))
    except FileNotFoundError:
        return []
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    prefix = "" if protocol in ("file", "local") else f"{protocol}://"
    return [PrecomputeResult.read(f"{prefix}{name}", storage_options) for name in names]


def config_digest(config: dict[str, Any]) -> str:
    """``sha256:<hex>`` of a config's canonical JSON (sorted keys, no spaces)."""
    text = json.dumps(config, sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def versions() -> dict[str, str]:
    """Python, kdcache and the installed packages of :data:`VERSIONED`."""
    from kdcache import __version__

    found = {"python": platform.python_version(), "kdcache": __version__}
    for name in VERSIONED:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def utc_now() -> _dt.datetime:
    return _dt.datetime.now(_dt.UTC)


def iso(moment: _dt.datetime) -> str:
    return moment.astimezone(_dt.UTC).isoformat(timespec="milliseconds")


def host_and_pid() -> tuple[str, int]:
    return platform.node() or "host", os.getpid()


# ---- train --------------------------------------------------------------------------------------


class Selection(BaseModel):
    """What a run trained on when it did not train on every sample (``summary.json``)."""

    model_config = ConfigDict(extra="ignore")

    by: str | None = None
    """``entropy_high``, ``entropy_low``, ``random``; None: only classes excluded."""
    teacher: str | None = None
    temperature: float | None = None
    per_class: int | None = None
    seed: int = 0
    excluded_classes: list[int] = []
    samples: int = 0
    """Samples kept (of the training shards' valid rows)."""
    counts: dict[str, int] = {}
    """Class -> samples kept (every labelled class present in the training shards)."""
    keys: list[str] | None = None
    """With ``select``: the keys kept, by class then rank; None with exclusion only."""


class TrainResult(Result):
    """What a ``kdcache train`` run did: ``<run.dir>/summary.json`` (written by the main rank)."""

    mode: str
    """``teacher.mode``: ``cache``, ``online`` or ``none``."""
    epochs: int
    """Epochs done."""
    steps: int
    completed: bool
    """Every epoch of every stage done (False when ``run.max_steps`` stopped it)."""
    top1: float | None
    """The last evaluation's top-1 accuracy in percent (None: not evaluated)."""
    top5: float | None
    eval_loss: float | None
    ema_top1: float | None
    """Top-1 of the EMA weights, with ``run.ema``."""
    sftn_branch_top1: list[float] | None = None
    """SFTN teacher runs: each student branch's top-1 in percent at the last evaluation, the
    branch after the teacher's first stage first (None: no branches, or not evaluated)."""
    images: int
    """Training images seen, all ranks."""
    images_per_s: float
    """Training images per second of training time (evaluation left out)."""
    train_time_s: float
    time_s: float
    """Wall seconds of the whole run in this process."""
    teacher_forwards: int
    """Views the teacher ran on (online mode; 0 from a cache)."""
    invalid_rows_skipped_per_epoch: int
    nonfinite_steps_skipped: int = 0
    """Steps skipped, without an update, for a NaN or inf loss (``run.on_nonfinite: skip``)."""
    world_size: int
    device: str
    run_dir: str
    per_class_top1: list[float | None] | None = None
    """The last evaluation's top-1 (percent) of each class (None: no validation sample)."""
    selection: Selection | None = None
    """``data.select`` / ``data.exclude_classes``: what the run trained on (None: everything)."""


# ---- validate and verify ------------------------------------------------------------------------


class ValidateResult(Result):
    """What ``kdcache validate`` found: counts, and every problem (none: the cache is valid)."""

    cache: str = ""
    teachers: list[str] = Field(default_factory=list)
    """The teachers checked."""
    shards: int = 0
    views: int = 0
    """Valid views of the shards marked complete for their views."""
    invalid_rows: int = 0
    problems: list[str] = Field(default_factory=list)

    @computed_field
    @property
    def ok(self) -> bool:
        return not self.problems


class TeacherVerify(BaseModel):
    """One teacher's recomputed views against its cached ones."""

    model_config = ConfigDict(extra="ignore")

    teacher: str
    views: int
    max_abs_delta: float
    """Largest |fresh - cached| logit at the cached indices."""
    max_excess: float
    """Largest amount by which a logit's difference exceeds its tolerance (<= 0: none does)."""
    max_lse_delta: float
    max_tail_delta: float
    """Largest |fresh - cached| tail mass (probability outside the top-k at T=1)."""
    topk_agreement: float
    top1_agreement: float
    failures: int
    """Views beyond tolerance (logits, tail, or a top-k set that differs without a tie)."""
    draws_agreement: float | None = None
    """Encoding ``sampled``: the fraction of views whose draws came out the same again."""

    @computed_field
    @property
    def ok(self) -> bool:
        return self.failures == 0


class VerifyResult(Result):
    """What ``kdcache verify`` found, per teacher."""

    cache: str = ""
    num: int = 0
    """Views asked for (fewer when the cache holds fewer valid ones)."""
    seed: int = 0
    atol: float = 0.0
    teachers: list[TeacherVerify] = Field(default_factory=list)

    @computed_field
    @property
    def ok(self) -> bool:
        return all(t.ok for t in self.teachers)


# ---- inspect ------------------------------------------------------------------------------------


class InspectCache(BaseModel):
    """The cache an inspect report read."""

    model_config = ConfigDict(extra="ignore")

    path: str
    shards: int
    shards_read: int
    skipped_shards: dict[str, list[str]]
    """``views`` or a teacher -> the shards skipped as incomplete for it."""
    samples: int
    num_views: int
    num_classes: int
    recipe: str


class InspectSettings(BaseModel):
    model_config = ConfigDict(extra="ignore")

    tail: str
    tail_note: str
    temperatures: list[float]
    fine_bins: int
    hist_bins: int
    ece_bins: int
    under_confident_thresholds: list[float]


class InspectResult(Result):
    """``kdcache inspect``'s report; ``teachers`` and ``pairs`` are typed by
    :mod:`kdcache.core.inspect_report` (the schema)."""

    cache: InspectCache
    settings: InspectSettings
    teachers: dict[str, TeacherReport]
    """Teacher -> its figures."""
    pairs: list[PairReport]
    """Teacher against teacher on the same views, one entry per pair."""
    ensembles: list[dict[str, Any]] = []
    """Ensembles against their members (``--ensemble``, and stored ensembles whose models are
    cached), schema in ``cache_tools/ensemble_stats.py``; empty when there are none."""
    sampled: dict[str, dict[str, Any]] = {}
    """Sampled teachers' coverage per view, by teacher; empty when there are none."""
    teacher_checks: list[dict[str, Any]] = []
    """The teacher check of each precompute run recorded in the cache, one entry per run and
    teacher: ``run_id``, ``teacher``, ``top1``, ``top1_unmixed``, ``views``, ``check``,
    ``rendering``."""

    def extras(self) -> dict[str, Any]:
        """The ensembles and sampled teachers' figures
        (:mod:`kdcache.cache_tools.ensemble_stats`)."""
        return {"ensembles": self.ensembles, "sampled": self.sampled}

    def to_json(self, indent: int = 1) -> str:
        return super().to_json(indent)
