"""Losses on sparse cached targets: CE, KD, DIST, WSL, EffDstl (consistent knowledge mining).

Every loss is a plain function of the student's logits ``[B, C]``, the teacher's targets and the
labels, with its settings as keyword arguments::

    loss = kd(student_logits, targets, labels=labels, temperature=4.0, alpha=0.9, tail="spread")

``targets`` is a :class:`~kdcache.targets.sparse.SparseTargets` (cached top-k + logsumexp + label
logit) or a dense ``[B, C]`` tensor of teacher logits (converted exactly, k = C); the online mode
of the trainer converts its teacher's logits the same way, so both modes run the same code.
``labels`` is an ``int64[B]`` tensor or, for Mixup/CutMix views, a
:class:`~kdcache.targets.sparse.MixedLabels` (the CE part mixes the two labels' cross-entropies by
lam). The class count is the logits' width. The tail outside the top-k is an explicit choice
(``renorm`` or ``spread``, see
:mod:`kdcache.targets.sparse`); KD and WSL work on the sparse form, DIST and EffDstl build dense
``[B, C]`` teacher probabilities because they need them.

Each loss comes in three forms: ``kd(...)`` returns the total (a scalar tensor), ``kd_parts(...)``
the :class:`LossParts` the trainer logs, and :class:`KDLoss` is an ``nn.Module`` holding the
settings. The trainer calls the same functions through the *registry*: a config's
``stages.N.loss`` names a registered loss and gives its keyword arguments, and
:func:`register_loss` adds a loss of one's own under a name (see :class:`RegisteredLoss`).
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kdcache.targets.sparse import (
    EnsembleTargets,
    LossTail,
    MixedLabels,
    SparseTargets,
    TemperedTargets,
    dense_probs,
    from_logits,
    loss_targets,
    sparse_probs,
    tail_logit,
)

Tensor = torch.Tensor
Labels = Tensor | MixedLabels
Targets = SparseTargets | TemperedTargets | Tensor


@dataclass
class LossParts:
    """The total loss and its parts (scalars), for the backward pass and for logging."""

    total: Tensor
    ce: Tensor | None = None
    """The hard-label CE term before its weight (None: the loss has none to report)."""
    kd: Tensor | None = None
    """The distillation term as it enters ``total`` before its weight (incl. ``T^2``)."""
    kd_weight: float = 0.0
    """The weight the distillation term had in ``total`` (0 after ``stop_epoch``)."""
    weight: Tensor | None = None
    """WSL: the mean per-sample weight ``w`` (logged)."""
    sample_weights: Tensor | None = None
    """WSL: the per-sample weights ``w`` ``[B]`` (detached)."""
    mining_rate: Tensor | None = None
    """EffDstl: the fraction of rows whose target was replaced by the smoothed label (logged)."""
    mined: Tensor | None = None
    """EffDstl: which rows were mined, ``bool[B]``."""
    branch_ce: Tensor | None = None
    """SFTN: the student branches' mean CE (logged)."""

    def log(self) -> dict[str, float]:
        out = {"loss": float(self.total.detach())}
        for name in ("ce", "kd", "weight", "mining_rate", "branch_ce"):
            value = getattr(self, name)
            if value is not None:
                out[name] = float(value.detach())
        return out


# ---- building blocks --------------------------------------------------------------------------


def cross_entropy(
    logits: Tensor, labels: Labels, label_smoothing: float = 0.0, reduction: str = "mean"
) -> Tensor:
    """CE of float32 logits (label smoothing as in torch: eps spread over all C classes); mixed
    labels give ``lam * CE(label) + (1 - lam) * CE(partner)`` per row."""
    logits = logits.float()
    if not isinstance(labels, MixedLabels):
        return F.cross_entropy(logits, labels, label_smoothing=label_smoothing, reduction=reduction)
    own = F.cross_entropy(logits, labels.labels, label_smoothing=label_smoothing, reduction="none")
    other = F.cross_entropy(
        logits, labels.partner, label_smoothing=label_smoothing, reduction="none"
    )
    rows = labels.lam * own + (1.0 - labels.lam) * other
    return rows.mean() if reduction == "mean" else rows


def as_sparse(targets: Targets, labels: Labels | None) -> SparseTargets | TemperedTargets:
    """Sparse targets as they are, or dense teacher logits ``[B, C]`` converted exactly (k = C)."""
    if isinstance(targets, SparseTargets | TemperedTargets):
        return targets
    if labels is None:  # the label logit is unknown: NaN, as for unlabelled rows
        labels = torch.full(targets.shape[:1], -1, dtype=torch.int64, device=targets.device)
    return from_logits(targets.detach(), labels, targets.shape[-1])


def sparse_kl(
    log_q: Tensor,
    targets: SparseTargets | TemperedTargets,
    num_classes: int,
    temperature: float,
    tail: str,
) -> Tensor:
    """Per-row ``KL(p_t^T || q)`` with ``p_t^T`` from sparse targets and ``log_q`` dense ``[B, C]``.

    ``KL = sum_K p (log p - log q) + (C-k) p_o log p_o - p_o (sum_all log q - sum_K log q)``, where
    ``p_o`` is the probability of each class outside the top-k (0 for ``renorm``).
    """
    p_top, p_other = sparse_probs(targets, num_classes, temperature, tail)
    log_q_top = log_q.gather(1, targets.idx.long())
    others = num_classes - targets.k
    top = torch.xlogy(p_top, p_top).sum(1) - (p_top * log_q_top).sum(1)
    if others == 0:
        return top
    log_q_rest = log_q.sum(1) - log_q_top.sum(1)
    return top + others * torch.xlogy(p_other, p_other) - p_other * log_q_rest


def dense_kl(target: Tensor, log_q: Tensor) -> Tensor:
    """Per-row ``KL(target || q)`` for dense ``[B, C]`` targets."""
    return (torch.xlogy(target, target) - target * log_q).sum(1)


def pearson(a: Tensor, b: Tensor, eps: float = 1e-8) -> Tensor:
    """Pearson correlation of each row of ``a`` with the same row of ``b``, ``[B]``."""
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def _need_labels(labels: Labels | None, loss: str, why: str) -> Labels:
    if labels is None:
        raise ValueError(f"{loss}: labels are needed ({why}); pass labels=...")
    return labels


def _ce_term(
    logits: Tensor, labels: Labels | None, weight: float, smoothing: float, loss: str
) -> Tensor | None:
    """The CE part of a distillation loss, or None when its weight is 0 and no labels are given."""
    if labels is None and weight == 0.0:
        return None
    labels = _need_labels(labels, loss, f"the CE term has weight {weight:g}")
    return cross_entropy(logits, labels, smoothing)


def _weighted(ce: Tensor | None, ce_weight: float, kd: Tensor, kd_weight: float) -> Tensor:
    return kd_weight * kd if ce is None else ce_weight * ce + kd_weight * kd


# ---- the losses: LossParts ----------------------------------------------------------------------


def ce_parts(
    student_logits: Tensor,
    targets: Targets | None = None,
    labels: Labels | None = None,
    *,
    label_smoothing: float = 0.0,
) -> LossParts:
    """Plain cross-entropy against the labels (``targets`` is ignored)."""
    ce = cross_entropy(student_logits, _need_labels(labels, "ce", "CE"), label_smoothing)
    return LossParts(total=ce, ce=ce)


def kd_parts(
    student_logits: Tensor,
    targets: Targets,
    labels: Labels | None = None,
    *,
    temperature: float = 4.0,
    alpha: float = 0.9,
    tail: LossTail = "spread",
    label_smoothing: float = 0.0,
) -> LossParts:
    """Hinton KD: ``(1-alpha)*CE + alpha*T^2*mean KL(p_t^T || p_s^T)``."""
    targets = as_sparse(targets, labels)
    num_classes = student_logits.shape[-1]
    ce = _ce_term(student_logits, labels, 1.0 - alpha, label_smoothing, "kd")
    log_q = F.log_softmax(student_logits.float() / temperature, dim=1)
    kd = temperature**2 * sparse_kl(log_q, targets, num_classes, temperature, tail).mean()
    return LossParts(total=_weighted(ce, 1.0 - alpha, kd, alpha), ce=ce, kd=kd, kd_weight=alpha)


def dist_parts(
    student_logits: Tensor,
    targets: Targets,
    labels: Labels | None = None,
    *,
    beta: float = 1.0,
    gamma: float = 1.0,
    temperature: float = 1.0,
    ce_weight: float = 1.0,
    kd_weight: float = 2.0,
    tail: LossTail = "spread",
    label_smoothing: float = 0.0,
) -> LossParts:
    """DIST (paper 001): ``ce_w*CE + kd_w*(beta*T^2*(1-mean_rows r) + gamma*T^2*(1-mean_cols r))``
    of the softmax outputs (``r``: Pearson correlation). The official configs use
    ``beta = gamma = T = 1`` and ``kd_w = 2`` beside ``ce_w = 1`` (ImageNet and CIFAR-100, the
    latter at T = 4)."""
    targets = as_sparse(targets, labels)
    temp = temperature
    ce = _ce_term(student_logits, labels, ce_weight, label_smoothing, "dist")
    p_s = torch.softmax(student_logits.float() / temp, dim=1)
    p_t = dense_probs(targets, student_logits.shape[-1], temp, tail)
    inter = 1.0 - pearson(p_s, p_t).mean()
    intra = 1.0 - pearson(p_s.t(), p_t.t()).mean()
    kd = temp**2 * (beta * inter + gamma * intra)
    return LossParts(
        total=_weighted(ce, ce_weight, kd, kd_weight), ce=ce, kd=kd, kd_weight=kd_weight
    )


def teacher_label_ce(
    targets: SparseTargets | TemperedTargets, num_classes: int, temperature: float = 1.0
) -> Tensor:
    """The teacher's cross-entropy against the label at ``temperature``, ``[B]``, from the sparse
    targets: ``log Z_T - label_logit / T`` with ``Z_T`` the partition function at T.

    At T = 1 it is exact (``lse - label_logit``, both stored exactly). At other temperatures the
    top-k logits enter ``Z_T`` exactly and the tail enters *spread*, whatever tail treatment the
    loss uses for its targets: the exact tail mass at T = 1 as ``C - k`` equal logits (an upper
    bound on the tail's part of ``Z_T`` for T > 1, a lower bound for T < 1; exact when k = C).
    Dropping the tail (``renorm``) would give a label outside the top-k probability 0 and an
    infinite cross-entropy. Mixed labels: ``label_logit`` is the lam-weighted logit, so this is
    the mixed target's cross-entropy. NaN for rows without a label."""
    label_logit = targets.label_logit.float()
    if temperature == 1.0:
        return targets.lse.float() - label_logit
    if isinstance(targets, TemperedTargets):
        raise ValueError(
            f"the teacher's label cross-entropy at T={temperature:g} needs top-k targets; "
            "sampled estimates and ensembles give it at T=1 only (set weight_temperature: 1)"
        )
    scaled = targets.logit.float() / temperature
    others = num_classes - targets.k
    if others > 0:
        spread = tail_logit(targets, num_classes) / temperature + math.log(others)
        scaled = torch.cat([scaled, spread.unsqueeze(-1)], dim=-1)
    return torch.logsumexp(scaled, dim=-1) - label_logit / temperature


def wsl_weights(
    student_logits: Tensor,
    labels: Labels,
    targets: SparseTargets | TemperedTargets,
    temperature: float = 1.0,
) -> Tensor:
    """WSL's per-row weight ``w = 1 - exp(-CE_s/CE_t)`` from detached cross-entropies of student
    and teacher against the label at ``temperature`` (WSL: 1; EffDstl's official code: 2, its KD
    temperature). The teacher's CE comes from the sparse targets (:func:`teacher_label_ce`)."""
    logits = student_logits.detach().float() / temperature
    ce_s = cross_entropy(logits, labels, reduction="none")
    ce_t = teacher_label_ce(targets, student_logits.shape[-1], temperature)
    return 1.0 - torch.exp(-(ce_s / (ce_t + 1e-7)).clamp_min(0.0))


def wsl_parts(
    student_logits: Tensor,
    targets: Targets,
    labels: Labels,
    *,
    temperature: float = 2.0,
    weight_temperature: float = 1.0,
    ce_weight: float = 1.0,
    kd_weight: float = 2.5,
    tail: LossTail = "spread",
    label_smoothing: float = 0.0,
) -> LossParts:
    """WSL (Zhou et al. 2021, cited by paper 000): ``ce_w*CE + kd_w*T^2*mean(w*KL(p_t^T||p_s^T))``
    with the weights of :func:`wsl_weights` at ``weight_temperature``.

    WSL's reference code uses the soft cross-entropy ``H(p_t, p_s)``; the KL differs by
    ``w*H(p_t)``, which does not depend on the student: same gradients, a smaller value.
    """
    labels = _need_labels(labels, "wsl", "the sample weights compare cross-entropies")
    targets = as_sparse(targets, labels)
    temp = temperature
    ce = cross_entropy(student_logits, labels, label_smoothing)
    weights = wsl_weights(student_logits, labels, targets, weight_temperature)
    log_q = F.log_softmax(student_logits.float() / temp, dim=1)
    kl = sparse_kl(log_q, targets, student_logits.shape[-1], temp, tail)
    kd = temp**2 * (weights * kl).mean()
    return LossParts(
        total=ce_weight * ce + kd_weight * kd,
        ce=ce,
        kd=kd,
        kd_weight=kd_weight,
        weight=weights.mean(),
        sample_weights=weights,
    )


def mined_targets(
    student_logits: Tensor,
    labels: Labels,
    targets: SparseTargets | TemperedTargets,
    *,
    teacher_temperature: float = 0.7,
    student_temperature: float = 1.0,
    smooth_to: float = 0.99,
    tail: LossTail = "spread",
) -> tuple[Tensor, Tensor]:
    """EffDstl's targets ``[B, C]`` and the mined-row mask ``[B]``.

    A row is mined where the teacher's top-1 is the label and the teacher's label probability (at
    the teacher temperature) is below the student's (at the student temperature, detached): its
    target becomes the label smoothed to ``smooth_to`` (the rest spread evenly over the other
    C-1 classes). Other rows keep the teacher's distribution at the teacher temperature. Mixed
    views (Mixup/CutMix, ``lam < 1``) are never mined: the label of a mixed image is not one class.
    """
    num_classes = student_logits.shape[-1]
    own = labels.labels if isinstance(labels, MixedLabels) else labels
    p_t = dense_probs(targets, num_classes, teacher_temperature, tail)
    p_s = torch.softmax(student_logits.detach().float() / student_temperature, dim=1)
    rows = own.unsqueeze(1)
    correct = targets.idx[:, 0].long() == own
    mined = correct & (p_t.gather(1, rows).squeeze(1) < p_s.gather(1, rows).squeeze(1))
    if isinstance(labels, MixedLabels):
        mined = mined & ~labels.mixed
    smooth = torch.full_like(p_t, (1.0 - smooth_to) / max(num_classes - 1, 1))
    smooth.scatter_(1, rows, smooth_to)
    return torch.where(mined.unsqueeze(1), smooth, p_t), mined


def effdstl_parts(
    student_logits: Tensor,
    targets: Targets,
    labels: Labels,
    *,
    teacher_temperature: float = 0.7,
    student_temperature: float = 1.0,
    smooth_to: float = 0.99,
    ce_weight: float = 0.0,
    kd_weight: float = 1.0,
    tail: LossTail = "spread",
    label_smoothing: float = 0.0,
) -> LossParts:
    """EffDstl stage 2 (paper 000): ``ce_w*CE + kd_w*T_s^2*mean KL(mined target || p_s^{T_s})``.

    The official code has no CE term in stage 2 (``ce_loss_alpha = 0``), hence ``ce_weight = 0``.
    """
    labels = _need_labels(labels, "effdstl", "knowledge mining compares label probabilities")
    targets = as_sparse(targets, labels)
    ce = cross_entropy(student_logits, labels, label_smoothing)
    target, mined = mined_targets(
        student_logits,
        labels,
        targets,
        teacher_temperature=teacher_temperature,
        student_temperature=student_temperature,
        smooth_to=smooth_to,
        tail=tail,
    )
    temp = student_temperature
    log_q = F.log_softmax(student_logits.float() / temp, dim=1)
    kd = temp**2 * dense_kl(target, log_q).mean()
    return LossParts(
        total=ce_weight * ce + kd_weight * kd,
        ce=ce,
        kd=kd,
        kd_weight=kd_weight,
        mining_rate=mined.float().mean(),
        mined=mined,
    )


# ---- the losses: plain functions and modules --------------------------------------------------


def ce(student_logits: Tensor, labels: Labels, *, label_smoothing: float = 0.0) -> Tensor:
    """Plain cross-entropy (mixed labels: ``lam * CE(label) + (1 - lam) * CE(partner)``)."""
    return cross_entropy(student_logits, labels, label_smoothing)


def kd(
    student_logits: Tensor,
    targets: Targets,
    labels: Labels | None = None,
    *,
    temperature: float = 4.0,
    alpha: float = 0.9,
    tail: LossTail = "spread",
    label_smoothing: float = 0.0,
) -> Tensor:
    """Hinton KD: ``(1-alpha)*CE + alpha*T^2*mean KL(p_t^T || p_s^T)`` (:func:`kd_parts`'s
    total)."""
    return kd_parts(
        student_logits,
        targets,
        labels,
        temperature=temperature,
        alpha=alpha,
        tail=tail,
        label_smoothing=label_smoothing,
    ).total


def dist(
    student_logits: Tensor,
    targets: Targets,
    labels: Labels | None = None,
    *,
    beta: float = 1.0,
    gamma: float = 1.0,
    temperature: float = 1.0,
    ce_weight: float = 1.0,
    kd_weight: float = 2.0,
    tail: LossTail = "spread",
    label_smoothing: float = 0.0,
) -> Tensor:
    """DIST (paper 001): CE plus the inter- and intra-class Pearson relations of the softmax
    outputs (:func:`dist_parts`'s total)."""
    return dist_parts(
        student_logits,
        targets,
        labels,
        beta=beta,
        gamma=gamma,
        temperature=temperature,
        ce_weight=ce_weight,
        kd_weight=kd_weight,
        tail=tail,
        label_smoothing=label_smoothing,
    ).total


def wsl(
    student_logits: Tensor,
    targets: Targets,
    labels: Labels,
    *,
    temperature: float = 2.0,
    weight_temperature: float = 1.0,
    ce_weight: float = 1.0,
    kd_weight: float = 2.5,
    tail: LossTail = "spread",
    label_smoothing: float = 0.0,
) -> Tensor:
    """WSL: CE plus a KD term weighted per sample by the student's and the teacher's label
    cross-entropies (:func:`wsl_parts`'s total)."""
    return wsl_parts(
        student_logits,
        targets,
        labels,
        temperature=temperature,
        weight_temperature=weight_temperature,
        ce_weight=ce_weight,
        kd_weight=kd_weight,
        tail=tail,
        label_smoothing=label_smoothing,
    ).total


def effdstl(
    student_logits: Tensor,
    targets: Targets,
    labels: Labels,
    *,
    teacher_temperature: float = 0.7,
    student_temperature: float = 1.0,
    smooth_to: float = 0.99,
    ce_weight: float = 0.0,
    kd_weight: float = 1.0,
    tail: LossTail = "spread",
    label_smoothing: float = 0.0,
) -> Tensor:
    """EffDstl stage 2 (paper 000): KD against the teacher's targets with consistent knowledge
    mining (:func:`effdstl_parts`'s total)."""
    return effdstl_parts(
        student_logits,
        targets,
        labels,
        teacher_temperature=teacher_temperature,
        student_temperature=student_temperature,
        smooth_to=smooth_to,
        ce_weight=ce_weight,
        kd_weight=kd_weight,
        tail=tail,
        label_smoothing=label_smoothing,
    ).total


# ---- the registry --------------------------------------------------------------------------------


LOSS_ARGUMENTS = ("student_logits", "targets", "labels")
"""The three positional arguments every registered loss takes, in this order."""


@dataclass(frozen=True)
class RegisteredLoss:
    """A loss usable by name: ``fn(student_logits, targets, labels, **settings)`` returning a scalar
    tensor or :class:`LossParts`. ``targets`` is None for a loss that needs no teacher."""

    name: str
    fn: Callable[..., Tensor | LossParts]
    needs_teacher: bool = True
    """False: a supervised loss (the run needs no teacher for it and passes ``targets=None``)."""

    @property
    def settings(self) -> dict[str, inspect.Parameter]:
        """The keyword settings ``fn`` accepts (a config's keys beside ``name``)."""
        params = list(inspect.signature(self.fn).parameters.values())[len(LOSS_ARGUMENTS) :]
        return {p.name: p for p in params if p.kind is not p.VAR_KEYWORD}

    def check_settings(self, settings: Mapping[str, Any]) -> None:
        """Refuse settings ``fn`` does not take or required ones left out (a ValueError naming
        them and the valid ones)."""
        valid = self.settings
        takes_any = any(
            p.kind is p.VAR_KEYWORD for p in inspect.signature(self.fn).parameters.values()
        )
        unknown = sorted(set(settings) - set(valid)) if not takes_any else []
        if unknown:
            raise ValueError(
                f"loss {self.name!r} has no setting(s) {unknown}; "
                f"its settings: {', '.join(valid) or 'none'}"
            )
        missing = [n for n, p in valid.items() if p.default is p.empty and n not in settings]
        if missing:
            raise ValueError(f"loss {self.name!r} needs the setting(s) {missing}")

    def parts(
        self, student_logits: Tensor, targets: Targets | None, labels: Labels | None, **settings
    ) -> LossParts:
        out = self.fn(student_logits, targets, labels, **settings)
        return out if isinstance(out, LossParts) else LossParts(total=out)


_REGISTRY: dict[str, RegisteredLoss] = {}
BUILTIN_LOSSES = ("ce", "kd", "dist", "wsl", "effdstl")
"""The losses kdcache ships (their config keys are typed in :mod:`kdcache.train.config`)."""


def register_loss(
    name: str,
    fn: Callable[..., Tensor | LossParts] | None = None,
    *,
    needs_teacher: bool = True,
    replace: bool = False,
) -> Any:
    """Register ``fn`` under ``name``, so that ``stages.N.loss: {name: <name>, <setting>: ...}``
    trains with it; usable as a decorator::

        @kdcache.register_loss("my_kd")
        def my_kd(student_logits, targets, labels, *, temperature=4.0):
            return kdcache.kd(student_logits, targets, labels, temperature=temperature, alpha=1.0)

    ``fn`` takes ``(student_logits, targets, labels)`` positionally and its settings as keywords,
    and returns a scalar tensor or :class:`LossParts`. For ``kdcache train`` to find it, the
    module that registers it is listed under the config's ``imports``. A name already registered
    is refused unless ``replace``; the built-in names are always refused.
    """
    if fn is None:
        return functools.partial(register_loss, name, needs_teacher=needs_teacher, replace=replace)
    if name in BUILTIN_LOSSES and name in _REGISTRY:
        raise ValueError(f"loss {name!r} is built in and cannot be replaced; choose another name")
    if name in _REGISTRY and not replace:
        raise ValueError(
            f"a loss named {name!r} is already registered (replace=True to replace it)"
        )
    params = list(inspect.signature(fn).parameters.values())
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) < len(LOSS_ARGUMENTS):
        raise TypeError(
            f"loss {name!r}: {fn!r} must take (student_logits, targets, labels) positionally"
        )
    _REGISTRY[name] = RegisteredLoss(name, fn, needs_teacher)
    return fn


def registered_losses() -> list[str]:
    """Every registered loss name, built-in ones first."""
    return [*BUILTIN_LOSSES, *sorted(set(_REGISTRY) - set(BUILTIN_LOSSES))]


def get_loss(name: str) -> RegisteredLoss:
    """The loss registered as ``name``; a KeyError listing the registered names otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(
            f"no loss named {name!r}; registered: {', '.join(registered_losses())}"
        ) from None


def _ce_entry(
    student_logits: Tensor,
    targets: Targets | None,
    labels: Labels | None,
    *,
    label_smoothing: float = 0.0,
) -> LossParts:
    return ce_parts(student_logits, targets, labels, label_smoothing=label_smoothing)


register_loss("ce", _ce_entry, needs_teacher=False)
register_loss("kd", kd_parts)
register_loss("dist", dist_parts)
register_loss("wsl", wsl_parts)
register_loss("effdstl", effdstl_parts)


class Loss(nn.Module):
    """A registered loss as an ``nn.Module`` holding its settings:
    ``Loss("kd", temperature=2.0)(student_logits, targets, labels)`` returns the total."""

    def __init__(self, name: str, **settings: Any):
        super().__init__()
        self.entry = get_loss(name)
        self.entry.check_settings(settings)
        self.settings = settings

    @classmethod
    def from_config(cls, config: Any) -> Loss:
        """The loss a train config's ``stages.N.loss`` names, with its settings (``stop_epoch`` and
        ``topk`` are the trainer's: apply them in your loop if you use them)."""
        return Loss(config.name, **loss_settings(config))

    def forward(
        self, student_logits: Tensor, targets: Targets | None = None, labels: Labels | None = None
    ) -> Tensor:
        return self.entry.parts(student_logits, targets, labels, **self.settings).total

    def extra_repr(self) -> str:
        shown = ", ".join(f"{k}={v!r}" for k, v in self.settings.items())
        return f"{self.entry.name!r}" + (f", {shown}" if shown else "")


class KDLoss(Loss):
    """:func:`kd` as a module: ``KDLoss(temperature=4.0, alpha=0.9)(logits, targets, labels)``."""

    def __init__(self, **settings: Any):
        super().__init__("kd", **settings)


class DISTLoss(Loss):
    """:func:`dist` as a module."""

    def __init__(self, **settings: Any):
        super().__init__("dist", **settings)


class WSLLoss(Loss):
    """:func:`wsl` as a module."""

    def __init__(self, **settings: Any):
        super().__init__("wsl", **settings)


class EffDstlLoss(Loss):
    """:func:`effdstl` as a module."""

    def __init__(self, **settings: Any):
        super().__init__("effdstl", **settings)


class CELoss(Loss):
    """:func:`ce` as a module: ``CELoss(label_smoothing=0.1)(logits, labels)``."""

    def __init__(self, **settings: Any):
        super().__init__("ce", **settings)

    def forward(self, student_logits: Tensor, labels: Labels) -> Tensor:  # type: ignore[override]
        return self.entry.parts(student_logits, None, labels, **self.settings).total


# ---- the trainer's use ------------------------------------------------------------------------


TRAINER_KEYS = ("name", "stop_epoch", "topk")
"""Keys of a stage's loss config that the trainer applies itself (not passed to the loss)."""


def loss_settings(config: Any) -> dict[str, Any]:
    """The keyword settings a stage's loss config passes to its loss function."""
    extra = getattr(config, "model_extra", None) or {}
    fields = {name: getattr(config, name) for name in type(config).model_fields}
    return {k: v for k, v in {**fields, **extra}.items() if k not in TRAINER_KEYS}


def stopped(config: Any, epoch: int) -> bool:
    """Early-stopped KD: the distillation term is off from ``stop_epoch`` on."""
    stop = getattr(config, "stop_epoch", None)
    return stop is not None and epoch >= stop


class Criterion:
    """A stage's loss: ``criterion(logits, labels, targets, epoch) -> LossParts``, the registered
    loss the config names called with the config's settings (after ``stop_epoch`` plain CE; the
    targets first made what the loss asks for: truncated to ``topk``, a sampled estimate, an
    ensemble's combination, see :func:`~kdcache.targets.sparse.loss_targets`)."""

    def __init__(self, config: Any, num_classes: int):
        self.config = config
        self.num_classes = num_classes
        self.entry = get_loss(config.name)
        self.settings = loss_settings(config)

    @property
    def needs_teacher(self) -> bool:
        return self.entry.needs_teacher

    def __call__(
        self,
        logits: Tensor,
        labels: Labels,
        targets: SparseTargets | EnsembleTargets | None,
        epoch: int,
    ) -> LossParts:
        if self.needs_teacher and stopped(self.config, epoch):
            smoothing = getattr(self.config, "label_smoothing", 0.0)
            return ce_parts(logits, None, labels, label_smoothing=smoothing)
        if self.needs_teacher and targets is None:
            raise ValueError(f"loss {self.config.name!r} needs teacher targets, the batch has none")
        # topk, sampled estimates, ensembles: one conversion
        converted = (
            None if targets is None else loss_targets(targets, self.config, self.num_classes)
        )
        return self.entry.parts(logits, converted, labels, **self.settings)
