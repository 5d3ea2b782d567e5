"""``kdcache inspect CACHE``: teacher statistics of a cache as tables, a JSON document and plots.

The figures come from :mod:`kdcache.cache_tools.stats` (its docstring holds the JSON schema); the
plots from :mod:`kdcache.cache_tools.plots`. This module only parses, runs and prints.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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
    report = report.model_copy(update=extras)
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
    for name, t in report.teachers.items():
        sections.append(class_table(name, t))
        sections.append(confused_table(name, t))
        if t.get("augmentation"):
            sections.append(strength_table(name, t["augmentation"]))
    if report.pairs:
        sections.append(pair_table(report.pairs))
    from kdcache.cache_tools.ensemble_stats import format_extras

    sections += format_extras(report.extras(), table)
    return "\n\n".join(sections)


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


def _summary_rows(settings: InspectSettings) -> list[tuple[str, Callable[[dict[str, Any]], Any]]]:
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


def _top5(t: dict[str, Any]) -> str:
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


def class_table(name: str, t: dict[str, Any]) -> str:
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


def confused_table(name: str, t: dict[str, Any]) -> str:
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


def pair_table(pairs: list[dict[str, Any]]) -> str:
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
