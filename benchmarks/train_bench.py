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

And the baseline a user has without kdcache (:mod:`benchmarks.timm_baseline`): ``timm`` (a
``webdataset`` pipeline with timm's ``create_transform``, plain CE) and ``timm_strong`` (the
strong recipe's RandAugment and erasing through ``create_transform``, ``timm.data.Mixup`` and
``SoftTargetCrossEntropy``), the same student, batch, workers and threads, in the same rounds:
``cached_over_timm`` and ``cached_over_timm_strong``, per wall and per CPU second.
``--image-size 224`` runs every mode on 256 px RGB JPEG shards with 224 px views instead of
28 px Fashion-MNIST (decoding then dominates); ``--modes`` times a subset.

Also timed, interleaved in the same rounds: the loaders alone (plain and cached: how fast the
data path can feed), and after the rounds the step alone on one in-memory batch (student step
with CE and with cached KD, teacher forward): the ideal speed-up of cached over online KD is
``(teacher forward + student step) / student step``, and counting the data path's CPU
``(cached CPU per image + teacher forward per image) / cached CPU per image``.
"""

from __future__ import annotations

import argparse
import os
import resource
from pathlib import Path
from typing import Any

from benchmarks.common import (
    FMNIST_RECIPE,
    FMNIST_STRONG_RECIPE,
    JPEG224_RECIPE,
    JPEG224_STRONG_RECIPE,
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
from benchmarks.timm_baseline import TimmBaseline
from kdcache.shards.reading import expand_shards
from kdcache.train.config import load_train_config
from kdcache.train.data import Batch
from kdcache.train.hooks import StepHook
from kdcache.train.losses import LossParts
from kdcache.train.trainer import Trainer

MODES = (
    "plain",
    "plain_views",
    "cached",
    "online",
    "plain_strong",
    "cached_strong",
    "timm",
    "timm_strong",
)
LOADERS = ("plain_data", "cached_data")
TIMM = ("timm", "timm_strong")


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
        "--image-size",
        type=int,
        choices=(28, 224),
        default=28,
        help="28: Fashion-MNIST (or synthetic grey) PNGs; 224: synthetic 256 px RGB JPEGs, "
        "224 px views, teacher kd_cnn_small unless --teacher (default 28)",
    )
    parser.add_argument(
        "--modes",
        default=",".join(MODES + LOADERS),
        help="comma-separated modes to time (default all: " + ",".join(MODES + LOADERS) + ")",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny sizes (tests): 600 samples (200 at 224 px), 1 round",
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
    if args.image_size == 224:
        args.source = "synthetic"
        args.teacher = "kd_cnn_small" if args.teacher == "resnet18" else args.teacher
        if args.quick:
            args.samples = 200
            args.shard_size = 100
    args.source = args.source or default_source()
    modes = selected_modes(args.modes)
    trainers = build_trainers(args, prepare(args), modes)
    epochs: dict[str, list[tuple[int, float, float]]] = {mode: [] for mode in modes}
    loads = []
    for round_ in range(args.warmup + args.rounds):
        for mode in rotated(modes, round_):
            measured = time_epoch(trainers, mode, round_)
            if round_ >= args.warmup:
                epochs[mode].append(measured)
        loads.append(os.getloadavg()[0])
    steps = step_costs(trainers, args.step_repeats)
    for trainer in trainers.values():
        trainer.data.close() if isinstance(trainer, Trainer) else trainer.close()
    return summarise(args, epochs, steps) | {"load_avg_rounds": loads}


def selected_modes(names: str) -> tuple[str, ...]:
    """``--modes``, in the bench's order; refuses unknown names."""
    chosen = {n.strip() for n in names.split(",") if n.strip()}
    unknown = chosen - set(MODES + LOADERS)
    if unknown:
        raise SystemExit(f"--modes: unknown {sorted(unknown)}; choose from {MODES + LOADERS}")
    return tuple(m for m in MODES + LOADERS if m in chosen)


# ---- set-up --------------------------------------------------------------------------------------


def prepare(args: argparse.Namespace) -> dict[str, Any]:
    """Shards and a cache of the teacher (in-process precompute), reused when already there."""
    source = args.source
    large = args.image_size == 224
    shards, _ = make_shards(
        args.out / f"shards-{source}-{args.samples}{'-jpg256' if large else ''}",
        source,
        args.samples,
        args.shard_size,
        synthetic=(256, 3, "jpg") if large else (28, 1, "png"),
    )
    recipes = (
        (JPEG224_RECIPE, JPEG224_STRONG_RECIPE) if large else (FMNIST_RECIPE, FMNIST_STRONG_RECIPE)
    )
    caches = {}
    for name, recipe in zip(("", "-strong"), recipes, strict=True):
        size = f"-{args.image_size}px" if large else ""
        cache = args.out / f"cache-{args.teacher}-a{args.views}-k{args.k}{name}{size}"
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
        "recipe": recipes[0],
        "recipe_strong": recipes[1],
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
        recipe = setup["recipe_strong" if strong else "recipe"]
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


def build_trainers(
    args: argparse.Namespace, setup: dict[str, Any], modes: tuple[str, ...]
) -> dict[str, Trainer | TimmBaseline]:
    """One started trainer per mode (a fresh run.dir each: run.overwrite), counting its images
    (the step costs need plain, cached and online: built even when not timed); the timm
    baselines."""
    trainers: dict[str, Trainer | TimmBaseline] = {}
    for mode in TIMM:
        if mode in modes:
            trainers[mode] = TimmBaseline(
                expand_shards(setup["shards"]),
                setup["recipe_strong" if mode.endswith("_strong") else "recipe"],
                args.student,
                10,
                args.batch_size,
                args.workers,
            )
    needed = {m.removesuffix("_data") for m in modes} | {"plain", "cached", "online"}
    for mode in MODES:
        if mode in TIMM or mode not in needed:
            continue
        path = write_yaml(
            args.out / "configs" / f"train_{mode}.yaml", mode_config(args, mode, setup)
        )
        trainer = Trainer(load_train_config(path), hooks=[StepCount()])
        trainer.start()
        trainers[mode] = trainer
    return trainers


# ---- timing --------------------------------------------------------------------------------------


def time_epoch(
    trainers: dict[str, Trainer | TimmBaseline], mode: str, epoch: int
) -> tuple[int, float, float]:
    """(images, wall seconds, CPU seconds) of one epoch of ``mode``: the trainer's own epoch
    (``Trainer.train_epoch``: steps, train lines; its end, evaluation and checkpoint, untimed), or
    the loader alone for ``*_data``. CPU seconds count this process and the epoch's DataLoader
    workers (reaped at its end; persistent workers are counted by the pool's own CPU, see
    :func:`cpu_seconds`). Every mode runs one epoch per round, so a trainer's epoch is the
    round, ``epoch``."""
    cpu = cpu_seconds()
    if mode in LOADERS:
        trainer = trainers[mode.removesuffix("_data")]
        teachers = trainer.targets.stream_teachers(trainer.config.teacher.name)
        images, wall = timed(lambda: sum(len(b) for b in trainer.data.epoch(epoch, teachers)))
        return images, wall, cpu_seconds() - cpu
    trainer = trainers[mode]
    if isinstance(trainer, TimmBaseline):
        before = trainer.images
        _, wall = timed(trainer.train_epoch)
        return trainer.images - before, wall, cpu_seconds() - cpu
    counter = trainer.hooks[0]
    before = counter.images
    _, wall = timed(trainer.train_epoch)
    cpu = cpu_seconds() - cpu
    trainer.end_epoch()
    return counter.images - before, wall, cpu


def cpu_seconds() -> float:
    """User + system CPU seconds of this process, its reaped children and its live descendants
    (persistent DataLoader workers live across epochs, so their time is read from ``/proc``)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    reaped = own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime
    return reaped + sum(_proc_cpu(pid) for pid in _descendants(os.getpid()))


def _descendants(pid: int) -> list[int]:
    """Live descendants of ``pid`` (Linux ``/proc/PID/task/TID/children``; none elsewhere)."""
    out = []
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            kids = [int(k) for k in children.read_text().split()]
        except OSError:
            continue
        for kid in kids:
            out += [kid, *_descendants(kid)]
    return out


def _proc_cpu(pid: int) -> float:
    """utime + stime of a live process in seconds (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    # after the command's ")": state is field 3, utime and stime are fields 14 and 15
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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
    speed-up; a key whose modes were not timed (``--modes``) is None."""
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

    def over(a: str, b: str, by: dict[str, float] = ips) -> float | None:
        return by[a] / by[b] if a in by and b in by else None

    def rounds(a: str, b: str, by: dict[str, list[float]] = per_round) -> dict[str, Any] | None:
        if a not in by or b not in by:
            return None
        return mean_std([x / y for x, y in zip(by[a], by[b], strict=True)])

    ideal = (steps["teacher_forward_s"] + steps["kd_step_s"]) / steps["kd_step_s"]
    ideal_cpu = None
    if "cached" in cpu_ips:  # data path + step per image, what online adds the forward to
        per_image_cpu = 1.0 / cpu_ips["cached"]
        ideal_cpu = (per_image_cpu + steps["teacher_forward_s"] / steps["batch"]) / per_image_cpu
    pairs = {
        "cached_over_plain": ("cached", "plain"),
        "cached_over_plain_strong": ("cached_strong", "plain_strong"),
        "cached_over_online": ("cached", "online"),
        "cached_over_plain_views": ("cached", "plain_views"),
        "cached_over_timm": ("cached", "timm"),
        "cached_over_timm_strong": ("cached_strong", "timm_strong"),
        "plain_over_timm": ("plain", "timm"),
    }
    out: dict[str, Any] = {
        "bench": "train",
        "machine": machine(),
        "settings": _settings(args),
        **{f"{mode}_ips": ips.get(mode) for mode in MODES},
    }
    for key, (a, b) in pairs.items():
        out[key] = over(a, b)
        out[f"{key}_cpu"] = over(a, b, cpu_ips)
        out[f"{key}_rounds"] = rounds(a, b)
        out[f"{key}_cpu_rounds"] = rounds(a, b, cpu_round)
    cached_plain = out["cached_over_plain_rounds"]
    return out | {
        "cached_over_plain_median": median(cached_plain["values"]) if cached_plain else None,
        "cpu_ips": cpu_ips,
        "loader_ips": {m: ips[f"{m}_data"] for m in ("plain", "cached") if f"{m}_data" in ips},
        "loader_cached_over_plain_cpu": over("cached_data", "plain_data", cpu_ips),
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
        "image_size",
        "modes",
        "quick",
    )
    return {k: getattr(args, k) for k in keys} | {"out": str(args.out)}


def format_result(result: dict[str, Any]) -> str:
    """The tables printed by ``kdcache bench train``."""
    s = result["settings"]
    step = result["step"]
    cpu = result["cpu_ips"]
    timed_modes = [m for m in MODES + LOADERS if m in cpu]
    base = "plain" if "plain" in cpu else timed_modes[0]
    rows = [
        [
            f"{m.removesuffix('_data')} loader only" if m in LOADERS else m,
            result["loader_ips"][m.removesuffix("_data")] if m in LOADERS else result[f"{m}_ips"],
            mean_std(result["ips_rounds"][m])["std"],
            cpu[m],
            cpu[m] / cpu[base],
        ]
        for m in timed_modes
    ]
    head = (
        f"train bench: student {s['student']}, teacher {s['teacher']}, {s['image_size']} px, "
        f"batch {s['batch_size']}, {s['workers']} workers, {s['threads']} thread(s), "
        f"{s['samples']} samples per epoch, {s['rounds']} rounds after {s['warmup']} warm-up; "
        f"load {result['machine']['load_avg_1m']} (1 min) at the end"
    )
    modes = table(
        ["mode", "images/s (wall)", "std over rounds", "images per CPU s", f"CPU vs {base}"], rows
    )
    steps = table(
        ["in-memory step (one batch)", "ms"],
        [
            ["student step, CE", 1e3 * step["ce_step_s"]],
            ["student step, cached KD", 1e3 * step["kd_step_s"]],
            ["teacher forward (online adds it)", 1e3 * step["teacher_forward_s"]],
        ],
    )
    ratios = table(
        ["ratio", "wall", "per CPU second", "wall, per-round mean +- std"],
        [
            [
                key,
                result[key],
                result[f"{key}_cpu"],
                f"{result[f'{key}_rounds']['mean']:.3f} +- {result[f'{key}_rounds']['std']:.3f}",
            ]
            for key in (
                "cached_over_timm",
                "cached_over_timm_strong",
                "cached_over_plain",
                "cached_over_plain_strong",
                "cached_over_plain_views",
                "cached_over_online",
                "plain_over_timm",
            )
            if result[key] is not None
        ],
    )
    ideal = (
        f"ideal cached/online {result['ideal_speedup_over_online']:.2f}x "
        "(teacher forward + student step over student step)"
    )
    return "\n\n".join([head, modes, steps, ratios, ideal])
