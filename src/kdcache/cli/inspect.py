"""``kdcache inspect CACHE``: teacher statistics of a cache as tables, a JSON document and plots.

The figures come from :mod:`kdcache.cache_tools.stats` (the report's schema is
:mod:`kdcache.core.inspect_report`); the plots from :mod:`kdcache.cache_tools.plots`. This module
only parses, runs and prints.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kdcache.core.inspect_report import PairReport, Similarity, TeacherReport
    from kdcache.core.results import InspectResult, InspectSettings

QUANTITIES = (
    ("max_prob", "max prob"),
    ("label_prob", "p(label)"),
    ("tail_mass", "tail mass"),
    ("margin", "top1-top2"),
)
CLASS_ROWS = 10  # top / bottom classes shown when there are more than 2 * CLASS_ROWS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from kdcache.targets.sparse import TAIL_MODES

    parser.add_argument("cache", metavar="CACHE", help="path or URL of the cache")
    parser.add_argument(
        "--teacher",
        action="append",
        metavar="NAME",
        help="teacher to inspect; repeat for several (default: all teachers of the cache)",
    )
    parser.add_argument(
        "--json", type=Path, metavar="FILE", help="write every figure to this JSON file"
    )
    parser.add_argument(
        "--plots", type=Path, metavar="DIR", help="write PNG plots into this directory"
    )
    parser.add_argument(
        "--temperature",
        type=_temperatures,
        action="extend",
        metavar="T[,T...]",
        help="temperatures of the entropy figures, comma-separated or repeated (default: 1)",
    )
    parser.add_argument(
        "--tail",
        choices=TAIL_MODES,
        default="spread",
        help="treatment of the classes outside the stored top-k for entropy and JS "
        "(default spread)",
    )
    parser.add_argument(
        "--ensemble",
        action="append",
        metavar="NAME[:W],NAME[:W]...[/logits]",
        help="also compare this ensemble of cached teachers with its members (weights default "
        "1; repeat for several); teachers stored as ensembles are compared with their models "
        "when those are cached too",
    )
    parser.add_argument(
        "--require-complete",
        action="store_true",
        help="fail on incomplete shards instead of skipping them with a warning",
    )


def run(args: argparse.Namespace) -> int:
    from kdcache.cache.store import open_store
    from kdcache.cache_tools.ensemble_stats import inspect_extras, parse_ensemble
    from kdcache.cache_tools.stats import inspect_cache
    from kdcache.core.outputs import check_output_dir, check_output_file

    if args.json is not None:
        check_output_file(args.json, "--json")
    if args.plots is not None:
        check_output_dir(args.plots, "--plots")
    store = open_store(args.cache)
    ensembles = [parse_ensemble(text) for text in args.ensemble or []]
    with _progress_bar(store.num_shards) as progress:
        report = inspect_cache(
            store,
            args.teacher,
            temperatures=args.temperature or [1.0],
            tail=args.tail,
            require_complete=args.require_complete,
            progress=progress,
        )
    with _progress_bar(store.num_shards) as progress:
        extras = inspect_extras(
            store,
            list(report.teachers),
            ensembles,
            tail=args.tail,
            require_complete=args.require_complete,
            progress=progress,
        )
    report = report.model_copy(update={**extras, "teacher_checks": teacher_checks(args.cache)})
    print(format_report(report))
    if args.json is not None:
        report.write(args.json)
        print(f"\nwrote {args.json}")
    if args.plots is not None:
        from kdcache.cache_tools.plots import (
            write_plots,
        )  # matplotlib only when plots are asked for

        paths = write_plots(report, args.plots)
        print(f"wrote {len(paths)} plots to {args.plots}")
    return 0


def _temperatures(text: str) -> list[float]:
    """``--temperature 1,2`` (or the flag repeated): positive numbers."""
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected numbers separated by commas, found {text!r}"
        ) from None
    if not values or any(not (v > 0 and v < float("inf")) for v in values):
        raise argparse.ArgumentTypeError(
            f"temperatures must be positive and finite, found {text!r}"
        )
    return values


@contextmanager
def _progress_bar(total: int) -> Iterator[Callable[[int], None] | None]:
    """A tqdm progress callback on an interactive stderr, else None."""
    if not sys.stderr.isatty():
        yield None
        return
    from tqdm import tqdm

    with tqdm(total=total, unit="shard", desc="inspect", leave=False) as bar:

        def advance(shards: int) -> None:
            bar.update(shards)

        yield advance


# ---- formatting -------------------------------------------------------------------------
def format_report(report: InspectResult) -> str:
    """Every table of the report, as one string."""
    sections = [_header(report), summary_table(report), distribution_table(report)]
    if all(t.similarity is not None for t in report.teachers.values()):
        sections += [similarity_table(report), class_similarity_table(report)]
    for name, t in report.teachers.items():
        sections.append(class_table(name, t))
        sections.append(confused_table(name, t))
        if t.get("augmentation"):
            sections.append(strength_table(name, t["augmentation"]))
    if report.pairs:
        sections.append(pair_table(report.pairs))
    from kdcache.cache_tools.ensemble_stats import format_extras

    sections += format_extras(report.extras(), table)
    if report.teacher_checks:
        sections.append(check_table(report.teacher_checks))
    return "\n\n".join(sections)


def teacher_checks(cache: str) -> list[dict[str, Any]]:
    """Each recorded precompute run's teacher check (:mod:`kdcache.pipeline.teachercheck`)."""
    from kdcache.core.results import read_run_records

    return [
        {
            "run_id": record.run_id,
            "teacher": run.name,
            "top1": run.top1,
            "top1_unmixed": run.top1_unmixed,
            "views": run.views_checked,
            "check": run.check,
            "rendering": run.rendering,
        }
        for record in read_run_records(cache)
        for run in record.teachers
    ]


def check_table(checks: list[dict[str, Any]]) -> str:
    """The teacher checks of the precompute runs, then each teacher's rendering as recorded."""
    rows = [
        [
            c["run_id"],
            c["teacher"],
            _pct(c["top1"]),
            _pct(c["top1_unmixed"]),
            c["views"],
            c["check"],
        ]
        for c in checks
    ]
    headers = ["precompute run", "teacher", "top-1", "unmixed", "views", "teacher check"]
    title = "teacher check at precompute (on the views each run computed)"
    lines = [table(headers, rows, title=title, left=2)]
    latest = {c["teacher"]: c["rendering"] for c in checks if c["rendering"]}
    lines += [f"  {name} renders at {rendering}" for name, rendering in latest.items()]
    return "\n".join(lines)


def strength_table(name: str, augmentation: dict[str, Any]) -> str:
    """Teacher confidence by augmentation strength: policy ops and magnitude, mixing and lam."""
    rows = []
    policy = augmentation.get("policy")
    if policy:
        rows += [[f"{g['ops']} policy op(s)", *_group_cells(g)] for g in policy["by_ops"]]
        rows += [
            [f"magnitude {g['lo']:g}-{g['hi']:g}", *_group_cells(g)] for g in policy["by_level"]
        ]
    mix = augmentation.get("mix")
    if mix:
        rows += [[kind, *_group_cells(mix[kind])] for kind in ("unmixed", "mixup", "cutmix")]
        rows += [[f"lam {g['lo']:g}-{g['hi']:g}", *_group_cells(g)] for g in mix["by_lam"]]
    header = ["views", "n", "max prob", "top-1", "p(label)"]
    title = f"teacher {name}: confidence by augmentation strength (mixed: the heavier label)"
    return table(header, [r for r in rows if r[1]], title=title)


def _group_cells(group: dict[str, Any]) -> list[Any]:
    return [group["views"], group["max_prob"], group["top1"], group["label_prob"]]


def table(
    header: Sequence[str], rows: Sequence[Sequence[Any]], title: str = "", left: int = 1
) -> str:
    """Fixed-width table: the first ``left`` columns left-aligned, the others right-aligned."""
    cells = [[_cell(v) for v in row] for row in [header, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = [
        "  ".join(
            c.ljust(w) if i < left else c.rjust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(([title] if title else []) + lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _log_cell(value: float | None) -> str:
    """A quantity spread over decades (the tail mass): two significant digits."""
    return "-" if value is None else "0" if value == 0 else f"{value:.1e}"


def _header(report: InspectResult) -> str:
    c = report.cache
    s = report.settings
    lines = [
        f"cache {c.path}: {c.samples} samples x {c.num_views} views, "
        f"{c.num_classes} classes, {c.shards_read}/{c.shards} shards read",
        f"views: {c.recipe}",
        f"tail treatment: {s.tail} ({s.tail_note})",
    ]
    for what, names in c.skipped_shards.items():
        lines.append(
            f"SKIPPED {len(names)} shard(s) incomplete for {what}: {', '.join(names[:8])}"
            + (" ..." if len(names) > 8 else "")
        )
    return "\n".join(lines)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def summary_table(report: InspectResult) -> str:
    """One column per teacher: accuracy, calibration, confidence and consistency figures."""
    teachers = report.teachers
    rows = [
        [label, *(fn(t) for t in teachers.values())] for label, fn in _summary_rows(report.settings)
    ]
    return table(
        ["teacher", *teachers], rows, "== summary (accuracy and error rates: of labelled views) =="
    )


def _summary_rows(settings: InspectSettings) -> list[tuple[str, Callable[[TeacherReport], Any]]]:
    """(row label, figure of a teacher's report) for the summary table."""
    entropy = [
        (f"mean entropy T={t:g} (nats)", lambda r, k=f"T={float(t)}": r["entropy"][k]["mean"])
        for t in settings.temperatures
    ]
    under = [
        (
            f"right, p(label) < {thr}",
            lambda r, k=str(thr): _pct(r["under_confident"][k]["fraction"]),
        )
        for thr in settings.under_confident_thresholds
    ]
    return [
        ("k (stored top-k)", lambda r: r["k"]),
        ("valid views", lambda r: r["views"]),
        ("labelled views", lambda r: r["labelled_views"]),
        ("top-1 accuracy", lambda r: _pct(r["top1"])),
        ("top-5 accuracy", _top5),
        ("ECE (15 bins)", lambda r: r["ece"]),
        ("mean max prob", lambda r: r["max_prob"]["mean"]),
        ("mean p(label)", lambda r: r["label_prob"]["mean"]),
        *entropy,
        ("mean tail mass", lambda r: r["tail_mass"]["mean"]),
        ("wrong (top-1)", lambda r: _pct(r["wrong"]["fraction"])),
        *under,
        (
            "samples whose views differ on top-1",
            lambda r: _pct(r["view_consistency"]["top1_disagree"]),
        ),
        (
            "mean JS between views of a sample",
            lambda r: (r["view_consistency"]["js"] or {}).get("mean"),
        ),
    ]


SIMILARITY_ROWS = (
    ("nonlabel_mass", "mean non-label mass 1 - p(label)"),
    ("nonlabel_entropy", "mean entropy of the non-label distribution"),
    ("nonlabel_effective", "mean effective non-label classes"),
    ("nonlabel_top1_share", "mean share of the largest non-label class"),
    ("ls_kl", "mean KL(teacher || LS, same p(label))"),
    ("ls_l1", "mean L1(teacher, LS, same p(label))"),
)


def similarity_table(report: InspectResult) -> str:
    """Paper 003's similarity information, one column per teacher, ranked by KL to LS."""
    teachers = report.teachers
    sims = _similarities(report)
    kl = {n: sim.ls_kl.mean or 0.0 for n, sim in sims.items()}
    order = sorted(kl, key=lambda n: -kl[n])
    rows = [
        [f"mean entropy T={x:g}", *(t.entropy[f"T={float(x)}"].mean for t in teachers.values())]
        for x in report.settings.temperatures
    ]
    rows += [
        [label, *(getattr(sim, key).mean for sim in sims.values())]
        for key, label in SIMILARITY_ROWS
    ]
    rows.append(
        [
            "structure (0: LS-like, 1: one class)",
            *(sim.structure for sim in sims.values()),
        ]
    )
    rows.append(
        [
            "rank by KL to LS (1: most similarity information)",
            *(order.index(n) + 1 for n in teachers),
        ]
    )
    c = report.cache.num_classes
    title = (
        f"== similarity information (paper 003; T=1, tail: {report.settings.tail}; "
        f"LS: entropy log(C-1) = {math.log(max(c - 1, 1)):.3f}, KL 0) =="
    )
    return table(["figure (labelled views)", *teachers], rows, title)


def _similarities(report: InspectResult) -> dict[str, Similarity]:
    """Each teacher's similarity figures (format_report shows them only when all have them)."""
    return {n: t.similarity for n, t in report.teachers.items() if t.similarity is not None}


def class_similarity_table(report: InspectResult) -> str:
    """KL to LS and the closest class of each class, teachers side by side (the first
    ``2 * CLASS_ROWS`` classes)."""
    teachers = report.teachers
    first = next(iter(teachers.values())).per_class
    shown = first[: 2 * CLASS_ROWS]
    header = ["class", "name"]
    for n in teachers:
        header += [f"{n} KL to LS", f"{n} closest"]
    rows = []
    for i, c in enumerate(shown):
        row: list[Any] = [c.class_, c.name]
        for t in teachers.values():
            mine = t.per_class[i]
            closest = mine.most_similar[0] if mine.most_similar else None
            row += [mine.ls_kl_mean, f"{closest.name} {closest.share:.2f}" if closest else None]
        rows.append(row)
    more = (
        f" (the first {len(shown)} of {len(first)}; all in --json)"
        if len(first) > len(shown)
        else ""
    )
    return table(header, rows, f"== similarity information per class{more} ==", left=2)


def _top5(t: TeacherReport) -> str:
    if t["top5"] is not None:
        return _pct(t["top5"])
    return f"- (top-{t['topk']['k']}: {_pct(t['topk']['accuracy'])})"


def distribution_table(report: InspectResult) -> str:
    """Mean and quantiles of each per-view quantity, one row per teacher and quantity."""
    rows = []
    for name, t in report.teachers.items():
        dists = [(label, t[key]) for key, label in QUANTITIES]
        dists += [(f"entropy {k}", d) for k, d in t["entropy"].items()]
        rows += [
            [
                name,
                label,
                *map(
                    _log_cell if d.get("scale") == "log10" else _cell,
                    (d["mean"], *d["quantiles"].values()),
                ),
            ]
            for label, d in dists
            if d is not None
        ]
    title = (
        "== distributions per view (quantiles from 1000-bin histograms: within 0.001, "
        "entropy within log(C)/1000, tail mass within 1.9 %) =="
    )
    return table(
        ["teacher", "quantity", "mean", "p5", "p25", "p50", "p75", "p95"], rows, title, left=2
    )


def class_table(name: str, t: TeacherReport) -> str:
    """Per-class accuracy and confidence; the worst and best classes by accuracy when C is large."""
    classes: list[dict[str, Any] | None] = list(t["per_class"])
    title = f"== {name}: per class =="
    if len(classes) > 2 * CLASS_ROWS:
        seen = sorted(
            (c for c in t["per_class"] if c["views"]), key=lambda c: (c["top1"], c["class"])
        )
        if len(seen) > 2 * CLASS_ROWS:
            classes = [*seen[:CLASS_ROWS], None, *seen[-CLASS_ROWS:]]
            title = (
                f"== {name}: per class ({CLASS_ROWS} worst and {CLASS_ROWS} best by top-1 "
                f"of {len(seen)} with views) =="
            )
        else:
            classes = seen
            title = f"== {name}: per class (the {len(seen)} with labelled views) =="
    rows = [
        ["..."] * 6
        if c is None
        else [
            c["class"],
            c["name"],
            c["views"],
            _pct(c["top1"]),
            c["label_prob_mean"],
            c["max_prob_mean"],
        ]
        for c in classes
    ]
    return table(
        ["class", "name", "views", "top-1", "mean p(label)", "mean max p"], rows, title, left=2
    )


def confused_table(name: str, t: TeacherReport) -> str:
    rows = [
        [f"{p['true_name']} -> {p['pred_name']}", p["count"], _pct(p["fraction_of_true"])]
        for p in t["confused_pairs"]
    ]
    if not rows:
        return f"== {name}: most confused pairs == (no errors)"
    return table(
        ["true -> predicted", "views", "of the true class"],
        rows,
        f"== {name}: most confused pairs ==",
    )


def pair_table(pairs: list[PairReport]) -> str:
    """Teacher against teacher on the same views."""
    rows = [
        [
            f"{p['a']} vs {p['b']}",
            p["views"],
            _pct(p["top1_agreement"]),
            p["js"]["mean"],
            _pct(p["correctness"]["both_right"]),
            _pct(p["correctness"]["a_only"]),
            _pct(p["correctness"]["b_only"]),
            p["both_right"]["label_prob_mean_a"],
            p["both_right"]["label_prob_mean_b"],
            _pct(p["both_right"]["a_more_confident"]),
        ]
        for p in pairs
    ]
    header = [
        "A vs B",
        "views",
        "agree",
        "mean JS",
        "both right",
        "A only",
        "B only",
        "p(label) A",
        "p(label) B",
        "A > B",
    ]
    return table(
        header, rows, "== teacher vs teacher (p(label) and A > B on views both get right) =="
    )
