"""``kdcache bench papers``: each source paper's headline claim, in miniature, measured by kdcache.

On Fashion-MNIST (C = 10) with a small CNN student (``kd_cnn_tiny``: a regime where KD beats
CE), every claim compares two students (``a`` and ``b``) trained on the same shards, views and
seeds; each side is the mean and sample std of the students' test top-1 over ``--seeds``.

Set-up, shared by the claims and reused on reruns (every run is a ``kdcache train`` config under
``--out`` with ``run.resume: auto``; caches resume shard by shard):

- teachers trained with plain CE: ``small`` (``kd_cnn_small``, its early-stopped checkpoint
  ``small_early`` kept at ``--early-epoch``) and ``big`` (the same net twice as wide: the
  stronger teacher);
- one cache of all of them over A plain views (``FMNIST_RECIPE``), and one cache of ``small``
  and ``big`` over A strong views (RandAugment, erasing, Mixup/CutMix: a B3-like recipe).

The claims (paper: claim, a vs b):

- 000 EffDstl: two stages (WSL from the weak early-stopped teacher, then consistent knowledge
  mining from the strong teacher) vs KD from the strong teacher all the way;
- 001 DIST: DIST vs KD from the stronger teacher, under the plain recipe (B1) and under the
  strong one (B3-like); the weaker teacher's pair is reported beside them;
- 002 Efficacy: KD from the early-stopped teacher vs from the final one; early-stopped KD
  (``stop_epoch`` at half the epochs, then CE) vs KD all the way;
- 003 similarity information: of the cached teachers, the one with the most entropy at T=1
  (``rich``, from ``kdcache inspect``'s figures) vs the most confident one (``confident``): the
  student's accuracy on a class it never saw (``data.exclude_classes``: only the teacher's soft
  labels on other classes teach it), and with ``--per-class`` examples per class chosen by the
  teacher's entropy (``data.select``, highest at T = 9 as the paper ranks), beside a random
  choice of as many;
- 004 SFTN: a ``test_resnet`` teacher trained with ``mobilenetv3_small_050`` student branches
  (``sftn:``, the paper's CIFAR-100 weights) vs the same teacher trained alone, each distilled
  into a ``mobilenetv3_small_050`` student with KD (a heterogeneous pair, as the paper's
  Table 2); both teachers are cached beside the others (same views), rendered as the recipe.

``agrees`` is ``a.mean > b.mean``; ``margin`` is ``(a - b) / sqrt(std_a² + std_b²)`` so a reader
sees where an agreement is within the seeds' noise.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.common import (
    FMNIST_RECIPE,
    FMNIST_STRONG_RECIPE,
    BenchError,
    add_distill_arguments,
    add_runtime_arguments,
    fmnist_shards,
    ints,
    machine,
    mean_std,
    precompute_inprocess,
    student_sections,
    table,
    teacher_config,
    train_written,
    write_yaml,
)
from kdcache.cache.store import open_store
from kdcache.cache_tools.stats import inspect_cache

SMALL = "small"
SMALL_EARLY = "small_early"
BIG = "big"
SFTN_TEACHER = "test_resnet"
SFTN_STUDENT = "mobilenetv3_small_050"
RESNET = "resnet"
RESNET_SFTN = "resnet_sftn"
BIG_WIDTH = 32
"""``big`` is ``kd_cnn_small`` at twice its width (16 -> 32 channels in the first stage)."""


@dataclass(frozen=True)
class Setup:
    """What the students share: shards, the teachers' checkpoints and test top-1, the caches."""

    train: str
    test: str
    teachers: dict[str, dict[str, Any]]
    cache: str
    strong_cache: str
    rich: str
    """The cached teacher with the most entropy at T=1 (paper 003's similarity-rich one)."""
    confident: str
    entropy: dict[str, float]
    """Each candidate teacher's mean entropy (nats) at T=1 over its cached views."""


@dataclass(frozen=True)
class Student:
    """One student variant: its loss stages, the cache it reads and any data settings."""

    name: str
    stages: list[dict[str, Any]]
    strong: bool = False
    data: dict[str, Any] = field(default_factory=dict)
    model: str | None = None
    """The student network (default ``--student``)."""


@dataclass(frozen=True)
class Claim:
    """One row: the paper, its claim in words, and the two variants it compares."""

    paper: str
    claim: str
    a: str
    b: str
    metric: Callable[[dict[str, Any]], float] = lambda summary: summary["top1"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_distill_arguments(
        parser,
        out="runs/bench/papers",
        limit=5000,
        teacher_epochs=10,
        student="kd_cnn_tiny",
        epochs=5,
    )
    parser.add_argument(
        "--early-epoch", type=int, default=2, help="the early-stopped checkpoint (default 2)"
    )
    parser.add_argument(
        "--held-out", type=int, default=0, help="the class 003's students never see (default 0)"
    )
    parser.add_argument(
        "--per-class", type=int, default=50, help="003's examples per class (default 50)"
    )
    parser.add_argument(
        "--select-epochs", type=int, default=20, help="epochs on 003's selections (default 20)"
    )
    add_runtime_arguments(parser, quick="400 samples, 2 epochs, 1 seed")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Set-up, then every student of every claim x seed; the claims as rows."""
    if args.quick:
        _quick(args)
    setup = set_up(args)
    students = {s.name: s for s in student_variants(args, setup)}
    claims = claim_rows(args)
    summaries = {
        name: [train_student(args, setup, students[name], seed) for seed in ints(args.seeds)]
        for name in sorted({n for c in claims for n in (c.a, c.b)} | {"ce"})
    }
    return {
        "machine": machine(),
        "teachers": {name: t["top1"] for name, t in setup.teachers.items()},
        "entropy_t1": setup.entropy,
        "rich": setup.rich,
        "confident": setup.confident,
        "students": {name: mean_std(s["top1"] for s in ss) for name, ss in summaries.items()},
        "claims": [measure(claim, summaries) for claim in claims],
    }


def _quick(args: argparse.Namespace) -> None:
    args.limit = 400
    args.shard_size = 200
    args.views = 2
    args.teacher_epochs = 2
    args.early_epoch = 1
    args.epochs = 2
    args.seeds = "0"
    args.per_class = 5
    args.select_epochs = 2


# ---- the set-up: shards, teachers, caches --------------------------------------------------------


def set_up(args: argparse.Namespace) -> Setup:
    train_shards, test_shards = fmnist_shards(args, "papers")
    small = train_teacher(args, SMALL, {}, train_shards, test_shards)
    big = train_teacher(args, BIG, {"width": BIG_WIDTH}, train_shards, test_shards)
    early = {
        "model": small["model"] | {"checkpoint": small["early"]},
        "top1": small["early_top1"],
    }
    candidates = {SMALL: small, SMALL_EARLY: early, BIG: big}
    resnet = train_teacher(args, RESNET, {}, train_shards, test_shards, SFTN_TEACHER)
    sftn = {"student": {"name": SFTN_STUDENT}, "preset": "cifar100"}
    student_friendly = train_teacher(
        args, RESNET_SFTN, {}, train_shards, test_shards, SFTN_TEACHER, sftn
    )
    teachers = {**candidates, RESNET: resnet, RESNET_SFTN: student_friendly}
    cache = build_cache(args, "cache", train_shards, teachers, FMNIST_RECIPE)
    strong_teachers = {SMALL: small, BIG: big}
    strong = build_cache(args, "cache_strong", train_shards, strong_teachers, FMNIST_STRONG_RECIPE)
    entropy = mean_entropy(cache, list(candidates))
    rich = max(entropy, key=entropy.__getitem__)
    confident = min(entropy, key=entropy.__getitem__)
    return Setup(train_shards, test_shards, teachers, cache, strong, rich, confident, entropy)


def mean_entropy(cache: str, teachers: list[str]) -> dict[str, float]:
    """Each teacher's mean entropy at T=1 over the cache's views (``kdcache inspect``)."""
    report = inspect_cache(open_store(cache), teachers, temperatures=(1.0,))
    return {name: float(report.teachers[name]["entropy"]["T=1.0"]["mean"]) for name in teachers}


def train_teacher(
    args: argparse.Namespace,
    name: str,
    kwargs: dict[str, Any],
    shards: str,
    test: str,
    network: str = "kd_cnn_small",
    sftn: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Plain CE of ``network`` (with ``kwargs``; with ``sftn``: SFTN's loss beside student
    branches), keeping the early-stopped checkpoint; its final and early test top-1 (the early
    one from the evaluation at that epoch)."""
    run_dir = args.out / "teachers" / name
    model = {"name": network, "kwargs": kwargs}
    config = teacher_config(args, run_dir, model, (shards, test), eval_every=args.early_epoch)
    config["run"]["save_model_epochs"] = [args.early_epoch]
    if sftn:
        config["sftn"] = sftn
    summary = train_written(args.out / "configs" / f"{name}.yaml", config)
    checkpoints = run_dir / "checkpoints"
    return {
        "model": {
            "name": network,
            "kwargs": kwargs,
            "checkpoint": str(checkpoints / "model_final.pt"),
        },
        "early": str(checkpoints / f"model_e{args.early_epoch}.pt"),
        "early_top1": eval_top1_at(run_dir, args.early_epoch),
        "top1": summary.top1,
    }


def eval_top1_at(run_dir: Path, epoch: int) -> float:
    """The top-1 of a run's evaluation after ``epoch`` (its ``metrics.jsonl``)."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    evals = [json.loads(line) for line in lines if '"eval"' in line]
    found = [e["top1"] for e in evals if e.get("kind") == "eval" and e.get("epoch") == epoch]
    if not found:
        raise BenchError(f"{run_dir}/metrics.jsonl has no evaluation after epoch {epoch}")
    return float(found[-1])


def build_cache(
    args: argparse.Namespace,
    name: str,
    shards: str,
    teachers: dict[str, dict[str, Any]],
    recipe: dict[str, Any],
) -> str:
    """One cache of every teacher at k = C = 10 (fp16) over the same A views (in-process), each
    rendered as the recipe (the timm test models' hub configs say 160 px and ImageNet's mean)."""
    cache = args.out / name
    render = {"size": recipe["size"], "mean": recipe["mean"], "std": recipe["std"]}
    config = {
        "data": {"shards": shards},
        "cache": {"path": str(cache), "num_views": args.views, "recipe": recipe},
        "teachers": [
            {"name": teacher, "model": spec["model"], "k": 10, "render": render}
            for teacher, spec in teachers.items()
        ],
        "ray": {"num_actors": 1, "cpus_per_actor": 1},
        "runtime": {"batch_size": 256, "device": "cpu", "torch_threads": args.threads},
    }
    precompute_inprocess(write_yaml(args.out / "configs" / f"precompute_{name}.yaml", config))
    return str(cache)


# ---- students ------------------------------------------------------------------------------------


def student_variants(args: argparse.Namespace, setup: Setup) -> list[Student]:
    """Every student a claim compares, by name."""
    kd = {"name": "kd", "alpha": args.alpha, "temperature": args.temperature, "tail": "spread"}
    dist = {"name": "dist", "temperature": args.temperature, "tail": "spread"}
    half = max(1, args.epochs // 2)
    variants = [Student("ce", [{"loss": {"name": "ce"}}])]
    for teacher in (SMALL, BIG, SMALL_EARLY):
        variants.append(Student(f"kd-{teacher}", [{"teacher": teacher, "loss": kd}]))
    for teacher in (SMALL, BIG):
        variants.append(Student(f"dist-{teacher}", [{"teacher": teacher, "loss": dist}]))
        variants.append(Student(f"kd-{teacher}-strong", [{"teacher": teacher, "loss": kd}], True))
        variants.append(
            Student(f"dist-{teacher}-strong", [{"teacher": teacher, "loss": dist}], True)
        )
    eskd = kd | {"stop_epoch": half}
    variants.append(Student("eskd-small", [{"teacher": SMALL, "loss": eskd}]))
    variants.append(Student("effdstl", effdstl_stages(args)))
    for teacher in (RESNET, RESNET_SFTN):
        stage = {"teacher": teacher, "loss": kd}
        variants.append(Student(f"kd-{teacher}", [stage], model=SFTN_STUDENT))
    return variants + similarity_variants(args, setup, kd)


def similarity_variants(
    args: argparse.Namespace, setup: Setup, kd: dict[str, Any]
) -> list[Student]:
    """Paper 003's students: KD from the rich and the confident teacher with a class held out,
    and on ``--per-class`` examples per class (by the teacher's entropy, or at random)."""
    out = []
    for side, teacher in (("rich", setup.rich), ("confident", setup.confident)):
        held = {"exclude_classes": [args.held_out]}
        out.append(Student(f"heldout-{side}", [{"teacher": teacher, "loss": kd}], data=held))
        pick = {"per_class": args.per_class, "by": "entropy_high", "teacher": teacher}
        selected = {"select": pick | {"temperature": 9.0}}
        stage = {"epochs": args.select_epochs, "teacher": teacher, "loss": kd}
        out.append(Student(f"select-{side}", [stage], data=selected))
    random = {"select": {"per_class": args.per_class, "by": "random", "teacher": setup.rich}}
    stage = {"epochs": args.select_epochs, "teacher": setup.rich, "loss": kd}
    out.append(Student("select-rich-random", [stage], data=random))
    return out


def effdstl_stages(args: argparse.Namespace) -> list[dict[str, Any]]:
    """EffDstl's two stages (configs/fmnist/student_effdstl.yaml, the official settings scaled
    down): 4/5 of the epochs of CE + WSL from the weak early-stopped teacher, then consistent
    knowledge mining from the strong teacher with a fresh SGD."""
    second = max(1, args.epochs // 5)
    wsl = {
        "name": "wsl",
        "temperature": 2.0,
        "weight_temperature": 2.0,
        "ce_weight": 1.0,
        "kd_weight": 0.5,
        "label_smoothing": 0.1,
        "tail": "spread",
    }
    mining = {
        "name": "effdstl",
        "teacher_temperature": 0.7,
        "student_temperature": 1.0,
        "smooth_to": 0.99,
        "ce_weight": 0.0,
        "kd_weight": 1.0,
        "tail": "spread",
    }
    return [
        {"name": "wsl", "epochs": args.epochs - second, "teacher": SMALL_EARLY, "loss": wsl},
        {
            "name": "mining",
            "epochs": second,
            "teacher": BIG,
            "loss": mining,
            "optimizer": {"name": "sgd", "lr": 0.05, "weight_decay": 0.0},
            "scheduler": {"name": "cosine", "min_lr": 5.0e-4},
        },
    ]


def student_config(
    args: argparse.Namespace, setup: Setup, student: Student, seed: int
) -> dict[str, Any]:
    """One student run: the same student, optimizer and views for every variant."""
    stages = [{"epochs": args.epochs, **stage} for stage in student.stages]
    epochs = sum(stage["epochs"] for stage in stages)
    mode = "none" if student.name == "ce" else "cache"
    run_dir = args.out / "students" / run_name(args, student, seed)
    config = student_sections(args, run_dir, seed, (setup.train, setup.test), epochs) | {
        "cache": {"path": setup.strong_cache if student.strong else setup.cache},
        "student": {"name": student.model or args.student},
        "teacher": {"mode": mode, "name": SMALL},
        "stages": stages,
    }
    config["data"] |= student.data
    return config


def run_name(args: argparse.Namespace, student: Student, seed: int) -> str:
    """``<variant>-a<alpha>-t<T>-e<epochs>-s<seed>``: other settings never reuse a finished run."""
    return f"{student.name}-a{args.alpha:g}-t{args.temperature:g}-e{args.epochs}-s{seed}"


def train_student(
    args: argparse.Namespace, setup: Setup, student: Student, seed: int
) -> dict[str, Any]:
    """Train one student (or reuse its finished run) and return its summary as a dict."""
    config = student_config(args, setup, student, seed)
    path = args.out / "configs" / "students" / f"{run_name(args, student, seed)}.yaml"
    return train_written(path, config).model_dump()


# ---- claims --------------------------------------------------------------------------------------


def claim_rows(args: argparse.Namespace) -> list[Claim]:
    held = args.held_out
    return [
        Claim(
            "000",
            "two stages (WSL from a weak teacher, then consistent knowledge mining from the "
            "strong one) beat KD from the strong teacher",
            "effdstl",
            "kd-big",
        ),
        Claim("001", "DIST beats KD with the stronger teacher (B1 recipe)", "dist-big", "kd-big"),
        Claim(
            "001",
            "DIST beats KD with the stronger teacher (B3-like strong recipe)",
            "dist-big-strong",
            "kd-big-strong",
        ),
        Claim(
            "001", "DIST vs KD with the weaker teacher (B1, for contrast)", "dist-small", "kd-small"
        ),
        Claim(
            "002",
            "an early-stopped teacher teaches better than the same teacher trained to the end",
            "kd-small_early",
            "kd-small",
        ),
        Claim(
            "002",
            "early-stopped KD (KD for the first half, then CE) beats KD all the way",
            "eskd-small",
            "kd-small",
        ),
        Claim(
            "003",
            f"a similarity-rich teacher teaches a class the student never saw (class {held}) "
            "better than a confident one",
            "heldout-rich",
            "heldout-confident",
            lambda summary: summary["per_class_top1"][held],
        ),
        Claim(
            "003",
            f"with {args.per_class} examples per class chosen by entropy, the rich teacher "
            "distils better than the confident one",
            "select-rich",
            "select-confident",
        ),
        Claim(
            "003",
            f"{args.per_class} examples per class chosen by the rich teacher's entropy beat as "
            "many chosen at random",
            "select-rich",
            "select-rich-random",
        ),
        Claim(
            "004",
            f"a student-friendly teacher ({SFTN_TEACHER} trained with {SFTN_STUDENT} branches) "
            "teaches that student better than the same teacher trained alone",
            f"kd-{RESNET_SFTN}",
            f"kd-{RESNET}",
        ),
    ]


def measure(claim: Claim, summaries: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """A claim's row: both sides' mean ± std over seeds, whether a beats b, and by how much."""
    a = mean_std(claim.metric(s) for s in summaries[claim.a])
    b = mean_std(claim.metric(s) for s in summaries[claim.b])
    spread = math.sqrt(a["std"] ** 2 + b["std"] ** 2)
    return {
        "paper": claim.paper,
        "claim": claim.claim,
        "a": {"name": claim.a, "mean": a["mean"], "std": a["std"], "n": a["n"]},
        "b": {"name": claim.b, "mean": b["mean"], "std": b["std"], "n": b["n"]},
        "agrees": bool(a["mean"] > b["mean"]),
        "margin": (a["mean"] - b["mean"]) / spread if spread > 0 else math.nan,
    }


def format_result(result: dict[str, Any]) -> str:
    teachers = ", ".join(f"{name} {top1:.2f}" for name, top1 in result["teachers"].items())
    rows = [
        [
            c["paper"],
            c["claim"],
            f"{c['a']['name']} {c['a']['mean']:.2f} ± {c['a']['std']:.2f}",
            f"{c['b']['name']} {c['b']['mean']:.2f} ± {c['b']['std']:.2f}",
            "yes" if c["agrees"] else "no",
            c["margin"],
        ]
        for c in result["claims"]
    ]
    ce = result["students"]["ce"]
    entropy = ", ".join(f"{name} {h:.3f}" for name, h in result["entropy_t1"].items())
    return (
        f"teachers' test top-1: {teachers}; CE student {ce['mean']:.2f} ± {ce['std']:.2f}\n"
        f"entropy at T=1 (nats): {entropy}; rich {result['rich']}, "
        f"confident {result['confident']}\n"
        + table(["paper", "claim", "a (top-1 %)", "b (top-1 %)", "agrees", "margin"], rows)
    )
