"""The precompute driver: Ray actors over the planned shard tasks, progress and a summary.

Locally it starts an embedded Ray (``ray.init(address="local", ...)``) unless this process
already initialised Ray (tests start it once per module; the runner reuses it) or
``ray.address`` names a cluster to join. One :class:`~pipeline.worker.ShardWorker` actor per GPU
(or N CPU actors) with ``max_restarts`` / ``max_task_retries``, so an actor killed mid-shard is
restarted and its shard redone. One task per shard, at most two in flight per actor, fed with
``ray.wait`` to actors that have finished building their teachers. A shard that still fails
after the retries does not stop the others; at the end :class:`ShardsFailedError` lists the
failed shards and why (their marks are absent, so a rerun redoes exactly them); a shard whose
actor keeps dying is failed once its retries are spent, and the shards queued behind it on that
actor go to the other actors. Actors are killed at the end, so several precomputes can run in one
Ray session. :func:`precompute` plans and runs under the cache's writer lock (``<cache>.lock``):
a second precompute on the same cache is refused, naming the holder.

Test-only: the fault hook variable of :mod:`pipeline.worker` (``KDCACHE_FAULT_CRASH_SHARD``)
is passed on to the actors through ``runtime_env`` when the driver sees it set.
"""

from __future__ import annotations

import logging
import math
import os
import re
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import fsspec
import ray
from tqdm import tqdm

from cache_tools.errors import ConfigError, KdcacheError
from cache_tools.lock import check_unlocked
from pipeline.config import PrecomputeConfig, RaySection
from pipeline.plan import Plan, ShardTask, make_plan, writer_lock
from pipeline.worker import FAULT_ENV, ShardResult, ShardWorker, WorkerSettings

logger = logging.getLogger(__name__)

IN_FLIGHT_PER_ACTOR = 2
FORWARDED_ENV = (FAULT_ENV,)


class ShardsFailedError(KdcacheError, RuntimeError):
    """Some shards failed after retries; ``failures`` maps shard name to the exception or reason."""

    def __init__(self, failures: dict[str, BaseException | str], total: int):
        self.failures = failures
        groups: dict[str, list[str]] = {}
        for name, why in sorted(failures.items()):
            groups.setdefault(describe_failure(why), []).append(name)
        lines = [f"{_names(names)}: {why}" for why, names in groups.items()]
        super().__init__(f"{len(failures)} of {total} shard task(s) failed (their marks are not set; "
                         "a rerun redoes them):\n  " + "\n  ".join(lines))  # fmt: skip


def _names(names: list[str], most: int = 4) -> str:
    shown = ", ".join(names[:most])
    return shown if len(names) <= most else f"{shown} and {len(names) - most} more"


def describe_failure(why: BaseException | str) -> str:
    if isinstance(why, str):
        return why
    return f"{type(why).__name__}: {why}"


@dataclass
class Summary:
    """What a run did, for the final report."""

    cache_path: str
    tasks: int
    failed: int
    views: int = 0
    invalid_views: int = 0
    made_view_shards: int = 0
    forward_seconds: float = 0.0
    wall_seconds: float = 0.0
    busy_seconds: float = 0.0
    store_bytes: int = 0
    cache_views: int = 0
    cache_teachers: int = 0
    complete: str = ""
    results: list[ShardResult] = field(default_factory=list)

    def lines(self) -> list[str]:
        rate = self.views / self.wall_seconds if self.wall_seconds else 0.0
        busy = self.views / self.busy_seconds if self.busy_seconds else 0.0
        per_view = self.store_bytes / max(1, self.cache_views * max(1, self.cache_teachers))
        return [
            f"precompute: {self.tasks - self.failed}/{self.tasks} shard task(s) done in {self.wall_seconds:.1f} s "
            f"-> {self.cache_path}",
            f"  views processed: {self.views} ({self.invalid_views} invalid), {rate:.0f} views/s overall, "
            f"{busy:.0f} views/s once actors were up; views made for {self.made_view_shards} shard(s); "
            f"teacher forward {self.forward_seconds:.1f} s in actors",
            f"  cache: {self.complete}; {self.store_bytes / 1e6:.2f} MB {'stored' if '://' in self.cache_path else 'on disk'} "
            f"= {per_view:.1f} B per view "
            f"per teacher ({self.cache_views} views x {self.cache_teachers} teacher(s))",
        ]  # fmt: skip


def worker_settings(cfg: PrecomputeConfig, plan: Plan) -> WorkerSettings:
    threads = cfg.runtime.torch_threads or max(1, int(cfg.ray.cpus_per_actor))
    return WorkerSettings(
        cache_path=plan.cache_path, storage_options=dict(cfg.cache.storage_options),
        data_storage_options=dict(cfg.data.storage_options),
        recipe=cfg.cache.recipe, num_views=cfg.cache.num_views, seed=cfg.cache.seed,
        num_classes=plan.num_classes, on_error=cfg.data.on_error, teachers=tuple(plan.teachers),
        runtime=cfg.runtime, torch_threads=threads,
    )  # fmt: skip


def precompute(cfg: PrecomputeConfig, progress: bool | None = None) -> tuple[Plan, Summary | None]:
    """Plan and run under the cache's writer lock: the plan, and the summary (None: nothing to do)."""
    with writer_lock(cfg):
        plan = make_plan(cfg)
        return plan, (run_precompute(cfg, plan, progress) if plan.tasks else None)


def run_precompute(cfg: PrecomputeConfig, plan: Plan, progress: bool | None = None) -> Summary:
    """Run every planned shard task on Ray actors; raise ShardsFailedError if any failed."""
    check_unlocked(plan.cache_path, cfg.cache.storage_options or None)
    start = time.perf_counter()
    summary = Summary(cache_path=plan.cache_path, tasks=len(plan.tasks), failed=0)
    failures: dict[str, BaseException | str] = {}
    if plan.tasks:
        started = ensure_ray(cfg.ray)
        try:
            failures = _run_actors(cfg, plan, summary, progress)
        finally:
            if started:
                ray.shutdown()
    summary.failed, summary.wall_seconds = len(failures), time.perf_counter() - start
    _describe_cache(plan, cfg, summary)
    if failures:
        raise ShardsFailedError(failures, len(plan.tasks))
    return summary


def _run_actors(cfg: PrecomputeConfig, plan: Plan, summary: Summary, progress: bool | None) -> dict:
    actors = start_actors(cfg.ray, worker_settings(cfg, plan), len(plan.tasks))
    bar = tqdm(total=len(plan.tasks), unit="shard", desc="precompute", dynamic_ncols=True,
               disable=(not sys.stderr.isatty()) if progress is None else not progress)  # fmt: skip
    try:
        dispatcher = Dispatcher(actors, plan.tasks, lambda r: _on_result(r, summary, bar, plan),
                                retries=cfg.ray.max_task_retries)  # fmt: skip
        failures = dispatcher.run()
        if dispatcher.first_ready is not None:
            summary.busy_seconds = time.perf_counter() - dispatcher.first_ready
        return failures
    finally:
        bar.close()
        for actor in actors:
            ray.kill(actor, no_restart=True)


def _on_result(result: ShardResult, summary: Summary, bar: tqdm, plan: Plan) -> None:
    summary.results.append(result)
    summary.views += result.views
    summary.invalid_views += result.invalid_views
    summary.made_view_shards += int(result.made_views)
    summary.forward_seconds += result.forward_seconds
    bar.update(1)
    elapsed = bar.format_dict.get("elapsed") or 0.0
    bar.set_postfix_str(f"{summary.views / elapsed:.0f} views/s" if elapsed else "")
    logger.log(logging.DEBUG if not bar.disable else logging.INFO,
               "shard %s done (%d/%d): %d views, %d invalid, %.1f s (teacher forward %.1f s)", result.shard,
               len(summary.results), len(plan.tasks), result.views, result.invalid_views, result.seconds,
               result.forward_seconds)  # fmt: skip


def ensure_ray(section: RaySection) -> bool:
    """Initialise Ray unless this process already did; True if this call started it."""
    if ray.is_initialized():
        return False
    if section.address:
        ray.init(address=section.address, logging_level=logging.WARNING)
        return True
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # local only: no ~/.ray/auth_token
    # num_cpus / num_gpus left to Ray, which reads the cgroup CPU quota and CUDA_VISIBLE_DEVICES
    ray.init(address="local", include_dashboard=False, _temp_dir=section.temp_dir, logging_level=logging.WARNING)
    return True


def actor_layout(section: RaySection, num_tasks: int) -> tuple[int, float, float]:
    """(number of actors, CPUs per actor, GPUs per actor) for this cluster."""
    resources = ray.cluster_resources()
    cpus_total, gpus_total = float(resources.get("CPU", 0)), float(resources.get("GPU", 0))
    gpus = section.gpus_per_actor if section.gpus_per_actor is not None else (1.0 if gpus_total else 0.0)
    fit = math.floor(cpus_total / section.cpus_per_actor)
    if gpus:
        fit = min(fit, math.floor(gpus_total / gpus))
    if fit < 1:
        raise ConfigError(f"ray.cpus_per_actor / ray.gpus_per_actor: an actor needs {section.cpus_per_actor} CPU(s) "
                          f"and {gpus} GPU(s), the cluster has {cpus_total:g} and {gpus_total:g}")  # fmt: skip
    wanted = section.num_actors or fit
    if wanted > fit:
        logger.warning("ray.num_actors=%d but only %d fit the cluster now; the others wait for resources", wanted, fit)
    return max(1, min(wanted, num_tasks)), section.cpus_per_actor, gpus


def start_actors(section: RaySection, settings: WorkerSettings, num_tasks: int) -> list[Any]:
    """Create the shard actors (not waiting for them: the dispatcher does)."""
    count, cpus, gpus = actor_layout(section, num_tasks)
    env = {name: os.environ[name] for name in FORWARDED_ENV if name in os.environ}
    options: dict[str, Any] = dict(num_cpus=cpus, num_gpus=gpus, max_restarts=section.max_restarts,
                                   max_task_retries=section.max_task_retries)  # fmt: skip
    if env:
        options["runtime_env"] = {"env_vars": env}
    remote = ray.remote(ShardWorker).options(**options)
    logger.info("starting %d shard actor(s), %g CPU and %g GPU each", count, cpus, gpus)
    return [remote.remote(settings) for _ in range(count)]


class Dispatcher:
    """Feeds shard tasks to ready actors (at most two in flight each) and collects results.

    When an actor dies for good (its restarts or a task's retries spent), Ray fails every task it
    had in flight. The oldest of them was the one running (an actor runs its tasks in order): that
    shard is failed; the ones queued behind it go back to the queue for the other actors.
    """

    def __init__(self, actors: list[Any], tasks: list[ShardTask], on_result, retries: int = 0):
        self.actors, self.queue, self.on_result = actors, deque(tasks), on_result
        self.retries = retries
        self.load = [0] * len(actors)
        self.live: set[int] = set()
        self.dead: dict[int, str] = {}
        self.failures: dict[str, BaseException | str] = {}
        self.first_ready: float | None = None
        self.submitted = 0
        self.order: dict[Any, int] = {}
        self.pending: dict[Any, tuple[int, ShardTask | None]] = {
            actor.ready.remote(): (i, None) for i, actor in enumerate(actors)
        }

    def run(self) -> dict[str, BaseException | str]:
        """Until every task finished or failed; returns the failures."""
        while self._busy():
            [ref], _ = ray.wait(list(self.pending), num_returns=1)
            index, task = self.pending.pop(ref)
            if task is None:
                self._started(ref, index)
            else:
                self._finished(ref, index, task)
            self._submit()
        reasons = "; ".join(sorted(set(self.dead.values()))) or "no actor"
        for task in self.queue:
            self.failures[task.name] = f"no shard actor left to run it: {reasons}"
        return self.failures

    def _busy(self) -> bool:
        if any(task is not None for _, task in self.pending.values()):
            return True
        return bool(self.queue) and bool(self.pending)  # actors still starting

    def _started(self, ref: Any, index: int) -> None:
        try:
            ray.get(ref)
            self.live.add(index)
            self.first_ready = self.first_ready or time.perf_counter()
        except ray.exceptions.RayError as exc:
            self.dead[index] = f"actor could not start: {_cause(exc)}"
            logger.error("shard actor %d could not start: %s", index, _cause(exc))

    def _finished(self, ref: Any, index: int, task: ShardTask) -> None:
        self.load[index] -= 1
        try:
            result = ray.get(ref)
        except ray.exceptions.RayTaskError as exc:
            self._fail(task, exc.cause if isinstance(exc.cause, BaseException) else _cause(exc))
        except ray.exceptions.ActorDiedError as exc:
            self._actor_died(index, [(self.order.pop(ref), task, exc)])
        except ray.exceptions.RayError as exc:
            self._fail(task, _cause(exc))
        else:
            self.on_result(result)
        self.order.pop(ref, None)

    def _actor_died(self, index: int, died: list[tuple[int, ShardTask, BaseException]]) -> None:
        """Settle the dead actor's other tasks, fail the one it was running, requeue the rest."""
        self.live.discard(index)
        self.dead[index] = "actor died after its restarts"
        for ref in [r for r, (i, t) in self.pending.items() if i == index and t is not None]:
            _, task = self.pending.pop(ref)
            self.load[index] -= 1
            try:
                self.on_result(ray.get(ref))  # it finished before the actor died
            except ray.exceptions.RayTaskError as exc:
                self._fail(task, exc.cause if isinstance(exc.cause, BaseException) else _cause(exc))
            except ray.exceptions.RayError as exc:
                died.append((self.order[ref], task, exc))
            self.order.pop(ref, None)
        died.sort(key=lambda item: item[0])
        _, running, exc = died[0]
        self._fail(running, f"its shard actor died while processing it on every attempt "
                            f"({self.retries + 1}, ray.max_task_retries={self.retries}): {_cause(exc)}")  # fmt: skip
        for _, task, _ in reversed(died[1:]):
            logger.warning("shard %s goes back to the queue: it waited behind %s on the actor that died",
                           task.name, running.name)  # fmt: skip
            self.queue.appendleft(task)

    def _fail(self, task: ShardTask, why: BaseException | str) -> None:
        self.failures[task.name] = why
        logger.error("shard %s failed: %s", task.name, describe_failure(why))

    def _submit(self) -> None:
        for index in sorted(self.live, key=lambda i: self.load[i]):
            while self.queue and self.load[index] < IN_FLIGHT_PER_ACTOR:
                task = self.queue.popleft()
                ref = self.actors[index].__call__.remote(task)
                self.pending[ref] = (index, task)
                self.order[ref] = self.submitted
                self.submitted += 1
                self.load[index] += 1


def _cause(exc: BaseException) -> str:
    """A short reason from a Ray error: the exception line of its traceback, else its first line."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    return (lines[-1] if 'File "' in text else lines[0])[:400]


def _describe_cache(plan: Plan, cfg: PrecomputeConfig, summary: Summary) -> None:
    store = plan.store
    summary.cache_views = store.meta.fingerprint.num_samples * store.meta.num_views
    summary.cache_teachers = len(store.teachers)
    summary.store_bytes = store_size(plan.cache_path, cfg.cache.storage_options)
    missing = store.incomplete_shards([t.name for t in plan.teachers])
    summary.complete = ("all {} shards complete for {}".format(store.num_shards, ", ".join(t.name for t in plan.teachers))
                        if not missing else f"incomplete: {', '.join(f'{k}: {len(v)}' for k, v in missing.items())}")  # fmt: skip


def store_size(path: str, storage_options: dict[str, Any] | None = None) -> int:
    """Bytes under the cache (0 if it cannot be listed)."""
    try:
        fs, root = fsspec.core.url_to_fs(path, **(storage_options or {}))
        return int(fs.du(root, total=True))
    except (OSError, NotImplementedError):
        return 0
