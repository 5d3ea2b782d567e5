"""Similarity information (Vats & Crandall, paper 003): how a teacher spends its non-label mass.

The paper splits a teacher's response to a labelled view into the *confidence label* ``p_y`` (the
probability of the true class) and the *similarity labels* ``p_j, j != y``; a teacher whose
similarity labels are near-uniform teaches little more than label smoothing (LS) with the same
confidence, ``q_y = p_y, q_j = (1 - p_y) / (C - 1)``. Per labelled view, at T=1:

- ``nonlabel_mass`` ``m = 1 - p_y`` (exact: ``p_y`` comes from the stored label logit);
- the non-label distribution ``r_j = p_j / sum_{i != y} p_i`` over the ``C - 1`` other classes;
  ``nonlabel_entropy`` ``H_r = -sum r_j log r_j`` (``log(C - 1)`` for LS, 0 when one class takes
  all of it), ``nonlabel_effective`` ``exp(H_r)`` (how many classes share it),
  ``nonlabel_top1_share`` ``max_j r_j``;
- ``ls_kl = KL(p || q)`` with the teacher's response taken as ``p_y`` on the label and ``m r_j``
  elsewhere, which reduces to ``m (log(C - 1) - H_r)``: 0 for LS (and for a one-hot response),
  growing with both the non-label mass and how unevenly it is spread. It is the figure to rank
  checkpoints by: "RBKD" (similarity-rich) teachers have a large ``ls_kl``, LS-like ones ~0;
- ``ls_l1 = sum_{j != y} |m r_j - m / (C - 1)|`` (0 .. 2);
- ``structure`` (per teacher) ``= sum ls_kl / sum m log(C - 1)``: the same as a fraction of what
  a response with all its non-label mass on one class would have, 0 = LS-like, 1 = one class.

**The tail.** The cache stores the top-k exactly, the label's probability and the tail mass (all
that lies outside the top-k). The non-label top-k entries are exact. What lies outside the top-k
and is not the label, ``rest = tail_mass - (p_y if the label is outside the top-k)``, is treated
as ``settings.tail`` says: ``spread`` shares it equally among those ``C - k`` (or ``C - k - 1``)
classes, the most even the tail can be (``H_r`` an upper bound, ``ls_kl`` a lower bound, exact
when k == C); ``renorm`` drops it and renormalises the stored non-label entries (``H_r`` a lower
bound, ``ls_kl`` an upper bound). A view with no non-label mass at all counts as LS (``ls_kl`` 0).
Only T=1 is measured: the label's probability at another temperature needs the full logits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from kdcache.targets.sparse import TailMode

MATRIX_LIMIT = 1024
"""Classes up to which the class x class mean non-label shares are kept (``most_similar``)."""
MOST_SIMILAR = 3
FIGURES = (
    "nonlabel_mass",
    "nonlabel_entropy",
    "nonlabel_effective",
    "nonlabel_top1_share",
    "ls_kl",
    "ls_l1",
)


@dataclass
class ViewSimilarity:
    """The figures of ``m`` labelled views (``[m]`` each) and their non-label shares."""

    label: np.ndarray
    figures: dict[str, np.ndarray]
    idx: np.ndarray
    """``[m, k]`` the stored top-k classes."""
    share_top: np.ndarray
    """``[m, k]`` r_j on those classes (0 on the label)."""
    share_rest: np.ndarray
    """``[m]`` r_j on each class outside the top-k that is not the label."""


def _xlogx(x: np.ndarray) -> np.ndarray:
    pos = x > 0
    return np.where(pos, x * np.log(np.where(pos, x, 1.0)), 0.0)


def view_similarity(
    label: np.ndarray,
    idx: np.ndarray,
    probs: np.ndarray,
    label_prob: np.ndarray,
    tail_mass: np.ndarray,
    num_classes: int,
    tail: TailMode,
) -> ViewSimilarity:
    """The similarity figures of labelled views (``label >= 0``), from flattened ``[m]`` /
    ``[m, k]`` arrays: the exact top-k probabilities, p(label) and the stored tail mass."""
    c = num_classes
    k = idx.shape[-1]
    in_top = idx == label[:, None]
    label_in = in_top.any(-1)
    nl_top = np.where(in_top, 0.0, probs)
    n_rest = c - k - (~label_in).astype(np.int64)  # classes outside the top-k but the label
    rest = np.clip(tail_mass - np.where(label_in, 0.0, label_prob), 0.0, None)
    rest = np.where((n_rest > 0) & (tail == "spread"), rest, 0.0)
    total = nl_top.sum(-1) + rest
    empty = total <= 0  # no non-label mass: counted as uniform (LS), see the module docstring
    safe = np.where(empty, 1.0, total)
    uniform = 1.0 / max(c - 1, 1)
    share_top = np.where(empty[:, None], np.where(in_top, 0.0, uniform), nl_top / safe[:, None])
    each = rest / safe / np.maximum(n_rest, 1)
    share_rest = np.where(empty, uniform, each)
    h = -(_xlogx(share_top).sum(-1) + np.maximum(n_rest, 0) * _xlogx(share_rest))
    m = 1.0 - label_prob
    log_c1 = math.log(max(c - 1, 1))
    l1_top = np.where(in_top, 0.0, np.abs(share_top - uniform)).sum(-1)
    l1 = l1_top + np.maximum(n_rest, 0) * np.abs(share_rest - uniform)
    figures = {
        "nonlabel_mass": m,
        "nonlabel_entropy": h,
        "nonlabel_effective": np.exp(h),
        "nonlabel_top1_share": np.maximum(share_top.max(-1), np.where(n_rest > 0, share_rest, 0)),
        "ls_kl": np.clip(m * (log_c1 - h), 0.0, None),  # KL >= 0; rounding aside
        "ls_l1": m * l1,
    }
    return ViewSimilarity(label, figures, idx, share_top, share_rest)


@dataclass
class ClassShares:
    """Per class c and other class j, the sum over c's views of r_j (only for C <= MATRIX_LIMIT):
    the stored entries' shares, plus each view's equal tail share on every class outside its
    top-k (summed once per class as ``rest``, minus what fell on classes inside the top-k)."""

    num_classes: int
    top: np.ndarray = field(init=False)
    rest_on_top: np.ndarray = field(init=False)
    rest: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        c = self.num_classes
        self.top = np.zeros(c * c)
        self.rest_on_top = np.zeros(c * c)
        self.rest = np.zeros(c)

    def add(self, v: ViewSimilarity) -> None:
        c = self.num_classes
        k = v.idx.shape[-1]
        # Flat codes label * C + class, so one bincount sums a [C, C] table row-major.
        codes = (v.label[:, None] * c + v.idx).ravel()
        self.top += np.bincount(codes, weights=v.share_top.ravel(), minlength=c * c)
        rest_each = np.repeat(v.share_rest, k)
        self.rest_on_top += np.bincount(codes, weights=rest_each, minlength=c * c)
        self.rest += np.bincount(v.label, weights=v.share_rest, minlength=c)

    def shares(self, view_counts: np.ndarray) -> np.ndarray:
        """``[C, C]`` mean share of class c's non-label mass on class j (diagonal 0), given the
        views per class."""
        c = self.num_classes
        total = (self.top - self.rest_on_top).reshape(c, c) + self.rest[:, None]
        np.fill_diagonal(total, 0.0)
        with np.errstate(invalid="ignore", divide="ignore"):
            return total / view_counts[:, None]
