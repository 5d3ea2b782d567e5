"""``kdcache bench parity``: does KD from the cache teach what KD from the online teacher teaches?

On Fashion-MNIST (C = 10): shards with ``kdcache shards fashion-mnist --limit N``; a real teacher
trained with plain CE (``teacher.mode: none``); one cache of it at k = 10 = C (exact up to fp16);
then the same student, seeds and views trained with

- ``online``: KD with the teacher run live on the replayed views,
- ``cached``: KD from the cache at k = C,
- ``cached k=j, tail t``: KD from the same cache truncated to its first j classes at read time
  (``stages.0.loss.topk: j``: exactly what a k = j cache holds) under both tail treatments,
- ``ce``: the CE-only student on the same views,
- ``strong-online`` / ``strong-cached`` / ``strong-ce``: the same three on a second cache made with
  a strong recipe (RandAugment, random erasing, Mixup/CutMix with the teacher on the mixed image:
  :data:`~benchmarks.common.FMNIST_STRONG_RECIPE`), the CE part mixing the two labels by lam.
- ``eq-topk`` / ``eq-sampled``: KD at equal bytes per view (``--budget``, the stored layout):
  the teacher as ``q8`` top-k at the largest k that fits (tail ``spread``) and as ``sampled``
  (its top-1 plus the draws that fit, ``logsumexp`` stored at the KD temperature; tail
  ``sample``), beside ``cached`` (the full distribution, fp16 k = C); ``eq-sampled-sn``: the
  same without the stored normaliser (self-normalised at the KD temperature);
  ``eq-sampled-tau``: sampled targets drawn from the tail at τ = the KD temperature
  (``draw_temperature``: no importance weights at T = τ),
- ``ensemble`` / ``member2``: a second teacher (same network, another seed) and the two-teacher
  ensemble (``stages.0.teachers``, equal weights), beside ``cached`` (the first alone).

Every run is a ``kdcache train`` config written under ``--out`` (repeatable by hand) and runs
with ``run.resume: auto``, so rerunning the benchmark reuses finished runs. Reported: the test
accuracy of each (mean and sample std over seeds), whether cached KD at k = C is within one std
of online KD, and how far the cached (fp16) targets of the first shard are from the teacher rerun
in fp32 on the same views, truncated to each k, per tail treatment.
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np
import torch

from benchmarks.common import (
    FMNIST_RECIPE,
    FMNIST_STRONG_RECIPE,
    add_distill_arguments,
    add_runtime_arguments,
    fmnist_shards,
    ints,
    machine,
    mean_std,
    precompute_config,
    precompute_inprocess,
    student_sections,
    table,
    target_divergence,
    teacher_config,
    train_written,
    write_yaml,
)
from benchmarks.grad_cos import fit_budget, fit_draws, layout_bytes
from kdcache.cache.reader import read_block
from kdcache.cache.store import open_store
from kdcache.cache_tools.ensemble_stats import inspect_extras
from kdcache.models.build import ModelSpec, build_teacher
from kdcache.models.ensemble import StageEnsemble
from kdcache.models.runner import ModelRunner
from kdcache.shards.reading import decode_image, iter_shard
from kdcache.targets.sparse import SparseTargets, from_logits, tail_mass_t1, truncate
from kdcache.views.recipe import render_rows

TEACHER = "teacher"
SECOND = "teacher2"
EQ_TOPK = "eq_topk"
EQ_SAMPLED = "eq_sampled"
EQ_SAMPLED_SN = "eq_sampled_sn"
EQ_SAMPLED_TAU = "eq_sampled_tau"
BEYOND = ("eq-topk", "eq-sampled", "eq-sampled-sn", "eq-sampled-tau", "ensemble", "member2")
"""The variants of equal-bytes targets and of the ensemble (see the module docstring)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_distill_arguments(
        parser,
        out="runs/bench/parity",
        limit=10000,
        teacher_epochs=15,
        student="kd_mlp",
        epochs=4,
    )
    parser.add_argument(
        "--teacher", default="kd_cnn_small", help="timm teacher (default kd_cnn_small)"
    )
    parser.add_argument("--ks", default="1,2,3,5", help="truncated k values (default 1,2,3,5)")
    parser.add_argument(
        "--tails", default="spread,renorm", help="tail treatments (default spread,renorm)"
    )
    parser.add_argument(
        "--budget",
        type=int,
        default=24,
        help="bytes per view (stored layout) of the top-k and sampled students (default 24)",
    )
    add_runtime_arguments(parser, quick="400 samples, 1 epoch, 1 seed")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Shards, teacher, cache, then every student variant x seed; return accuracies."""
    if args.quick:
        args.limit = 400
        args.shard_size = 200
        args.views = 2
        args.teacher_epochs = 1
        args.epochs = 1
        args.seeds = "0"
        args.ks = "1,5"
    train_shards, test_shards = fmnist_shards(args, "parity")
    teacher = train_teacher(args, train_shards, test_shards)
    second = train_teacher(args, train_shards, test_shards, seed=1, name=SECOND)
    caches = {
        "": build_cache(args, train_shards, teacher["checkpoint"], second["checkpoint"]),
        "strong-": build_cache(args, train_shards, teacher["checkpoint"], strong=True),
    }
    runs = {
        variant: [
            student(args, variant, seed, train_shards, test_shards, caches[_cache_of(variant)])
            for seed in ints(args.seeds)
        ]
        for variant in variants(args)
    }
    cache = caches[""]
    return summarise(args, teacher, runs) | {
        "target_error": target_error(args, cache, teacher["checkpoint"]),
        "beyond": beyond(args, teacher, second, runs, cache),
    }


def variants(args: argparse.Namespace) -> list[str]:
    """``ce``, ``online``, ``cached``, ``k<j>-<tail>`` for every truncated k and tail, the strong
    recipe's ``strong-ce``, ``strong-online``, ``strong-cached``, and the equal-bytes and
    ensemble students."""
    per_k = [f"k{k}-{tail}" for k in ints(args.ks) for tail in args.tails.split(",") if tail]
    strong = ["strong-ce", "strong-online", "strong-cached"]
    return ["ce", "online", "cached", *per_k, *strong, *BEYOND]


def _cache_of(variant: str) -> str:
    return "strong-" if variant.startswith("strong-") else ""


# ---- the teacher and its cache -------------------------------------------------------------------


def train_teacher(
    args: argparse.Namespace, shards: str, test: str, seed: int = 0, name: str = TEACHER
) -> dict[str, Any]:
    """Plain CE (``teacher.mode: none``) of the teacher on fresh views each epoch."""
    model = {"name": args.teacher}
    config = teacher_config(args, args.out / name, model, (shards, test), seed)
    summary = train_written(args.out / "configs" / f"{name}.yaml", config)
    return {
        "top1": summary.top1,
        "checkpoint": str(args.out / name / "checkpoints" / "model_final.pt"),
    }


def build_cache(
    args: argparse.Namespace,
    shards: str,
    checkpoint: str,
    second: str | None = None,
    strong: bool = False,
) -> str:
    """One cache of the trained teacher at k = C = 10 (fp16), A views (precompute's worker,
    in-process), with the plain or the strong recipe. With ``second``: beside it the second
    teacher (k = C) and the first again at equal bytes per view, as q8 top-k and as sampled
    targets (its one forward per batch serves all three)."""
    name = "cache_strong" if strong else "cache"
    cache = args.out / name
    model = {"name": args.teacher, "checkpoint": checkpoint}
    recipe = FMNIST_STRONG_RECIPE if strong else FMNIST_RECIPE
    config = precompute_config(
        shards, cache, model, views=args.views, k=10, threads=args.threads, recipe=recipe
    )
    if second is not None:
        config["teachers"] += beyond_teachers(args, model, second)
    path = write_yaml(args.out / "configs" / f"precompute_{name}.yaml", config)
    precompute_inprocess(path, ["cache.overwrite=false"])  # resumes: finished shards are skipped
    return str(cache)


def beyond_teachers(
    args: argparse.Namespace, model: dict[str, Any], second: str
) -> list[dict[str, Any]]:
    """The second teacher (k = C), and the first at equal bytes per view: q8 top-k, sampled
    targets drawn at T=1 with and without the logsumexp at the KD temperature, and sampled
    targets drawn at the KD temperature."""
    k, draws = fit_budget(args.budget, 10)
    sampled = {"model": model, "k": 1, "encoding": "sampled", "samples": draws}
    at_tau = sampled | {
        "samples": fit_draws(args.budget, 10, draw_tail=True),
        "draw_temperature": args.temperature,
    }
    return [
        {"name": SECOND, "model": {"name": args.teacher, "checkpoint": second}, "k": 10},
        {"name": EQ_TOPK, "model": model, "k": k, "encoding": "q8"},
        {"name": EQ_SAMPLED, **sampled, "sample_temperatures": [args.temperature]},
        {"name": EQ_SAMPLED_SN, **sampled},
        {"name": EQ_SAMPLED_TAU, **at_tau},
    ]


def target_error(args: argparse.Namespace, cache: str, checkpoint: str) -> list[dict[str, Any]]:
    """Cached vs online targets of the first shard, both truncated to each k: mean
    KL(online ‖ cached) per tail at the KD temperature, and the largest T=1 tail-mass error (what
    fp16 rounding does to the tail)."""
    online, cached = first_shard_targets(args, cache, checkpoint)
    rows = []
    for k in sorted({10, *ints(args.ks)}):
        a = truncate(online, k)
        b = truncate(cached, k)
        row: dict[str, Any] = {
            "k": k,
            "max_dtail": float((tail_mass_t1(a) - tail_mass_t1(b)).abs().max()),
        }
        for tail in [t for t in args.tails.split(",") if t]:
            row[f"kl_{tail}"] = target_divergence(a, b, 10, args.temperature, tail)[0]
        rows.append(row)
    return rows


def first_shard_targets(
    args: argparse.Namespace, cache: str, checkpoint: str
) -> tuple[SparseTargets, SparseTargets]:
    """(teacher rerun in fp32, cached) targets of every stored view of the first shard,
    ``[n * A, 10]``."""
    store = open_store(cache)
    block = read_block(store, 0, [TEACHER])
    recipe = store.meta.recipe
    rendering = store.teacher_meta(TEACHER).rendering
    samples = iter_shard(str(args.out / "shards" / block.shard))
    images = {row: decode_image(s.image, recipe.channels) for row, s in enumerate(samples)}
    pixels = render_rows(images, block.view_params, sorted(images), recipe, rendering)
    model = build_teacher(ModelSpec(name=args.teacher, checkpoint=checkpoint), 10, recipe.channels)
    labels = torch.from_numpy(block.labels.astype(np.int64)).repeat_interleave(store.meta.num_views)
    t = block.teachers[TEACHER]
    flat = lambda x, dtype: torch.from_numpy(x.astype(dtype).reshape(len(labels), *x.shape[2:]))  # noqa: E731
    cached = SparseTargets(
        flat(t.topk_idx, np.int64),
        flat(t.topk_logit, np.float32),
        *(flat(x, np.float32) for x in (t.lse, t.label_logit, t.tail_lse)),
    )
    return from_logits(ModelRunner(model, rendering, device="cpu")(pixels), labels, 10), cached


# ---- students ------------------------------------------------------------------------------------


def run_name(args: argparse.Namespace, variant: str, seed: int) -> str:
    """``<variant>[-a<alpha>-t<T>]-e<epochs>-s<seed>``: other settings never collide with finished
    runs."""
    kd = "" if variant.endswith("ce") else f"-a{args.alpha:g}-t{args.temperature:g}"
    return f"{variant}{kd}-e{args.epochs}-s{seed}"


def student_config(
    args: argparse.Namespace, variant: str, seed: int, shards: str, test: str, cache: str
) -> dict[str, Any]:
    """One student run: the same student, seed, views and optimizer for every variant."""
    loss: dict[str, Any] = {
        "name": "kd",
        "alpha": args.alpha,
        "temperature": args.temperature,
        "tail": "spread",
    }
    base = variant.removeprefix("strong-")
    mode = {"ce": "none", "online": "online"}.get(base, "cache")
    teacher = {
        "eq-topk": EQ_TOPK,
        "eq-sampled": EQ_SAMPLED,
        "eq-sampled-sn": EQ_SAMPLED_SN,
        "eq-sampled-tau": EQ_SAMPLED_TAU,
        "member2": SECOND,
    }.get(variant)
    stage: dict[str, Any] = {"teacher": teacher} if teacher else {}
    if base == "ce":
        loss = {"name": "ce"}
    elif variant.startswith("k"):
        k, tail = variant[1:].split("-")
        loss |= {"topk": int(k), "tail": tail}
    elif variant in ("eq-sampled", "eq-sampled-sn", "eq-sampled-tau"):
        loss |= {"tail": "sample"}
    elif variant == "ensemble":
        stage = {"teachers": [TEACHER, SECOND]}
    run_dir = args.out / "students" / run_name(args, variant, seed)
    return student_sections(args, run_dir, seed, (shards, test), args.epochs) | {
        "cache": {"path": cache},
        "student": {"name": args.student},
        "teacher": {"mode": mode, "name": TEACHER},
        "stages": [{"epochs": args.epochs, "loss": loss, **stage}],
    }


def student(
    args: argparse.Namespace, variant: str, seed: int, shards: str, test: str, cache: str
) -> dict[str, Any]:
    """Train one student (or reuse its finished run) and return its summary."""
    config = student_config(args, variant, seed, shards, test, cache)
    path = args.out / "configs" / "students" / f"{run_name(args, variant, seed)}.yaml"
    summary = train_written(path, config)
    return {
        "seed": seed,
        "top1": summary.top1,
        "images_per_s": summary.images_per_s,
        "teacher_forwards": summary.teacher_forwards,
    }


# ---- equal bytes, ensembles ---------------------------------------------------------------------


def beyond(
    args: argparse.Namespace,
    teacher: dict[str, Any],
    second: dict[str, Any],
    runs: dict[str, list[dict[str, Any]]],
    cache: str,
) -> dict[str, Any]:
    """Students at equal bytes per view (and the full distribution's), and the two-teacher
    ensemble against each member (students, teachers' test accuracy, and the ensemble's figures
    on the cached training views)."""
    acc = {variant: mean_std(r["top1"] for r in rs) for variant, rs in runs.items()}
    k, draws = fit_budget(args.budget, 10)
    tau_draws = fit_draws(args.budget, 10, draw_tail=True)
    store = open_store(cache)
    pair = StageEnsemble.of({TEACHER: 1.0, SECOND: 1.0})
    figures = inspect_extras(store, [], [pair])["ensembles"][0]
    return {
        "budget_bytes_per_view": args.budget,
        "equal_bytes": {
            "topk": {"k": k, "layout_bytes": layout_bytes("q8", 10, k), **acc["eq-topk"]},
            "sampled": {
                "k": 1,
                "draws": draws,
                "layout_bytes": layout_bytes("sampled", 10, 1, draws, 1),
                **acc["eq-sampled"],
            },
            "sampled_sn": {
                "k": 1,
                "draws": draws,
                "layout_bytes": layout_bytes("sampled", 10, 1, draws, 0),
                **acc["eq-sampled-sn"],
            },
            "sampled_tau": {
                "k": 1,
                "draws": tau_draws,
                "draw_temperature": args.temperature,
                "layout_bytes": layout_bytes("sampled", 10, 1, tau_draws, 0, draw_tail=True),
                **acc["eq-sampled-tau"],
            },
            "full": {"k": 10, "layout_bytes": layout_bytes("fp16", 10, 10), **acc["cached"]},
        },
        "ensemble": {
            "students": {
                "ensemble": acc["ensemble"],
                TEACHER: acc["cached"],
                SECOND: acc["member2"],
            },
            "teachers_test_top1": {TEACHER: teacher["top1"], SECOND: second["top1"]},
            "on_cached_views": {
                "top1": figures["top1"],
                "agreement": figures["agreement"],
                "js_mean": {name: d["mean"] for name, d in figures["js"].items()},
            },
        },
    }


def beyond_rows(b: dict[str, Any]) -> list[list[Any]]:
    """Table rows of the equal-bytes and ensemble students."""
    eq = b["equal_bytes"]
    e = b["ensemble"]["students"]
    return [
        [
            f"KD top-k q8, {eq['topk']['layout_bytes']} B/view",
            eq["topk"]["k"],
            "spread",
            eq["topk"],
        ],
        [
            f"KD sampled, {eq['sampled']['layout_bytes']} B/view",
            f"1+{eq['sampled']['draws']}",
            "sample",
            eq["sampled"],
        ],
        [
            f"KD sampled, self-normalised, {eq['sampled_sn']['layout_bytes']} B/view",
            f"1+{eq['sampled_sn']['draws']}",
            "sample",
            eq["sampled_sn"],
        ],
        [
            f"KD sampled at T={eq['sampled_tau']['draw_temperature']:g}, "
            f"{eq['sampled_tau']['layout_bytes']} B/view",
            f"1+{eq['sampled_tau']['draws']}",
            "sample",
            eq["sampled_tau"],
        ],
        [f"KD full, {eq['full']['layout_bytes']} B/view", 10, "exact", eq["full"]],
        ["KD, second teacher", 10, "exact", e[SECOND]],
        ["KD, ensemble of both", 10, "exact", e["ensemble"]],
    ]


# ---- results -------------------------------------------------------------------------------------


def summarise(
    args: argparse.Namespace, teacher: dict[str, Any], runs: dict[str, list[dict[str, Any]]]
) -> dict[str, Any]:
    acc = {variant: mean_std(r["top1"] for r in rs) for variant, rs in runs.items()}
    online = acc["online"]
    cached = acc["cached"]
    noise = max(online["std"], cached["std"])
    per_k = [
        {"k": int(v[1:].split("-")[0]), "tail": v.split("-")[1], **acc[v]}
        for v in acc
        if v.startswith("k")
    ]
    return {
        "bench": "parity",
        "machine": machine(),
        "settings": {
            k: getattr(args, k)
            for k in (
                "limit",
                "shard_size",
                "views",
                "teacher",
                "teacher_epochs",
                "student",
                "epochs",
                "seeds",
                "ks",
                "tails",
                "alpha",
                "temperature",
                "batch_size",
                "budget",
                "quick",
            )
        },
        "teacher_acc": teacher["top1"],
        "online_acc": online,
        "cached_acc": cached,
        "ce_acc": acc["ce"],
        "per_k": per_k,
        "strong": _strong(acc, runs),
        "cached_minus_online": cached["mean"] - online["mean"],
        "parity_ok": abs(cached["mean"] - online["mean"]) <= noise,
        "paired_differences": [
            c["top1"] - o["top1"] for c, o in zip(runs["cached"], runs["online"], strict=True)
        ],
        "images_per_s": {
            variant: mean_std(r["images_per_s"] for r in rs)["mean"] for variant, rs in runs.items()
        },
        "runs": runs,
    }


def _strong(acc: dict[str, Any], runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """The strong recipe's figures: online and cached KD, CE, and whether they agree."""
    online = acc["strong-online"]
    cached = acc["strong-cached"]
    noise = max(online["std"], cached["std"])
    pairs = zip(runs["strong-cached"], runs["strong-online"], strict=True)
    return {
        "recipe": FMNIST_STRONG_RECIPE,
        "online_acc": online,
        "cached_acc": cached,
        "ce_acc": acc["strong-ce"],
        "cached_minus_online": cached["mean"] - online["mean"],
        "parity_ok": abs(cached["mean"] - online["mean"]) <= noise,
        "paired_differences": [c["top1"] - o["top1"] for c, o in pairs],
    }


def format_result(result: dict[str, Any]) -> str:
    """The table printed by ``kdcache bench parity``."""
    s = result["settings"]
    head = (
        f"parity bench: Fashion-MNIST {s['limit']} train / test samples, teacher {s['teacher']} "
        f"({result['teacher_acc']:.2f}% after {s['teacher_epochs']} epochs), "
        f"student {s['student']} x {s['epochs']} "
        f"epochs, KD alpha {s['alpha']} T {s['temperature']}, seeds {s['seeds']}, A={s['views']}"
    )
    rows = [
        ["CE only", "-", "-", result["ce_acc"]],
        ["online KD", 10, "exact", result["online_acc"]],
        ["cached KD", 10, "exact", result["cached_acc"]],
    ]
    rows += [
        ["cached KD", r["k"], r["tail"], r]
        for r in sorted(result["per_k"], key=lambda r: (r["k"], r["tail"]))
    ]
    strong = result["strong"]
    rows += [
        ["strong recipe: CE only", "-", "-", strong["ce_acc"]],
        ["strong recipe: online KD", 10, "exact", strong["online_acc"]],
        ["strong recipe: cached KD", 10, "exact", strong["cached_acc"]],
    ]
    if "beyond" in result:
        rows += beyond_rows(result["beyond"])
    body = table(
        ["student", "k", "tail", "top-1 % mean", "std", "seeds"],
        [[a, b, c, f"{d['mean']:.2f}", f"{d['std']:.2f}", d["n"]] for a, b, c, d in rows],
    )
    verdict = (
        f"cached - online = {result['cached_minus_online']:+.3f} points (paired per seed: "
        f"{', '.join(f'{d:+.3f}' for d in result['paired_differences'])}); "
        f"within one std: {result['parity_ok']}; strong recipe: cached - online = "
        f"{strong['cached_minus_online']:+.3f} points, within one std: {strong['parity_ok']}"
    )
    tails = [t for t in s["tails"].split(",") if t]
    error = table(
        ["k"]
        + [f"mean KL(online ‖ cached) T={s['temperature']:g} {t}" for t in tails]
        + ["max |Δ tail mass| T=1"],
        [
            [r["k"]] + [r[f"kl_{t}"] for t in tails] + [r["max_dtail"]]
            for r in result.get("target_error", [])
        ],
    )
    return "\n\n".join(
        [
            head,
            body,
            verdict,
            "cached (fp16) vs online (fp32) targets, first shard, same views:",
            error,
        ]
    )
