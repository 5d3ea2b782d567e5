"""Soft targets from sparse cached values, at any temperature, with an explicit tail treatment.

A cached view holds the top-k logits ``l_1..l_k`` (sorted), ``lse = logsumexp(all logits)`` at
T=1, ``tail_lse = logsumexp(the other C - k logits)`` (``-inf`` when k == C) and the label's
logit. At T=1 the top-k probabilities ``exp(l_i - lse)`` and the tail mass ``exp(tail_lse - lse)``
are exact. The tail is stored, not derived as ``1 - sum_i p_i``: that difference is dominated by
the rounding of the stored logits whenever the true tail is small (an fp16 top logit near 20 is
off by up to 0.008, i.e. ~0.8 % of a confident top-1 probability), and at T > 1 the spread tail
below is very sensitive to it. Two treatments of the classes outside the top-k:

- ``renorm``: drop the tail; the target is ``softmax(l_topk / T)`` over the k classes.
- ``spread``: give every one of the ``C - k`` other classes the same logit
  ``l_tail = tail_lse - log(C - k)``, so their total mass at T=1 is the exact tail mass, then take
  ``softmax(logits / T)`` over all C. At T=1 this reproduces the exact top-k probabilities and the
  exact tail mass; at T > 1 it is an upper bound on the true tail's mass (equal logits maximise
  ``sum_j exp(l_j / T)`` for a given ``sum_j exp(l_j)``).

With ``k == C`` both treatments give the exact teacher distribution at every temperature.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

TailMode = Literal["renorm", "spread"]
TAIL_MODES = ("renorm", "spread")


@dataclass
class SparseTargets:
    """A batch of cached targets as tensors: ``idx``/``logit`` ``[B, k]``; ``lse``, ``label_logit``
    and ``tail_lse`` (logsumexp of the logits outside the top-k, ``-inf`` when k == C) ``[B]``."""

    idx: torch.Tensor
    logit: torch.Tensor
    lse: torch.Tensor
    label_logit: torch.Tensor
    tail_lse: torch.Tensor

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The fields in order: ``SparseTargets(*t.tensors())`` rebuilds ``t``."""
        return self.idx, self.logit, self.lse, self.label_logit, self.tail_lse

    def to(self, device: torch.device | str, non_blocking: bool = False) -> SparseTargets:
        return SparseTargets(*(t.to(device, non_blocking=non_blocking) for t in self.tensors()))

    @property
    def k(self) -> int:
        return int(self.idx.shape[-1])


def topk_probs_t1(t: SparseTargets) -> torch.Tensor:
    """Exact top-k probabilities at T=1, ``[B, k]``."""
    return torch.exp(t.logit.float() - t.lse.float().unsqueeze(-1))


def tail_mass_t1(t: SparseTargets) -> torch.Tensor:
    """Exact probability mass outside the top-k at T=1, ``[B]`` (0 when k == C)."""
    return torch.exp(t.tail_lse.float() - t.lse.float()).clamp_max(1.0)


def label_prob_t1(t: SparseTargets) -> torch.Tensor:
    """Exact teacher probability of the labelled class at T=1, ``[B]``."""
    return torch.exp(t.label_logit.float() - t.lse.float())


def tail_logit(t: SparseTargets, num_classes: int) -> torch.Tensor:
    """``l_tail`` of the spread treatment, ``[B]``; ``-inf`` when there is no tail."""
    others = num_classes - t.k
    if others <= 0:
        return torch.full_like(t.lse.float(), float("-inf"))
    return t.tail_lse.float() - math.log(others)


def dense_logits(t: SparseTargets, num_classes: int, tail: TailMode) -> torch.Tensor:
    """``[B, C]`` logits whose softmax at T is the target at T (``-inf`` outside the top-k for
    renorm)."""
    _check_tail(tail)
    fill = (
        tail_logit(t, num_classes)
        if tail == "spread"
        else torch.full_like(t.lse.float(), float("-inf"))
    )
    out = fill.unsqueeze(-1).expand(-1, num_classes).clone()
    return out.scatter(1, t.idx.long(), t.logit.float())


def dense_probs(
    t: SparseTargets, num_classes: int, temperature: float, tail: TailMode
) -> torch.Tensor:
    """``[B, C]`` teacher probabilities at ``temperature`` under the chosen tail treatment."""
    return torch.softmax(dense_logits(t, num_classes, tail) / temperature, dim=-1)


def sparse_probs(
    t: SparseTargets, num_classes: int, temperature: float, tail: TailMode
) -> tuple[torch.Tensor, torch.Tensor]:
    """(``[B, k]`` top-k probabilities, ``[B]`` probability of each of the C-k other classes) at T.

    The sparse form of :func:`dense_probs`, for losses that need not build ``[B, C]``.
    """
    _check_tail(tail)
    scaled = t.logit.float() / temperature
    if tail == "renorm" or num_classes == t.k:
        probs = torch.softmax(scaled, dim=-1)
        return probs, torch.zeros_like(probs[:, 0])
    lt = tail_logit(t, num_classes) / temperature
    others = math.log(num_classes - t.k)
    log_z = torch.logsumexp(
        torch.cat([scaled, (lt + others).unsqueeze(-1)], dim=-1), dim=-1, keepdim=True
    )
    return torch.exp(scaled - log_z), torch.exp(lt - log_z.squeeze(-1))


def _check_tail(tail: str) -> None:
    if tail not in TAIL_MODES:
        raise ValueError(f"tail must be one of {TAIL_MODES}, found {tail!r}")


@dataclass
class MixedLabels:
    """Hard labels of Mixup/CutMix views: view ``i`` is ``lam[i]`` parts ``labels[i]`` and
    ``1 - lam[i]`` parts ``partner[i]`` (unmixed views: ``lam`` 1, ``partner`` = ``labels``)."""

    labels: torch.Tensor
    """``int64[B]``: each view's own label."""
    partner: torch.Tensor
    """``int64[B]``: the label of the image mixed in."""
    lam: torch.Tensor
    """``float32[B]``: the weight of ``labels``."""

    @classmethod
    def unmixed(cls, labels: torch.Tensor) -> MixedLabels:
        return cls(labels, labels, torch.ones(labels.shape, device=labels.device))

    def to(self, device: torch.device | str, non_blocking: bool = False) -> MixedLabels:
        return MixedLabels(
            self.labels.to(device, non_blocking=non_blocking),
            self.partner.to(device, non_blocking=non_blocking),
            self.lam.to(device, non_blocking=non_blocking),
        )

    @property
    def mixed(self) -> torch.Tensor:
        """``bool[B]``: which views mix two images."""
        return self.lam < 1.0

    def dominant(self) -> torch.Tensor:
        """``int64[B]``: the label with the larger weight (accuracy of mixed views)."""
        return torch.where(self.lam >= 0.5, self.labels, self.partner)


def label_logits(logits: torch.Tensor, labels: torch.Tensor | MixedLabels) -> torch.Tensor:
    """``[B]`` logit of each row's label, NaN where the label is missing (< 0). For mixed labels
    the lam-weighted mean of the two labels' logits, so ``lse - label_logit`` is the mixed
    target's cross-entropy: ``-(lam log p_a + (1 - lam) log p_b)``."""
    if isinstance(labels, MixedLabels):
        own = label_logits(logits, labels.labels)
        partner = label_logits(logits, labels.partner)
        return labels.lam * own + (1.0 - labels.lam) * partner
    safe = labels.clamp(0, logits.shape[-1] - 1).long()
    picked = logits.gather(1, safe.unsqueeze(1)).squeeze(1)
    return torch.where(labels >= 0, picked, torch.full_like(picked, float("nan")))


def from_logits(logits: torch.Tensor, labels: torch.Tensor | MixedLabels, k: int) -> SparseTargets:
    """Sparse targets from full logits ``[B, C]`` (what precompute stores, before fp16 rounding)."""
    logits = logits.float()
    values, idx = torch.topk(logits, k, dim=-1, sorted=True)
    lse = torch.logsumexp(logits, dim=-1)
    tail_lse = torch.logsumexp(logits.scatter(1, idx, float("-inf")), dim=-1)  # -inf when k == C
    label_logit = label_logits(logits, labels)
    return SparseTargets(idx=idx, logit=values, lse=lse, label_logit=label_logit, tail_lse=tail_lse)


def truncate(t: SparseTargets, k: int | None) -> SparseTargets:
    """The first ``k`` of the logit-sorted top-k, the dropped ones folded into the tail: exactly
    what a cache with top-k ``k`` holds (up to the rounding of the stored values)."""
    if k is None or k >= t.k:
        return t
    dropped = torch.logsumexp(t.logit[:, k:].float(), dim=-1)
    tail_lse = torch.logaddexp(t.tail_lse.float(), dropped)
    return SparseTargets(t.idx[:, :k], t.logit[:, :k], t.lse, t.label_logit, tail_lse)
