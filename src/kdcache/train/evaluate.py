"""Validation: top-1, top-5 and cross-entropy on the validation shards' center views, and the top-1
of each class (``top1_class_<c>``, percent; absent for a class without validation samples), so a
class held out of training (``data.exclude_classes``) shows what the student learned of it.

Every rank evaluates its part of the shards (split by rank and DataLoader worker, file order) and
the sums are added over ranks, so the numbers do not depend on the world size. With EMA the
averaged weights are evaluated too (``ema_top1`` ...).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader

from kdcache.models.runner import AmpMode, autocast_context
from kdcache.train import distributed as D
from kdcache.train.student import Ema


class Evaluator:
    """Evaluates a model on the validation loader (``None``: no ``data.val_shards``, nothing to
    evaluate). ``to_input`` turns uint8 views into the model's input, as in training."""

    def __init__(
        self,
        loader: DataLoader | None,
        device: torch.device,
        amp: AmpMode,
        to_input: Callable[[torch.Tensor], torch.Tensor],
        num_classes: int = 0,
    ):
        self.num_classes = num_classes
        """0: no per-class figures."""
        self.loader = loader
        self.device = device
        self.amp: AmpMode = amp
        self.to_input = to_input

    def run(self, model: nn.Module, ema: Ema | None) -> dict[str, float]:
        """The model's metrics and, with EMA, the EMA model's as ``ema_<name>`` (no data: {})."""
        metrics = self.evaluate(model)
        if ema is not None and metrics:
            averaged = self.evaluate(ema.module)
            metrics.update({f"ema_{k}": v for k, v in averaged.items() if k != "n"})
        return metrics

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Top-1, top-5 (percent), mean CE and the count, summed over ranks (a collective)."""
        if self.loader is None:
            return {}
        model.eval()
        c = self.num_classes
        # One vector for one collective: the 4 sums, then per class the correct and the count.
        sums = torch.zeros(4 + 2 * c, dtype=torch.float64, device=self.device)
        for batch in self.loader:
            batch = batch.to(self.device)
            with autocast_context(self.device, self.amp):
                logits = model(self.to_input(batch.images)).float()
            sums[:4] += eval_sums(logits, batch.labels)
            if c:
                sums[4:] += class_sums(logits, batch.labels, c).ravel()
        model.train()
        totals = D.all_reduce_sum(sums).tolist()
        correct1, correct5, loss, n = totals[:4]
        if n == 0:
            return {}
        return {
            "top1": 100.0 * correct1 / n,
            "top5": 100.0 * correct5 / n,
            "loss": loss / n,
            "n": int(n),
            **per_class_top1(totals[4 : 4 + c], totals[4 + c :]),
        }


def eval_sums(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``[top-1 correct, top-5 correct, CE sum, count]`` of one batch (float64: sums over a whole
    validation set stay exact)."""
    k = min(5, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    correct1 = (top[:, 0] == labels).sum()
    correct5 = (top == labels.unsqueeze(1)).any(dim=1).sum()
    loss = torch.nn.functional.cross_entropy(logits, labels, reduction="sum")
    count = torch.tensor(float(len(labels)), dtype=torch.float64, device=logits.device)
    return torch.stack([correct1.double(), correct5.double(), loss.double(), count])


def class_sums(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``[2, C]``: top-1 correct and views per class of one batch (labels outside [0, C) left
    out)."""
    inside = (labels >= 0) & (labels < num_classes)
    right = (logits.argmax(1) == labels) & inside
    safe = labels.clamp(0, num_classes - 1)
    correct = torch.bincount(safe[right], minlength=num_classes)
    count = torch.bincount(safe[inside], minlength=num_classes)
    return torch.stack([correct, count]).double()


def per_class_top1(correct: list[float], count: list[float]) -> dict[str, float]:
    """``top1_class_<c>`` in percent for each class with validation samples."""
    return {
        f"top1_class_{c}": 100.0 * right / n
        for c, (right, n) in enumerate(zip(correct, count, strict=True))
        if n
    }
