"""The precompute driver: Ray actors over the planned shard tasks, progress and a summary.

Locally it starts an embedded Ray (``ray.init(address="local", ...)``) unless this process already
initialised Ray (tests start it once per module; the runner reuses it) or a cluster is named:
``ray.address``, else ``RAY_ADDRESS`` (set by ``ray job submit``). A named cluster is joined before
anything is written (:func:`connect_cluster`): one that cannot be reached is one
:class:`RayClusterError`, and no cache is created. One
:class:`~kdcache.pipeline.worker.ShardWorker` actor per GPU (or N CPU actors), one shard task in
flight on each, fed with ``ray.wait`` to actors that have finished building their teachers.

Like any Ray job, the actors ask Ray for their CPUs and GPUs and wait until it places them (free
resources, or nodes the autoscaler adds): a cluster without room at start is not refused. While
no actor is up the :class:`Dispatcher` logs what it waits for every 30 s, and after
``ray.wait_for_resources_s`` gives up: :class:`ResourcesUnavailableError` when no shard ran.

The :class:`Dispatcher`, not Ray, handles dead actors: a shard whose actor died is retried later
on a fresh actor (``ray.max_task_retries`` times, then it fails by name), and a dead actor is
replaced (``ray.max_restarts`` times per actor slot). A shard that still fails does not stop the
others; at the end :class:`ShardsFailedError` lists the failed shards and why (their marks are
absent, so a rerun redoes exactly them). Without a terminal (no tqdm bar) :class:`Progress` logs
shards done, views/s and the ETA every 30 s. Actors are killed at the end, so several precomputes
can run in one Ray session. :func:`precompute` plans and runs under the cache's writer lock
(``<cache>.lock``): a second precompute on the same cache is refused, naming the holder.

A run returns its :class:`~kdcache.core.results.PrecomputeResult` and, when it ran shard tasks,
writes it into the cache as its run record (``<cache>/runs/<run id>.json``,
:mod:`kdcache.pipeline.record`) at the end: complete, with shards failed (then
:class:`ShardsFailedError` carries it too), or stopped by an error.

Test-only: the fault hook variable of :mod:`kdcache.pipeline.worker` (``KDCACHE_FAULT_CRASH_SHARD``)
is passed on to the actors through ``runtime_env`` when the driver sees it set.
"""

from __future__ import annotations

import logging
import math
import os
import re
import socket
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import fsspec
import ray
import ray.exceptions
from tqdm import tqdm

from kdcache.cache.lock import check_unlocked
from kdcache.core.errors import KdcacheError
from kdcache.core.results import PrecomputeResult
from kdcache.pipeline.cluster import probe_cluster
from kdcache.pipeline.config import PrecomputeConfig, RaySection
from kdcache.pipeline.datapath import FAULT_ENV as DATA_FAULT_ENV
from kdcache.pipeline.plan import (
    PrecomputePlan,
    ShardTask,
    plan_precompute,
    seal_fingerprint,
    writer_lock,
)
from kdcache.pipeline.record import finish, new_result, write_record
from kdcache.pipeline.resources import cpus_per_actor
from kdcache.pipeline.teachercheck import TeacherCheckError, judge
from kdcache.pipeline.worker import FAULT_ENV, ShardResult, ShardWorker, WorkerSettings

logger = logging.getLogger(__name__)

PROGRESS_LOG_SECONDS = 30.0
FIRST_WAIT_LOG_S = 5.0
"""While no shard actor is up, the first "not up after" line comes after this long."""
FORWARDED_ENV = (FAULT_ENV, DATA_FAULT_ENV)


class RayClusterError(KdcacheError, ConnectionError):
    """The Ray cluster named by ``ray.address`` (or ``RAY_ADDRESS``) cannot be reached."""


class ResourcesUnavailableError(KdcacheError, TimeoutError):
    """No shard actor got its resources within ``ray.wait_for_resources_s``."""


class ShardsFailedError(KdcacheError, RuntimeError):
    """Some shards failed after retries; ``failures`` maps shard name to the exception or reason,
    ``result`` is the run's result (its record is in the cache)."""

    def __init__(
        self,
        failures: dict[str, BaseException | str],
        total: int,
        result: PrecomputeResult | None = None,
    ):
        self.failures = failures
        self.result = result
        groups: dict[str, list[str]] = {}
        for name, why in sorted(failures.items()):
            groups.setdefault(describe_failure(why), []).append(name)
        lines = [f"{_names(names)}: {why}" for why, names in groups.items()]
        super().__init__(
            f"{len(failures)} of {total} shard task(s) failed (their marks are not set; "
            "a rerun redoes them):\n  " + "\n  ".join(lines)
        )


def _names(names: list[str], most: int = 4) -> str:
    shown = ", ".join(names[:most])
    return shown if len(names) <= most else f"{shown} and {len(names) - most} more"


def describe_failure(why: BaseException | str) -> str:
    if isinstance(why, str):
        return why
    return f"{type(why).__name__}: {why}"


def worker_settings(cfg: PrecomputeConfig, plan: PrecomputePlan) -> WorkerSettings:
    cpus = cfg.ray.cpus_per_actor or 1.0  # actor_factory sets the resolved count
    threads = cfg.runtime.torch_threads or max(1, int(cpus))
    return WorkerSettings(
        cache_path=plan.cache_path,
        storage_options=dict(cfg.cache.storage_options),
        data_storage_options=dict(cfg.data.storage_options),
        recipe=cfg.cache.recipe,
        num_views=cfg.cache.num_views,
        seed=cfg.cache.seed,
        num_classes=plan.num_classes,
        on_error=cfg.data.on_error,
        label_key=cfg.data.label_key,
        max_pixels=cfg.data.max_pixels,
        teachers=tuple(plan.teachers),
        runtime=cfg.runtime,
        torch_threads=threads,
        cpus=cpus,
        data_workers=cfg.runtime.data_workers,
    )


def precompute(
    cfg: PrecomputeConfig, progress: bool | None = None
) -> tuple[PrecomputePlan, PrecomputeResult]:
    """Join the named Ray cluster (before anything is written), then plan and run under the
    cache's writer lock: the plan, and the run's result (status ``nothing_to_do``, and no run
    record, when every shard was complete)."""
    started = connect_cluster(cfg.ray)
    try:
        with writer_lock(cfg):
            plan = plan_precompute(cfg)
            if not plan.tasks:
                return plan, finish(new_result(cfg, plan), "nothing_to_do")
            return plan, run_precompute(cfg, plan, progress)
    finally:
        if started:
            ray.shutdown()


def run_precompute(
    cfg: PrecomputeConfig, plan: PrecomputePlan, progress: bool | None = None
) -> PrecomputeResult:
    """Run every planned shard task on Ray actors and write the run record; raise
    ShardsFailedError (with the result) if any failed."""
    check_unlocked(plan.cache_path, cfg.cache.storage_options or None)
    start = time.perf_counter()
    summary = new_result(cfg, plan)
    options = cfg.cache.storage_options
    try:
        failures = _run_tasks(cfg, plan, summary, progress)
    except Exception as exc:  # the record says how the run ended, then the error goes on
        summary.wall_seconds = time.perf_counter() - start
        write_record(finish(summary, "error", describe_failure(exc)), options)
        raise
    summary.shards_failed = {name: describe_failure(why) for name, why in sorted(failures.items())}
    summary.wall_seconds = time.perf_counter() - start
    _describe_cache(plan, cfg, summary)
    try:
        check_teachers(cfg, plan, summary, final=True)
    except TeacherCheckError as exc:
        write_record(finish(summary, "error", str(exc)), options)
        raise
    write_record(finish(summary, "shards_failed" if failures else "complete"), options)
    if failures:
        raise ShardsFailedError(failures, len(plan.tasks), summary)
    return summary


def check_teachers(
    cfg: PrecomputeConfig, plan: PrecomputePlan, summary: PrecomputeResult, final: bool
) -> None:
    """The teacher check (:mod:`kdcache.pipeline.teachercheck`) on the counts so far."""
    resolved = {t.name: t for t in plan.teachers}
    judge(summary.teachers, resolved, cfg.teachers, plan.num_classes, final)


def _run_tasks(
    cfg: PrecomputeConfig, plan: PrecomputePlan, summary: PrecomputeResult, progress: bool | None
) -> dict[str, BaseException | str]:
    """The shard tasks on Ray actors (an embedded Ray unless one is up); seal the fingerprint
    when none failed. Returns the failures."""
    failures: dict[str, BaseException | str] = {}
    if plan.tasks and runs_in_process(cfg, plan):
        failures = _run_local(cfg, plan, summary, progress)
    elif plan.tasks:
        started = ensure_ray(cfg.ray)
        try:
            failures = _run_actors(cfg, plan, summary, progress)
        finally:
            if started:
                ray.shutdown()
    if not failures:
        seal_fingerprint(plan.store)  # every shard's keys are stored now
    return failures


SMALL_JOB_VIEWS = 20_000
"""``ray.mode: auto`` runs a job of at most this many views to compute in this process."""


def runs_in_process(cfg: PrecomputeConfig, plan: PrecomputePlan) -> bool:
    """Whether the shard tasks run here, without Ray (``ray.mode``)."""
    if cfg.ray.mode != "auto":
        return cfg.ray.mode == "local"
    if ray.is_initialized() or cluster_address(cfg.ray):
        return False
    if any(name in os.environ for name in FORWARDED_ENV):  # fault tests crash actors
        return False
    views = sum(task.count for task in plan.tasks) * cfg.cache.num_views
    return views <= SMALL_JOB_VIEWS


def local_cpus() -> int:
    """CPUs this process may use (its affinity, else the machine's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _run_local(
    cfg: PrecomputeConfig, plan: PrecomputePlan, summary: PrecomputeResult, progress: bool | None
) -> dict[str, BaseException | str]:
    """Every shard task in this process with one worker (every CPU for its torch threads, its
    data path in a background thread unless ``runtime.data_workers`` says otherwise). A shard
    that raises fails alone, as on an actor."""
    settings = worker_settings(cfg, plan).for_actor(float(local_cpus()))
    settings = replace(settings, data_workers=cfg.runtime.data_workers or 0)
    logger.info(
        "running %d shard task(s) in this process (ray.mode: %s; set ray.mode: ray for Ray actors)",
        len(plan.tasks),
        cfg.ray.mode,
    )
    shown = Progress(
        summary,
        len(plan.tasks),
        enabled=sys.stderr.isatty() if progress is None else progress,
        check=lambda final: check_teachers(cfg, plan, summary, final),
    )
    failures: dict[str, BaseException | str] = {}
    worker = ShardWorker(settings)
    try:
        ready = time.perf_counter()
        shown.actors_up()
        for task in plan.tasks:
            try:
                result = worker(task)
            except Exception as exc:  # noqa: BLE001  (as a failed task on an actor)
                failures[task.name] = exc
                shown.shard_failed(task.name)
                continue
            shown.shard_done(result)
        summary.busy_seconds = time.perf_counter() - ready
    finally:
        worker.close()
        shown.close()
    return failures


def wait_log_interval(limit: float | None) -> float:
    """Seconds between "not up after" lines: every 30 s, a few times for short limits."""
    return PROGRESS_LOG_SECONDS if limit is None else min(PROGRESS_LOG_SECONDS, max(1.0, limit / 3))


def _run_actors(
    cfg: PrecomputeConfig, plan: PrecomputePlan, summary: PrecomputeResult, progress: bool | None
) -> dict:
    fits = fits_now(cfg.ray)  # before the actors take the free resources
    count, new_actor = actor_factory(cfg.ray, worker_settings(cfg, plan), len(plan.tasks))
    wait_log_s = wait_log_interval(cfg.ray.wait_for_resources_s)
    shown = Progress(
        summary,
        len(plan.tasks),
        enabled=sys.stderr.isatty() if progress is None else progress,
        check=lambda final: check_teachers(cfg, plan, summary, final),
    )
    dispatcher = Dispatcher(
        new_actor,
        count,
        plan.tasks,
        shown.shard_done,
        retries=cfg.ray.max_task_retries,
        replacements=cfg.ray.max_restarts,
        on_failure=shown.shard_failed,
        on_first_ready=shown.actors_up,
        wait_limit=cfg.ray.wait_for_resources_s,
        wait_reason=lambda: resource_needs(cfg.ray),
        wait_log_s=wait_log_s,
        first_wait_log_s=wait_log_s if fits else FIRST_WAIT_LOG_S,
    )
    try:
        failures = dispatcher.run()
        if dispatcher.first_ready is not None:
            summary.busy_seconds = time.perf_counter() - dispatcher.first_ready
        if dispatcher.timed_out and not summary.shards_done:
            raise ResourcesUnavailableError(
                f"{dispatcher.timed_out}; no shard was processed (a rerun resumes)"
            )
        return failures
    finally:
        shown.close()
        dispatcher.close()


class Progress:
    """Progress of the shard tasks: a tqdm bar on a terminal, else log lines.

    Without the bar (stderr not a terminal: cluster logs, nohup, CI; or ``progress=False``), each
    shard is logged at INFO, and at most every ``interval`` seconds, and for the last shard, a line
    with the shards done out of all, views/s and the ETA, both over the time since the first actor
    was up (actor start-up left out, as in the summary's "views/s once actors were up").
    """

    def __init__(
        self,
        summary: PrecomputeResult,
        total: int,
        enabled: bool,
        interval: float = PROGRESS_LOG_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        check: Callable[[bool], None] | None = None,
    ):
        self.summary = summary
        self.check = check
        """The teacher check, after each shard (``final`` false: it may stop the run early)."""
        self.total = total
        self.interval = interval
        self.clock = clock
        self.bar = tqdm(
            total=total, unit="shard", desc="precompute", dynamic_ncols=True, disable=not enabled
        )
        self.start = self.last_line = clock()
        self.failed = 0

    def actors_up(self) -> None:
        """The first actor is ready: the time counts from here."""
        self.start = self.last_line = self.clock()

    def shard_done(self, result: ShardResult) -> None:
        summary = self.summary
        summary.shards_done.append(result.shard)
        summary.views += result.views
        summary.invalid_views += result.invalid_views
        summary.made_view_shards += int(result.made_views)
        summary.forward_seconds += result.forward_seconds
        for run in summary.teachers:
            run.add_counts(result.top1.get(run.name, (0, 0, 0, 0)))
        logger.log(
            logging.DEBUG if not self.bar.disable else logging.INFO,
            "shard %s done (%d/%d): %d views, %d invalid, %.1f s (teacher forward %.1f s)",
            result.shard,
            summary.done,
            self.total,
            result.views,
            result.invalid_views,
            result.seconds,
            result.forward_seconds,
        )
        self._advance()
        if self.check is not None:
            self.check(False)

    def shard_failed(self, name: str) -> None:
        self.failed += 1
        self._advance()

    def close(self) -> None:
        self.bar.close()

    def line(self) -> str:
        """``precompute: 12/40 shards done (1 failed), 2100 views/s, 1m02s elapsed, ETA 3m10s``."""
        elapsed = max(self.clock() - self.start, 1e-9)
        settled = self.summary.done + self.failed
        eta = _duration(elapsed / settled * (self.total - settled)) if settled else "unknown"
        failed = f" ({self.failed} failed)" if self.failed else ""
        return (
            f"precompute: {self.summary.done}/{self.total} shards done{failed}, "
            f"{self.summary.views / elapsed:.0f} views/s, {_duration(elapsed)} elapsed, ETA {eta}"
        )

    def _advance(self) -> None:
        self.bar.update(1)
        if not self.bar.disable:
            elapsed = self.bar.format_dict.get("elapsed") or 0.0
            failed = f", {self.failed} failed" if self.failed else ""
            self.bar.set_postfix_str(
                f"{self.summary.views / elapsed:.0f} views/s{failed}" if elapsed else failed
            )
            return
        now = self.clock()
        last = self.summary.done + self.failed == self.total
        if last or now - self.last_line >= self.interval:
            self.last_line = now
            logger.info("%s", self.line())


def _duration(seconds: float) -> str:
    """``45s``, ``3m05s``, ``2h07m``."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def ensure_ray(section: RaySection) -> bool:
    """Initialise Ray unless this process already did; True if this call started it."""
    if ray.is_initialized():
        return False
    if cluster_address(section):
        return connect_cluster(section)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # local only: no ~/.ray/auth_token
    # num_cpus / num_gpus left to Ray, which reads the cgroup CPU quota and CUDA_VISIBLE_DEVICES
    ray.init(
        address="local",
        include_dashboard=False,
        _temp_dir=section.temp_dir,
        logging_level=logging.WARNING,
    )
    return True


def cluster_address(section: RaySection) -> str | None:
    """The cluster to join: ``ray.address``, else ``RAY_ADDRESS`` (``ray job submit`` sets it for
    its entrypoint); None: an embedded local Ray."""
    address = section.address or os.environ.get("RAY_ADDRESS") or None
    return None if address == "local" else address


def connect_cluster(section: RaySection) -> bool:
    """Join the named cluster unless Ray is initialised or none is named; True if this call
    connected. A cluster that cannot be reached is one :class:`RayClusterError`."""
    address = cluster_address(section)
    if address is None or ray.is_initialized():
        return False
    where = f"{address!r}" + ("" if section.address else " (RAY_ADDRESS; ray.address is unset)")
    hint = (
        "start one (`ray start --head`), correct ray.address, or leave it unset for an embedded "
        "local Ray"
    )
    problem = unreachable(address, section.connect_timeout_s)
    problem = problem or probe_cluster(address, section.connect_timeout_s)
    if problem is None:
        try:
            ray.init(address=address, logging_level=logging.WARNING)
            return True
        except (ConnectionError, TimeoutError, ValueError, RuntimeError) as exc:
            problem = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    raise RayClusterError(f"ray.address: cannot reach a Ray cluster at {where}: {problem}; {hint}")


def unreachable(address: str, timeout_s: float) -> str | None:
    """Why ``host:port`` (or ``ray://host:port``) does not accept a connection, None if it does
    or the address is not of that form (``auto``: Ray's own discovery fails fast). Ray itself
    retries an unreachable address for minutes."""
    if address == "auto":
        address = os.environ.get("RAY_ADDRESS") or address
    host, _, port = address.split("://", 1)[-1].rpartition(":")
    if not host or not port.isdigit():
        return None
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout_s).close()
    except OSError as exc:
        return f"{host}:{port} does not accept connections ({exc.strerror or exc})"
    return None


def actor_layout(section: RaySection, num_tasks: int) -> tuple[int, float, float]:
    """(number of actors, CPUs per actor, GPUs per actor) for this cluster.

    Actors that do not fit now are still created: Ray places them when resources free up or the
    autoscaler adds nodes (the dispatcher waits, see ``ray.wait_for_resources_s``)."""
    resources = ray.cluster_resources()
    cpus_total = float(resources.get("CPU", 0))
    gpus_total = float(resources.get("GPU", 0))
    gpus = (
        section.gpus_per_actor
        if section.gpus_per_actor is not None
        else (1.0 if gpus_total else 0.0)
    )
    cpus = cpus_per_actor(section.cpus_per_actor, gpus)
    fit = math.floor(cpus_total / cpus)
    if gpus:
        fit = min(fit, math.floor(gpus_total / gpus))
    wanted = section.num_actors or max(1, fit)
    count = max(1, min(wanted, num_tasks))
    if fit < count:
        logger.warning(
            "%d shard actor(s) of %g CPU and %g GPU each, but %d fit the cluster now (%g CPU, "
            "%g GPU): the others wait for Ray to place them (free resources or the autoscaler)",
            count,
            cpus,
            gpus,
            fit,
            cpus_total,
            gpus_total,
        )
    return count, cpus, gpus


def resource_needs(section: RaySection) -> str:
    """What a shard actor asks for and what the cluster has now (for the waiting messages)."""
    total = ray.cluster_resources()
    free = ray.available_resources()
    gpus = section.gpus_per_actor
    if gpus is None:
        gpus = 1.0 if total.get("GPU", 0) else 0.0
    cpus = cpus_per_actor(section.cpus_per_actor, gpus)
    return (
        f"each shard actor needs {cpus:g} CPU and {gpus:g} GPU "
        "(ray.cpus_per_actor, ray.gpus_per_actor); the cluster has "
        f"{total.get('CPU', 0):g} CPU ({free.get('CPU', 0):g} free) and "
        f"{total.get('GPU', 0):g} GPU ({free.get('GPU', 0):g} free)"
    )


def fits_now(section: RaySection) -> bool:
    """Whether one shard actor fits the cluster's free resources now (then a slow first actor is
    building its teachers, not waiting for Ray)."""
    free = ray.available_resources()
    gpus = section.gpus_per_actor
    if gpus is None:
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) else 0.0
    cpus = cpus_per_actor(section.cpus_per_actor, gpus)
    return free.get("CPU", 0) >= cpus and free.get("GPU", 0) >= gpus


def actor_factory(
    section: RaySection, settings: WorkerSettings, num_tasks: int
) -> tuple[int, Callable[[], Any]]:
    """How many shard actors to run, and a function that creates one (not waiting for it: the
    dispatcher does).

    Ray neither restarts these actors nor retries their tasks (``max_restarts=0``,
    ``max_task_retries=0``): the :class:`Dispatcher` counts each shard's attempts and replaces a
    dead actor itself, within ``ray.max_task_retries`` and ``ray.max_restarts``.
    """
    count, cpus, gpus = actor_layout(section, num_tasks)
    settings = settings.for_actor(cpus)
    env = {name: os.environ[name] for name in FORWARDED_ENV if name in os.environ}
    options: dict[str, Any] = dict(num_cpus=cpus, num_gpus=gpus, max_restarts=0, max_task_retries=0)
    if env:
        options["runtime_env"] = {"env_vars": env}
    remote = ray.remote(ShardWorker).options(**options)
    logger.info("starting %d shard actor(s), %g CPU and %g GPU each", count, cpus, gpus)
    return count, lambda: remote.remote(settings)


@dataclass
class Slot:
    """One actor slot of the dispatcher: its current actor, and how often that was replaced."""

    index: int
    actor: Any = None
    """The current actor; None after it died or could not start (until it is replaced)."""
    ready: bool = False
    busy: bool = False
    """A shard task is in flight on the actor (at most one)."""
    replacements: int = 0
    gone: str = ""
    """Why the slot gets no further actor: its constructor raised, or its replacements are spent."""


class Dispatcher:
    """Runs shard tasks on actor slots, one task in flight per actor, and collects the results.

    One task in flight makes a death exact: the actor died running that shard, never one queued
    behind it (the worker prefetches views within a shard, so a second queued task would only
    save a round trip per shard). Budgets:

    * a shard whose actor died goes back to the end of the queue, for a fresh actor or another
      one; after ``retries + 1`` attempts (``ray.max_task_retries``) it fails, naming the shard;
    * a slot whose actor died gets a fresh actor while shards wait, ``replacements`` times over
      the run (``ray.max_restarts``); then the slot is given up. An actor whose constructor raised
      is not replaced (a fresh one would fail the same way);
    * a shard task that raises fails at once (the same data would fail the same way again).

    Shards still queued when no slot is left fail with "no shard actor left to run it".

    While no actor is up (all still waiting for Ray to place them, or building their teachers)
    it logs ``wait_reason()`` every ``wait_log_s``; after ``wait_limit`` seconds of that it gives
    the waiting slots up (``timed_out`` says why) and the queued shards fail.
    """

    def __init__(
        self,
        new_actor: Callable[[], Any],
        count: int,
        tasks: list[ShardTask],
        on_result: Callable[[ShardResult], None],
        retries: int = 0,
        replacements: int = 0,
        on_failure: Callable[[str], None] | None = None,
        on_first_ready: Callable[[], None] | None = None,
        wait_limit: float | None = None,
        wait_reason: Callable[[], str] = lambda: "",
        wait_log_s: float = PROGRESS_LOG_SECONDS,
        first_wait_log_s: float = FIRST_WAIT_LOG_S,
    ):
        self.new_actor = new_actor
        self.on_result = on_result
        self.on_failure = on_failure
        self.on_first_ready = on_first_ready
        self.queue = deque(tasks)
        self.retries = retries
        self.replacements = replacements
        self.slots = [Slot(index) for index in range(count)]
        self.pending: dict[Any, tuple[Slot, ShardTask | None]] = {}
        self.attempts: dict[str, int] = {}
        self.failures: dict[str, BaseException | str] = {}
        self.created: list[Any] = []
        self.first_ready: float | None = None
        self.wait_limit = wait_limit
        self.wait_reason = wait_reason
        self.wait_log_s = wait_log_s
        self.first_wait_log_s = first_wait_log_s
        """Before the first "not up" line: short when the actors did not fit the free resources
        at start (something to tell), else a whole ``wait_log_s`` (they are building
        teachers)."""
        self.idle_since: float | None = None
        """Since when no actor is up (None: one is)."""
        self.next_wait_log = 0.0
        self.timed_out = ""
        """Why the dispatcher stopped waiting for actors ("" if it did not)."""

    def run(self) -> dict[str, BaseException | str]:
        """Until every task finished or failed; returns the failures."""
        for slot in self.slots:
            self._start(slot)
        while self._busy():
            ready, _ = ray.wait(list(self.pending), num_returns=1, timeout=self._wait_timeout())
            if not ready:
                self._still_waiting()
                continue
            ref = ready[0]
            slot, task = self.pending.pop(ref)
            if task is None:
                self._started(slot, ref)
            else:
                self._finished(slot, task, ref)
            self._replace()
            self._submit()
        self._fail_queued()
        return self.failures

    def close(self) -> None:
        """Kill every actor this dispatcher created (killing a dead one does nothing)."""
        for actor in self.created:
            ray.kill(actor, no_restart=True)

    def _wait_timeout(self) -> float | None:
        """Block until a result while an actor is up; else wake up to log and to time out."""
        if any(slot.ready for slot in self.slots):
            self.idle_since = None
            return None
        now = time.monotonic()
        if self.idle_since is None:
            self.idle_since = now
            self.next_wait_log = now + min(self.first_wait_log_s, self.wait_log_s)
        wake = self.next_wait_log
        if self.wait_limit is not None:
            wake = min(wake, self.idle_since + self.wait_limit)
        return max(0.0, wake - now)

    def _still_waiting(self) -> None:
        """No actor is up yet: log what the run waits for, or give up after ``wait_limit``."""
        now = time.monotonic()
        waited = now - (self.idle_since or now)
        starting = sum(1 for slot in self.slots if slot.actor is not None and not slot.ready)
        if self.wait_limit is not None and waited >= self.wait_limit:
            self.timed_out = (
                f"no shard actor was up within ray.wait_for_resources_s={self.wait_limit:g} s "
                f"({starting} waiting for Ray to place them or building their teachers): "
                f"{self.wait_reason()}"
            )
            for slot in self.slots:
                if slot.actor is not None and not slot.ready:
                    self._give_up(slot, self.timed_out)
            return
        if now >= self.next_wait_log:
            self.next_wait_log = now + self.wait_log_s
            limit = (
                f"giving up after {self.wait_limit:g} s (ray.wait_for_resources_s)"
                if self.wait_limit is not None
                else "waiting as long as it takes (ray.wait_for_resources_s: null)"
            )
            logger.info(
                "shard actors: %d not up after %.0f s, either waiting for Ray to place them "
                "(when resources free up or its autoscaler adds nodes) or building their "
                "teachers; %s; %s",
                starting,
                waited,
                self.wait_reason(),
                limit,
            )

    def _busy(self) -> bool:
        if any(slot.busy for slot in self.slots):
            return True
        return bool(self.queue) and bool(self.pending)  # actors still starting

    def _start(self, slot: Slot) -> None:
        slot.actor = self.new_actor()
        slot.ready = False
        self.created.append(slot.actor)
        self.pending[slot.actor.ready.remote()] = (slot, None)

    def _started(self, slot: Slot, ref: Any) -> None:
        try:
            ray.get(ref)
        except ray.exceptions.RayActorError as exc:
            if exc.actor_init_failed:
                self._give_up(slot, f"actor could not start: {_cause(exc)}")
            else:
                logger.warning("shard actor %d died while starting: %s", slot.index, _cause(exc))
                self._down(slot)
        except ray.exceptions.RayError as exc:
            self._give_up(slot, f"actor could not start: {_cause(exc)}")
        else:
            slot.ready = True
            if self.first_ready is None:
                self.first_ready = time.perf_counter()
                if self.on_first_ready is not None:
                    self.on_first_ready()

    def _finished(self, slot: Slot, task: ShardTask, ref: ray.ObjectRef[ShardResult]) -> None:
        slot.busy = False
        try:
            result = ray.get(ref)
        except ray.exceptions.RayTaskError as exc:
            self._fail(task, exc.cause if isinstance(exc.cause, BaseException) else _cause(exc))
        except ray.exceptions.RayActorError as exc:
            self._actor_died(slot, task, exc)
        except ray.exceptions.RayError as exc:
            self._fail(task, _cause(exc))
        else:
            self.on_result(result)

    def _actor_died(self, slot: Slot, task: ShardTask, exc: BaseException) -> None:
        """The slot's actor died running ``task`` (its only task): retry the shard later, or fail
        it."""
        self._down(slot)
        attempts = self.attempts[task.name] = self.attempts.get(task.name, 0) + 1
        if attempts > self.retries:
            self._fail(
                task,
                f"its shard actor died while processing it on every attempt "
                f"({attempts}, ray.max_task_retries={self.retries}): {_cause(exc)}",
            )
            return
        logger.warning(
            "shard actor %d died while processing shard %s (attempt %d of %d), the shard goes back "
            "to the queue: %s",
            slot.index,
            task.name,
            attempts,
            self.retries + 1,
            _cause(exc),
        )
        self.queue.append(task)

    def _down(self, slot: Slot) -> None:
        """The slot's actor is dead (or unreachable: killed, so it is never used again)."""
        ray.kill(slot.actor, no_restart=True)
        slot.actor = None
        slot.ready = False
        self.pending = {
            ref: (owner, task)
            for ref, (owner, task) in self.pending.items()
            if owner is not slot or task is not None
        }  # its start is not awaited any more

    def _give_up(self, slot: Slot, why: str) -> None:
        logger.error("shard actor %d: %s", slot.index, why)
        if slot.actor is not None:
            self._down(slot)
        slot.gone = why

    def _replace(self) -> None:
        """A fresh actor in each slot whose actor died, while shards wait and the slot's budget
        lasts."""
        for slot in self.slots:
            if slot.actor is not None or slot.gone or not self.queue:
                continue
            if slot.replacements >= self.replacements:
                self._give_up(
                    slot,
                    f"its actor died {slot.replacements + 1} time(s), "
                    f"ray.max_restarts={self.replacements} replacement(s) spent",
                )
                continue
            slot.replacements += 1
            logger.warning(
                "starting a fresh shard actor %d (replacement %d of ray.max_restarts=%d)",
                slot.index,
                slot.replacements,
                self.replacements,
            )
            self._start(slot)

    def _submit(self) -> None:
        for slot in self.slots:
            if self.queue and slot.ready and not slot.busy:
                task = self.queue.popleft()
                slot.busy = True
                self.pending[slot.actor.__call__.remote(task)] = (slot, task)

    def _fail_queued(self) -> None:
        """Fail the shards that no slot is left to run."""
        reasons = "; ".join(sorted({slot.gone for slot in self.slots if slot.gone})) or "no actor"
        while self.queue:
            task = self.queue.popleft()
            tried = self.attempts.get(task.name, 0)
            died = (
                "its shard actor died while processing it "
                f"({tried} of {self.retries + 1} attempts), then "
                if tried
                else ""
            )
            self._fail(task, f"{died}no shard actor left to run it: {reasons}")

    def _fail(self, task: ShardTask, why: BaseException | str) -> None:
        self.failures[task.name] = why
        logger.error("shard %s failed: %s", task.name, describe_failure(why))
        if self.on_failure is not None:
            self.on_failure(task.name)


def _cause(exc: BaseException) -> str:
    """A short reason from a Ray error: the exception line of its traceback, else its first line."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    return (lines[-1] if 'File "' in text else lines[0])[:400]


def _describe_cache(plan: PrecomputePlan, cfg: PrecomputeConfig, summary: PrecomputeResult) -> None:
    """The cache after the run: its views and teachers, bytes, and what is still incomplete."""
    store = plan.store
    summary.cache_views = store.meta.fingerprint.num_samples * store.meta.num_views
    summary.cache_teachers = len(store.teachers)
    summary.store_bytes = store_size(plan.cache_path, cfg.cache.storage_options)
    summary.incomplete = store.incomplete_shards([t.name for t in plan.teachers])


def store_size(path: str, storage_options: dict[str, Any] | None = None) -> int:
    """Bytes under the cache (0 if it cannot be listed)."""
    try:
        fs, root = fsspec.core.url_to_fs(path, **(storage_options or {}))
        return int(fs.du(root, total=True))
    except (OSError, NotImplementedError):
        return 0
