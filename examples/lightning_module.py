"""Distil a student from a kdcache cache with PyTorch Lightning (``pip install lightning``).

    python examples/lightning_module.py configs/demo/student_kd.yaml [dotted.key=value ...]

The module reads a `kdcache train` config: its data and cache (``kdcache.CacheDataset``), its
student, its first stage's loss by name (any registered loss) and its optimizer. Lightning does not
call ``set_epoch`` on an iterable dataset, so :meth:`on_train_epoch_start` does: without it the
second epoch would fail instead of replaying the first epoch's views. The training loader reports
its exact length (``batches_per_epoch``: an iterable dataset cannot tell Lightning), and Lightning
logs into the config's ``run.dir`` (``lightning/version_N/metrics.csv``) unless told otherwise.
"""

from __future__ import annotations

import sys

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger

import kdcache


class SizedLoader:
    """The dataset's DataLoader with its exact batch count as ``len()``, so Lightning knows the
    epoch's length (progress, ``val_check_interval``, schedulers by step)."""

    def __init__(self, data: kdcache.CacheDataset):
        self.data = data
        self.loader = data.loader()

    def __iter__(self):
        return iter(self.loader)

    def __len__(self) -> int:
        return self.data.batches_per_epoch()


class DistillModule(L.LightningModule):
    """A student, a cache and a loss from a train config."""

    def __init__(self, path: str, overrides: list[str] | None = None):
        super().__init__()
        self.config = kdcache.load_train_config(path, overrides)
        self.data = kdcache.CacheDataset.from_config(self.config)
        torch.manual_seed(self.config.run.seed)
        self.model = kdcache.build_model(
            self.config.student, self.data.num_classes, self.data.channels
        )
        self.stage = self.config.stages[0]
        self.loss = kdcache.Loss.from_config(self.stage.loss)  # e.g. kd with its settings
        self.teacher = self.data.teachers[0] if self.data.teachers else None

    def train_dataloader(self):
        return SizedLoader(self.data)

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
        segment = kdcache.optimizer_segments(self.config)[0]  # the config's optimizer and schedule
        optimizer = kdcache.build_optimizer(self.model, segment.optimizer)
        steps = self.data.batches_per_epoch()
        peak = segment.optimizer.lr
        schedule = torch.optim.lr_scheduler.LambdaLR(  # the trainer's LR, relative to the peak
            optimizer, lambda step: kdcache.lr_at(segment, step / steps, steps) / peak
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def main(path: str, overrides: list[str], **trainer_options) -> dict[str, float]:
    module = DistillModule(path, overrides)
    run_dir = module.config.run.dir
    trainer_options.setdefault("default_root_dir", run_dir)
    trainer_options.setdefault("logger", CSVLogger(save_dir=run_dir, name="lightning"))
    trainer = L.Trainer(max_epochs=module.stage.epochs, **trainer_options)
    trainer.fit(module)
    return {name: float(value) for name, value in trainer.callback_metrics.items()}


if __name__ == "__main__":
    print(main(sys.argv[1], sys.argv[2:], accelerator="auto"))
