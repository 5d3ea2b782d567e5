"""Teacher confidence by augmentation strength: by the policy's op count and magnitude, for mixed
and unmixed views, and by Mixup/CutMix's lam; streamed with the other inspect figures.

Per group of views: how many, the mean top-1 probability, the accuracy (a mixed view counts as
right when the teacher's top-1 is the label with the larger weight) and the mean probability of
the label (for a mixed view ``exp(-CE)`` of its mixed target, ``p(a)^lam * p(b)^(1 - lam)``,
what the stored label logit gives).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kdcache.views.augment import LEVEL_STEPS, NOT_APPLIED
from kdcache.views.recipe import ViewParams, ViewRecipe

LAM_EDGES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
"""lam bins of mixed views: [0, 0.2), ..., [0.8, 1.0); unmixed views (lam 1) are their own group."""
LEVEL_EDGES = (0.0, 2.0, 4.0, 6.0, 8.0, 10.0, 32.0)
"""Bins of the mean magnitude level of a view's applied policy ops (timm's scale, 0..10 ...)."""
FIELDS = 4
"""Per group: views, sum of top-1 probability, top-1 right, sum of label probability."""


@dataclass
class ViewFeatures:
    """What a view's stored parameters say about its strength: ``[n, A]`` each."""

    ops: np.ndarray | None
    """Policy ops applied (None without a policy)."""
    level: np.ndarray | None
    """Mean magnitude of the applied ops on a 0..10 scale (NaN with none applied)."""
    lam: np.ndarray | None
    """Weight of the own image (1: unmixed; None without mixing)."""
    cutmix: np.ndarray | None


def view_features(params: ViewParams, rows: np.ndarray, recipe: ViewRecipe) -> ViewFeatures:
    """The strength features of the views of ``rows`` (the valid rows of a block)."""
    ops = level = lam = cutmix = None
    if recipe.policy is not None:
        codes = params.arrays["policy"][rows]
        applied = codes[..., 0] > 0
        ops = applied.sum(-1)
        level = _levels(codes[..., 1].astype(np.float64), recipe)
        with np.errstate(invalid="ignore"):  # no op applied: NaN, left out of the level bins
            level = np.where(applied, level, 0.0).sum(-1) / ops
    if recipe.mix is not None:
        a = params.num_views
        weights = params.mixing(np.repeat(rows, a), np.tile(np.arange(a), len(rows)))[1]
        lam = weights.reshape(len(rows), a)
        center = params.arrays.get("mix_center")
        cutmix = np.zeros_like(lam, bool)
        if center is not None:
            cutmix = (center[rows][..., 0] != NOT_APPLIED) & (lam < 1)
    return ViewFeatures(ops, level, lam, cutmix)


def _levels(codes: np.ndarray, recipe: ViewRecipe) -> np.ndarray:
    """Stored magnitudes on timm's 0..10 scale (bins of torchvision op sets rescaled to it)."""
    policy = recipe.policy
    if policy is None:  # only views drawn with a policy have levels
        raise ValueError("magnitude levels need a recipe with a policy")
    if policy.name == "randaugment" and policy.ops == "timm":
        return codes / LEVEL_STEPS
    return codes * 10.0 / (policy.num_bins - 1)


def dominant_labels(labels: np.ndarray, params: ViewParams, rows: np.ndarray) -> np.ndarray:
    """``[n, A]`` labels each view is scored against: the own label, or the partner's where the
    partner's image weighs more (lam < 0.5). ``labels``: the block's labels by row."""
    a = params.num_views
    flat_rows = np.repeat(rows, a)
    partner, lam = params.mixing(flat_rows, np.tile(np.arange(a), len(rows)))
    dominant = np.where(lam >= 0.5, labels[flat_rows], labels[partner])
    return dominant.reshape(len(rows), a)


@dataclass
class StrengthStats:
    """Streaming sums per group (see :data:`FIELDS`) of one teacher."""

    recipe: ViewRecipe
    by_ops: np.ndarray = field(init=False)
    by_level: np.ndarray = field(init=False)
    by_mix: np.ndarray = field(init=False)
    """unmixed, Mixup, CutMix."""
    by_lam: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        slots = self.recipe.policy.slots if self.recipe.policy is not None else 0
        self.by_ops = np.zeros((slots + 1, FIELDS))
        self.by_level = np.zeros((len(LEVEL_EDGES) - 1, FIELDS))
        self.by_mix = np.zeros((3, FIELDS))
        self.by_lam = np.zeros((len(LAM_EDGES) - 1, FIELDS))

    def update(
        self,
        f: ViewFeatures,
        labelled: np.ndarray,
        max_prob: np.ndarray,
        correct: np.ndarray,
        label_prob: np.ndarray,
    ) -> None:
        """Add one block's labelled views (``[n, A]`` arrays; the others weigh 0)."""
        weight = labelled.astype(np.float64)
        label_prob = np.where(labelled, label_prob, 0.0)
        values = np.stack([weight, max_prob * weight, correct * weight, label_prob], -1)
        if f.ops is not None and f.level is not None:  # a policy stores both
            _add(self.by_ops, f.ops, values)
            applied = f.ops > 0
            bins = np.digitize(f.level[applied], LEVEL_EDGES[1:-1], right=True)  # (lo, hi]
            _add(self.by_level, bins, values[applied])
        if f.lam is not None and f.cutmix is not None:  # a mix stores both
            kind = np.where(f.lam >= 1.0, 0, np.where(f.cutmix, 2, 1))
            _add(self.by_mix, kind, values)
            mixed = f.lam < 1.0
            bins = np.digitize(f.lam[mixed], LAM_EDGES[1:-1])
            _add(self.by_lam, bins, values[mixed])

    def report(self) -> dict[str, Any] | None:
        """The ``augmentation`` JSON object (None when the recipe has neither policy nor mix)."""
        if self.recipe.policy is None and self.recipe.mix is None:
            return None
        out: dict[str, Any] = {"policy": None, "mix": None}
        if self.recipe.policy is not None:
            out["policy"] = {
                "by_ops": [{"ops": i, **_group(row)} for i, row in enumerate(self.by_ops)],
                "by_level": _binned(self.by_level, LEVEL_EDGES),
            }
        if self.recipe.mix is not None:
            kinds = ("unmixed", "mixup", "cutmix")
            mix: dict[str, Any] = {
                k: _group(row) for k, row in zip(kinds, self.by_mix, strict=True)
            }
            mix["by_lam"] = _binned(self.by_lam, LAM_EDGES)
            out["mix"] = mix
        return out


def _add(table: np.ndarray, bins: np.ndarray, values: np.ndarray) -> None:
    """Sum ``values`` ``[..., FIELDS]`` into ``table`` rows by ``bins``."""
    flat = bins.reshape(-1)
    for column in range(FIELDS):
        weights = values[..., column].reshape(-1)
        table[:, column] += np.bincount(flat, weights=weights, minlength=len(table))


def _group(row: np.ndarray) -> dict[str, Any]:
    views = int(row[0])
    mean = (lambda total: float(total / views)) if views else (lambda total: None)
    return {
        "views": views,
        "max_prob": mean(row[1]),
        "top1": mean(row[2]),
        "label_prob": mean(row[3]),
    }


def _binned(table: np.ndarray, edges: tuple[float, ...]) -> list[dict[str, Any]]:
    return [{"lo": edges[i], "hi": edges[i + 1], **_group(row)} for i, row in enumerate(table)]
