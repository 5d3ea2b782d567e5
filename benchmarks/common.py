"""What the benchmarks share: data and cache set-up, timing, statistics and tables.

The set-up goes through the same code a user runs: ``kdcache shards`` (through the CLI
dispatcher) for shards, and precompute's plan + :class:`~kdcache.pipeline.worker.ShardWorker` for
caches (in-process: the Ray layer is measured by ``kdcache bench precompute`` alone).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from kdcache.core.errors import KdcacheError
from kdcache.core.results import Result

if TYPE_CHECKING:
    from kdcache.core.results import TrainResult
    from kdcache.targets.sparse import SparseTargets

FMNIST_DIR = "/usr/share/datasets/fashion-mnist"
FMNIST_RECIPE: dict[str, Any] = {
    "name": "rrc_flip",
    "size": 28,
    "scale": [0.5, 1.0],
    "channels": 1,
    "mean": [0.286],
    "std": [0.353],
}
"""The view recipe of the Fashion-MNIST configs (configs/fmnist/teacher.yaml)."""
FMNIST_STRONG_RECIPE: dict[str, Any] = {
    **FMNIST_RECIPE,
    "policy": "rand-m5-mstd0.5-inc1",
    "erasing": {"prob": 0.25, "mode": "pixel"},
    "mix": {"mixup_alpha": 0.2, "cutmix_alpha": 1.0, "prob": 0.5, "group_size": 32},
}
"""A strong recipe on Fashion-MNIST (configs/demo/precompute_strong.yaml's): RandAugment,
random erasing, Mixup/CutMix on half the views, the teacher on the mixed images."""
JPEG224_RECIPE: dict[str, Any] = {"name": "rrc_flip", "size": 224, "scale": [0.5, 1.0]}
"""ImageNet-sized views (RGB, ImageNet mean and std) of 256 px JPEG shards: ``--image-size 224``
of ``kdcache bench train``."""
JPEG224_STRONG_RECIPE: dict[str, Any] = {
    **JPEG224_RECIPE,
    **{k: FMNIST_STRONG_RECIPE[k] for k in ("policy", "erasing", "mix")},
}
"""The strong recipe's augmentation on the 224 px views."""


class BenchResult(Result):
    """What one ``python -m benchmarks NAME`` run measured: ``--json FILE``."""

    bench: str
    argv: list[str]
    """The benchmark's arguments (after ``python -m benchmarks``)."""
    started: str
    """UTC, ISO 8601."""
    versions: dict[str, str]
    results: dict[str, Any]
    """The numbers: the bench's own keys (``benchmarks/README.md``); NaN and inf as null."""


class BenchError(KdcacheError, RuntimeError):
    """A benchmark could not set up or run (names the step that failed)."""


# ---- data and caches -----------------------------------------------------------------------------


def fmnist_available(directory: str = FMNIST_DIR) -> bool:
    """True when the Debian package's Fashion-MNIST IDX files are there."""
    return Path(directory, "train-images-idx3-ubyte.gz").is_file()


def default_source() -> str:
    """``fashion-mnist`` when installed, else ``synthetic`` (28x28 grey, 10 classes)."""
    return "fashion-mnist" if fmnist_available() else "synthetic"


def make_shards(
    out: Path,
    source: str,
    num: int,
    shard_size: int,
    test_num: int = 0,
    synthetic: tuple[int, int, str] = (28, 1, "png"),
) -> tuple[str, str | None]:
    """``kdcache shards`` into ``out`` (reused when its train manifest has ``num`` samples);
    (train, test) shard globs, test None when there is no test split. Fashion-MNIST takes
    ``--limit num`` for both splits; synthetic images are ``(size, channels, format)``."""
    if (
        not (out / "train-manifest.json").is_file()
        or _manifest_count(out / "train-manifest.json") != num
    ):
        argv = ["shards", source, "--out", str(out), "--shard-size", str(shard_size), "--overwrite"]
        if source == "synthetic":
            argv += [
                "--num",
                str(num),
                "--test-num",
                str(test_num),
                "--classes",
                "10",
                "--size",
                str(synthetic[0]),
                "--channels",
                str(synthetic[1]),
                "--format",
                synthetic[2],
            ]
        else:
            argv += ["--limit", str(num)]
        _cli(argv, "kdcache shards")
    test = str(out / "test-*.tar") if (out / "test-manifest.json").is_file() else None
    return str(out / "train-*.tar"), test


def _manifest_count(path: Path) -> int:
    return int(sum(json.loads(path.read_text()).get("counts", [])))


def _cli(argv: list[str], what: str) -> None:
    from kdcache.cli import main

    code = main(argv)
    if code != 0:
        raise BenchError(f"{what} failed with exit status {code}: {' '.join(argv)}")


def write_yaml(path: Path, data: dict[str, Any]) -> Path:
    """Write a config beside the benchmark's outputs (so every run can be repeated by hand)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def precompute_config(
    shards: str,
    cache: Path,
    teacher: dict[str, Any],
    *,
    views: int,
    k: int,
    encoding: str = "fp16",
    recipe: dict[str, Any] | None = None,
    threads: int = 1,
    batch_size: int = 256,
) -> dict[str, Any]:
    """A precompute config: one teacher named ``teacher`` over ``shards`` x ``views``."""
    return {
        "data": {"shards": shards},
        "cache": {
            "path": str(cache),
            "num_views": views,
            "recipe": recipe or FMNIST_RECIPE,
            "overwrite": True,
        },
        "teachers": [{"name": "teacher", "model": teacher, "k": k, "encoding": encoding}],
        "ray": {"num_actors": 1, "cpus_per_actor": 1},
        "runtime": {"batch_size": batch_size, "device": "cpu", "torch_threads": threads},
    }


def precompute_inprocess(config_path: Path, overrides: list[str] | None = None) -> int:
    """Plan and run every shard task with one in-process ShardWorker (no Ray), then seal the
    fingerprint as the runner does; returns the views made."""
    from kdcache.core.config import load_config
    from kdcache.pipeline.config import PrecomputeConfig
    from kdcache.pipeline.plan import plan_precompute, seal_fingerprint
    from kdcache.pipeline.runner import worker_settings
    from kdcache.pipeline.worker import ShardWorker

    cfg = load_config(PrecomputeConfig, config_path, overrides)
    plan = plan_precompute(cfg)
    worker = ShardWorker(worker_settings(cfg, plan))
    views = sum(worker(task).views for task in plan.tasks)
    seal_fingerprint(plan.store)
    return views


# ---- the Fashion-MNIST distillation benchmarks (parity, papers) ---------------------------------


def add_distill_arguments(
    parser: argparse.ArgumentParser,
    *,
    out: str,
    limit: int,
    teacher_epochs: int,
    student: str,
    epochs: int,
) -> None:
    """The set-up and student options of ``kdcache bench parity`` and ``papers`` (their own
    defaults); each bench adds its own options after these, then :func:`add_runtime_arguments`."""
    parser.add_argument(
        "--out", type=Path, default=Path(out), help="shards, teachers, caches, runs"
    )
    parser.add_argument(
        "--limit", type=int, default=limit, help=f"train and test samples each (default {limit})"
    )
    parser.add_argument(
        "--shard-size", type=int, default=1000, help="samples per shard (default 1000)"
    )
    parser.add_argument(
        "--views", type=int, default=4, help="A, cached views per sample (default 4)"
    )
    parser.add_argument(
        "--teacher-epochs",
        type=int,
        default=teacher_epochs,
        help=f"teacher CE epochs (default {teacher_epochs})",
    )
    parser.add_argument("--student", default=student, help=f"timm student (default {student})")
    parser.add_argument(
        "--epochs", type=int, default=epochs, help=f"student epochs (default {epochs})"
    )
    parser.add_argument(
        "--seeds", default="0,1,2", help="student seeds, comma-separated (default 0,1,2)"
    )
    parser.add_argument("--alpha", type=float, default=0.5, help="KD alpha (default 0.5)")
    parser.add_argument(
        "--temperature", type=float, default=4.0, help="distillation temperature (default 4)"
    )


def add_runtime_arguments(parser: argparse.ArgumentParser, quick: str) -> None:
    """Batch size, loader workers, torch threads, and ``--quick`` (``quick``: what it sets)."""
    parser.add_argument("--batch-size", type=int, default=128, help="batch size (default 128)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers (default 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--quick", action="store_true", help=f"tiny sizes (tests): {quick}")


def ints(text: str) -> list[int]:
    """``"0,1,2"`` -> ``[0, 1, 2]`` (``--seeds``, ``--ks``)."""
    return [int(x) for x in text.split(",") if x]


def fmnist_shards(args: argparse.Namespace, bench: str) -> tuple[str, str | None]:
    """``--limit`` train and test samples of Fashion-MNIST as shards under ``--out``."""
    if not fmnist_available():
        raise BenchError(
            f"kdcache bench {bench} needs Fashion-MNIST: apt-get install dataset-fashion-mnist"
        )
    return make_shards(args.out / "shards", "fashion-mnist", args.limit, args.shard_size)


def run_section(
    args: argparse.Namespace, run_dir: Path, seed: int, eval_every: int
) -> dict[str, Any]:
    """A benchmark run's ``run``: ``resume: auto``, so a rerun reuses every finished run."""
    return {
        "dir": str(run_dir),
        "seed": seed,
        "threads": args.threads,
        "progress": False,
        "resume": "auto",
        "eval_every": eval_every,
    }


def data_section(args: argparse.Namespace, shards: str, test: str | None) -> dict[str, Any]:
    """A benchmark run's ``data``: the shards, evaluated on the test split."""
    return {
        "shards": shards,
        "val_shards": test,
        "batch_size": args.batch_size,
        "num_workers": args.workers,
        "shuffle_buffer": 2000,
    }


def teacher_config(
    args: argparse.Namespace,
    run_dir: Path,
    model: dict[str, Any],
    data: tuple[str, str | None],
    seed: int = 0,
    eval_every: int | None = None,
) -> dict[str, Any]:
    """Plain CE (``teacher.mode: none``) of ``model`` for ``--teacher-epochs`` on fresh views of
    :data:`FMNIST_RECIPE` each epoch; ``data``: (train, test) shards; evaluated every
    ``eval_every`` epochs (default: once, at the end)."""
    every = args.teacher_epochs if eval_every is None else eval_every
    return {
        "run": run_section(args, run_dir, seed, every),
        "data": data_section(args, *data) | {"num_classes": 10},
        "views": {"recipe": FMNIST_RECIPE, "num_views": None},
        "student": model,
        "teacher": {"mode": "none"},
        "optimizer": {"name": "sgd", "lr": 0.1, "weight_decay": 5.0e-4},
        "scheduler": {"name": "cosine", "warmup_epochs": 0.2},
        "stages": [{"epochs": args.teacher_epochs, "loss": {"name": "ce"}}],
    }


def student_sections(
    args: argparse.Namespace,
    run_dir: Path,
    seed: int,
    data: tuple[str, str | None],
    epochs: int,
) -> dict[str, Any]:
    """What every student run of a bench shares: ``run`` (evaluated once, after its ``epochs``),
    ``data``, and the optimizer and schedule; the bench adds cache, student, teacher, stages."""
    return {
        "run": run_section(args, run_dir, seed, epochs) | {"log_every": 1000},
        "data": data_section(args, *data),
        "optimizer": {"name": "sgd", "lr": 0.05, "weight_decay": 1.0e-4},
        "scheduler": {"name": "cosine", "warmup_epochs": 0.2},
    }


def train_written(path: Path, config: dict[str, Any]) -> TrainResult:
    """Write ``config`` to ``path`` (repeatable by hand: ``kdcache train PATH``) and train it."""
    from kdcache.train.config import load_train_config
    from kdcache.train.trainer import train

    return train(load_train_config(write_yaml(path, config)))


# ---- timing and statistics -----------------------------------------------------------------------


def timed(fn, *args: Any) -> tuple[Any, float]:
    """(result, wall seconds) of ``fn(*args)``."""
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def per_second(count: float, seconds: float) -> float:
    return count / seconds if seconds > 0 else math.nan


def mean_std(values: Iterable[float]) -> dict[str, Any]:
    """``{"mean", "std" (sample std, 0 for one value), "n", "values"}``."""
    values = [float(v) for v in values]
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {
        "mean": statistics.fmean(values) if values else math.nan,
        "std": std,
        "n": len(values),
        "values": values,
    }


def median(values: Iterable[float]) -> float:
    values = list(values)
    return statistics.median(values) if values else math.nan


def rotated(items: tuple[str, ...], shift: int) -> list[str]:
    """``items`` rotated by ``shift``: each item leads in turn, so no mode always runs first."""
    shift %= len(items)
    return list(items[shift:] + items[:shift])


# ---- target error --------------------------------------------------------------------------------


def target_divergence(
    p: SparseTargets, q: SparseTargets, num_classes: int, temperature: float, tail: str
) -> tuple[float, float]:
    """(mean KL(p ‖ q), max |p - q|) of two sparse targets as dense distributions at
    ``temperature``.

    The softmax runs in float64 on the logits (``log_softmax``): in float32 its rounding alone is
    ~1e-7 nats of KL and can come out negative, which would hide fp16's own error."""
    import torch

    from kdcache.targets.sparse import dense_logits

    log_p, log_q = (
        torch.log_softmax(dense_logits(x, num_classes, tail).double() / temperature, -1)
        for x in (p, q)
    )
    prob_p = log_p.exp()
    kl = torch.where(prob_p > 0, prob_p * (log_p - log_q), torch.zeros_like(prob_p)).sum(-1)
    return float(kl.mean()), float((prob_p - log_q.exp()).abs().max())


# ---- output --------------------------------------------------------------------------------------


def table(headers: list[str], rows: list[list[Any]]) -> str:
    """A Markdown table (what docs/benchmarks.md shows), numbers formatted compactly."""
    cells = [[_fmt(c) for c in row] for row in rows]
    widths = [
        max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)
    ]

    def line(parts):
        return "| " + " | ".join(p.ljust(w) for p, w in zip(parts, widths, strict=True)) + " |"

    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in cells])


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e6):
            return f"{value:.2e}"
        return (
            f"{value:.3f}"
            if abs(value) < 10
            else f"{value:,.0f}"
            if abs(value) >= 1000
            else f"{value:.1f}"
        )
    return str(value)


def machine() -> dict[str, Any]:
    """Where the numbers were measured: CPU model and count, load, library versions."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
