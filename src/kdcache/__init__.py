"""kdcache: an offline teacher-logit cache and streaming knowledge distillation.

One import namespace: the cache contract (``kdcache.cache.store``, ``kdcache.views.recipe``,
``kdcache.targets.sparse`` ...), precompute (``kdcache.pipeline``), training (``kdcache.train``),
the tools (``kdcache.cache_tools``: validate, verify, inspect statistics) and the command line
(``kdcache.cli``). ``pipeline`` and ``train`` build on the contract and never on each other.

The public API, for a training loop of one's own (names in ``__all__`` are stable)::

    import kdcache

    train = kdcache.CacheDataset.from_config("student.yaml")   # or CacheDataset(shards, cache, ...)
    for epoch in range(epochs):
        train.set_epoch(epoch)
        for batch in train.loader():                           # DataLoader + kdcache.collate
            logits = model(batch.images)
            loss = kdcache.kd(logits, batch.targets["teacher"], batch.hard_labels(),
                              temperature=4.0, alpha=0.9, tail="spread")

- data: :class:`CacheDataset` (per-sample, for any DataLoader), :func:`collate`,
  :class:`Batch`, :class:`DistillSample`;
- targets: :class:`SparseTargets`, :class:`MixedLabels`, :func:`dense_probs`,
  :func:`sparse_probs`, :func:`from_logits`, :func:`truncate`;
- losses: :func:`ce`, :func:`kd`, :func:`dist`, :func:`wsl`, :func:`effdstl` (plain keyword
  arguments, a scalar tensor), their ``*_parts`` forms (:class:`LossParts`), the modules
  :class:`Loss`, :class:`CELoss`, :class:`KDLoss`, :class:`DISTLoss`, :class:`WSLLoss`,
  :class:`EffDstlLoss`, and the registry (:func:`register_loss`, :func:`get_loss`,
  :func:`registered_losses`) that makes a loss of one's own usable by name in a train config;
- one's own loop: :func:`build_model` (:class:`ModelSpec`), the trainer's optimizers and LR
  schedule (:func:`optimizer_segments`, :func:`build_optimizer`, :func:`lr_at`,
  :class:`Segment`), random access by key (:class:`CacheReader`: the targets of (key, view), a
  view rendered from its image) and a map-style dataset over any indexable source
  (:class:`ViewDataset`); ``MixedLabels.one_hot`` for timm's soft-target losses;
- configs: :func:`load_train_config`, :class:`TrainConfig` (``kdcache train`` itself is
  ``kdcache.train.trainer.train``; ``kdcache.train`` is the training package).
- results (what the commands return and write as JSON): :class:`PrecomputeResult` (a cache's run
  records, :func:`read_run_records`), :class:`TrainResult` (``summary.json``),
  :class:`ValidateResult`, :class:`VerifyResult`, :class:`InspectResult`.

The names load lazily (PEP 562), so ``import kdcache`` stays light.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what type checkers and editors see; at run time __getattr__ loads lazily
    from kdcache.core.results import (
        InspectResult,
        PrecomputeResult,
        TrainResult,
        ValidateResult,
        VerifyResult,
        read_run_records,
    )
    from kdcache.models.build import ModelSpec, build_model
    from kdcache.targets.sparse import (
        MixedLabels,
        SparseTargets,
        dense_probs,
        from_logits,
        sparse_probs,
        truncate,
    )
    from kdcache.train.config import TrainConfig, load_train_config
    from kdcache.train.data import Batch
    from kdcache.train.dataset import CacheDataset, DistillSample, collate
    from kdcache.train.losses import (
        CELoss,
        DISTLoss,
        EffDstlLoss,
        KDLoss,
        Loss,
        LossParts,
        WSLLoss,
        ce,
        ce_parts,
        dist,
        dist_parts,
        effdstl,
        effdstl_parts,
        get_loss,
        kd,
        kd_parts,
        register_loss,
        registered_losses,
        wsl,
        wsl_parts,
    )
    from kdcache.train.random_access import CacheReader, ViewDataset
    from kdcache.train.schedule import Segment, build_optimizer, lr_at, optimizer_segments

__version__ = "0.2.0"

_PUBLIC = {
    "kdcache.train.dataset": ("CacheDataset", "DistillSample", "collate"),
    "kdcache.train.data": ("Batch",),
    "kdcache.targets.sparse": (
        "SparseTargets",
        "MixedLabels",
        "dense_probs",
        "sparse_probs",
        "from_logits",
        "truncate",
    ),
    "kdcache.train.losses": (
        "ce",
        "kd",
        "dist",
        "wsl",
        "effdstl",
        "ce_parts",
        "kd_parts",
        "dist_parts",
        "wsl_parts",
        "effdstl_parts",
        "LossParts",
        "Loss",
        "CELoss",
        "KDLoss",
        "DISTLoss",
        "WSLLoss",
        "EffDstlLoss",
        "register_loss",
        "get_loss",
        "registered_losses",
    ),
    "kdcache.train.config": ("TrainConfig", "load_train_config"),
    "kdcache.train.schedule": ("lr_at", "optimizer_segments", "build_optimizer", "Segment"),
    "kdcache.train.random_access": ("CacheReader", "ViewDataset"),
    "kdcache.models.build": ("build_model", "ModelSpec"),
    "kdcache.core.results": (
        "PrecomputeResult",
        "TrainResult",
        "ValidateResult",
        "VerifyResult",
        "InspectResult",
        "read_run_records",
    ),
}
_WHERE = {name: module for module, names in _PUBLIC.items() for name in names}

__all__ = [  # as _PUBLIC; a test checks it against _PUBLIC and the TYPE_CHECKING block
    "__version__",
    "CacheDataset",
    "DistillSample",
    "collate",
    "Batch",
    "SparseTargets",
    "MixedLabels",
    "dense_probs",
    "sparse_probs",
    "from_logits",
    "truncate",
    "ce",
    "kd",
    "dist",
    "wsl",
    "effdstl",
    "ce_parts",
    "kd_parts",
    "dist_parts",
    "wsl_parts",
    "effdstl_parts",
    "LossParts",
    "Loss",
    "CELoss",
    "KDLoss",
    "DISTLoss",
    "WSLLoss",
    "EffDstlLoss",
    "register_loss",
    "get_loss",
    "registered_losses",
    "TrainConfig",
    "load_train_config",
    "lr_at",
    "optimizer_segments",
    "build_optimizer",
    "Segment",
    "CacheReader",
    "ViewDataset",
    "build_model",
    "ModelSpec",
    "PrecomputeResult",
    "TrainResult",
    "ValidateResult",
    "VerifyResult",
    "InspectResult",
    "read_run_records",
]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'kdcache' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
