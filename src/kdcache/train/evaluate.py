"""Validation: top-1, top-5 and cross-entropy on the validation shards' center views.

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
    ):
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
        sums = torch.zeros(4, dtype=torch.float64, device=self.device)
        for batch in self.loader:
            batch = batch.to(self.device)
            with autocast_context(self.device, self.amp):
                logits = model(self.to_input(batch.images)).float()
            sums += eval_sums(logits, batch.labels)
        model.train()
        correct1, correct5, loss, n = D.all_reduce_sum(sums).tolist()
        if n == 0:
            return {}
        return {
            "top1": 100.0 * correct1 / n,
            "top5": 100.0 * correct5 / n,
            "loss": loss / n,
            "n": int(n),
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
