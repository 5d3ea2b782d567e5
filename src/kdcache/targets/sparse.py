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

A third treatment needs more than the top-k: ``sample`` (:class:`SampledTargets`, encoding
``sampled``) estimates the tail from S classes drawn from it (at the teacher's
``draw_temperature``), without bias at T=1, at the draws' temperature and at every temperature
whose normaliser was stored (:func:`sampled_at`). Targets a loss gets at one
temperature only (sampled estimates, ensembles of teachers) are :class:`TemperedTargets`;
:func:`loss_targets` is the one conversion from what a batch carries to what a loss takes.
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

TailMode = Literal["renorm", "spread"]
TAIL_MODES = ("renorm", "spread")
"""The treatments of a top-k tail (what inspect and the benchmarks compare)."""
LossTail = Literal["renorm", "spread", "sample"]
LOSS_TAILS = ("renorm", "spread", "sample")
"""What a loss may ask for: a top-k treatment, or ``sample`` (sampled targets' estimate)."""
COMBINES = ("probs", "logits")


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
        return self.map(lambda t: t.to(device, non_blocking=non_blocking))

    def map(self, fn: Any) -> SparseTargets:
        """The same kind of targets with ``fn`` applied to every tensor."""
        return type(self)(*(fn(t) for t in self.tensors()))

    @property
    def k(self) -> int:
        return int(self.idx.shape[-1])


@dataclass
class SampledTargets(SparseTargets):
    """Top-k targets plus S classes drawn with replacement from the teacher's distribution at
    the draw temperature τ outside the top-k (encoding ``sampled``): the top-k fields are exact
    as for any cache, and the draws estimate the tail (``tail: sample``, :func:`sampled_at`).

    ``sample_idx``/``sample_logit``/``sample_count`` ``[B, S]``: each drawn class (distinct within
    a row), its T=1 logit and how many of the S draws hit it (0: an empty slot, whose logit is
    finite and whose class means nothing). ``lse_t``/``temperatures`` ``[B, n]``: the logsumexp of
    the logits at T (``logsumexp(l / T)``) for each temperature stored (the same on every row).
    ``draw_tail_lse``/``draw_temperature`` ``[B]``: ``logsumexp(l / τ)`` over the classes outside
    the top-k (the draws' normaliser; ``tail_lse`` where τ = 1) and τ (the same on every row).
    """

    sample_idx: torch.Tensor
    sample_logit: torch.Tensor
    sample_count: torch.Tensor
    lse_t: torch.Tensor
    temperatures: torch.Tensor
    draw_tail_lse: torch.Tensor
    draw_temperature: torch.Tensor

    def tensors(self) -> tuple[torch.Tensor, ...]:
        extra = (self.sample_idx, self.sample_logit, self.sample_count, self.lse_t)
        draws = (self.draw_tail_lse, self.draw_temperature)
        return super().tensors() + extra + (self.temperatures,) + draws

    def head(self) -> SparseTargets:
        """The top-k part alone (``tail: spread`` or ``renorm`` ignore the draws)."""
        return SparseTargets(*super().tensors())


@dataclass
class TemperedTargets:
    """A target distribution made for one temperature: ``probs`` on ``idx`` ``[B, m]`` (the most
    probable class first; slots of probability 0 may repeat a class only where ``other`` is 0)
    and ``other`` ``[B]`` on each class outside ``idx``. ``lse - label_logit`` is the T=1
    cross-entropy of the label (WSL's teacher weight).

    Made by :func:`loss_targets` for a loss at ``temperature`` (sampled estimates, ensembles); the
    probabilities need not sum to 1 (an unbiased estimate does so only on average).
    """

    idx: torch.Tensor
    probs: torch.Tensor
    other: torch.Tensor
    lse: torch.Tensor
    label_logit: torch.Tensor
    temperature: float

    @property
    def k(self) -> int:
        return int(self.idx.shape[-1])

    def check(self, temperature: float) -> None:
        if not math.isclose(temperature, self.temperature, rel_tol=1e-6):
            raise ValueError(
                f"these targets were made for T={self.temperature:g}, the loss asks for "
                f"T={temperature:g}"
            )


@dataclass
class EnsembleTargets:
    """Several teachers' targets of the same views, to be combined for a loss: the weighted mean
    of their probabilities at the loss's temperature (``probs``) or of their logits
    (``logits``), see :func:`ensemble_targets`."""

    members: tuple[SparseTargets, ...]
    weights: tuple[float, ...]
    combine: str = "probs"


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


def dense_logits(t: SparseTargets, num_classes: int, tail: str) -> torch.Tensor:
    """``[B, C]`` logits whose softmax at T is the target at T (``-inf`` outside the top-k for
    renorm); ``tail`` a :data:`LossTail` (``sample`` only where k == C)."""
    tail = _check_tail(tail, t, num_classes)
    fill = (
        tail_logit(t, num_classes)
        if tail == "spread"
        else torch.full_like(t.lse.float(), float("-inf"))
    )
    out = fill.unsqueeze(-1).expand(-1, num_classes).clone()
    return out.scatter(1, t.idx.long(), t.logit.float())


def dense_probs(
    t: SparseTargets | TemperedTargets, num_classes: int, temperature: float, tail: str
) -> torch.Tensor:
    """``[B, C]`` teacher probabilities at ``temperature`` under the chosen tail treatment
    (:class:`TemperedTargets`: as made, for their temperature only)."""
    if isinstance(t, TemperedTargets):
        t.check(temperature)
        placed = torch.zeros(len(t.probs), num_classes, device=t.probs.device)
        placed = placed.scatter_add(1, t.idx.long(), t.probs.float())
        held = torch.zeros_like(placed, dtype=torch.bool).scatter(1, t.idx.long(), True)
        return torch.where(held, placed, t.other.float().unsqueeze(-1))
    return torch.softmax(dense_logits(t, num_classes, tail) / temperature, dim=-1)


def sparse_probs(
    t: SparseTargets | TemperedTargets, num_classes: int, temperature: float, tail: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(``[B, k]`` top-k probabilities, ``[B]`` probability of each of the C-k other classes) at T.

    The sparse form of :func:`dense_probs`, for losses that need not build ``[B, C]``.
    """
    if isinstance(t, TemperedTargets):
        t.check(temperature)
        return t.probs.float(), t.other.float()
    tail = _check_tail(tail, t, num_classes)
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


def _check_tail(tail: str, t: SparseTargets, num_classes: int) -> str:
    """The top-k treatment to apply: ``tail`` itself, or ``spread`` for ``sample`` on targets
    without a tail (k == C: exact either way)."""
    if tail == "sample" and t.k >= num_classes:
        return "spread"
    if tail == "sample":
        raise ValueError(
            "tail 'sample' needs sampled targets (encoding 'sampled') or k equal to the class "
            f"count; these hold the top {t.k} of {num_classes} classes: convert them with "
            "loss_targets first, or use 'spread' or 'renorm'"
        )
    if tail not in TAIL_MODES:
        raise ValueError(f"tail must be one of {LOSS_TAILS}, found {tail!r}")
    return tail


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

    def one_hot(self, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
        """``float32[B, C]``: the dense mixed target, ``lam`` of the own label's smoothed one-hot
        plus ``1 - lam`` of the partner's (timm's ``mixup_target``: ``smoothing / C`` off the
        label, ``1 - smoothing + smoothing / C`` on it), for timm's ``SoftTargetCrossEntropy``.
        Its cross-entropy is the mixed CE of ``kdcache.ce`` with ``label_smoothing``."""
        off = smoothing / num_classes
        on = 1.0 - smoothing + off
        own = torch.full((len(self.labels), num_classes), off, device=self.lam.device)
        partner = own.clone()
        own.scatter_(1, self.labels.long().unsqueeze(1), on)
        partner.scatter_(1, self.partner.long().unsqueeze(1), on)
        lam = self.lam.float().unsqueeze(1)
        return lam * own + (1.0 - lam) * partner


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


# ---- sampled targets, ensembles: what a loss takes ---------------------------------------------


def sampled_at(t: SampledTargets, temperature: float) -> TemperedTargets:
    """The ``tail: sample`` estimate of the teacher's distribution at ``temperature``.

    The top-k classes get their exact probability ``exp(l / T - L_T)``; a drawn class ``x`` gets
    ``(c_x / S) * M_τ * p_T(x) / p_τ(x)``, where τ is the temperature the draws came from,
    ``M_τ`` the exact tail mass at τ, ``c_x`` the class's count among the S draws (drawn from
    the tail at τ renormalised, whose probability of ``x`` is ``p_τ(x) / M_τ``) and
    ``L_T = logsumexp(l / T)``. Each class's expectation over the draws is its probability at T,
    so a loss linear in the target (KD, WSL's KL) has an unbiased gradient: the
    importance-sampling estimator of random-sampling KD (Anshumann et al., 2025), with the top-k
    taken out of the draws. At T = τ there is no importance weight: a drawn class gets
    ``(c_x / S) * M_τ``, and only the draws' spread over the tail varies. The further T is from
    τ, the larger the weights of tail classes that τ makes rare (T > τ) or of the few that
    dominate at T (T < τ). At a temperature whose ``L_T`` is neither stored nor derivable (T=1:
    ``lse``; τ: the top-k and the draws' tail) the estimate is self-normalised (consistent, not
    unbiased): ``L_T`` is replaced by the log of the estimate's own total.
    """
    inverse = 1.0 / temperature
    logit = t.logit.float()
    draws = t.sample_count.float()
    total = draws.sum(-1, keepdim=True).clamp_min(1.0)
    # log((c/S) * M_τ * p_T(x) / p_τ(x)) + L_T, in logs: log M_τ = draw_tail_lse - L_τ, and
    # log p_T(x) - log p_τ(x) = l_x (1/T - 1/τ) - L_T + L_τ, so L_τ cancels and an empty slot
    # (count 0) is -inf whatever its logit. τ is one number per batch (a Python float here, so
    # τ = 1 computes exactly what the estimate computed before τ could be chosen).
    tau = draw_temperature_of(t)
    if math.isclose(temperature, tau, rel_tol=1e-6):
        tau = temperature  # τ comes back as float32: no weight at all at T = τ, not 1e-8 of one
    log_weight = torch.log(draws / total) + t.draw_tail_lse.float().unsqueeze(-1)
    sampled = log_weight + t.sample_logit.float() * (inverse - 1.0 / tau)
    head = logit * inverse
    log_z = _log_normaliser(t, temperature, head, sampled)
    probs = torch.exp(torch.cat([head, sampled], dim=-1) - log_z.unsqueeze(-1))
    idx = torch.cat([t.idx.long(), t.sample_idx.long()], dim=-1)
    return TemperedTargets(
        idx, probs, torch.zeros_like(log_z), t.lse.float(), t.label_logit.float(), temperature
    )


def _log_normaliser(
    t: SampledTargets, temperature: float, head: torch.Tensor, sampled: torch.Tensor
) -> torch.Tensor:
    """``L_T`` ``[B]``: ``lse`` at T=1; at the draws' τ the top-k's and the tail's together; a
    stored one; else the log of the estimate's total."""
    if math.isclose(temperature, 1.0, rel_tol=1e-6):
        return t.lse.float()
    if math.isclose(temperature, draw_temperature_of(t), rel_tol=1e-6):
        # every class is in the top-k or the tail: L_τ from the stored values, exact up to their
        # rounding, so the top-k and M_τ = exp(draw_tail_lse - L_τ) sum to 1 on every view
        return torch.logaddexp(torch.logsumexp(head, dim=-1), t.draw_tail_lse.float())
    if t.temperatures.numel():
        stored = torch.isclose(t.temperatures[0].float(), torch.tensor(float(temperature)))
        if stored.any():
            return t.lse_t[:, int(stored.nonzero()[0, 0])].float()
    return torch.logsumexp(torch.cat([head, sampled], dim=-1), dim=-1)


def draw_temperature_of(t: SampledTargets) -> float:
    """The temperature ``t``'s draws came from (one per batch; 1 for an empty batch)."""
    return float(t.draw_temperature.reshape(-1)[0]) if t.draw_temperature.numel() else 1.0


def stored_temperature(t: SampledTargets, temperature: float) -> bool:
    """Whether :func:`sampled_at` is unbiased at ``temperature`` (T=1, the draws' τ, or ``L_T``
    stored)."""
    if math.isclose(temperature, 1.0, rel_tol=1e-6):
        return True
    if math.isclose(temperature, draw_temperature_of(t), rel_tol=1e-6):
        return True
    return bool(torch.isclose(t.temperatures.float(), torch.tensor(float(temperature))).any())


def ensemble_targets(
    members: Sequence[SparseTargets | TemperedTargets],
    weights: Sequence[float],
    num_classes: int,
    temperature: float,
    tail: str,
    combine: str = "probs",
) -> TemperedTargets:
    """Teachers' targets of the same views combined into one target at ``temperature``.

    ``probs``: ``sum_i w_i p_i^T`` with each ``p_i^T`` under ``tail`` (weights normalised to sum
    to 1); the label's T=1 cross-entropy is the mixture's, exact from each member's stored values.
    ``logits``: ``softmax(sum_i w_i l_i / T)`` with each member's dense logits (``spread``: the
    classes outside its top-k at its tail's logit; only exact where k == C); the label's logit is
    the exact weighted mean, the logsumexp that of the dense mean. An ensemble of one teacher, or
    of identical teachers, is that teacher's distribution at T.
    """
    if combine not in COMBINES:
        raise ValueError(f"combine must be one of {COMBINES}, found {combine!r}")
    if not members or len(weights) != len(members) or min(weights) <= 0:
        raise ValueError(
            f"an ensemble needs one positive weight per member: {len(members)} member(s), "
            f"weights {list(weights)}"
        )
    w = torch.tensor([float(x) for x in weights], dtype=torch.float64)
    w = (w / w.sum()).tolist()
    if combine == "logits":
        dense, lse, label_logit = _mean_logits(members, w, num_classes, temperature, tail)
    else:
        dense = _total(
            wi * dense_probs(m, num_classes, temperature, tail)
            for wi, m in zip(w, members, strict=True)
        )
        log_label = torch.stack([m.label_logit.float() - m.lse.float() for m in members], -1)
        label_logit = torch.logsumexp(log_label + torch.tensor(w).log().to(log_label), dim=-1)
        lse = torch.zeros_like(label_logit)
    probs, idx = torch.sort(dense, dim=-1, descending=True)
    return TemperedTargets(idx, probs, torch.zeros_like(lse), lse, label_logit, temperature)


def _mean_logits(
    members: Sequence[SparseTargets | TemperedTargets],
    weights: list[float],
    num_classes: int,
    temperature: float,
    tail: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``combine: logits``: (probabilities at T, logsumexp, label logit) of the weighted mean."""
    logit_members = [m for m in members if isinstance(m, SparseTargets)]
    if len(logit_members) < len(members) or tail not in ("spread", "sample"):
        raise ValueError(
            "combine 'logits' needs every member's logits: top-k targets with tail 'spread' "
            "(a renormalised or sampled tail has no logit for the classes it leaves out)"
        )
    pairs = list(zip(weights, logit_members, strict=True))
    mean = _total(wi * dense_logits(m, num_classes, tail) for wi, m in pairs)
    label_logit = _total(wi * m.label_logit.float() for wi, m in pairs)
    return torch.softmax(mean / temperature, -1), torch.logsumexp(mean, -1), label_logit


def _total(terms: Iterable[torch.Tensor]) -> torch.Tensor:
    """The sum of ``terms`` in order (``sum`` would start at ``0``, typed ``Tensor | int``)."""
    return functools.reduce(operator.add, terms)


def target_temperature(loss: Any) -> float:
    """The temperature a loss config applies to the teacher: ``teacher_temperature`` (EffDstl)
    or ``temperature``."""
    value = getattr(loss, "teacher_temperature", None)
    return float(value if value is not None else getattr(loss, "temperature", 1.0))


def loss_targets(
    targets: SparseTargets | EnsembleTargets, loss: Any, num_classes: int
) -> SparseTargets | TemperedTargets:
    """What a batch's targets become for a loss (config ``loss``: its ``tail``, ``topk`` and
    temperature): top-k targets truncated to ``topk``; sampled targets' estimate at the loss's
    temperature (``tail: sample``) or their top-k (``spread``/``renorm``); an ensemble combined
    from its members so converted (:func:`ensemble_targets`). Called once, before the loss."""
    tail = getattr(loss, "tail", "spread")
    topk = getattr(loss, "topk", None)
    temperature = target_temperature(loss)
    if isinstance(targets, EnsembleTargets):
        members = [_for_loss(m, tail, topk, temperature) for m in targets.members]
        return ensemble_targets(
            members, targets.weights, num_classes, temperature, tail, targets.combine
        )
    return _for_loss(targets, tail, topk, temperature)


def _for_loss(
    t: SparseTargets, tail: str, topk: int | None, temperature: float
) -> SparseTargets | TemperedTargets:
    if tail == "sample" and isinstance(t, SampledTargets):
        if topk is not None and topk < t.k:
            raise ValueError(
                f"topk {topk} with tail 'sample': the draws exclude all {t.k} stored classes"
            )
        return sampled_at(t, temperature)
    if isinstance(t, SampledTargets):
        t = t.head()
    return truncate(t, topk)


INDEX_FIELDS = {"idx", "sample_idx"}


def targets_from_arrays(arrays: Sequence[Any]) -> SparseTargets:
    """Targets from arrays (numpy or torch) in field order: 5 make :class:`SparseTargets`, 12
    :class:`SampledTargets`; class indices become int64, the other values stay as given (fp16
    logits are widened by the losses)."""
    kind = SampledTargets if len(arrays) == len(SampledTargets.__dataclass_fields__) else None
    kind = kind or SparseTargets
    names = list(kind.__dataclass_fields__)
    tensors = [torch.as_tensor(_native(a)) for a in arrays]
    return kind(
        *(t.long() if n in INDEX_FIELDS else t for n, t in zip(names, tensors, strict=True))
    )


def _native(array: Any) -> Any:
    """uint16/uint32 indices (no torch dtype on every version) as int64 numpy."""
    if hasattr(array, "dtype") and str(array.dtype) in ("uint16", "uint32"):
        return array.astype("int64")
    return array
