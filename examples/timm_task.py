"""kdcache in timm's train.py: the pattern, runnable on a small config.

    python examples/timm_task.py configs/demo/student_kd.yaml [dotted.key=value ...]

timm's ``train.py`` builds a loader of ``(input, target)`` pairs and a training task
(``task = ClassificationTask(model, ...)``) and runs ``result = task(input, target)`` per batch in
``train_one_epoch``. Three changes make it distil from a cache instead of running a teacher:

1. the loader (where train.py calls ``create_loader``): kdcache's DataLoader with
   :func:`timm_collate`, whose target is the kdcache batch: labels, Mixup/CutMix labels and the
   teacher's cached targets (leave timm's own ``--mixup``/``--cutmix`` off: a cache of mixed views
   already mixes, as the teacher saw it);
2. the task (where train.py builds ``ClassificationTask``): :class:`CachedDistillationTask`;
3. ``dataset.set_epoch(epoch)`` at the top of each epoch (where train.py calls
   ``loader.sampler.set_epoch``).

Everything else (``timm.create_model``, ``create_optimizer_v2``, ``create_scheduler_v2``, AMP, EMA,
checkpoints) stays timm's. :func:`train_one_epoch` below is train.py's loop cut to its bones.
"""

from __future__ import annotations

import sys
from dataclasses import replace

import timm
import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.task import TrainingTask

import kdcache
from kdcache.models.build import build_model


def timm_collate(samples: list[kdcache.DistillSample]) -> tuple[torch.Tensor, kdcache.Batch]:
    """``(input, target)`` as timm's loop expects: the images, and the batch without them."""
    batch = kdcache.collate(samples)
    return batch.images, replace(batch, images=batch.images[:0])


class CachedDistillationTask(TrainingTask):
    """timm's ``LogitDistillationTask`` with the teacher's forward pass replaced by the cache."""

    def __init__(self, model: torch.nn.Module, loss: kdcache.Loss, teacher: str, **kwargs):
        super().__init__(**kwargs)
        self.trainable_module = model
        self.loss = loss
        self.teacher = teacher

    def forward(self, input: torch.Tensor, target: kdcache.Batch) -> dict[str, torch.Tensor]:
        output = self.trainable_module(input)
        loss = self.loss(output, target.targets[self.teacher], target.hard_labels())
        return {"loss": loss, "output": output}


def train_one_epoch(epoch, task, loader, optimizer, lr_scheduler, updates_per_epoch, device):
    """timm's train_one_epoch, without AMP, accumulation, EMA and logging."""
    task.train()
    num_updates = epoch * updates_per_epoch
    losses = []
    for input, target in loader:
        input = input.to(device)
        target = target.to(device)
        loss = task(input, target)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        num_updates += 1
        lr_scheduler.step_update(num_updates=num_updates)
        losses.append(loss.item())
    lr_scheduler.step(epoch + 1)
    return losses


def main(path: str, overrides: list[str]) -> dict:
    config = kdcache.load_train_config(path, overrides)
    dataset = kdcache.CacheDataset.from_config(config)
    loader = dataset.loader(collate_fn=timm_collate)  # 1.
    torch.manual_seed(config.run.seed)
    model = build_model(config.student, dataset.num_classes, dataset.channels)  # or create_model
    loss = kdcache.Loss.from_config(config.stages[0].loss)
    task = CachedDistillationTask(model, loss, dataset.teachers[0], verbose=False)  # 2.
    opt = config.optimizer
    optimizer = create_optimizer_v2(model, "sgd", lr=opt.lr, weight_decay=opt.weight_decay)
    epochs = config.stages[0].epochs
    updates = dataset.batches_per_epoch()
    scheduler, _ = create_scheduler_v2(
        optimizer, "cosine", num_epochs=epochs, updates_per_epoch=updates, step_on_epochs=False
    )
    losses = []
    for epoch in range(epochs):
        dataset.set_epoch(epoch)  # 3.
        losses += train_one_epoch(epoch, task, loader, optimizer, scheduler, updates, "cpu")
    model.eval()
    with torch.no_grad():
        hits = [(model(b.images).argmax(1) == b.labels) for b in dataset.eval_dataset().loader()]
    return {"losses": losses, "top1": 100.0 * torch.cat(hits).float().mean().item()}


if __name__ == "__main__":
    print(f"timm {timm.__version__}: test top-1 {main(sys.argv[1], sys.argv[2:])['top1']:.2f}%")
