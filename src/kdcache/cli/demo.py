"""``kdcache demo [--out runs/demo] [--quick]``: the whole flow on Fashion-MNIST, end to end
(~5 min, 2 CPUs).

Every step is a real ``kdcache`` command with a config from ``configs/demo/``, printed, then run in
this process through :func:`kdcache.cli.main`: the user sees the commands they would type (with
the default ``--out`` they are the short ones, since the configs' paths are that layout).

1. ``kdcache shards fashion-mnist``: 20000 train images (and the 10000 test images) as shards of
   500.
2. ``kdcache train configs/demo/teacher.yaml``: a small ResNet teacher, plain CE on all 20000
   images, keeping the epoch-4 checkpoint beside the final one: two teachers, early-stopped vs full
   (paper 002).
3. ``kdcache precompute configs/demo/precompute.yaml``: both teachers over A=4 views of the
   students' labelled subset (the first 1000 images, two shards), top-5, into one cache, on an
   embedded Ray.
4. ``kdcache inspect``: the teachers' statistics as tables, JSON and plots.
5. ``kdcache train configs/demo/student_*.yaml``: one small student (a 64-unit MLP, 60 epochs over
   the 1000 images) trained with CE only, KD from each teacher, DIST, EffDstl's two stages (early
   teacher, then final) from the cache, and KD with the final teacher run online for the cost
   comparison.
6. A final table, ``report.md`` and ``summary.json``, read from the typed results the steps wrote:
   each run's ``summary.json`` (:class:`~kdcache.core.results.TrainResult`) and ``metrics.jsonl``,
   the run record precompute wrote into the cache (:class:`~kdcache.core.results.PrecomputeResult`),
   the inspect JSON (:class:`~kdcache.core.results.InspectResult`); never what a command printed.

``summary.json`` (:class:`DemoResult`): ``teacher_acc`` (test top-1 by teacher name),
``student_acc`` (test top-1 by method: ``ce``, ``kd_early``, ``kd_final``, ``dist``, ``effdstl``,
``kd_online``), ``bytes_per_view`` (cache bytes on disk per view per teacher), ``precompute_vps``
(views per second through both teachers once the Ray actors were up), ``train_ips`` (student images
per second: ``plain`` = the CE run, ``cached`` = KD from the cache, ``online`` = KD with the teacher
online), and for reading them: ``kd_beats_ce``, ``teacher_on_cached_views``, ``precompute`` (with
the path of its ``run_record``), ``teacher_forwards``, ``setup``, ``step_seconds``,
``command_seconds``, ``commands``, ``plots``.

This module imports neither ``pipeline`` nor ``train`` (it only calls the CLI and reads results),
and prints: it is a command, not library code.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shlex
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict

from kdcache.cli.checkout import source_checkout
from kdcache.core.config import read_config
from kdcache.core.errors import ConfigError, DataError, KdcacheError, ResultError
from kdcache.core.results import (
    InspectResult,
    PrecomputeResult,
    Result,
    TrainResult,
    read_run_records,
)

CONFIGS = (source_checkout() or Path("<no source checkout>")) / "configs" / "demo"
FASHION_MNIST_DIR = Path(
    "/usr/share/datasets/fashion-mnist"
)  # as kdcache.shards.writing.FASHION_MNIST_DIR
FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)
FASHION_MNIST_URL = (
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"  # the official files
)
R = TypeVar("R", bound=Result)
EARLY = "early"
FINAL = "final"
"""Teacher names in the cache (configs/demo/precompute.yaml)."""
METHODS = ("ce", "kd_early", "kd_final", "dist", "effdstl", "kd_online")
STUDENTS: dict[str, tuple[str, dict[str, Any]]] = {
    "ce": ("student_ce.yaml", {}),
    "kd_early": ("student_kd.yaml", {"teacher.name": EARLY}),
    "kd_final": ("student_kd.yaml", {"teacher.name": FINAL}),
    "dist": ("student_dist.yaml", {"teacher.name": FINAL}),
    "effdstl": ("student_effdstl.yaml", {"stages.0.teacher": EARLY, "stages.1.teacher": FINAL}),
    "kd_online": ("student_kd.yaml", {"teacher.name": FINAL, "teacher.mode": "online"}),
}
"""Method -> (config under configs/demo/, the settings that make the method)."""


@dataclass(frozen=True, slots=True)
class Sizes:
    """How big the demo is. The full demo uses the configs' own epochs (``None`` here)."""

    train: int
    """Train images (``kdcache shards --limit``; the test split is cut to the same limit, at most
    its 10000)."""
    shard_size: int
    """Images per shard."""
    student_shards: int
    """The students' labelled subset, and the cached one: the first this many train shards."""
    early_epoch: int
    """The early-stopped teacher is the checkpoint after this epoch."""
    teacher_epochs: int | None = None
    """Teacher epochs; None: configs/demo/teacher.yaml's."""
    num_views: int | None = None
    """A, the cached views per sample; None: configs/demo/precompute.yaml's."""
    student_epochs: tuple[int, int] | None = None
    """(epochs of single-stage students, EffDstl's stage 2); None: the configs' own."""

    @property
    def students(self) -> int:
        return self.student_shards * self.shard_size

    @property
    def test(self) -> int:
        return min(self.train, 10000)


FULL = Sizes(train=20000, shard_size=500, student_shards=2, early_epoch=4)
"""~5 minutes on 2 CPU cores: a teacher on 20000 images, students on the first 1000."""
QUICK_STUDENT_EPOCHS = (2, 1)
"""The quick demo's (single-stage students' epochs, EffDstl's stage 2)."""
QUICK = Sizes(
    train=2000,
    shard_size=250,
    student_shards=2,
    early_epoch=1,
    teacher_epochs=2,
    num_views=2,
    student_epochs=QUICK_STUDENT_EPOCHS,
)
"""Well under a minute: the same commands on tiny sizes (a test of the flow, not a result)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out", type=Path, default=Path("runs/demo"), help="output directory (default runs/demo)"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"a tiny demo ({QUICK.train} images, {QUICK_STUDENT_EPOCHS[0]} student epochs): "
        "tests the flow, shows no result",
    )
    parser.add_argument(
        "--data",
        type=Path,
        default=FASHION_MNIST_DIR,
        metavar="DIR",
        help=f"directory of the Fashion-MNIST IDX files (default {FASHION_MNIST_DIR})",
    )
    parser.add_argument(
        "--no-download",
        action="store_true",
        help="when the data is absent, do not try to download the official files",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the teacher and the student runs (default 0)"
    )
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")


def run(args: argparse.Namespace) -> int:
    if not CONFIGS.is_dir():
        raise ConfigError(
            f"the demo's configs are not at {CONFIGS}: run it from a source checkout installed "
            "with `pip install -e .` (`make demo` does)"
        )
    sizes = QUICK if args.quick else FULL
    demo = Demo(args.out, sizes, args.data, args.seed)
    if args.dry_run:
        for step in demo.steps():
            print(f"# {step.name}\n{step.command_line}")
        return 0
    demo.data_dir = find_data(args.data, args.out, download=not args.no_download)
    demo.run_all()
    summary = collect_summary(demo)
    write_outputs(args.out, summary)
    print("\n" + format_table(summary))
    print(f"\nwrote {args.out / 'report.md'} and {args.out / 'summary.json'}")
    return 0


# ---- data ----------------------------------------------------------------------------------------


def find_data(data_dir: Path, out: Path, download: bool) -> Path:
    """The directory holding Fashion-MNIST's IDX files: ``data_dir``, a previous download, or a new
    one."""
    for candidate in (data_dir, out / "fashion-mnist"):
        if all((candidate / name).is_file() for name in FASHION_MNIST_FILES):
            return candidate
    how = (
        f"Fashion-MNIST is not in {data_dir}. Install it with\n"
        "    sudo apt-get update && sudo apt-get install dataset-fashion-mnist\n"
        "(Debian/Ubuntu; `make fmnist` does it), or pass --data DIR with the four files "
        f"{', '.join(FASHION_MNIST_FILES)}."
    )
    if not download:
        raise DataError(how)
    print(how + f"\nTrying to download the official files from {FASHION_MNIST_URL} ...", flush=True)
    try:
        return download_fashion_mnist(out / "fashion-mnist")
    except (OSError, ValueError, EOFError) as exc:  # no network, HTTP errors, a truncated file
        raise DataError(f"{how}\nThe download failed too: {exc}") from None


def download_fashion_mnist(target: Path, timeout: float = 10.0) -> Path:
    """Fetch the four official IDX files into ``target`` (each checked to be gzip, then renamed into
    place)."""
    target.mkdir(parents=True, exist_ok=True)
    for name in FASHION_MNIST_FILES:
        path = target / name
        if path.is_file():
            continue
        with urllib.request.urlopen(FASHION_MNIST_URL + name, timeout=timeout) as response:
            data = response.read()
        gzip.decompress(data)  # raises on a truncated or non-gzip answer
        tmp = path.with_suffix(".part")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        print(f"  {name}: {len(data) / 1e6:.1f} MB", flush=True)
    return target


# ---- the steps -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """One command of the demo."""

    title: str
    """Which step it belongs to (``1. shards`` ...)."""
    name: str
    """Its own name (``shards``, ``teacher``, ``student ce`` ...)."""
    argv: tuple[str, ...]
    """The ``kdcache`` arguments."""

    @property
    def command_line(self) -> str:
        return shlex.join(["kdcache", *self.argv])


@dataclass
class StepRecord:
    """One command the demo ran."""

    step: Step
    seconds: float


class Demo:
    """The demo's commands (:meth:`steps`), run in order (:meth:`run_all`), and where their outputs
    are."""

    def __init__(self, out: Path, sizes: Sizes, data_dir: Path, seed: int):
        self.out = out
        self.sizes = sizes
        self.data_dir = data_dir
        self.seed = seed
        self.records: list[StepRecord] = []
        self.step_seconds: dict[str, float] = {}

    # ---- paths
    @property
    def shards(self) -> Path:
        return self.out / "shards"

    @property
    def cache(self) -> Path:
        return self.out / "cache"

    @property
    def teacher_dir(self) -> Path:
        return self.out / "teacher"

    @property
    def inspect_dir(self) -> Path:
        return self.out / "inspect"

    def student_dir(self, method: str) -> Path:
        return self.out / "students" / method

    @property
    def student_shards(self) -> str:
        """The students' subset as a brace pattern (the same string for precompute and train)."""
        last = self.sizes.student_shards - 1
        return (
            f"{self.shards}/train-{{000000..{last:06d}}}.tar"
            if last
            else f"{self.shards}/train-000000.tar"
        )

    # ---- the commands
    def steps(self) -> list[Step]:
        """Every command, in order."""
        return [
            self.shards_step(),
            self.teacher_step(),
            self.precompute_step(),
            self.inspect_step(),
            *(self.student_step(m) for m in METHODS),
        ]

    def shards_step(self) -> Step:
        argv = [
            "shards",
            "fashion-mnist",
            "--out",
            str(self.shards),
            "--limit",
            str(self.sizes.train),
            "--shard-size",
            str(self.sizes.shard_size),
            "--overwrite",
        ]
        if self.data_dir != FASHION_MNIST_DIR:
            argv += ["--dir", str(self.data_dir)]
        return Step("1. shards", "shards", tuple(argv))

    def _run(self, run_dir: Path) -> dict[str, Any]:
        return {
            "run.dir": run_dir,
            "run.seed": self.seed,
            "data.val_shards": f"{self.shards}/test-*.tar",
        }

    def teacher_step(self) -> Step:
        s = self.sizes
        values = {
            **self._run(self.teacher_dir),
            "data.shards": f"{self.shards}/train-*.tar",
            "run.save_model_epochs": [s.early_epoch],
        }
        if s.teacher_epochs is not None:
            values |= {"stages.0.epochs": s.teacher_epochs, "run.eval_every": 1}
        return Step(
            "2. teacher",
            "teacher",
            ("train", _config("teacher.yaml"), *_overrides("teacher.yaml", values)),
        )

    def precompute_step(self) -> Step:
        checkpoints = self.teacher_dir / "checkpoints"
        values = {
            "data.shards": self.student_shards,
            "cache.path": self.cache,
            "teachers.0.model.checkpoint": checkpoints / f"model_e{self.sizes.early_epoch}.pt",
            "teachers.1.model.checkpoint": checkpoints / "model_final.pt",
            "cache.num_views": self.sizes.num_views,
        }
        argv = (
            "precompute",
            _config("precompute.yaml"),
            *_overrides("precompute.yaml", values),
            "--overwrite",
        )
        return Step("3. precompute", "precompute", argv)

    def inspect_step(self) -> Step:
        argv = (
            "inspect",
            str(self.cache),
            "--json",
            str(self.inspect_dir / "inspect.json"),
            "--plots",
            str(self.inspect_dir),
        )
        return Step("4. inspect", "inspect", argv)

    def student_step(self, method: str) -> Step:
        config, method_values = STUDENTS[method]
        values = {
            **method_values,
            **self._run(self.student_dir(method)),
            "data.shards": self.student_shards,
            "cache.path": self.cache,
        }
        if self.sizes.student_epochs is not None:
            epochs, stage2 = self.sizes.student_epochs
            values |= (
                {"stages.0.epochs": epochs - stage2, "stages.1.epochs": stage2}
                if method == "effdstl"
                else {"stages.0.epochs": epochs}
            )
        return Step(
            "5. students",
            f"student {method}",
            ("train", _config(config), *_overrides(config, values)),
        )

    # ---- running
    def run_all(self) -> None:
        """Run every command, stopping at the first failure; time each step."""
        title = None
        for step in self.steps():
            if step.title != title:
                title = step.title
                _banner(title)
            record = self.execute(step)
            key = step.title.split(" ", 1)[1]
            self.step_seconds[key] = self.step_seconds.get(key, 0.0) + record.seconds

    def execute(self, step: Step) -> StepRecord:
        """Print the command, run it through the CLI in this process, raise if it fails."""
        # cli imports this module lazily; import it back the same way
        from kdcache.cli import main

        print(f"\n$ {step.command_line}", flush=True)
        start = time.perf_counter()
        code = main(list(step.argv))
        record = StepRecord(step, time.perf_counter() - start)
        self.records.append(record)
        print(f"[{step.name}: {record.seconds:.1f} s]", flush=True)
        if code != 0:
            raise DemoStepError(
                f"{step.name} failed (exit status {code}; its error is above): {step.command_line}"
            )
        return record


class DemoStepError(KdcacheError, RuntimeError):
    """A command of the demo failed."""


def _overrides(config: str, values: dict[str, Any]) -> list[str]:
    """``key=value`` for each value the config does not already have (None: keep the config's), so
    the printed commands stay short for the default ``--out`` and still say everything."""
    import yaml

    data = read_config(CONFIGS / config)  # with its base config merged in
    out = []
    for key, value in values.items():
        text = json.dumps(value) if isinstance(value, list) else str(value)
        if value is not None and yaml.safe_load(text) != _lookup(data, key):
            out.append(f"{key}={text}")
    return out


def _lookup(data: Any, key: str) -> Any:
    """The value at a dotted key of plain YAML data (list items by index); None where absent."""
    for part in key.split("."):
        if isinstance(data, list) and part.isdigit() and int(part) < len(data):
            data = data[int(part)]
        elif isinstance(data, dict) and part in data:
            data = data[part]
        else:
            return None
    return data


def _config(name: str) -> str:
    """A demo config's path as the user would type it: relative to the working directory when
    inside it."""
    path = CONFIGS / name
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _banner(title: str) -> None:
    print(f"\n{'=' * 100}\n== kdcache demo: step {title}\n{'=' * 100}", flush=True)


# ---- reading the results -----------------------------------------------------------------------


def read_precompute(cache: Path) -> dict[str, Any]:
    """Views, views/s and bytes from the run record ``kdcache precompute`` wrote into the cache
    (the demo's precompute starts the cache over, so its record is the only one, and the last)."""
    try:
        records = read_run_records(str(cache))
    except ResultError as exc:
        raise DemoStepError(f"cannot read the precompute run record: {exc}") from None
    if not records:
        raise DemoStepError(f"{cache} holds no run record of `kdcache precompute` (runs/*.json)")
    return precompute_figures(records[-1])


def precompute_figures(run: PrecomputeResult) -> dict[str, Any]:
    """The figures of a precompute run that the demo reports."""
    return {
        "views": run.views,
        "views_per_s": round(run.views_per_s, 1),
        "views_per_s_actors_up": round(run.busy_views_per_s, 1),
        "store_mb": round(run.store_bytes / 1e6, 3),
        "bytes_per_view": round(run.bytes_per_view, 2),
        "cache_views": run.cache_views,
        "teachers": run.cache_teachers,
        "run_record": run.record_path(),
    }


def read_result(kind: type[R], path: Path) -> R:
    """A typed result a step wrote (``summary.json``, the inspect JSON)."""
    try:
        return kind.read(path)
    except ResultError as exc:
        raise DemoStepError(str(exc)) from None


def eval_top1(run_dir: Path, epoch: int) -> float:
    """Test top-1 of a run after ``epoch`` epochs, from its ``metrics.jsonl``."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    for line in map(json.loads, filter(None, lines)):
        if line.get("kind") == "eval" and line.get("epoch") == epoch:
            return float(line["top1"])
    raise DemoStepError(f"{run_dir / 'metrics.jsonl'} has no evaluation after epoch {epoch}")


def run_config(run_dir: Path) -> dict[str, Any]:
    """The resolved config a ``kdcache train`` run saved beside its outputs."""
    import yaml

    try:
        return yaml.safe_load((run_dir / "config.yaml").read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise DemoStepError(f"cannot read {run_dir / 'config.yaml'}: {exc}") from None


class DemoSetup(BaseModel):
    """What the demo ran: models, epochs, images, views, k, seed."""

    model_config = ConfigDict(extra="ignore")

    teacher_model: str
    teacher_epochs: int
    early_epoch: int
    teacher_images: int
    student_model: str
    student_epochs: int
    student_images: int
    test_images: int
    num_views: int
    k: dict[str, int]
    seed: int
    quick: bool


class DemoResult(Result):
    """``<out>/summary.json``: the demo's numbers (the keys are described in the module
    docstring)."""

    teacher_acc: dict[str, float | None]
    student_acc: dict[str, float | None]
    bytes_per_view: float
    precompute_vps: float
    train_ips: dict[str, float]
    kd_beats_ce: dict[str, bool]
    teacher_on_cached_views: dict[str, dict[str, float | None]]
    precompute: dict[str, Any]
    teacher_forwards: dict[str, int]
    setup: DemoSetup
    step_seconds: dict[str, float]
    command_seconds: dict[str, float]
    commands: list[str]
    plots: list[str]


def collect_summary(demo: Demo) -> DemoResult:
    """summary.json's content, from the typed results the steps wrote: the runs' summary.json
    (and metrics.jsonl, config.yaml), precompute's run record in the cache, the inspect JSON."""
    teacher = read_result(TrainResult, demo.teacher_dir / "summary.json")
    students = {m: read_result(TrainResult, demo.student_dir(m) / "summary.json") for m in METHODS}
    precompute = read_precompute(demo.cache)
    inspect = read_result(InspectResult, demo.inspect_dir / "inspect.json")
    acc = {m: s.top1 for m, s in students.items()}
    return DemoResult(
        teacher_acc={
            EARLY: eval_top1(demo.teacher_dir, demo.sizes.early_epoch),
            FINAL: teacher.top1,
        },
        student_acc=acc,
        bytes_per_view=precompute["bytes_per_view"],
        precompute_vps=precompute["views_per_s_actors_up"],
        train_ips={
            "plain": students["ce"].images_per_s,
            "cached": students["kd_final"].images_per_s,
            "online": students["kd_online"].images_per_s,
        },
        kd_beats_ce={m: _beats(acc[m], acc["ce"]) for m in METHODS if m != "ce"},
        teacher_on_cached_views={
            name: {
                "top1": t["top1"],
                "mean_max_prob": t["max_prob"]["mean"],
                "mean_entropy": t["entropy"]["T=1.0"]["mean"],
                "mean_tail_mass": t["tail_mass"]["mean"],
                "ece": t["ece"],
            }
            for name, t in inspect.teachers.items()
        },
        precompute=precompute,
        teacher_forwards={m: s.teacher_forwards for m, s in students.items()},
        setup=_setup(demo, teacher, students["ce"], inspect),
        step_seconds={k: round(v, 1) for k, v in demo.step_seconds.items()},
        command_seconds={r.step.name: round(r.seconds, 1) for r in demo.records},
        commands=[r.step.command_line for r in demo.records],
        plots=sorted(p.name for p in demo.inspect_dir.glob("*.png")),
    )


def _beats(top1: float | None, ce: float | None) -> bool:
    return top1 is not None and ce is not None and top1 > ce


def _setup(
    demo: Demo, teacher: TrainResult, student: TrainResult, inspect: InspectResult
) -> DemoSetup:
    return DemoSetup(
        teacher_model=run_config(demo.teacher_dir)["student"]["name"],
        teacher_epochs=teacher.epochs,
        early_epoch=demo.sizes.early_epoch,
        teacher_images=demo.sizes.train,
        student_model=run_config(demo.student_dir("ce"))["student"]["name"],
        student_epochs=student.epochs,
        student_images=demo.sizes.students,
        test_images=demo.sizes.test,
        num_views=inspect.cache.num_views,
        k={name: t["k"] for name, t in inspect.teachers.items()},
        seed=demo.seed,
        quick=demo.sizes == QUICK,
    )


# ---- the report ----------------------------------------------------------------------------------

LABELS = {
    "ce": "CE only, no teacher",
    "kd_early": "KD, early teacher (cache)",
    "kd_final": "KD, final teacher (cache)",
    "dist": "DIST, final teacher (cache)",
    "effdstl": "EffDstl, early -> final (cache)",
    "kd_online": "KD, final teacher (online)",
}


def format_table(summary: DemoResult) -> str:
    """The final table: teachers, students, cache and speed."""
    up = summary.setup
    note = " (--quick: too small to show anything)" if up.quick else ""
    title = (
        f"== kdcache demo on Fashion-MNIST: teacher trained on {up.teacher_images} images, "
        f"students on the first {up.student_images}; test top-1 on {up.test_images} =={note}"
    )
    lines = [
        title,
        "",
        *_teacher_rows(summary),
        "",
        *_student_rows(summary),
        "",
        *_cost_rows(summary),
    ]
    return "\n".join(lines)


def _teacher_rows(summary: DemoResult) -> list[str]:
    up = summary.setup
    epochs = {EARLY: up.early_epoch, FINAL: up.teacher_epochs}
    head = f"teacher ({up.teacher_model})"
    rows = [
        f"{head:<28}{'test top-1':>11}{'cached views':>14}{'max prob':>10}{'entropy':>9}"
        f"{'tail mass':>11}"
    ]
    for name, top1 in summary.teacher_acc.items():
        c = summary.teacher_on_cached_views[name]
        cached_top1 = None if c["top1"] is None else 100 * c["top1"]
        label = f"{name} (epoch {epochs[name]}/{up.teacher_epochs})"
        rows.append(
            f"{label:<28}{_pct(top1):>11}{_pct(cached_top1):>14}{c['mean_max_prob']:>10.3f}"
            f"{c['mean_entropy']:>9.3f}{c['mean_tail_mass']:>11.4f}"
        )
    return rows


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}%"


def _student_rows(summary: DemoResult) -> list[str]:
    up = summary.setup
    acc = summary.student_acc
    head = f"student ({up.student_model}, {up.student_epochs} epochs)"
    rows = [f"{head:<44}{'test top-1':>11}{'vs CE':>8}"]
    for method, top1 in acc.items():
        ce = acc["ce"]
        delta = "" if method == "ce" or top1 is None or ce is None else f"{top1 - ce:+.2f}"
        rows.append(f"{method:<10}{LABELS.get(method, method):<34}{_pct(top1):>11}{delta:>8}")
    return rows


def _cost_rows(summary: DemoResult) -> list[str]:
    up = summary.setup
    ips = summary.train_ips
    pre = summary.precompute
    forwards = summary.teacher_forwards
    k = "/".join(str(v) for v in sorted(set(up.k.values())))
    steps = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in summary.step_seconds.items())
    cache = (
        f"cache: {pre['cache_views']} views (A={up.num_views}) x {pre['teachers']} teachers, "
        f"top-{k}: {summary.bytes_per_view:.1f} B per view per teacher "
        "(the whole store on disk, view parameters included)"
    )
    precompute = (
        f"precompute: {summary.precompute_vps:.0f} views/s through both teachers "
        f"once the actors were up ({pre['views_per_s']:.0f} views/s overall, "
        "Ray start-up included)"
    )
    speed = (
        f"student images/s: plain CE {ips['plain']:.0f}, KD from the cache {ips['cached']:.0f} "
        f"({forwards['kd_final']} teacher forwards), KD online {ips['online']:.0f} "
        f"({forwards['kd_online']} teacher forwards)"
    )
    total = sum(summary.step_seconds.values())
    return [cache, precompute, speed, "", f"wall time: {steps}; total {total:.0f} s"]


def format_report(summary: DemoResult) -> str:
    """report.md: the table, the commands and links to the plots."""
    plots = "\n".join(f"- [{name}](inspect/{name})" for name in summary.plots) or "- (none)"
    commands = "\n".join(summary.commands)
    seconds = ", ".join(f"{k} {v:.0f} s" for k, v in summary.command_seconds.items())
    return (
        f"# kdcache demo\n\n```\n{format_table(summary)}\n```\n\n"
        f"Per command: {seconds}.\n\n"
        "## Teacher statistics (`kdcache inspect`)\n\n"
        f"Tables: `inspect/inspect.json`; plots:\n\n{plots}\n\n"
        f"## The commands\n\n```\n{commands}\n```\n\nNumbers: `summary.json`, read from each "
        "run's `summary.json` / `metrics.jsonl`, the run record `kdcache precompute` wrote into "
        "the cache (`cache/runs/`) and the inspect JSON.\n"
    )


def write_outputs(out: Path, summary: DemoResult) -> None:
    summary.write(out / "summary.json")
    (out / "report.md").write_text(format_report(summary))
