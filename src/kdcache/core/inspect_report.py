"""The typed schema of ``kdcache inspect``'s report: one teacher's figures and one pair's.

These models are the schema (the JSON keys are the field names, ``class`` aside, which is
``class_`` in Python); :class:`~kdcache.core.results.InspectResult` holds them, so a report is
validated when it is built and when it is read back. How each figure is computed is said in
:mod:`kdcache.cache_tools.stats` (distributions, tail treatment) and
:mod:`kdcache.cache_tools.similarity` (the similarity information of paper 003).

Every model also reads like the mapping it replaces (``t["entropy"]["T=1.0"]["mean"]``,
``t.get("augmentation")``, ``t["topk"] == {"k": 5, "accuracy": 0.9}``), so scripts written
against the former ``dict`` report keep working; new code uses attributes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class Section(BaseModel):
    """A part of the report: extra keys ignored on read, JSON keys by alias, mapping-style reads."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True, serialize_by_alias=True)

    def _field(self, key: str) -> str:
        for name, info in type(self).model_fields.items():
            if key in (name, info.alias):
                return name
        raise KeyError(key)

    def __getitem__(self, key: str) -> Any:
        return getattr(self, self._field(key))

    def get(self, key: str, default: Any = None) -> Any:
        """The figure under a JSON key, or ``default`` where the model has no such key."""
        try:
            return self[key]
        except KeyError:
            return default

    def keys(self) -> list[str]:
        return [info.alias or name for name, info in type(self).model_fields.items()]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Mapping):
            return self.model_dump() == dict(other)
        return super().__eq__(other)

    __hash__ = None  # type: ignore[assignment]  # mutable, compared by value


# ---- shared pieces ------------------------------------------------------------------------------


class Histogram(Section):
    edges: list[float]
    """``hist_bins + 1`` edges (in the quantity's units, also for a log10 scale)."""
    counts: list[int]


class Dist(Section):
    """A per-view quantity over the views: exact mean, min, max; quantiles and a histogram read
    from ``fine_bins`` bins (``resolution`` apart on the binned axis)."""

    n: int
    mean: float | None
    min: float | None
    max: float | None
    quantiles: dict[str, float | None]
    """``p5``, ``p25``, ``p50``, ``p75``, ``p95``."""
    scale: Literal["linear", "log10"]
    resolution: float
    hist: Histogram


class Group(Section):
    """Labelled views of a group and their means (None for no views)."""

    views: int
    max_prob: float | None
    top1: float | None
    label_prob: float | None


class OpsGroup(Group):
    ops: int
    """Policy ops applied to the view."""


class BinGroup(Group):
    lo: float
    hi: float


# ---- one teacher --------------------------------------------------------------------------------


class TopK(Section):
    k: int
    """min(stored k, 5)."""
    accuracy: float | None


class Reliability(Section):
    edges: list[float]
    counts: list[int]
    confidence: list[float | None]
    accuracy: list[float | None]


class UnderConfident(Section):
    """Views whose top-1 is right with p(label) below the threshold."""

    views: int
    fraction: float | None
    fraction_of_correct: float | None


class Wrong(Section):
    views: int
    fraction: float | None


class ClassRow(Section):
    """One class's labelled views, with the similarity figures of paper 003 (means over views)."""

    class_: int = Field(alias="class")
    name: str
    views: int
    top1: float | None
    label_prob_mean: float | None
    max_prob_mean: float | None
    label_prob_std: float | None = None
    """Spread of the confidence label over the class's views (the paper's "variance in
    response")."""
    entropy_mean: dict[str, float | None] = Field(default_factory=dict)
    """``T=...`` -> mean entropy (nats) of the class's views at that temperature."""
    nonlabel_mass_mean: float | None = None
    nonlabel_entropy_mean: float | None = None
    nonlabel_effective_mean: float | None = None
    nonlabel_top1_share_mean: float | None = None
    ls_kl_mean: float | None = None
    ls_l1_mean: float | None = None
    most_similar: list[SimilarClass] | None = None
    """The classes that get most of this class's non-label mass on average (None when C is
    above ``similarity.matrix_limit``)."""


class SimilarClass(Section):
    class_: int = Field(alias="class")
    name: str
    share: float
    """Mean share of the non-label mass it gets over the class's views."""


class Similarity(Section):
    """Paper 003's similarity information at T=1 (definitions in
    :mod:`kdcache.cache_tools.similarity`), over labelled views."""

    nonlabel_mass: Dist
    """1 - p(label)."""
    nonlabel_entropy: Dist
    """Entropy (nats) of the non-label distribution renormalised to 1; log(C-1) is LS."""
    nonlabel_effective: Dist
    """exp(nonlabel_entropy): how many other classes share the non-label mass (C-1: LS)."""
    nonlabel_top1_share: Dist
    """Share of the non-label mass on its largest class."""
    ls_kl: Dist
    """KL(teacher || LS with the same p(label)) in nats: 0 is label smoothing."""
    ls_l1: Dist
    """L1 distance to that LS distribution (0 .. 2)."""
    structure: float | None
    """mean ls_kl / mean (nonlabel_mass * log(C-1)): 0 = LS-like, 1 = all non-label mass on one
    class; where the teacher sits between LS and a similarity-rich response."""


class ConfusedPair(Section):
    true: int
    true_name: str
    pred: int
    pred_name: str
    count: int
    fraction_of_true: float


class PolicyStrength(Section):
    by_ops: list[OpsGroup]
    by_level: list[BinGroup]


class MixStrength(Section):
    unmixed: Group
    mixup: Group
    cutmix: Group
    by_lam: list[BinGroup]


class Augmentation(Section):
    policy: PolicyStrength | None
    mix: MixStrength | None


class ViewConsistency(Section):
    samples: int
    views_per_sample: int
    top1_disagree: float | None
    js: Dist | None


class TeacherReport(Section):
    """One teacher's figures (fractions about labels are of labelled views)."""

    k: int
    views: int
    labelled_views: int
    top1: float | None
    top5: float | None
    topk: TopK
    max_prob: Dist
    label_prob: Dist
    tail_mass: Dist
    margin: Dist | None
    entropy: dict[str, Dist]
    """``T=...`` -> entropy (nats) of the targets at that temperature under ``settings.tail``."""
    ece: float | None
    reliability: Reliability
    under_confident: dict[str, UnderConfident]
    wrong: Wrong
    per_class: list[ClassRow]
    confused_pairs: list[ConfusedPair]
    view_consistency: ViewConsistency
    augmentation: Augmentation | None
    similarity: Similarity | None = None
    """Absent in reports written before it existed."""


# ---- two teachers -------------------------------------------------------------------------------


class Correctness(Section):
    both_right: float | None
    a_only: float | None
    b_only: float | None
    both_wrong: float | None


class BothRight(Section):
    views: int
    label_prob_mean_a: float | None
    label_prob_mean_b: float | None
    a_more_confident: float | None
    b_more_confident: float | None


class LabelProb2d(Section):
    bins: int
    counts: list[list[int]]
    """counts[a_bin][b_bin] of p(label), bins on [0, 1]."""


class PairReport(Section):
    """Two teachers on the same views."""

    a: str
    b: str
    views: int
    top1_agreement: float | None
    js: Dist
    correctness: Correctness
    both_right: BothRight
    label_prob_2d: LabelProb2d


ClassRow.model_rebuild()
