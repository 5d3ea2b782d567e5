"""The student trained the way a user would train it without kdcache: ``webdataset`` + timm.

``timm`` and ``timm_strong`` of ``kdcache bench train``. The same student (built by
:func:`kdcache.models.build.build_model`), batch size, DataLoader workers, torch threads and SGD
as the kdcache modes, plain CE, over the same shards:

- a ``webdataset.WebDataset`` pipeline (shards shuffled, split by DataLoader worker, a 1000-sample
  shuffle buffer, ``decode("pil")``, timm's transform, batched in the workers), under a DataLoader
  with persistent workers (as timm's ``create_loader``);
- timm's ``create_transform(is_training=True, ...)`` with the recipe's crop scale, flip,
  interpolation, mean and std, no colour jitter (kdcache's ``rrc_flip`` has none); for strong
  also ``auto_augment`` (the recipe's RandAugment string) and ``re_prob`` / ``re_mode`` (its
  random erasing);
- for strong, ``timm.data.Mixup`` (the recipe's alphas and probability, timm's default
  ``mode="batch"``, no label smoothing) on each batch in the training process and
  ``timm.loss.SoftTargetCrossEntropy``, as timm's ``train.py`` does without its prefetcher.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from kdcache.models.build import ModelSpec, build_model


class TimmBaseline:
    """One epoch at a time of a plain timm + webdataset training loop (counts its images)."""

    def __init__(
        self,
        urls: list[str],
        recipe: dict[str, Any],
        student: str,
        num_classes: int,
        batch_size: int,
        workers: int,
        seed: int = 0,
    ):
        torch.manual_seed(seed)
        self.channels = int(recipe.get("channels", 3))
        self.model = build_model(ModelSpec(name=student), num_classes, self.channels)
        self.optimizer = torch.optim.SGD(
            self.model.parameters(), lr=0.05, momentum=0.9, weight_decay=1.0e-4
        )
        self.mixup = _mixup(recipe, num_classes)
        self.loss: nn.Module = _loss(self.mixup is not None)
        self.loader = _loader(urls, _transform(recipe), self.channels, batch_size, workers, seed)
        self.images = 0
        self.epoch = 0

    def train_epoch(self) -> None:
        """One pass over the shards: transform, (mix,) forward, CE, step."""
        self.model.train()
        for images, labels in self.loader:
            if self.mixup is not None:
                images, labels = self.mixup(images, labels)
            loss = self.loss(self.model(images), labels)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.images += len(images)
        self.epoch += 1

    def close(self) -> None:
        """Stop the persistent workers."""
        iterator = getattr(self.loader, "_iterator", None)
        if iterator is not None:
            iterator._shutdown_workers()
        self.loader._iterator = None


def _transform(recipe: dict[str, Any]) -> Any:
    """timm's training transform of the recipe (RandAugment and erasing when it has them)."""
    from timm.data import create_transform

    erasing = recipe.get("erasing") or {}
    channels = int(recipe.get("channels", 3))
    size = int(recipe["size"])
    return create_transform(
        input_size=(channels, size, size),
        is_training=True,
        scale=tuple(recipe.get("scale", (0.08, 1.0))),
        hflip=0.5,
        color_jitter=None,
        auto_augment=recipe.get("policy"),
        re_prob=float(erasing.get("prob", 0.0)),
        re_mode=erasing.get("mode", "const"),
        interpolation=recipe.get("interpolation", "bilinear"),
        mean=tuple(recipe.get("mean", (0.485, 0.456, 0.406))),
        std=tuple(recipe.get("std", (0.229, 0.224, 0.225))),
    )


def _mixup(recipe: dict[str, Any], num_classes: int) -> Any:
    mix = recipe.get("mix")
    if not mix:
        return None
    from timm.data import Mixup

    return Mixup(
        mixup_alpha=float(mix.get("mixup_alpha", 0.0)),
        cutmix_alpha=float(mix.get("cutmix_alpha", 0.0)),
        prob=float(mix.get("prob", 1.0)),
        label_smoothing=0.0,
        num_classes=num_classes,
    )


def _loss(soft: bool) -> nn.Module:
    from timm.loss import SoftTargetCrossEntropy

    return SoftTargetCrossEntropy() if soft else nn.CrossEntropyLoss()


def _loader(
    urls: list[str], transform: Any, channels: int, batch_size: int, workers: int, seed: int
) -> DataLoader:
    """webdataset: shuffled shards split over the workers, a sample buffer, PIL decode, timm's
    transform, batches made in the workers."""
    import webdataset as wds

    mode = "L" if channels == 1 else "RGB"
    dataset = (
        wds.WebDataset(
            urls,
            shardshuffle=len(urls),
            nodesplitter=wds.single_node_only,
            workersplitter=wds.split_by_worker,
            seed=seed,
            empty_check=False,
        )
        .shuffle(1000)
        .decode("pil")
        .to_tuple("png;jpg;jpeg", "cls")
        .map_tuple(lambda image: transform(image.convert(mode)), int)
        .batched(batch_size, partial=True)
    )
    return DataLoader(
        dataset,
        batch_size=None,
        num_workers=workers,
        persistent_workers=workers > 0,
        prefetch_factor=2 if workers > 0 else None,
    )
