"""Losses on sparse cached targets: CE, KD, DIST, WSL, EffDstl (consistent knowledge mining).

Every loss takes the student's logits ``[B, C]``, the labels ``[B]`` and the teacher's targets as a
:class:`~kdcache.targets.SparseTargets` (cached top-k + logsumexp + label logit; the online
mode converts full teacher logits with ``from_logits(k=C)``, so both modes run the same code), and
returns :class:`LossParts` for logging. The tail outside the top-k is an explicit choice
(``renorm`` or ``spread``, see :mod:`kdcache.targets`); KD and WSL work on the sparse form,
DIST and EffDstl build dense ``[B, C]`` teacher probabilities because they need them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kdcache.targets import SparseTargets, dense_probs, loss_targets, sparse_probs
from kdcache.train.config import (
    DISTILL_LOSSES,
    CELossConfig,
    DISTLossConfig,
    EffDstlLossConfig,
    KDLossConfig,
    LossConfig,
    WSLLossConfig,
)

Tensor = torch.Tensor


@dataclass
class LossParts:
    """The total loss and its parts (scalars), for the backward pass and for logging."""

    total: Tensor
    ce: Tensor
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

    def log(self) -> dict[str, float]:
        out = {"loss": float(self.total.detach()), "ce": float(self.ce.detach())}
        for name in ("kd", "weight", "mining_rate"):
            value = getattr(self, name)
            if value is not None:
                out[name] = float(value.detach())
        return out


# ---- building blocks --------------------------------------------------------------------------


def cross_entropy(logits: Tensor, labels: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Mean CE of float32 logits (label smoothing as in torch: eps spread over all C classes)."""
    return F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)


def sparse_kl(
    log_q: Tensor, targets: SparseTargets, num_classes: int, temperature: float, tail: str
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


def stopped(config: LossConfig, epoch: int) -> bool:
    """Early-stopped KD: the distillation term is off from ``stop_epoch`` on."""
    stop = getattr(config, "stop_epoch", None)
    return stop is not None and epoch >= stop


# ---- the losses ---------------------------------------------------------------------------------


def ce_loss(
    cfg: CELossConfig,
    logits: Tensor,
    labels: Tensor,
    targets: SparseTargets | None,
    num_classes: int,
) -> LossParts:
    ce = cross_entropy(logits, labels, cfg.label_smoothing)
    return LossParts(total=ce, ce=ce)


def kd_loss(
    cfg: KDLossConfig, logits: Tensor, labels: Tensor, targets: SparseTargets, num_classes: int
) -> LossParts:
    """``(1-alpha)*CE + alpha*T^2*mean KL(p_t^T || p_s^T)``."""
    temp = cfg.temperature
    ce = cross_entropy(logits, labels, cfg.label_smoothing)
    log_q = F.log_softmax(logits.float() / temp, dim=1)
    kd = temp**2 * sparse_kl(log_q, targets, num_classes, temp, cfg.tail).mean()
    return LossParts(total=(1 - cfg.alpha) * ce + cfg.alpha * kd, ce=ce, kd=kd, kd_weight=cfg.alpha)


def dist_loss(
    cfg: DISTLossConfig, logits: Tensor, labels: Tensor, targets: SparseTargets, num_classes: int
) -> LossParts:
    """``ce_w*CE + kd_w*(beta*T^2*(1-mean_rows r) + gamma*T^2*(1-mean_cols r))`` of softmax
    outputs."""
    temp = cfg.temperature
    ce = cross_entropy(logits, labels, cfg.label_smoothing)
    p_s = torch.softmax(logits.float() / temp, dim=1)
    p_t = dense_probs(targets, num_classes, temp, cfg.tail)
    inter = 1.0 - pearson(p_s, p_t).mean()
    intra = 1.0 - pearson(p_s.t(), p_t.t()).mean()
    kd = temp**2 * (cfg.beta * inter + cfg.gamma * intra)
    return LossParts(
        total=cfg.ce_weight * ce + cfg.kd_weight * kd, ce=ce, kd=kd, kd_weight=cfg.kd_weight
    )


def wsl_weights(logits: Tensor, labels: Tensor, targets: SparseTargets) -> Tensor:
    """``w = 1 - exp(-CE_s/CE_t)`` per row, from detached T=1 CEs against the label.

    The teacher's CE is exact from the cache: ``lse - label_logit``.
    """
    ce_s = F.cross_entropy(logits.detach().float(), labels, reduction="none")
    ce_t = targets.lse.float() - targets.label_logit.float()
    return 1.0 - torch.exp(-(ce_s / (ce_t + 1e-7)).clamp_min(0.0))


def wsl_loss(
    cfg: WSLLossConfig, logits: Tensor, labels: Tensor, targets: SparseTargets, num_classes: int
) -> LossParts:
    """``ce_w*CE + kd_w*T^2*mean(w*KL(p_t^T || p_s^T))``.

    WSL's reference code uses the soft cross-entropy ``H(p_t, p_s)``; the KL differs by
    ``w*H(p_t)``, which does not depend on the student: same gradients, a smaller value.
    """
    temp = cfg.temperature
    ce = cross_entropy(logits, labels, cfg.label_smoothing)
    weights = wsl_weights(logits, labels, targets)
    log_q = F.log_softmax(logits.float() / temp, dim=1)
    kd = temp**2 * (weights * sparse_kl(log_q, targets, num_classes, temp, cfg.tail)).mean()
    return LossParts(
        total=cfg.ce_weight * ce + cfg.kd_weight * kd,
        ce=ce,
        kd=kd,
        kd_weight=cfg.kd_weight,
        weight=weights.mean(),
        sample_weights=weights,
    )


def mined_targets(
    cfg: EffDstlLossConfig, logits: Tensor, labels: Tensor, targets: SparseTargets, num_classes: int
) -> tuple[Tensor, Tensor]:
    """EffDstl's targets ``[B, C]`` and the mined-row mask ``[B]``.

    A row is mined where the teacher's top-1 is the label and the teacher's label probability (at
    the teacher temperature) is below the student's (at the student temperature, detached): its
    target becomes the label smoothed to ``smooth_to`` (the rest spread evenly over the other
    C-1 classes). Other rows keep the teacher's distribution at the teacher temperature.
    """
    p_t = dense_probs(targets, num_classes, cfg.teacher_temperature, cfg.tail)
    p_s = torch.softmax(logits.detach().float() / cfg.student_temperature, dim=1)
    rows = labels.unsqueeze(1)
    correct = targets.idx[:, 0].long() == labels
    mined = correct & (p_t.gather(1, rows).squeeze(1) < p_s.gather(1, rows).squeeze(1))
    smooth = torch.full_like(p_t, (1.0 - cfg.smooth_to) / max(num_classes - 1, 1))
    smooth.scatter_(1, rows, cfg.smooth_to)
    return torch.where(mined.unsqueeze(1), smooth, p_t), mined


def effdstl_loss(
    cfg: EffDstlLossConfig, logits: Tensor, labels: Tensor, targets: SparseTargets, num_classes: int
) -> LossParts:
    """``ce_w*CE + kd_w*T_s^2*mean KL(mined target || p_s^{T_s})``."""
    ce = cross_entropy(logits, labels, cfg.label_smoothing)
    target, mined = mined_targets(cfg, logits, labels, targets, num_classes)
    temp = cfg.student_temperature
    kd = temp**2 * dense_kl(target, F.log_softmax(logits.float() / temp, dim=1)).mean()
    return LossParts(
        total=cfg.ce_weight * ce + cfg.kd_weight * kd,
        ce=ce,
        kd=kd,
        kd_weight=cfg.kd_weight,
        mining_rate=mined.float().mean(),
        mined=mined,
    )


LOSSES: dict[str, Callable[..., LossParts]] = {
    "ce": ce_loss,
    "kd": kd_loss,
    "dist": dist_loss,
    "wsl": wsl_loss,
    "effdstl": effdstl_loss,
}


class Criterion:
    """A stage's loss: ``criterion(logits, labels, targets, epoch) -> LossParts``."""

    def __init__(self, config: LossConfig, num_classes: int):
        self.config = config
        self.num_classes = num_classes
        self.fn = LOSSES[config.name]

    @property
    def needs_teacher(self) -> bool:
        return self.config.name in DISTILL_LOSSES

    def __call__(
        self, logits: Tensor, labels: Tensor, targets: SparseTargets | None, epoch: int
    ) -> LossParts:
        if self.needs_teacher and stopped(self.config, epoch):
            ce = cross_entropy(logits, labels, self.config.label_smoothing)
            return LossParts(total=ce, ce=ce)
        if self.needs_teacher and targets is None:
            raise ValueError(f"loss {self.config.name!r} needs teacher targets, the batch has none")
        if targets is not None:  # topk, sampled estimates, ensembles: one conversion
            targets = loss_targets(targets, self.config, self.num_classes)
        return self.fn(self.config, logits, labels, targets, self.num_classes)
