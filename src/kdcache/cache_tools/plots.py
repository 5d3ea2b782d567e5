"""PNG plots of an inspect report (its schema: :mod:`kdcache.core.inspect_report`).

Everything is drawn from the report alone, so plots can be redrawn from a saved JSON file
(``InspectResult.read(path)``).
Figures are built with :class:`matplotlib.figure.Figure` (Agg canvas), never through pyplot's
global state.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
from matplotlib.colors import LogNorm  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from kdcache.core.inspect_report import PairReport, TeacherReport  # noqa: E402
from kdcache.core.results import InspectResult  # noqa: E402

DPI = 110
DISTRIBUTIONS = {  # report key -> (title, x label)
    "max_prob": ("Max probability (teacher confidence)", "max_c p(c)  at T=1"),
    "label_prob": ("Probability of the labelled class", "p(label)  at T=1"),
    "tail_mass": ("Mass outside the stored top-k", "probability outside the top-k at T=1"),
    "margin": ("Top-1 / top-2 margin", "p(top-1) - p(top-2)  at T=1"),
}
CORRECTNESS = (
    ("both_right", "both right"),
    ("a_only", "only A right"),
    ("b_only", "only B right"),
    ("both_wrong", "both wrong"),
)


def write_plots(report: InspectResult, out_dir: str | Path) -> list[Path]:
    """Write every plot of the report into ``out_dir``; return the paths written (none without
    views)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    teachers = report.teachers
    if not any(t["views"] for t in teachers.values()):
        return []  # nothing to draw: no complete shard was read
    paths = [
        _save(distribution_plot(report, key), out / f"dist_{key}.png")
        for key in DISTRIBUTIONS
        if any(t[key] is not None for t in teachers.values())
    ]
    paths += [
        _save(entropy_plot(report, key), out / f"dist_entropy_{key.replace('=', '')}.png")
        for key in next(iter(teachers.values()))["entropy"]
    ]
    if all(t.similarity is not None for t in teachers.values()):
        paths.append(_save(similarity_plot(report), out / "similarity.png"))
    for name, t in teachers.items():
        paths.append(_save(reliability_plot(name, t), out / f"reliability_{_slug(name)}.png"))
        paths.append(_save(class_plot(name, t), out / f"per_class_{_slug(name)}.png"))
        if t.get("augmentation"):
            figure = strength_plot(name, t["augmentation"])
            paths.append(_save(figure, out / f"augmentation_{_slug(name)}.png"))
    for pair in report.pairs:
        paths.append(
            _save(pair_plot(pair), out / f"pair_{_slug(pair['a'])}_vs_{_slug(pair['b'])}.png")
        )
    return paths


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=DPI)
    return path


def _overlay(ax, dists: dict[str, dict[str, Any] | None]) -> None:
    """Step histograms (fraction of views per bin) of several teachers, a dashed line at each
    mean."""
    for i, (name, d) in enumerate(dists.items()):
        if d is None or not d["n"]:
            continue
        edges = np.array(d["hist"]["edges"])
        counts = np.array(d["hist"]["counts"])
        color = f"C{i}"
        f = ".1e" if d.get("scale") == "log10" else ".3f"
        ax.stairs(
            counts / counts.sum(),
            edges,
            color=color,
            linewidth=1.8,
            label=f"{name}: mean {d['mean']:{f}}, median {d['quantiles']['p50']:{f}}",
        )
        ax.axvline(d["mean"], color=color, linestyle="--", linewidth=1)
    ax.set_ylabel("fraction of views per bin")
    ax.grid(alpha=0.3)
    ax.legend(title="teacher (dashed: mean)", fontsize=9)


def distribution_plot(report: InspectResult, key: str) -> Figure:
    """One probability quantity of every teacher, overlaid."""
    title, xlabel = DISTRIBUTIONS[key]
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.add_subplot()
    dists = {
        (f"{n} (k={t['k']})" if key == "tail_mass" else n): t[key]
        for n, t in report.teachers.items()
    }
    _overlay(ax, dists)
    log = any(d is not None and d.get("scale") == "log10" for d in dists.values())
    if log:  # the tail mass spans decades: its histogram is binned in log10
        edges = next(d["hist"]["edges"] for d in dists.values() if d is not None)
        ax.set_xscale("log")
        ax.set(
            xlim=(edges[0], edges[-1]),
            xlabel=f"{xlabel} (log scale; the first bin holds every tail below {edges[1]:.1e})",
        )
    else:
        ax.set(xlabel=xlabel, xlim=(0, 1))
    ax.set(title=f"{title} over {_views(report)}")
    return fig


def entropy_plot(report: InspectResult, key: str) -> Figure:
    """The entropy at one temperature of every teacher, overlaid, with the maximum log C marked."""
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.add_subplot()
    _overlay(ax, {n: t["entropy"][key] for n, t in report.teachers.items()})
    log_c = float(np.log(report.cache.num_classes))
    ax.axvline(log_c, color="grey", linewidth=1)
    ax.text(log_c, ax.get_ylim()[1] * 0.97, " log C ", ha="right", va="top", color="grey")
    tail = report.settings.tail
    ax.set(
        title=f"Entropy of the soft targets at {key} (tail: {tail}) over {_views(report)}",
        xlabel="entropy (nats)",
        xlim=(0, log_c * 1.02),
    )
    return fig


def similarity_plot(report: InspectResult) -> Figure:
    """Paper 003's similarity information, teachers side by side: mean entropy against the
    temperature, where each teacher sits between label smoothing and a one-class response, and
    the KL to label smoothing per class."""
    fig = Figure(figsize=(15, 4.8), layout="constrained")
    ent, where, per_class = fig.subplots(1, 3)
    log_c1 = float(np.log(max(report.cache.num_classes - 1, 1)))
    temps = report.settings.temperatures
    for i, (name, t) in enumerate(report.teachers.items()):
        color = f"C{i % 10}"
        means = [t.entropy[f"T={float(x)}"].mean for x in temps]
        ent.plot(temps, [np.nan if m is None else m for m in means], "o-", color=color, label=name)
        sim = t.similarity
        if sim is None:  # a report written before the figures existed
            continue
        mass = sim.nonlabel_mass.mean or 0.0
        spread = sim.nonlabel_entropy.mean or 0.0
        where.scatter(
            [mass], [spread], color=color, s=50, label=f"{name} ({sim.structure or 0:.2f})"
        )
        rows = [c for c in t.per_class if c.views]
        per_class.plot(
            [c.class_ for c in rows], [c.ls_kl_mean for c in rows], "o-", color=color, label=name
        )
    ent.axhline(float(np.log(report.cache.num_classes)), color="grey", lw=1, ls=":")
    ent.set(title="Mean entropy of the targets", xlabel="temperature", ylabel="nats")
    ent.legend(fontsize="small")
    where.axhline(log_c1, color="grey", lw=1, ls="--")
    where.text(0.0, log_c1, " label smoothing (uniform non-label mass)", va="bottom", color="grey")
    where.set(
        title="Non-label mass and its spread (structure in the legend)",
        xlabel="mean 1 - p(label)",
        ylabel="mean entropy of the non-label distribution (nats)",
        xlim=(0, 1),
        ylim=(0, log_c1 * 1.1 + 1e-6),
    )
    where.legend(fontsize="small")
    per_class.set(
        title="KL to label smoothing of the same p(label)",
        xlabel="class",
        ylabel="mean KL (nats); higher: more similarity information",
    )
    per_class.legend(fontsize="small")
    fig.suptitle(
        f"Similarity information over {_views(report)} (T=1, tail: {report.settings.tail})"
    )
    return fig


def _views(report: InspectResult) -> str:
    n = next(iter(report.teachers.values()))["views"]
    return f"{n:,} views"


def reliability_plot(name: str, t: TeacherReport) -> Figure:
    """Reliability diagram: accuracy per confidence bin against the diagonal, and the bin counts."""
    rel = t["reliability"]
    edges = np.array(rel["edges"])
    centers = (edges[:-1] + edges[1:]) / 2
    width = np.diff(edges)
    acc = np.array([np.nan if a is None else a for a in rel["accuracy"]])
    conf = np.array([np.nan if c is None else c for c in rel["confidence"]])
    fig = Figure(figsize=(6, 7), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    top.bar(
        centers,
        np.nan_to_num(acc),
        width,
        color="C0",
        edgecolor="black",
        linewidth=0.6,
        label="accuracy in bin",
    )
    gap = np.isfinite(acc)
    top.bar(
        centers[gap],
        np.abs(conf - acc)[gap],
        width[gap],
        bottom=np.minimum(conf, acc)[gap],
        fill=False,
        edgecolor="C3",
        hatch="///",
        linewidth=0.8,
        label="gap to mean confidence",
    )
    top.scatter(
        centers[gap],
        conf[gap],
        marker="_",
        s=250,
        color="C3",
        linewidths=2,
        label="mean confidence",
        zorder=3,
    )
    top.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
    ece = "-" if t["ece"] is None else f"{t['ece']:.4f}"
    top.set(
        title=f"Reliability of {name}: ECE {ece} ({len(centers)} bins)",
        ylabel="top-1 accuracy",
        xlim=(0, 1),
        ylim=(0, 1),
    )
    fig.legend(loc="outside lower center", ncols=2, fontsize=9)
    top.grid(alpha=0.3)
    counts = np.array(rel["counts"], dtype=float)
    bottom.bar(
        centers,
        counts / max(counts.sum(), 1),
        width,
        color="grey",
        edgecolor="black",
        linewidth=0.6,
    )
    bottom.set(xlabel="confidence (max probability, T=1)", ylabel="fraction of views")
    bottom.grid(alpha=0.3)
    return fig


def class_plot(name: str, t: TeacherReport) -> Figure:
    """Per-class top-1 accuracy and mean p(label): bars by class when few, sorted curves when
    many."""
    classes = [c for c in t["per_class"] if c["views"]]
    acc = np.array([c["top1"] for c in classes])
    conf = np.array([c["label_prob_mean"] for c in classes])
    top = np.array([c["max_prob_mean"] for c in classes])
    fig = Figure(
        figsize=(max(6.0, min(0.45 * len(classes), 16.0)) if len(classes) <= 40 else 9, 4.8),
        layout="constrained",
    )
    ax = fig.add_subplot()
    if len(classes) <= 40:
        x = np.arange(len(classes))
        ax.bar(x - 0.27, acc, 0.27, label="top-1 accuracy", color="C0")
        ax.bar(x, conf, 0.27, label="mean p(label)", color="C1")
        ax.bar(x + 0.27, top, 0.27, label="mean max prob (confidence)", color="C2")
        ax.set_xticks(
            x,
            [c["name"] for c in classes],
            rotation=45 if len(classes) > 8 else 0,
            ha="right" if len(classes) > 8 else "center",
        )
        ax.set(xlabel="class")
    else:
        order = np.argsort(acc, kind="stable")
        x = np.arange(len(classes))
        ax.plot(x, acc[order], color="C0", linewidth=1.8, label="top-1 accuracy")
        ax.scatter(x, conf[order], s=4, color="C1", alpha=0.6, label="mean p(label)")
        ax.scatter(x, top[order], s=4, color="C2", alpha=0.6, label="mean max prob (confidence)")
        ax.set(xlabel=f"classes sorted by accuracy ({len(classes)} classes with views)")
    ax.set(
        title=f"Per-class accuracy and confidence of {name}",
        ylabel="fraction / probability",
        ylim=(0, 1.05),
    )
    fig.legend(loc="outside lower center", ncols=3, fontsize=9)
    ax.grid(alpha=0.3, axis="y")
    return fig


def pair_plot(pair: PairReport) -> Figure:
    """Two teachers on the same views: p(label) of A against B, and who is right."""
    a = pair["a"]
    b = pair["b"]
    fig = Figure(figsize=(12, 5), layout="constrained")
    left, right = fig.subplots(1, 2, width_ratios=[1.1, 1])
    counts = np.array(pair["label_prob_2d"]["counts"], dtype=float)
    if counts.sum():
        image = left.imshow(
            np.where(counts > 0, counts, np.nan).T,
            origin="lower",
            extent=(0, 1, 0, 1),
            norm=LogNorm(vmin=1, vmax=max(counts.max(), 2)),
            cmap="viridis",
            aspect="equal",
        )
        fig.colorbar(image, ax=left, label="labelled views per cell (log scale)", pad=0.02)
    left.plot([0, 1], [0, 1], "r--", linewidth=1, label="equal confidence")
    left.set(
        title=f"p(label): {a} vs {b}", xlabel=f"p(label) of {a} (A)", ylabel=f"p(label) of {b} (B)"
    )
    left.legend(loc="upper left", fontsize=9)
    fractions = [pair["correctness"][key] or 0.0 for key, _ in CORRECTNESS] + [
        pair["top1_agreement"] or 0.0
    ]
    labels = [label for _, label in CORRECTNESS] + ["same top-1\n(all views)"]
    bars = right.bar(labels, fractions, color=["C2", "C0", "C1", "C3", "grey"])
    right.bar_label(bars, labels=[f"{100 * f:.1f}%" for f in fractions], padding=2)
    right.axvline(3.5, color="black", linewidth=0.8)
    right.set(
        title=f"Who is right: A = {a}, B = {b}",
        ylabel="fraction of views (labelled ones, left of the line)",
        ylim=(0, 1.3),
    )
    right.text(
        0.02,
        0.97,
        _both_right_note(pair["both_right"]),
        transform=right.transAxes,
        va="top",
        fontsize=9,
        bbox={"boxstyle": "round", "facecolor": "white", "alpha": 0.9},
    )
    right.grid(alpha=0.3, axis="y")
    return fig


def _both_right_note(both: dict[str, Any]) -> str:
    if not both["views"]:
        return "no view that both get right"
    return (
        f"on the {both['views']:,} views both get right:\n"
        f"  mean p(label): A {both['label_prob_mean_a']:.3f}, B {both['label_prob_mean_b']:.3f}\n"
        f"  A more confident on {100 * both['a_more_confident']:.1f}%, "
        f"B on {100 * both['b_more_confident']:.1f}%"
    )


def strength_plot(name: str, augmentation: dict[str, Any]) -> Figure:
    """Teacher confidence and accuracy by policy magnitude and by Mixup/CutMix lam."""
    panels = [(k, v) for k, v in (("policy", augmentation["policy"]), ("mix", augmentation["mix"]))]
    panels = [(k, v) for k, v in panels if v]
    fig = Figure(figsize=(5.5 * len(panels), 4), dpi=DPI)
    for i, (kind, section) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        groups = section["by_level"] if kind == "policy" else section["by_lam"]
        groups = [g for g in groups if g["views"]]
        x = [(g["lo"] + min(g["hi"], 10.0 if kind == "policy" else 1.0)) / 2 for g in groups]
        for key, label in (("max_prob", "max prob"), ("top1", "top-1 (heavier label)")):
            ax.plot(x, [g[key] for g in groups], marker="o", label=label)
        if kind == "mix" and section["unmixed"]["views"]:
            ax.axhline(
                section["unmixed"]["max_prob"], ls="--", color="grey", label="unmixed max prob"
            )
        ax.set_xlabel("mean policy magnitude (0..10)" if kind == "policy" else "lam (own image)")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title(f"{name}: by {'policy magnitude' if kind == 'policy' else 'mixing lam'}")
    fig.tight_layout()
    return fig
