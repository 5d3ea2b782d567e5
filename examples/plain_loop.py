"""Distil a student from a kdcache cache in a plain PyTorch loop: a `kdcache train` config with one
KD stage trains the same samples, views, targets, initial weights, SGD and schedule as the CLI.

    python examples/plain_loop.py configs/demo/student_kd.yaml [dotted.key=value ...]
"""

import math
import sys

import torch

import kdcache
from kdcache.models.build import build_model

KD = {"temperature", "alpha", "tail", "label_smoothing"}  # the settings of kdcache.kd


def lr_at(config, progress: float, epochs: int) -> float:
    """The trainer's schedule: linear warm-up, then cosine decay to min_lr."""
    s = config.scheduler
    peak = config.optimizer.lr
    if progress < s.warmup_epochs:
        return peak * (s.warmup_start + (1 - s.warmup_start) * progress / s.warmup_epochs)
    t = min(max((progress - s.warmup_epochs) / max(epochs - s.warmup_epochs, 1e-12), 0.0), 1.0)
    return s.min_lr + (peak - s.min_lr) * (0.5 * (1.0 + math.cos(math.pi * t)))


def main(path: str, overrides: list[str]) -> dict:
    config = kdcache.load_train_config(path, overrides)
    train = kdcache.CacheDataset.from_config(config)  # its shards, cache, seed, batch size
    torch.manual_seed(config.run.seed)
    model = build_model(config.student, train.num_classes, train.channels)
    stage = config.stages[0]  # e.g. loss {name: kd, alpha: 0.7, temperature: 2.0, tail: spread}
    decay = [p for _, p in sorted(model.named_parameters()) if p.ndim > 1]
    rest = [p for _, p in sorted(model.named_parameters()) if p.ndim <= 1]  # no decay on biases
    groups = [{"params": decay, "weight_decay": config.optimizer.weight_decay}, {"params": rest}]
    optimizer = torch.optim.SGD(groups, lr=config.optimizer.lr, momentum=config.optimizer.momentum)
    losses = []
    for epoch in range(stage.epochs):
        train.set_epoch(epoch)  # this epoch's shard order, shuffle and cached view of each sample
        for step, batch in enumerate(train.loader()):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(config, epoch + step / train.batches_per_epoch(), stage.epochs)
            logits = model(batch.images)  # normalised views at the student's size
            targets = batch.targets[train.teachers[0]]  # the cached top-k, sparse
            settings = stage.loss.model_dump(include=KD)
            loss = kdcache.kd(logits, targets, batch.hard_labels(), **settings)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        hits = [(model(b.images).argmax(1) == b.labels) for b in train.eval_dataset().loader()]
    return {"losses": losses, "top1": 100.0 * torch.cat(hits).float().mean().item()}


if __name__ == "__main__":
    print(f"test top-1 {main(sys.argv[1], sys.argv[2:])['top1']:.2f}%")
