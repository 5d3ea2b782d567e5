"""``kdcache inspect``: ensembles against their members, and sampled teachers' coverage.

Streamed one shard block at a time, like :mod:`kdcache.cache_tools.stats` (whose report these
figures join as ``"ensembles"`` and ``"sampled"``, each present when there is one to report):

```
"ensembles": [{label, stored: TEACHER | null, combine, members: [{name, weight}], views,
               labelled_views,
               top1: {"ensemble": accuracy, MEMBER: accuracy, ...},
               agreement: {MEMBER: fraction of views whose top-1 is the ensemble's},
               js: {MEMBER: DIST}}, ...]    # JS(ensemble, member) per view, nats, at T=1
"sampled": {TEACHER: {views, k, samples, slots, draw_temperature,
                      distinct: {mean, counts: [views with 0, 1, ..., slots distinct classes]},
                      classes_per_view: mean of k + distinct,
                      tail_share: DIST}}   # of the T=1 tail mass, the share the drawn classes
                                           # hold (exact, from their logits)
```

An ensemble is either named with ``--ensemble a:1,b:3`` (a training-time ensemble of cached
teachers, mixed as ``stages.N.teachers`` mixes them, at T=1 under ``--tail``), or a teacher
stored as an ensemble whose models are in the cache too (found by weights digest and rendering).
DIST is :meth:`kdcache.cache_tools.stats.Histogram.summary`. Accuracy and agreement are of views
with a label (accuracy) or of all valid views (agreement); dense ``[views, C]`` distributions are
built for at most ``CHUNK`` views at a time.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from kdcache.cache.reader import ShardBlock, TeacherBlock, read_block
from kdcache.cache.store import STATUS_VALID, CacheStore
from kdcache.cache_tools.stats import Histogram, complete_shards
from kdcache.core.errors import ConfigError
from kdcache.models.ensemble import StageEnsemble
from kdcache.targets.sparse import TailMode, dense_probs, ensemble_targets, targets_from_arrays

CHUNK = 4096
"""Views per dense ``[views, C]`` step."""


@dataclass
class EnsembleSpec:
    """What to compare: an ensemble's members and either its mixing or the stored teacher."""

    ensemble: StageEnsemble
    stored: str | None = None
    """A teacher stored as this ensemble (its distribution is read, not mixed)."""

    @property
    def label(self) -> str:
        return self.stored or self.ensemble.label


def parse_ensemble(text: str) -> StageEnsemble:
    """``a:1,b:3`` (weights; default 1 each) with an optional ``/logits`` suffix."""
    body, _, combine = text.partition("/")
    combine = combine or "probs"
    members = {}
    for part in body.split(","):
        name, _, weight = part.strip().partition(":")
        try:
            value = float(weight) if weight else 1.0
        except ValueError:
            value = float("nan")
        if not name or not (value > 0 and math.isfinite(value)) or name in members:
            raise ConfigError(
                f"--ensemble: expected NAME[:WEIGHT],NAME[:WEIGHT]...[/logits] with distinct "
                f"names and positive weights, found {text!r}"
            )
        members[name] = value
    if combine not in ("probs", "logits"):
        raise ConfigError(f"--ensemble: combine must be probs or logits, found {combine!r}")
    return StageEnsemble.of(members, combine)


def stored_ensembles(store: CacheStore) -> list[EnsembleSpec]:
    """Teachers stored as ensembles whose every model is also a teacher of the cache."""
    by_model: dict[tuple[str, str], str] = {}
    metas = {name: store.teacher_meta(name) for name in store.teachers}
    # one teacher per model: the widest top-k first, sampled teachers last
    order = sorted(metas, key=lambda n: (metas[n].encoding == "sampled", -metas[n].k, n))
    for name in order:
        meta = metas[name]
        if meta.ensemble is None:
            by_model.setdefault((meta.weights_digest, _key(meta.rendering)), name)
    out = []
    for name in store.teachers:
        ensemble = store.teacher_meta(name).ensemble
        if ensemble is None:
            continue
        found = [by_model.get((m.weights_digest, _key(m.rendering))) for m in ensemble.members]
        if all(found):
            weights = {}
            for member, teacher in zip(ensemble.members, found, strict=True):
                weights[teacher] = weights.get(teacher, 0.0) + member.weight
            out.append(EnsembleSpec(StageEnsemble.of(weights, ensemble.combine), stored=name))
    return out


def _key(rendering) -> str:
    return rendering.model_dump_json()


@dataclass
class EnsembleStats:
    """Streaming figures of one ensemble against its members."""

    spec: EnsembleSpec
    views: int = 0
    labelled: int = 0
    right: dict[str, int] = field(default_factory=dict)
    agree: dict[str, int] = field(default_factory=dict)
    js: dict[str, Histogram] = field(default_factory=dict)

    def __post_init__(self) -> None:
        names = self.spec.ensemble.names
        self.right = {"ensemble": 0, **{n: 0 for n in names}}
        self.agree = {n: 0 for n in names}
        self.js = {n: Histogram(0.0, math.log(2)) for n in names}

    def update(self, dists: dict[str, torch.Tensor], ensemble: torch.Tensor, labels: np.ndarray):
        """One chunk: dense T=1 distributions ``[B, C]`` of the members and of the ensemble."""
        has = labels >= 0
        top = ensemble.argmax(-1).numpy()
        self.views += len(labels)
        self.labelled += int(has.sum())
        self.right["ensemble"] += int((top == labels)[has].sum())
        for name, p in dists.items():
            pred = p.argmax(-1).numpy()
            self.right[name] += int((pred == labels)[has].sum())
            self.agree[name] += int((pred == top).sum())
            self.js[name].add(_js(ensemble.double(), p.double()).numpy())

    def report(self) -> dict[str, Any]:
        e = self.spec.ensemble
        labelled = self.labelled or None
        return {
            "label": self.spec.label,
            "stored": self.spec.stored,
            "combine": e.combine,
            "members": [{"name": n, "weight": w} for n, w in e.members],
            "views": self.views,
            "labelled_views": self.labelled,
            "top1": {n: (r / labelled if labelled else None) for n, r in self.right.items()},
            "agreement": {
                n: (a / self.views if self.views else None) for n, a in self.agree.items()
            },
            "js": {n: h.summary() for n, h in self.js.items()},
        }


def _js(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """JS divergence (nats) of the rows of two dense distributions."""
    m = 0.5 * (p + q)
    return 0.5 * (torch.xlogy(p, p / m).nansum(-1) + torch.xlogy(q, q / m).nansum(-1))


@dataclass
class CoverageStats:
    """Streaming coverage figures of one sampled teacher."""

    name: str
    k: int
    samples: int
    slots: int
    draw_temperature: float = 1.0
    views: int = 0
    distinct: np.ndarray = field(init=False)
    tail_share: Histogram = field(default_factory=lambda: Histogram(0.0, 1.0))

    def __post_init__(self) -> None:
        self.distinct = np.zeros(self.slots + 1, np.int64)

    def update(self, tb: TeacherBlock, valid: np.ndarray) -> None:
        if tb.sample_count is None or tb.sample_logit is None:  # set for a sampled teacher
            raise ValueError("draw statistics need a teacher stored with encoding 'sampled'")
        count = tb.sample_count[valid].reshape(-1, self.slots)
        drawn = (count > 0).sum(-1)
        self.views += len(drawn)
        self.distinct += np.bincount(drawn, minlength=self.slots + 1)
        lse = tb.lse[valid].reshape(-1, 1).astype(np.float64)
        logit = tb.sample_logit[valid].reshape(-1, self.slots).astype(np.float64)
        held = np.where(count > 0, np.exp(logit - lse), 0.0).sum(-1)
        tail = np.exp(tb.tail_lse[valid].reshape(-1).astype(np.float64) - lse[:, 0])
        has_tail = tail > 0
        self.tail_share.add(np.minimum(held[has_tail] / tail[has_tail], 1.0))

    def report(self) -> dict[str, Any]:
        n = max(self.views, 1)
        mean = float((np.arange(self.slots + 1) * self.distinct).sum() / n)
        return {
            "views": self.views,
            "k": self.k,
            "samples": self.samples,
            "slots": self.slots,
            "draw_temperature": self.draw_temperature,
            "distinct": {"mean": mean if self.views else None, "counts": self.distinct.tolist()},
            "classes_per_view": self.k + mean if self.views else None,
            "tail_share": self.tail_share.summary(),
        }


def inspect_extras(
    store: CacheStore,
    teachers: Sequence[str],
    ensembles: Sequence[StageEnsemble] = (),
    *,
    tail: TailMode = "spread",
    require_complete: bool = False,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """``{"ensembles": [...], "sampled": {...}}`` (schema above): the named ensembles and the
    stored ones whose models are cached, and the coverage of the sampled teachers among
    ``teachers``."""
    specs = [EnsembleSpec(e) for e in ensembles] + stored_ensembles(store)
    _check_members(store, specs)
    sampled = [t for t in teachers if store.teacher_meta(t).encoding == "sampled"]
    needed = sorted({n for s in specs for n in (*s.ensemble.names, s.stored) if n} | set(sampled))
    if not needed:
        return {"ensembles": [], "sampled": {}}
    shards, _ = complete_shards(store, needed, require_complete)
    c = store.meta.num_classes
    stats = [EnsembleStats(s) for s in specs]
    coverage = {t: _coverage(store, t) for t in sampled}
    for index in shards:
        block = read_block(store, index, needed, require_complete=False)
        valid = block.status == STATUS_VALID
        for s in stats:
            _update_ensemble(s, block, valid, c, tail)
        for name, cov in coverage.items():
            cov.update(block.teachers[name], valid)
        if progress is not None:
            progress(1)
    return {
        "ensembles": [s.report() for s in stats],
        "sampled": {name: cov.report() for name, cov in coverage.items()},
    }


def _check_members(store: CacheStore, specs: list[EnsembleSpec]) -> None:
    available = store.teachers
    for spec in specs:
        unknown = [n for n in spec.ensemble.names if n not in available]
        if unknown:
            raise ConfigError(
                f"--ensemble {spec.label}: {unknown} not in cache {store.path!r}; "
                f"valid: {', '.join(available)}"
            )


def _coverage(store: CacheStore, teacher: str) -> CoverageStats:
    meta = store.teacher_meta(teacher)
    slots = dict(meta.arrays(store.meta.num_classes))["sample_idx"][1][0]
    return CoverageStats(teacher, meta.k, meta.samples, slots, meta.draw_temperature)


def _update_ensemble(
    s: EnsembleStats, block: ShardBlock, valid: np.ndarray, num_classes: int, tail: TailMode
) -> None:
    """One block's views of an ensemble and its members, ``CHUNK`` views at a time."""
    a = block.view_params.num_views
    labels = np.repeat(np.where(valid, block.labels, -1)[valid], a)
    names = s.spec.ensemble.names
    targets = {n: _targets(block.teachers[n], valid) for n in (*names, s.spec.stored) if n}
    for start in range(0, len(labels), CHUNK):
        part = slice(start, start + CHUNK)
        members = [_rows(targets[n], part) for n in names]
        dists = {
            n: dense_probs(m, num_classes, 1.0, tail) for n, m in zip(names, members, strict=True)
        }
        if s.spec.stored:
            ensemble = dense_probs(_rows(targets[s.spec.stored], part), num_classes, 1.0, tail)
        else:
            e = s.spec.ensemble
            mixed = ensemble_targets(members, e.weights, num_classes, 1.0, tail, e.combine)
            ensemble = dense_probs(mixed, num_classes, 1.0, tail)
        s.update(dists, ensemble, labels[part])


def _targets(tb: TeacherBlock, valid: np.ndarray):
    """A teacher's top-k targets of the valid views, flattened to ``[views, ...]`` (a sampled
    teacher's top-k: the figures compare distributions at T=1 under the tail treatment)."""
    fields = tb.fields()[:5]
    return targets_from_arrays(
        [np.ascontiguousarray(x[valid].reshape(-1, *x.shape[2:])) for x in fields]
    )


def _rows(t, part: slice):
    return t.map(lambda x: x[part])


# ---- tables -------------------------------------------------------------------------------------


def format_extras(extras: dict[str, Any], table: Callable[..., str]) -> list[str]:
    """The tables of the ensembles and of the sampled teachers (``table``: inspect's)."""
    out = []
    for e in extras.get("ensembles", []):
        rows = [["ensemble", _pct(e["top1"]["ensemble"]), "-", "-"]]
        rows += [
            [
                f"{m['name']} (w {m['weight']:.3g})",
                _pct(e["top1"][m["name"]]),
                _pct(e["agreement"][m["name"]]),
                e["js"][m["name"]]["mean"],
            ]
            for m in e["members"]
        ]
        what = f"stored teacher {e['stored']!r}" if e["stored"] else e["label"]
        title = f"== ensemble {what} ({e['combine']}) against its members, {e['views']} views =="
        out.append(table(["", "top-1", "agrees with ensemble", "mean JS (T=1)"], rows, title))
    sampled = extras.get("sampled", {})
    if sampled:
        rows = [
            [
                name,
                s["k"],
                s["samples"],
                f"{s['draw_temperature']:g}",
                s["distinct"]["mean"],
                s["classes_per_view"],
                s["tail_share"]["mean"],
                s["tail_share"]["quantiles"]["p50"],
            ]
            for name, s in sampled.items()
        ]
        header = [
            "teacher",
            "k",
            "draws",
            "drawn at T",
            "distinct drawn",
            "classes per view",
            "tail mass held (mean)",
            "(median)",
        ]
        title = "== sampled teachers: coverage per view (draws from the tail) =="
        out.append(table(header, rows, title))
    return out


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"
