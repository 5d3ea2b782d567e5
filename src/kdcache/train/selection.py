"""Which of the cache's samples a run trains on: ``data.select`` and ``data.exclude_classes``.

Computed once at start from the cache (labels, status and, to rank, one teacher's stored
targets), shard by shard, and handed to the stream as the rows kept per shard; the stream then
skips every other row as it skips invalid ones, so slots, steps and resumption work unchanged.

- ``exclude_classes``: rows labelled with those classes are dropped (paper 003's "a class never
  seen"); no image of theirs reaches a batch (recipes that mix images are refused: a partner's
  image would).
- ``select``: per class, ``per_class`` valid rows (fewer where the class has fewer), ranked by
  the teacher's entropy at ``temperature``, the mean over the sample's stored views (nats; the
  tail under ``tail``): ``entropy_high`` keeps the highest, ``entropy_low`` the lowest,
  ``random`` a uniform pick. Ties, and the random pick, are broken by a random key drawn from
  ``run.seed``, so the selection is a function of the cache and the seed. Unlabelled rows and
  rows of excluded classes are never selected.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from kdcache.cache.reader import read_block
from kdcache.cache.store import STATUS_VALID, CacheStore
from kdcache.core.errors import ConfigError
from kdcache.core.results import Selection
from kdcache.shards.reading import shard_name
from kdcache.targets.sparse import SparseTargets, sparse_probs
from kdcache.train.config import DataConfig
from kdcache.views.recipe import ViewRecipe


@dataclass
class Kept:
    """The rows kept per training shard (in the order of the shard URLs) and their record."""

    rows: tuple[tuple[int, ...], ...]
    record: Selection


@dataclass
class _Candidates:
    shard: np.ndarray
    row: np.ndarray
    label: np.ndarray
    key: np.ndarray
    score: np.ndarray


def select_rows(
    data: DataConfig,
    store: CacheStore,
    urls: list[str],
    recipe: ViewRecipe,
    seed: int,
    default_teacher: str | None,
) -> Kept | None:
    """The rows the run keeps, or None when it keeps every valid row."""
    if data.select is None and not data.exclude_classes:
        return None
    if recipe.mixes:
        key = "select" if data.select is not None else "exclude_classes"
        raise ConfigError(
            f"data.{key}: the cache's recipe mixes images (Mixup/CutMix), so a kept view would "
            "carry a dropped sample's image; use a cache without mixing"
        )
    c = store.meta.num_classes
    outside = [x for x in data.exclude_classes if x >= c]
    if outside:
        raise ConfigError(
            f"data.exclude_classes: {outside} not among the {c} classes of cache {store.path!r}"
        )
    select = data.select
    teacher = None
    if select is not None and select.by != "random":
        teacher = select.teacher or default_teacher
        if teacher not in store.teachers:
            raise ConfigError(
                f"data.select.teacher: {teacher!r} is not a teacher of cache {store.path!r}; "
                f"valid: {', '.join(store.teachers)}"
            )
    found = _candidates(data, store, urls, teacher)
    if select is None:
        chosen = np.arange(len(found.row))
    else:
        chosen = _pick(found, select.per_class, select.by, seed)
    return _kept(data, found, chosen, len(urls), seed, teacher)


def _candidates(
    data: DataConfig, store: CacheStore, urls: list[str], teacher: str | None
) -> _Candidates:
    """Every valid row of the training shards outside the excluded classes, with its score."""
    excluded = np.array(sorted(set(data.exclude_classes)), dtype=np.int64)
    parts: list[tuple[np.ndarray, ...]] = []
    for i, url in enumerate(urls):
        block = read_block(store, shard_name(url), [teacher] if teacher else [])
        labels = block.labels.astype(np.int64)
        keep = (block.status == STATUS_VALID) & ~np.isin(labels, excluded)
        if data.select is not None:
            keep &= (labels >= 0) & (labels < store.meta.num_classes)
        rows = np.flatnonzero(keep)
        score = np.zeros(len(rows))
        if teacher is not None and data.select is not None and len(rows):
            tb = block.teachers[teacher]
            score = _mean_entropy(
                [
                    a[rows]
                    for a in (tb.topk_idx, tb.topk_logit, tb.lse, tb.label_logit, tb.tail_lse)
                ],
                store.meta.num_classes,
                data.select.temperature,
                data.select.tail,
            )
        parts.append((np.full(len(rows), i), rows, labels[rows], block.keys[rows], score))
    return _Candidates(*(np.concatenate([p[j] for p in parts]) for j in range(5)))


def _mean_entropy(
    arrays: list[np.ndarray], num_classes: int, temperature: float, tail: str
) -> np.ndarray:
    """Mean over a sample's views of its targets' entropy (nats) ``[n]``, from ``[n, A, ...]``."""
    n, a, k = arrays[0].shape
    flat = [np.ascontiguousarray(x).reshape(n * a, *x.shape[2:]) for x in arrays]
    targets = SparseTargets(
        torch.from_numpy(flat[0].astype(np.int64)),
        *(torch.from_numpy(x.astype(np.float32)) for x in flat[1:]),
    )
    top, other = (x.double() for x in sparse_probs(targets, num_classes, temperature, tail))
    h = -(torch.xlogy(top, top).sum(-1) + (num_classes - k) * torch.xlogy(other, other))
    return h.numpy().reshape(n, a).mean(1)


def _pick(found: _Candidates, per_class: int, by: str, seed: int) -> np.ndarray:
    """Indices of the chosen candidates: per class, the first ``per_class`` by score."""
    tie = np.random.default_rng([seed, 0x5E1EC7]).random(len(found.row))
    score = {"entropy_high": -found.score, "entropy_low": found.score}.get(by)
    primary = np.zeros(len(tie)) if score is None else score
    order = np.lexsort((tie, primary, found.label))  # by class, then score, then the seeded key
    labels = found.label[order]
    rank = np.arange(len(order)) - np.searchsorted(labels, labels, side="left")
    return order[rank < per_class]


def _kept(
    data: DataConfig,
    found: _Candidates,
    chosen: np.ndarray,
    num_shards: int,
    seed: int,
    teacher: str | None,
) -> Kept:
    rows: list[list[int]] = [[] for _ in range(num_shards)]
    for s, r in zip(found.shard[chosen], found.row[chosen], strict=True):
        rows[int(s)].append(int(r))
    classes, counts = np.unique(found.label[chosen], return_counts=True)
    select = data.select
    record = Selection(
        by=select.by if select else None,
        teacher=teacher,
        temperature=select.temperature if select and teacher else None,
        per_class=select.per_class if select else None,
        seed=seed,
        excluded_classes=sorted(set(data.exclude_classes)),
        samples=len(chosen),
        counts={str(int(c)): int(n) for c, n in zip(classes, counts, strict=True)},
        keys=[str(k) for k in found.key[chosen]] if select else None,
    )
    return Kept(tuple(tuple(sorted(r)) for r in rows), record)
