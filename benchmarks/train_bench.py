"""``kdcache bench train``: plain CE vs KD from the cache vs KD with the online teacher,
interleaved.

One student architecture on the same shards, four real :class:`~kdcache.train.trainer.Trainer`
objects built from configs written beside the results: ``plain`` (supervised, no cache: a fresh
random view per epoch), ``plain_views`` (CE on the cache's stored views), ``cached`` (KD from the
cache) and ``online`` (KD with the teacher run live on the same views). Rounds alternate one epoch
of each mode (the order rotates every round; the first ``--warmup`` rounds are not counted), so the
machine's load drifts over all modes alike. An epoch is the trainer's own
(``Trainer.train_epoch``, a step hook counting its images), timed from asking for its first batch
to the end of its last optimizer step: DataLoader start-up, decoding, view replay, the cache join,
the loss, the step and its train lines, exactly as ``kdcache train`` runs them (the epoch's end,
evaluation and checkpoint, is not timed); and its CPU seconds (this process and the epoch's loader
workers) are counted, which other load disturbs much less.

With a strong recipe too (RandAugment, random erasing, Mixup/CutMix with the teacher on the mixed
image: :data:`~benchmarks.common.FMNIST_STRONG_RECIPE`): ``plain_strong`` (CE on fresh strong views
drawn every epoch, no cache) and ``cached_strong`` (KD from a cache made with that recipe), in the
same rounds: ``cached_over_plain_strong``.

Also timed, interleaved in the same rounds: the loaders alone (plain and cached: how fast the
data path can feed), and after the rounds the step alone on one in-memory batch (student step
with CE and with cached KD, teacher forward): the ideal speed-up of cached over online KD is
``(teacher forward + student step) / student step``, and counting the data path's CPU
``(cached CPU per image + teacher forward per image) / cached CPU per image``.
"""

from __future__ import annotations

import argparse
import resource
from pathlib import Path
from typing import Any

from benchmarks.common import (
    FMNIST_RECIPE,
    FMNIST_STRONG_RECIPE,
    default_source,
    machine,
    make_shards,
    mean_std,
    median,
    per_second,
    precompute_config,
    precompute_inprocess,
    rotated,
    table,
    timed,
    write_yaml,
)
from kdcache.train.config import load_train_config
from kdcache.train.data import Batch
from kdcache.train.hooks import StepHook
from kdcache.train.losses import LossParts
from kdcache.train.trainer import Trainer

MODES = ("plain", "plain_views", "cached", "online", "plain_strong", "cached_strong")
LOADERS = ("plain_data", "cached_data")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out", type=Path, default=Path("runs/bench/train"), help="shards, cache, configs (reused)"
    )
    parser.add_argument(
        "--source",
        choices=("fashion-mnist", "synthetic"),
        default=None,
        help="data (default fashion-mnist when installed, else synthetic 28x28 grey)",
    )
    parser.add_argument("--samples", type=int, default=8000, help="training samples (default 8000)")
    parser.add_argument(
        "--shard-size", type=int, default=1000, help="samples per shard (default 1000)"
    )
    parser.add_argument(
        "--views", type=int, default=2, help="A, cached views per sample (default 2)"
    )
    parser.add_argument("--k", type=int, default=5, help="cached top-k (default 5 of 10 classes)")
    parser.add_argument(
        "--student", default="kd_cnn_tiny", help="timm name of the student (default kd_cnn_tiny)"
    )
    parser.add_argument(
        "--teacher", default="resnet18", help="timm name of the teacher (default resnet18)"
    )
    parser.add_argument("--batch-size", type=int, default=128, help="batch size (default 128)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers (default 2)")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads of the training process (default 1)"
    )
    parser.add_argument(
        "--rounds", type=int, default=8, help="timed rounds of one epoch per mode (default 8)"
    )
    parser.add_argument(
        "--warmup", type=int, default=1, help="rounds run first and not counted (default 1)"
    )
    parser.add_argument(
        "--step-repeats", type=int, default=30, help="in-memory steps timed per kind (default 30)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny sizes (tests): 600 samples, 1 round"
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Set up shards and cache, build the trainers, time them interleaved, return the results."""
    if args.quick:
        args.samples = 600
        args.shard_size = 200
        args.rounds = 1
        args.warmup = 0
        args.step_repeats = 3
        args.teacher = "kd_cnn_small" if args.teacher == "resnet18" else args.teacher
    args.source = args.source or default_source()
    trainers = build_trainers(args, prepare(args))
    epochs: dict[str, list[tuple[int, float, float]]] = {mode: [] for mode in MODES + LOADERS}
    for round_ in range(args.warmup + args.rounds):
        for mode in rotated(MODES + LOADERS, round_):
            measured = time_epoch(trainers, mode, round_)
            if round_ >= args.warmup:
                epochs[mode].append(measured)
    steps = step_costs(trainers, args.step_repeats)
    return summarise(args, epochs, steps)


# ---- set-up --------------------------------------------------------------------------------------


def prepare(args: argparse.Namespace) -> dict[str, Any]:
    """Shards and a cache of the teacher (in-process precompute), reused when already there."""
    source = args.source
    shards, _ = make_shards(
        args.out / f"shards-{source}-{args.samples}", source, args.samples, args.shard_size
    )
    caches = {}
    for name, recipe in (("", FMNIST_RECIPE), ("-strong", FMNIST_STRONG_RECIPE)):
        cache = args.out / f"cache-{args.teacher}-a{args.views}-k{args.k}{name}"
        config = write_yaml(
            args.out / "configs" / f"precompute{name}.yaml",
            precompute_config(
                shards,
                cache,
                {"name": args.teacher},
                views=args.views,
                k=args.k,
                threads=max(1, args.threads),
                recipe=recipe,
            ),
        )
        if not (cache / "zarr.json").is_file() or not _complete(cache):
            precompute_inprocess(config)
        caches[name] = str(cache)
    return {
        "source": source,
        "shards": shards,
        "cache": caches[""],
        "cache_strong": caches["-strong"],
    }


def _complete(cache: Path) -> bool:
    from kdcache.cache.store import open_store

    try:
        return not open_store(str(cache)).incomplete_shards()
    except Exception:  # any unreadable or foreign cache is rebuilt
        return False


def mode_config(args: argparse.Namespace, mode: str, setup: dict[str, Any]) -> dict[str, Any]:
    """The train config of one mode: same student, seed, shards, batch and optimizer. ``plain`` is
    supervised training without a cache (a fresh random view per epoch); ``plain_views`` is CE on
    the cache's stored views, so cached vs plain_views is the cost of the targets alone; the
    ``*_strong`` modes are plain and cached with the strong recipe."""
    kd = {"name": "kd", "alpha": 0.9, "temperature": 4.0, "tail": "spread"}
    config: dict[str, Any] = {
        "run": {
            "dir": str(args.out / "runs" / mode),
            "seed": 0,
            "threads": args.threads,
            "progress": False,
            "overwrite": True,
        },
        "data": {
            "shards": setup["shards"],
            "batch_size": args.batch_size,
            "num_workers": args.workers,
            "shuffle_buffer": 1000,
        },
        "student": {"name": args.student},
        "teacher": {
            "mode": {"cached": "cache", "online": "online"}.get(
                mode.removesuffix("_strong"), "none"
            ),
            "name": "teacher",
        },
        "optimizer": {"name": "sgd", "lr": 0.05, "weight_decay": 1.0e-4},
        "scheduler": {"name": "constant"},
        "stages": [{"epochs": 100000, "loss": {"name": "ce"} if mode.startswith("plain") else kd}],
    }
    strong = mode.endswith("_strong")
    if mode.startswith("plain") and mode != "plain_views":  # no cache, a fresh view per epoch
        config["data"]["num_classes"] = 10
        recipe = FMNIST_STRONG_RECIPE if strong else FMNIST_RECIPE
        config["views"] = {"recipe": recipe, "num_views": None}
    else:  # plain_views: CE on the cache's stored views (the join's cost alone is cached vs this)
        config["cache"] = {"path": setup["cache_strong" if strong else "cache"]}
    return config


class StepCount(StepHook):
    """The images a trainer has stepped on (the epoch timer reads it)."""

    def __init__(self) -> None:
        self.images = 0

    def step_end(self, trainer: Trainer, batch: Batch, parts: LossParts) -> None:
        self.images += len(batch)


def build_trainers(args: argparse.Namespace, setup: dict[str, Any]) -> dict[str, Trainer]:
    """One started trainer per mode (a fresh run.dir each: run.overwrite), counting its images."""
    trainers = {}
    for mode in MODES:
        path = write_yaml(
            args.out / "configs" / f"train_{mode}.yaml", mode_config(args, mode, setup)
        )
        trainer = Trainer(load_train_config(path), hooks=[StepCount()])
        trainer.start()
        trainers[mode] = trainer
    return trainers


# ---- timing --------------------------------------------------------------------------------------


def time_epoch(trainers: dict[str, Trainer], mode: str, epoch: int) -> tuple[int, float, float]:
    """(images, wall seconds, CPU seconds) of one epoch of ``mode``: the trainer's own epoch
    (``Trainer.train_epoch``: steps, train lines; its end, evaluation and checkpoint, untimed), or
    the loader alone for ``*_data``. CPU seconds count this process and the epoch's DataLoader
    workers (reaped at its end). Every mode runs one epoch per round, so a trainer's epoch is the
    round, ``epoch``."""
    cpu = cpu_seconds()
    if mode in LOADERS:
        trainer = trainers[mode.removesuffix("_data")]
        teachers = trainer.targets.stream_teachers(trainer.config.teacher.name)
        images, wall = timed(lambda: sum(len(b) for b in trainer.data.epoch(epoch, teachers)))
        return images, wall, cpu_seconds() - cpu
    trainer = trainers[mode]
    counter = trainer.hooks[0]
    before = counter.images
    _, wall = timed(trainer.train_epoch)
    cpu = cpu_seconds() - cpu
    trainer.end_epoch()
    return counter.images - before, wall, cpu


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and its reaped children."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def step_costs(trainers: dict[str, Trainer], repeats: int) -> dict[str, float]:
    """Seconds per batch on one in-memory batch: the trainer's step with CE and with cached KD
    (``Trainer.train_step``), and the online target source's teacher forward (with its conversion
    to targets: what an online step adds)."""
    cached = trainers["cached"]
    online = trainers["online"]
    teacher = cached.config.teacher.name
    batch = next(iter(cached.data.epoch(0, cached.targets.stream_teachers(teacher))))
    out = {"batch": len(batch)}
    for name, fn in (
        ("ce_step_s", lambda: [trainers["plain"].train_step(batch) for _ in range(repeats)]),
        ("kd_step_s", lambda: [cached.train_step(batch) for _ in range(repeats)]),
        ("teacher_forward_s", lambda: [online.targets(batch, teacher) for _ in range(repeats)]),
    ):
        fn()  # warm-up
        out[name] = timed(fn)[1] / repeats
    return out


# ---- results -------------------------------------------------------------------------------------


def summarise(
    args: argparse.Namespace,
    epochs: dict[str, list[tuple[int, float, float]]],
    steps: dict[str, float],
) -> dict[str, Any]:
    """images/s (wall and per CPU second) per mode, paired per-round ratios, step costs, the ideal
    speed-up."""
    ips = {
        mode: per_second(sum(r[0] for r in runs), sum(r[1] for r in runs))
        for mode, runs in epochs.items()
    }
    cpu_ips = {
        mode: per_second(sum(r[0] for r in runs), sum(r[2] for r in runs))
        for mode, runs in epochs.items()
    }
    per_round = {mode: [per_second(r[0], r[1]) for r in runs] for mode, runs in epochs.items()}
    cpu_round = {mode: [per_second(r[0], r[2]) for r in runs] for mode, runs in epochs.items()}
    ratio = lambda a, b, by=per_round: [x / y for x, y in zip(by[a], by[b], strict=True)]  # noqa: E731
    ideal = (steps["teacher_forward_s"] + steps["kd_step_s"]) / steps["kd_step_s"]
    per_image_cpu = (
        1.0 / cpu_ips["cached"]
    )  # data path + step, what online adds the teacher forward to
    ideal_cpu = (per_image_cpu + steps["teacher_forward_s"] / steps["batch"]) / per_image_cpu
    return {
        "bench": "train",
        "machine": machine(),
        "settings": _settings(args),
        "plain_ips": ips["plain"],
        "cached_ips": ips["cached"],
        "online_ips": ips["online"],
        "plain_views_ips": ips["plain_views"],
        "plain_strong_ips": ips["plain_strong"],
        "cached_strong_ips": ips["cached_strong"],
        "cached_over_plain": ips["cached"] / ips["plain"],
        "cached_over_plain_strong": ips["cached_strong"] / ips["plain_strong"],
        "cached_over_plain_strong_cpu": cpu_ips["cached_strong"] / cpu_ips["plain_strong"],
        "cached_over_online": ips["cached"] / ips["online"],
        "cached_over_plain_views": ips["cached"] / ips["plain_views"],
        "cached_over_plain_views_cpu": cpu_ips["cached"] / cpu_ips["plain_views"],
        "cached_over_plain_median": median(ratio("cached", "plain")),
        "cached_over_plain_rounds": mean_std(ratio("cached", "plain")),
        "cached_over_online_rounds": mean_std(ratio("cached", "online")),
        "cpu_ips": cpu_ips,
        "cached_over_plain_cpu": cpu_ips["cached"] / cpu_ips["plain"],
        "cached_over_plain_cpu_rounds": mean_std(ratio("cached", "plain", cpu_round)),
        "cached_over_online_cpu": cpu_ips["cached"] / cpu_ips["online"],
        "loader_ips": {"plain": ips["plain_data"], "cached": ips["cached_data"]},
        "loader_cached_over_plain_cpu": cpu_ips["cached_data"] / cpu_ips["plain_data"],
        "ips_rounds": per_round,
        "step": steps,
        "ideal_speedup_over_online": ideal,
        "ideal_speedup_over_online_with_data": ideal_cpu,
        "kd_step_over_ce_step": steps["kd_step_s"] / steps["ce_step_s"],
    }


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    keys = (
        "source",
        "samples",
        "shard_size",
        "views",
        "k",
        "student",
        "teacher",
        "batch_size",
        "workers",
        "threads",
        "rounds",
        "warmup",
        "step_repeats",
        "quick",
    )
    return {k: getattr(args, k) for k in keys} | {"out": str(args.out)}


def format_result(result: dict[str, Any]) -> str:
    """The tables printed by ``kdcache bench train``."""
    s = result["settings"]
    step = result["step"]
    cpu = result["cpu_ips"]
    names = [(m, m) for m in MODES] + [
        (f"{m} loader only", f"{m}_data") for m in ("plain", "cached")
    ]
    rows = [
        [
            label,
            result[f"{key}_ips"]
            if key in MODES
            else result["loader_ips"][key.removesuffix("_data")],
            mean_std(result["ips_rounds"][key])["std"],
            cpu[key],
            cpu[key] / cpu["plain"],
        ]
        for label, key in names
    ]
    head = (
        f"train bench: student {s['student']}, teacher {s['teacher']}, batch {s['batch_size']}, "
        f"{s['workers']} workers, {s['threads']} thread(s), "
        f"{s['rounds']} rounds after {s['warmup']} warm-up"
    )
    modes = table(
        ["mode", "images/s (wall)", "std over rounds", "images per CPU s", "CPU vs plain"], rows
    )
    steps = table(
        ["in-memory step (one batch)", "ms"],
        [
            ["student step, CE", 1e3 * step["ce_step_s"]],
            ["student step, cached KD", 1e3 * step["kd_step_s"]],
            ["teacher forward (online adds it)", 1e3 * step["teacher_forward_s"]],
        ],
    )
    ratios = (
        f"cached/plain {result['cached_over_plain']:.3f} wall (per-round median "
        f"{result['cached_over_plain_median']:.3f}), "
        f"{result['cached_over_plain_cpu']:.3f} per CPU second; "
        f"cached/online {result['cached_over_online']:.2f}x wall, "
        f"{result['cached_over_online_cpu']:.2f}x per CPU second; "
        f"ideal {result['ideal_speedup_over_online']:.2f}x "
        "(teacher forward + student step over student step), "
        f"{result['ideal_speedup_over_online_with_data']:.2f}x counting the data path's CPU; "
        f"cached/plain_views {result['cached_over_plain_views']:.3f} wall, "
        f"{result['cached_over_plain_views_cpu']:.3f} per CPU second (the targets' cost alone); "
        f"strong recipe: cached/plain {result['cached_over_plain_strong']:.3f} wall, "
        f"{result['cached_over_plain_strong_cpu']:.3f} per CPU second"
    )
    return "\n\n".join([head, modes, steps, ratios])
