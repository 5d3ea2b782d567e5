"""Teacher statistics of a cache, streamed one shard block at a time with bounded memory.

Every figure comes from bounded accumulators (counts, sums, fixed-bin histograms, per-class vectors,
counts of the distinct (true, predicted) error pairs) updated with vectorised numpy per shard block,
so memory does not grow with the cache and a million views take seconds. Only VALID rows (status 1)
count; shards without a completion mark (views or any selected teacher) are skipped with a warning,
or refused.

## The report

Its schema is code: :mod:`kdcache.core.inspect_report` (``TeacherReport``, ``PairReport`` and their
parts), validated when the report is built here and when it is read back. A DIST (``Dist``) is a
per-view quantity's mean, min, max, quantiles and histogram; the similarity figures (paper 003) are
defined in :mod:`kdcache.cache_tools.similarity`.

Fractions about labels (accuracy, wrong, under-confident, correctness) are of labelled views. Means,
min and max are exact. Quantiles are read from a 1000-bin histogram over the quantity's range
([0, 1] for probabilities, [0, log C] for entropy, [0, log 2] for JS divergence; for the tail mass,
which spans decades, bins equal in log10 over [1e-8, 1], ``scale: "log10"``, smaller tails and 0
counting in the first): they are inverted-CDF quantiles within one fine bin (``resolution``, in
log10 units for the tail mass: 1.9 %) of the exact value. ``hist`` is the same histogram merged to
50 bins. Entropy and JS divergence are in nats; JS uses the T=1 distributions under
``settings.tail``. Exact at T=1 means up to the fp16 rounding of the stored top-k logits (about 0.4%
of a probability for logits near 10); the tail mass is read from the stored tail logsumexp (relative
error ~0.4% in fp16) and is exactly 0 when k == C. Undefined figures (no views, ``k < 2`` for the
margin, ``A < 2`` for view consistency) are null. A view mixing two images (Mixup/CutMix) is
scored against the label with the larger weight, and its p(label) is ``exp(-CE)`` of its mixed
target (``p(a)^lam * p(b)^(1 - lam)``, what its stored label logit gives). EffDstl's consistent
knowledge mining acts on "under_confident" views (its threshold is the student's confidence,
which a cache does not know).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import combinations
from typing import Any

import numpy as np
import torch

from kdcache.cache.reader import ShardBlock, read_block
from kdcache.cache.store import STATUS_VALID, CacheStore
from kdcache.cache_tools.similarity import (
    FIGURES,
    MATRIX_LIMIT,
    MOST_SIMILAR,
    ClassShares,
    ViewSimilarity,
    view_similarity,
)
from kdcache.cache_tools.strength import StrengthStats, ViewFeatures, dominant_labels, view_features
from kdcache.core.errors import (
    CacheIncompleteError,
    CacheMismatchError,
    CacheReadError,
    ConfigError,
)
from kdcache.core.inspect_report import PairReport, TeacherReport
from kdcache.core.results import InspectCache, InspectResult, InspectSettings
from kdcache.targets.sparse import TAIL_MODES, SparseTargets, TailMode, sparse_probs
from kdcache.views.recipe import ViewRecipe

log = logging.getLogger(__name__)

FINE_BINS = 1000
HIST_BINS = 50
ECE_BINS = 15
PAIR_2D_BINS = 40
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
UNDER_CONFIDENT = (0.5, 0.7, 0.9)
TAIL_MASS_FLOOR = 1e-8
"""The tail mass is binned in log10 over [1e-8, 1] (1000 bins: 1.9 % apart); smaller tails, 0 among
them, count in the first bin."""
TOP_CONFUSED = 10
COMPACT_EVERY = 1 << 20
TAIL_NOTES = {
    "spread": "each of the C-k classes outside the top-k gets an equal share of the exact tail "
    "mass (exact at T=1 for the top-k and the tail mass; the entropy is then an upper bound)",
    "renorm": "the tail is dropped and the top-k renormalised (entropy is then a lower bound)",
}


# ---- accumulators ------------------------------------------------------------------------
@dataclass
class Histogram:
    """Fixed-bin histogram on ``[lo, hi]`` with exact count, mean, min and max.

    ``log``: bins of equal width in ``log10`` of the value (``lo > 0``), for quantities spread over
    decades such as the tail mass; values below ``lo`` (zero included) count in the first bin.
    """

    lo: float
    hi: float
    bins: int = FINE_BINS
    log: bool = False
    counts: np.ndarray = field(init=False)
    n: int = 0
    total: float = 0.0
    vmin: float = math.inf
    vmax: float = -math.inf

    def __post_init__(self) -> None:
        self.counts = np.zeros(self.bins, dtype=np.int64)

    def _axis(self, x: np.ndarray | float) -> np.ndarray:
        """Where values sit on the binned axis (the value, or its log10)."""
        return np.log10(np.maximum(x, self.lo)) if self.log else np.asarray(x, dtype=np.float64)

    def _value(self, position: np.ndarray | float) -> np.ndarray:
        return np.power(10.0, position) if self.log else np.asarray(position, dtype=np.float64)

    @property
    def width(self) -> float:
        """Bin width on the binned axis (in log10 units when ``log``)."""
        return float(self._axis(self.hi) - self._axis(self.lo)) / self.bins

    def add(self, values: np.ndarray) -> None:
        """Count finite values; values outside the range go to the first or last bin."""
        x = np.asarray(values, dtype=np.float64).ravel()
        x = x[np.isfinite(x)]
        if x.size == 0:
            return
        i = np.clip(
            np.floor((self._axis(x) - self._axis(self.lo)) / self.width), 0, self.bins - 1
        ).astype(np.int64)
        self.counts += np.bincount(i, minlength=self.bins)
        self.n += int(x.size)
        self.total += float(x.sum())
        self.vmin = min(self.vmin, float(x.min()))
        self.vmax = max(self.vmax, float(x.max()))

    def quantile(self, q: float) -> float | None:
        """Inverted-CDF quantile (``0 < q <= 1``), interpolated within its bin, clipped to
        [min, max]."""
        if self.n == 0:
            return None
        cum = np.cumsum(self.counts)
        target = q * self.n
        i = min(int(np.searchsorted(cum, target, side="left")), self.bins - 1)
        frac = (target - (cum[i] - self.counts[i])) / max(int(self.counts[i]), 1)
        position = self._axis(self.lo) + (i + frac) * self.width
        return float(np.clip(self._value(position), self.vmin, self.vmax))

    def summary(self) -> dict[str, Any]:
        """The DIST object of the JSON schema."""
        merged = (
            self.counts.reshape(HIST_BINS, -1).sum(1) if self.bins % HIST_BINS == 0 else self.counts
        )
        edges = self._value(np.linspace(self._axis(self.lo), self._axis(self.hi), len(merged) + 1))
        return {
            "n": self.n,
            "mean": self.total / self.n if self.n else None,
            "min": self.vmin if self.n else None,
            "max": self.vmax if self.n else None,
            "quantiles": {f"p{round(q * 100)}": self.quantile(q) for q in QUANTILES},
            "scale": "log10" if self.log else "linear",
            "resolution": self.width,
            "hist": {
                "edges": [float(f"{e:.6g}") if self.log else round(float(e), 6) for e in edges],
                "counts": merged.tolist(),
            },
        }


@dataclass
class SparseCounts:
    """Counts of integer codes (e.g. ``true * C + pred``) holding only the distinct codes seen.

    New codes are buffered and merged every ``COMPACT_EVERY`` entries, so memory is bounded by the
    number of distinct codes plus the buffer, never ``C x C``.
    """

    codes: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    counts: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    pending: list[np.ndarray] = field(default_factory=list)
    pending_size: int = 0

    def add(self, codes: np.ndarray) -> None:
        self.pending.append(np.asarray(codes, dtype=np.int64).ravel())
        self.pending_size += self.pending[-1].size
        if self.pending_size >= COMPACT_EVERY:
            self.compact()

    def compact(self) -> None:
        """Merge the buffer into the distinct codes and their counts."""
        new = np.concatenate(self.pending) if self.pending else np.zeros(0, dtype=np.int64)
        weights = np.concatenate([self.counts, np.ones(new.size, dtype=np.int64)])
        self.codes, inverse = np.unique(np.concatenate([self.codes, new]), return_inverse=True)
        self.counts = np.bincount(inverse, weights=weights, minlength=self.codes.size).astype(
            np.int64
        )
        self.pending = []
        self.pending_size = 0

    def most_common(self, n: int) -> list[tuple[int, int]]:
        """The ``n`` most frequent (code, count), ties broken by the smaller code."""
        self.compact()
        order = np.lexsort((self.codes, -self.counts))[:n]
        return [(int(self.codes[i]), int(self.counts[i])) for i in order]


@dataclass
class BlockTargets:
    """One teacher's values for the valid rows of a block: ``[n, A]`` unless noted.

    ``probs`` are the exact top-k probabilities at T=1 ``[n, A, k]``; ``dist_top`` ``[n, A, k]`` and
    ``dist_other`` (each class outside the top-k) are the T=1 distribution under the tail treatment.
    ``label`` is -1 where a view has no usable label; ``targets`` holds the cached values flattened
    to ``[n * A]`` rows, for :mod:`kdcache.targets.sparse`.
    """

    label: np.ndarray
    idx: np.ndarray
    probs: np.ndarray
    label_prob: np.ndarray
    tail_mass: np.ndarray
    targets: SparseTargets
    dist_top: np.ndarray
    dist_other: np.ndarray

    @property
    def pred(self) -> np.ndarray:
        return self.idx[..., 0]

    @property
    def labelled(self) -> np.ndarray:
        return self.label >= 0

    @property
    def correct(self) -> np.ndarray:
        return self.labelled & (self.pred == self.label)


def _check_finite(shard: str, teacher: str, *arrays: np.ndarray) -> None:
    """Stored targets are finite (a tail of -inf aside; the label logit of labelled views only):
    NaN or inf means a damaged cache, whose figures would be meaningless (and numpy would warn over
    every one)."""
    bad = sum(int(np.isnan(a).sum() + np.isposinf(a).sum()) for a in arrays)
    bad += sum(int(np.isneginf(a).sum()) for a in arrays[:-1])
    if bad:
        raise CacheReadError(
            f"shard {shard!r}, teacher {teacher!r}: {bad} NaN or inf value(s) in the stored "
            "targets; the cache is damaged (kdcache validate lists what)"
        )


def block_targets(
    block: ShardBlock, teacher: str, num_classes: int, tail: TailMode
) -> BlockTargets:
    """Derive a teacher's per-view values from a shard block (valid rows only). A view mixing two
    images (Mixup/CutMix) is scored against the label with the larger weight."""
    valid = block.status == STATUS_VALID
    tb = block.teachers[teacher]
    idx = tb.topk_idx[valid].astype(np.int64)
    n, a, k = idx.shape
    labels = block.labels.astype(np.int64)
    labels = np.where((labels >= 0) & (labels < num_classes), labels, -1)
    label = dominant_labels(labels, block.view_params, np.flatnonzero(valid))
    logit = tb.topk_logit[valid].astype(np.float32)
    lse = tb.lse[valid].astype(np.float32)
    label_logit = tb.label_logit[valid].astype(np.float32)
    tail_lse = tb.tail_lse[valid].astype(np.float32)
    _check_finite(block.shard, teacher, logit, lse, label_logit[label >= 0], tail_lse)
    with np.errstate(over="ignore"):  # exp of a logit far above the lse: clipped to 1 below
        probs = np.minimum(np.exp(logit - lse[..., None]), 1.0)
        label_prob = np.where(
            label >= 0,
            np.minimum(np.exp(np.where(label >= 0, label_logit - lse, 0.0)), 1.0),
            np.nan,
        )
        tail_mass = np.minimum(np.exp(tail_lse - lse), 1.0)
    targets = SparseTargets(
        *(
            torch.from_numpy(np.ascontiguousarray(v))
            for v in (
                idx.reshape(-1, k),
                logit.reshape(-1, k),
                lse.reshape(-1),
                label_logit.reshape(-1),
                tail_lse.reshape(-1),
            )
        )
    )
    top, other = sparse_probs(targets, num_classes, 1.0, tail)
    return BlockTargets(
        label,
        idx,
        probs,
        label_prob,
        tail_mass,
        targets,
        top.double().numpy().reshape(n, a, k),
        other.double().numpy().reshape(n, a),
    )


def _xlogy(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``x * log(y)``, 0 where ``x == 0``."""
    pos = x > 0
    return np.where(pos, x * np.log(np.where(pos, y, 1.0)), 0.0)


def _js_terms(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Per-class JS contributions ``(p log(p/m) + q log(q/m)) / 2`` with ``m = (p + q) / 2``."""
    s = p + q
    pos = s > 0
    s = np.where(pos, s, 1.0)
    return 0.5 * (_xlogy(p, 2 * p / s) + _xlogy(q, 2 * q / s))


def js_divergence(
    idx_p: np.ndarray,
    top_p: np.ndarray,
    other_p: np.ndarray,
    idx_q: np.ndarray,
    top_q: np.ndarray,
    other_q: np.ndarray,
    num_classes: int,
) -> np.ndarray:
    """Exact JS divergence (nats) of sparse distributions: ``top`` on ``idx`` ``[B, k]``, ``other``
    elsewhere ``[B]``.

    Equals the JS divergence of the dense ``[B, C]`` distributions without building them.
    """
    match = (idx_p[:, :, None] == idx_q[:, None, :]).astype(
        np.float64
    )  # [B, kp, kq], batched matmuls below
    on_p = match @ np.stack(
        [top_q, np.ones_like(top_q)], -1
    )  # q's value on p's classes, and whether q has them
    in_q = on_p[..., 1] > 0
    in_p = (np.ones((1, 1, match.shape[1])) @ match)[:, 0] > 0
    q_on_p = np.where(in_q, on_p[..., 0], other_q[:, None])
    js = _js_terms(top_p, q_on_p).sum(-1)
    js += np.where(in_p, 0.0, _js_terms(np.broadcast_to(other_p[:, None], top_q.shape), top_q)).sum(
        -1
    )
    rest = num_classes - idx_p.shape[1] - (~in_p).sum(-1)
    return js + rest * _js_terms(other_p, other_q)


def entropy(
    targets: SparseTargets, num_classes: int, temperature: float, tail: TailMode
) -> np.ndarray:
    """Entropy (nats) of each target at ``temperature`` under the tail treatment, ``[B]``."""
    top, other = (t.double().numpy() for t in sparse_probs(targets, num_classes, temperature, tail))
    return entropy_of(top, other, num_classes)


def entropy_of(top: np.ndarray, other: np.ndarray, num_classes: int) -> np.ndarray:
    """Entropy (nats) of ``top`` ``[..., k]`` plus ``other`` ``[...]`` on each of the other
    classes."""
    return -(_xlogy(top, top).sum(-1) + (num_classes - top.shape[-1]) * _xlogy(other, other))


@contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    """Run torch on ``n`` threads: its ops here are small, and idle OpenMP workers spinning
    beside zarr's decompression threads slow a 2-core machine several-fold."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _ratio(num: float, den: float) -> float | None:
    return num / den if den else None


@dataclass
class TeacherStats:
    """Streaming accumulator of one teacher's figures."""

    name: str
    k: int
    num_classes: int
    temperatures: Sequence[float]
    tail: TailMode
    recipe: ViewRecipe
    views: int = 0
    labelled: int = 0
    hists: dict[str, Histogram] = field(init=False)
    ece: np.ndarray = field(init=False)
    under: np.ndarray = field(init=False)
    classes: np.ndarray = field(
        init=False
    )  # per class: views, top-1 right, sum of p(label), sum of max prob
    errors: SparseCounts = field(
        default_factory=SparseCounts
    )  # true * C + predicted, wrong views only
    consistency: dict[str, int] = field(init=False)
    topk_hits: int = 0

    def __post_init__(self) -> None:
        log_c = max(math.log(self.num_classes), 1e-6)
        self.hists = {q: Histogram(0.0, 1.0) for q in ("max_prob", "label_prob", "margin")}
        self.hists["tail_mass"] = Histogram(TAIL_MASS_FLOOR, 1.0, log=True)
        self.hists |= {_tkey(t): Histogram(0.0, log_c) for t in self.temperatures}
        self.hists["view_js"] = Histogram(0.0, math.log(2))
        self.ece = np.zeros((3, ECE_BINS))  # count, sum of confidence, sum of correct
        self.under = np.zeros(len(UNDER_CONFIDENT), dtype=np.int64)
        self.classes = np.zeros((4, self.num_classes))
        self.consistency = {"samples": 0, "disagree": 0, "views_per_sample": 0}
        self.strength = StrengthStats(self.recipe)
        log_c1 = max(math.log(max(self.num_classes - 1, 1)), 1e-6)
        ranges = (
            (0.0, 1.0),
            (0.0, log_c1),
            (1.0, max(self.num_classes - 1.0, 1.0 + 1e-6)),
            (0.0, 1.0),
            (0.0, log_c1),
            (0.0, 2.0),
        )
        self.similar = {f: Histogram(lo, hi) for f, (lo, hi) in zip(FIGURES, ranges, strict=True)}
        # Per class sums of: each similarity figure (rows in FIGURES order), p(label)^2, and the
        # entropy at each temperature (rows in self.temperatures order); divided by views.
        self.class_similar = np.zeros((len(FIGURES), self.num_classes))
        self.class_lp2 = np.zeros(self.num_classes)
        self.class_entropy = np.zeros((len(self.temperatures), self.num_classes))
        self.ls_scale = 0.0  # sum of m log(C - 1): the denominator of "structure"
        self.shares = ClassShares(self.num_classes) if self.num_classes <= MATRIX_LIMIT else None

    def update(self, v: BlockTargets, features: ViewFeatures) -> None:
        """Add one block's views."""
        self.views += v.label.size
        self._update_distributions(v)
        self._update_labelled(v)
        self._update_consistency(v)
        self._update_similarity(v)
        self.strength.update(features, v.labelled, v.probs[..., 0], v.correct, v.label_prob)

    def _update_distributions(self, v: BlockTargets) -> None:
        self.hists["max_prob"].add(v.probs[..., 0])
        self.hists["tail_mass"].add(
            v.tail_mass
        )  # stored, exact: not 1 - sum(top-k), which is mostly rounding
        if self.k >= 2:
            self.hists["margin"].add(v.probs[..., 0] - v.probs[..., 1])
        for t in self.temperatures:
            h = (
                entropy_of(v.dist_top, v.dist_other, self.num_classes)
                if t == 1.0
                else entropy(v.targets, self.num_classes, t, self.tail)
            )
            self.hists[_tkey(t)].add(h)
            labelled = v.labelled
            self.class_entropy[self.temperatures.index(t)] += np.bincount(
                v.label[labelled],
                weights=np.reshape(h, v.label.shape)[labelled],  # [n * A] at T != 1
                minlength=self.num_classes,
            )

    def _update_similarity(self, v: BlockTargets) -> None:
        mask = v.labelled
        sim: ViewSimilarity = view_similarity(
            v.label[mask],
            v.idx[mask],
            v.probs[mask].astype(np.float64),
            v.label_prob[mask].astype(np.float64),
            v.tail_mass[mask].astype(np.float64),
            self.num_classes,
            self.tail,
        )
        for row, name in enumerate(FIGURES):
            self.similar[name].add(sim.figures[name])
            self.class_similar[row] += np.bincount(
                sim.label, weights=sim.figures[name], minlength=self.num_classes
            )
        self.class_lp2 += np.bincount(
            sim.label, weights=v.label_prob[mask] ** 2, minlength=self.num_classes
        )
        self.ls_scale += float(sim.figures["nonlabel_mass"].sum()) * math.log(
            max(self.num_classes - 1, 1)
        )
        if self.shares is not None:
            self.shares.add(sim)

    def _update_labelled(self, v: BlockTargets) -> None:
        mask = v.labelled
        label = v.label[mask]
        pred = v.pred[mask]
        correct = v.correct[mask]
        lp = v.label_prob[mask]
        conf = v.probs[..., 0][mask]
        self.labelled += int(mask.sum())
        self.topk_hits += int((v.idx[mask][:, : min(self.k, 5)] == label[:, None]).any(-1).sum())
        self.hists["label_prob"].add(lp)
        self.under += ((lp[:, None] < np.array(UNDER_CONFIDENT)) & correct[:, None]).sum(0)
        # self.classes rows: 0 views, 1 correct, 2 sum of p(label), 3 sum of max prob, per class;
        # _per_class unpacks the rows in this order and divides rows 1-3 by row 0.
        for row, weights in enumerate((None, correct.astype(np.float64), lp, conf)):
            self.classes[row] += np.bincount(label, weights=weights, minlength=self.num_classes)
        # A (true, pred) pair as one code true * C + pred, so one counter tallies the confusions.
        self.errors.add((label * self.num_classes + pred)[~correct])
        b = np.clip(np.ceil(conf * ECE_BINS).astype(np.int64) - 1, 0, ECE_BINS - 1)  # bins (lo, hi]
        # self.ece rows: 0 views, 1 sum of confidence, 2 correct, per bin (the reliability table).
        for row, weights in enumerate((None, conf, correct.astype(np.float64))):
            self.ece[row] += np.bincount(b, weights=weights, minlength=ECE_BINS)

    def _update_consistency(self, v: BlockTargets) -> None:
        n, a = v.label.shape
        self.consistency["samples"] += n
        self.consistency["views_per_sample"] = a
        self.consistency["disagree"] += int((v.pred != v.pred[:, :1]).any(1).sum())
        for i, j in combinations(range(a), 2):
            self.hists["view_js"].add(
                js_divergence(
                    v.idx[:, i],
                    v.dist_top[:, i],
                    v.dist_other[:, i],
                    v.idx[:, j],
                    v.dist_top[:, j],
                    v.dist_other[:, j],
                    self.num_classes,
                )
            )


def _tkey(temperature: float) -> str:
    return f"T={float(temperature)}"


def teacher_report(s: TeacherStats, class_names: Sequence[str]) -> TeacherReport:
    """One teacher's figures, validated by their schema."""
    correct = int(s.classes[1].sum())
    return TeacherReport.model_validate(
        {
            "k": s.k,
            "views": s.views,
            "labelled_views": s.labelled,
            "top1": _ratio(correct, s.labelled),
            "top5": _ratio(s.topk_hits, s.labelled) if s.k >= 5 else None,
            "topk": {"k": min(s.k, 5), "accuracy": _ratio(s.topk_hits, s.labelled)},
            **{q: s.hists[q].summary() for q in ("max_prob", "label_prob", "tail_mass")},
            "margin": s.hists["margin"].summary() if s.k >= 2 else None,
            "entropy": {_tkey(t): s.hists[_tkey(t)].summary() for t in s.temperatures},
            **_calibration(s.ece),
            "under_confident": _under_confident(s.under, correct, s.labelled),
            "wrong": {
                "views": s.labelled - correct,
                "fraction": _ratio(s.labelled - correct, s.labelled),
            },
            "per_class": _with_similarity(_per_class(s.classes, class_names), s, class_names),
            "confused_pairs": _confused_pairs(s.errors, s.classes[0], class_names),
            "view_consistency": _view_consistency(s),
            "augmentation": s.strength.report(),
            "similarity": _similarity(s),
        }
    )


def _similarity(s: TeacherStats) -> dict[str, Any]:
    """The teacher's similarity information (:mod:`kdcache.cache_tools.similarity`)."""
    out: dict[str, Any] = {f: s.similar[f].summary() for f in FIGURES}
    out["structure"] = _ratio(s.similar["ls_kl"].total, s.ls_scale)
    return out


def _with_similarity(
    rows: list[dict[str, Any]], s: TeacherStats, names: Sequence[str]
) -> list[dict[str, Any]]:
    """Add each class's mean similarity figures, entropy per temperature and closest classes."""
    view_counts = s.classes[0]
    shares = s.shares.shares(view_counts) if s.shares is not None else None
    for c, row in enumerate(rows):
        n = view_counts[c]
        for i, f in enumerate(FIGURES):
            row[f"{f}_mean"] = _ratio(float(s.class_similar[i, c]), n)
        mean = _ratio(float(s.classes[2, c]), n)
        square = _ratio(float(s.class_lp2[c]), n)
        row["label_prob_std"] = (
            math.sqrt(max(square - mean * mean, 0.0)) if mean is not None and square else None
        )
        row["entropy_mean"] = {
            _tkey(t): _ratio(float(s.class_entropy[i, c]), n) for i, t in enumerate(s.temperatures)
        }
        row["most_similar"] = _most_similar(shares[c], names) if shares is not None and n else None
    return rows


def _most_similar(shares: np.ndarray, names: Sequence[str]) -> list[dict[str, Any]]:
    order = np.lexsort((np.arange(len(shares)), -shares))[:MOST_SIMILAR]
    return [
        {"class": int(j), "name": _name(names, int(j)), "share": float(shares[j])} for j in order
    ]


def _calibration(ece: np.ndarray) -> dict[str, Any]:
    """Standard ECE over 15 equal-width bins of the max probability, and the reliability table."""
    counts, conf, hits = ece
    n = counts.sum()
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = conf / counts
        accuracy = hits / counts
    gaps = np.abs(hits - conf).sum()  # sum_b n_b |acc_b - conf_b|
    return {
        "ece": float(gaps / n) if n else None,
        "reliability": {
            "edges": np.linspace(0, 1, ECE_BINS + 1).round(6).tolist(),
            "counts": counts.astype(np.int64).tolist(),
            "confidence": [float(x) if c else None for x, c in zip(mean_conf, counts, strict=True)],
            "accuracy": [float(x) if c else None for x, c in zip(accuracy, counts, strict=True)],
        },
    }


def _under_confident(under: np.ndarray, correct: int, labelled: int) -> dict[str, Any]:
    return {
        str(t): {
            "views": int(c),
            "fraction": _ratio(int(c), labelled),
            "fraction_of_correct": _ratio(int(c), correct),
        }
        for t, c in zip(UNDER_CONFIDENT, under, strict=True)
    }


def _name(class_names: Sequence[str], c: int) -> str:
    return str(class_names[c]) if c < len(class_names) else str(c)


def _per_class(classes: np.ndarray, names: Sequence[str]) -> list[dict[str, Any]]:
    view_counts, right, label_prob, max_prob = classes
    return [
        {
            "class": c,
            "name": _name(names, c),
            "views": int(n),
            "top1": _ratio(float(right[c]), n),
            "label_prob_mean": _ratio(float(label_prob[c]), n),
            "max_prob_mean": _ratio(float(max_prob[c]), n),
        }
        for c, n in enumerate(view_counts.astype(np.int64).tolist())
    ]


def _confused_pairs(
    errors: SparseCounts, view_counts: np.ndarray, names: Sequence[str]
) -> list[dict[str, Any]]:
    """The most frequent (true -> predicted) errors; ties broken by class ids."""
    c = len(view_counts)
    return [
        {
            "true": code // c,
            "true_name": _name(names, code // c),
            "pred": code % c,
            "pred_name": _name(names, code % c),
            "count": count,
            "fraction_of_true": count / float(view_counts[code // c]),
        }
        for code, count in errors.most_common(TOP_CONFUSED)
    ]


def _view_consistency(s: TeacherStats) -> dict[str, Any]:
    cons = s.consistency
    a = s.consistency["views_per_sample"]
    return {
        "samples": cons["samples"],
        "views_per_sample": a,
        "top1_disagree": _ratio(cons["disagree"], cons["samples"]) if a >= 2 else None,
        "js": s.hists["view_js"].summary() if a >= 2 else None,
    }


@dataclass
class PairStats:
    """Streaming accumulator of two teachers compared on the same views."""

    a: str
    b: str
    num_classes: int
    views: int = 0
    agree: int = 0
    cells: np.ndarray = field(
        default_factory=lambda: np.zeros(4, dtype=np.int64)
    )  # both, a only, b only, neither
    both_sums: np.ndarray = field(
        default_factory=lambda: np.zeros(4)
    )  # sum p_a, sum p_b, n(a > b), n(b > a)
    hist2d: np.ndarray = field(
        default_factory=lambda: np.zeros((PAIR_2D_BINS, PAIR_2D_BINS), dtype=np.int64)
    )
    js: Histogram = field(default_factory=lambda: Histogram(0.0, math.log(2)))

    def update(self, va: BlockTargets, vb: BlockTargets) -> None:
        """Add one block's views of both teachers."""
        self.views += va.label.size
        self.agree += int((va.pred == vb.pred).sum())
        self.js.add(
            js_divergence(
                _flat(va.idx),
                _flat(va.dist_top),
                _flat(va.dist_other),
                _flat(vb.idx),
                _flat(vb.dist_top),
                _flat(vb.dist_other),
                self.num_classes,
            )
        )
        mask = va.labelled
        ca = va.correct[mask]
        cb = vb.correct[mask]
        self.cells += [
            int((ca & cb).sum()),
            int((ca & ~cb).sum()),
            int((~ca & cb).sum()),
            int((~ca & ~cb).sum()),
        ]
        pa = va.label_prob[mask]
        pb = vb.label_prob[mask]
        both = ca & cb
        self.both_sums += [
            pa[both].sum(),
            pb[both].sum(),
            (pa[both] > pb[both]).sum(),
            (pb[both] > pa[both]).sum(),
        ]
        bins = [np.clip((p * PAIR_2D_BINS).astype(np.int64), 0, PAIR_2D_BINS - 1) for p in (pa, pb)]
        # Row-major codes a_bin * BINS + b_bin, so the reshape gives counts[a_bin][b_bin].
        self.hist2d += np.bincount(
            bins[0] * PAIR_2D_BINS + bins[1], minlength=PAIR_2D_BINS**2
        ).reshape(PAIR_2D_BINS, PAIR_2D_BINS)


def _flat(x: np.ndarray) -> np.ndarray:
    """``[n, A, ...]`` -> ``[n * A, ...]``."""
    return x.reshape(-1, *x.shape[2:])


def pair_report(p: PairStats) -> PairReport:
    """The figures of one teacher pair, validated by their schema."""
    labelled = int(p.cells.sum())
    both = int(p.cells[0])
    sum_a, sum_b, a_more, b_more = p.both_sums
    return PairReport.model_validate(
        {
            "a": p.a,
            "b": p.b,
            "views": p.views,
            "top1_agreement": _ratio(p.agree, p.views),
            "js": p.js.summary(),
            "correctness": {
                key: _ratio(int(n), labelled)
                for key, n in zip(
                    ("both_right", "a_only", "b_only", "both_wrong"), p.cells, strict=True
                )
            },
            "both_right": {
                "views": both,
                "label_prob_mean_a": _ratio(float(sum_a), both),
                "label_prob_mean_b": _ratio(float(sum_b), both),
                "a_more_confident": _ratio(float(a_more), both),
                "b_more_confident": _ratio(float(b_more), both),
            },
            "label_prob_2d": {"bins": PAIR_2D_BINS, "counts": p.hist2d.tolist()},
        }
    )


# ---- the driver ----------------------------------------------------------------------------
def select_teachers(store: CacheStore, teachers: Sequence[str] | None) -> list[str]:
    """The teachers to inspect (default all), refusing unknown names with the valid ones."""
    available = store.teachers
    if not available:
        raise CacheMismatchError(f"cache {store.path!r} has no teachers to inspect")
    if not teachers:
        return available
    unknown = [t for t in teachers if t not in available]
    if unknown:
        raise CacheMismatchError(
            f"unknown teacher{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} "
            f"in cache {store.path!r}; valid: {', '.join(available)}"
        )
    return list(dict.fromkeys(teachers))


def complete_shards(
    store: CacheStore, teachers: list[str], require_complete: bool
) -> tuple[list[int], dict[str, list[str]]]:
    """Shard indices to read and the incomplete shards left out (``{"views"|teacher: [names]}``)."""
    incomplete = store.incomplete_shards(teachers)
    if not incomplete:
        return list(range(store.num_shards)), {}
    listing = "; ".join(f"{what}: {', '.join(names)}" for what, names in incomplete.items())
    if require_complete:
        raise CacheIncompleteError(
            f"cache {store.path!r} has incomplete shards ({listing}): run precompute to finish them"
        )
    log.warning("skipping incomplete shards of %s (%s)", store.path, listing)
    skipped = {name for names in incomplete.values() for name in names}
    return [i for i, s in enumerate(store.meta.fingerprint.shards) if s not in skipped], incomplete


def check_settings(temperatures: Sequence[float], tail: str) -> None:
    if tail not in TAIL_MODES:
        raise ConfigError(f"tail must be one of {', '.join(TAIL_MODES)}, found {tail!r}")
    bad = [t for t in temperatures if not (t > 0 and math.isfinite(t))]
    if bad or not temperatures:
        raise ConfigError(
            f"temperatures must be positive finite numbers, found {list(temperatures)}"
        )


def inspect_cache(
    store: CacheStore,
    teachers: Sequence[str] | None = None,
    *,
    temperatures: Sequence[float] = (1.0,),
    tail: TailMode = "spread",
    require_complete: bool = False,
    progress: Callable[[int], None] | None = None,
) -> InspectResult:
    """Stream every complete shard once and return the report (the JSON schema above)."""
    check_settings(temperatures, tail)
    temperatures = list(dict.fromkeys(float(t) for t in temperatures))
    names = select_teachers(store, teachers)
    shards, skipped = complete_shards(store, names, require_complete)
    meta = store.meta
    c = store.meta.num_classes
    recipe = meta.recipe
    stats = {
        n: TeacherStats(n, store.teacher_meta(n).k, c, temperatures, tail, recipe) for n in names
    }
    pairs = [PairStats(a, b, c) for a, b in combinations(names, 2)]
    with _torch_threads(1):
        for index in shards:
            block = read_block(
                store, index, names, require_complete=False
            )  # marks checked by complete_shards
            _update_all(block, stats, pairs, c, tail, recipe)
            if progress is not None:
                progress(1)
    return InspectResult(
        cache=InspectCache.model_validate(_cache_section(store, len(shards), skipped)),
        settings=InspectSettings.model_validate(_settings(temperatures, tail)),
        teachers={n: teacher_report(stats[n], meta.class_names) for n in names},
        pairs=[pair_report(p) for p in pairs],
    )


def _update_all(
    block: ShardBlock,
    stats: dict[str, TeacherStats],
    pairs: list[PairStats],
    c: int,
    tail: TailMode,
    recipe: ViewRecipe,
) -> None:
    targets = {n: block_targets(block, n, c, tail) for n in stats}
    valid = np.flatnonzero(block.status == STATUS_VALID)
    features = view_features(block.view_params, valid, recipe)
    for n, s in stats.items():
        s.update(targets[n], features)
    for p in pairs:
        p.update(targets[p.a], targets[p.b])


def _cache_section(store: CacheStore, read: int, skipped: dict[str, list[str]]) -> dict[str, Any]:
    meta = store.meta
    return {
        "path": str(store.path),
        "shards": store.num_shards,
        "shards_read": read,
        "skipped_shards": skipped,
        "samples": meta.fingerprint.num_samples,
        "num_views": meta.num_views,
        "num_classes": meta.num_classes,
        "recipe": meta.recipe.describe(),
    }


def _settings(temperatures: Sequence[float], tail: TailMode) -> dict[str, Any]:
    return {
        "tail": tail,
        "tail_note": TAIL_NOTES[tail],
        "temperatures": [float(t) for t in temperatures],
        "fine_bins": FINE_BINS,
        "hist_bins": HIST_BINS,
        "ece_bins": ECE_BINS,
        "under_confident_thresholds": list(UNDER_CONFIDENT),
    }
