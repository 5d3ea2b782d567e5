"""Distil a student from a kdcache cache with PyTorch Lightning (``pip install lightning``).

    python examples/lightning_module.py configs/demo/student_kd.yaml [dotted.key=value ...]

The module reads a `kdcache train` config: its data and cache (``kdcache.CacheDataset``), its
student, its first stage's loss by name (any registered loss) and its optimizer. Lightning does not
call ``set_epoch`` on an iterable dataset, so :meth:`on_train_epoch_start` does: without it the
second epoch would fail instead of replaying the first epoch's views.
"""

from __future__ import annotations

import math
import sys

import lightning as L
import torch

import kdcache
from kdcache.models.build import build_model


class DistillModule(L.LightningModule):
    """A student, a cache and a loss from a train config."""

    def __init__(self, path: str, overrides: list[str] | None = None):
        super().__init__()
        self.config = kdcache.load_train_config(path, overrides)
        self.data = kdcache.CacheDataset.from_config(self.config)
        torch.manual_seed(self.config.run.seed)
        self.model = build_model(self.config.student, self.data.num_classes, self.data.channels)
        self.stage = self.config.stages[0]
        self.loss = kdcache.Loss.from_config(self.stage.loss)  # e.g. kd with its settings
        self.teacher = self.data.teachers[0] if self.data.teachers else None

    def train_dataloader(self):
        return self.data.loader()

    def val_dataloader(self):
        return self.data.eval_dataset().loader()

    def on_train_epoch_start(self) -> None:
        self.data.set_epoch(self.current_epoch)  # this epoch's views of the cache

    def training_step(self, batch: kdcache.Batch, index: int) -> torch.Tensor:
        logits = self.model(batch.images)
        targets = batch.targets.get(self.teacher)
        loss = self.loss(logits, targets, batch.hard_labels())
        self.log("train/loss", loss, batch_size=len(batch), prog_bar=True)
        return loss

    def validation_step(self, batch: kdcache.Batch, index: int) -> None:
        hits = (self.model(batch.images).argmax(1) == batch.labels).float().mean()
        self.log("val/top1", 100.0 * hits, batch_size=len(batch), prog_bar=True)

    def configure_optimizers(self):
        opt = self.config.optimizer
        optimizer = torch.optim.SGD(
            self.model.parameters(), lr=opt.lr, momentum=opt.momentum, weight_decay=opt.weight_decay
        )
        steps = self.stage.epochs * self.data.batches_per_epoch()
        cosine = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step / steps, 1.0)))
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": cosine, "interval": "step"}}


def main(path: str, overrides: list[str], **trainer_options) -> dict[str, float]:
    module = DistillModule(path, overrides)
    trainer = L.Trainer(max_epochs=module.stage.epochs, **trainer_options)
    trainer.fit(module)
    return {name: float(value) for name, value in trainer.callback_metrics.items()}


if __name__ == "__main__":
    print(main(sys.argv[1], sys.argv[2:], accelerator="auto"))
