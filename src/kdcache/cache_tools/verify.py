"""``kdcache verify``: recompute a random sample of stored views with the teacher and compare.

Views are replayed from the shards with their *stored* parameters and the cache's recipe, the
teacher is rebuilt from its stored spec (its weights digest must match), and the fresh logits are
compared with the cached ones at the cached class indices, and the fresh tail (the logits outside
the cached top-k) with the stored tail. A difference beyond the encoding's rounding (plus
``atol`` per logit) fails; top-k sets may differ only where logits tie within that tolerance.

A stored ensemble is recomputed from its models (each rebuilt from its recorded spec, checked
against its weights digest, run in its own rendering) and combined as precompute combined them.
A sampled teacher's draws are drawn again from the fresh logits with the same generator, at the
teacher's draw temperature: a view whose draws differ fails unless one of its uniforms lies
within the logits' tolerance of a class boundary of the tail's CDF (there, rounding alone may
move a draw to the neighbouring class). Its stored normalisers (``logsumexp(l / T)`` at each
stored temperature, the tail's at the draw temperature) are compared with the fresh logits'.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch

from kdcache.cache.reader import TeacherBlock, read_array, read_block
from kdcache.cache.store import STATUS_VALID, CacheStore, TeacherMeta
from kdcache.cache_tools.portable import shipped_checkpoint
from kdcache.core.errors import CacheMismatchError, ConfigError
from kdcache.core.results import TeacherVerify, VerifyResult
from kdcache.models.build import ModelSpec, build_teacher, weights_digest
from kdcache.models.ensemble import build_members, combine_logits
from kdcache.models.runner import AmpMode, ModelRunner
from kdcache.shards.reading import (
    MAX_PIXELS,
    decode_image,
    expand_shards,
    iter_shard,
    shard_name,
)
from kdcache.targets.encoding import FP16_REL, log_tail_tolerance, logit_tolerance, sample_slots
from kdcache.targets.sampling import Draws, draw, tail_probs, uniforms
from kdcache.views.recipe import Rendering, View, render

log = logging.getLogger(__name__)


@dataclass
class Picked:
    """The views chosen for verification: shard index -> list of (row, view)."""

    by_shard: dict[int, list[tuple[int, int]]] = field(default_factory=dict)

    def __len__(self) -> int:
        return sum(len(v) for v in self.by_shard.values())


def pick_views(store: CacheStore, teachers: list[str], num: int, seed: int) -> Picked:
    """``num`` random (row, view) pairs among valid rows of shards complete for every teacher."""
    complete = store.views_done() & np.logical_and.reduce([store.teacher_done(t) for t in teachers])
    candidates = []
    status_all = read_array(store, "status")
    for shard in np.flatnonzero(complete):
        status = status_all[store.rows(int(shard))]
        candidates += [(int(shard), int(r)) for r in np.flatnonzero(status == STATUS_VALID)]
    if not candidates:
        raise CacheMismatchError(
            f"cache {store.path!r} has no complete shard with valid views to verify"
        )
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(candidates), size=min(num, len(candidates)), replace=False)
    picked = Picked()
    for i in sorted(chosen):
        shard, row = candidates[i]
        picked.by_shard.setdefault(shard, []).append((row, int(rng.integers(store.meta.num_views))))
    return picked


def shard_urls(
    store: CacheStore, pattern: str | list[str] | None, storage_options: dict | None = None
) -> dict[str, str]:
    """Shard name -> URL, from ``pattern`` or the shards recorded in the cache's config."""
    pattern = pattern or store.meta.config.get("data", {}).get("shards")
    if not pattern:
        raise ConfigError("--shards: the cache records no shard location; pass the shards' pattern")
    return {
        shard_name(u): u
        for u in expand_shards(pattern, key="--shards", storage_options=storage_options)
    }


@dataclass
class Replayed:
    """A picked view ready to render: its decoded image, stored view and, if mixed, partner."""

    image: torch.Tensor
    view: View
    partner: tuple[torch.Tensor, View] | None = None


def replay_picked(
    store: CacheStore, picked: Picked, urls: dict[str, str], storage_options: dict | None = None
) -> tuple[list[Replayed], list[tuple[int, int, int]]]:
    """Every picked view with what rendering it needs (partners of mixed views included), and
    the (shard, row, view) order."""
    out = []
    order = []
    for shard, wanted in sorted(picked.by_shard.items()):
        block = read_block(store, shard, [])
        if block.shard not in urls:
            raise CacheMismatchError(
                f"shard {block.shard!r} of the cache is not among the given shards"
            )
        picks = [(row, a, block.view_params.view(row, a)) for row, a in wanted]
        rows = {row for row, _, _ in picks} | {row + v.mix_partner for row, _, v in picks}
        images = _decode_rows(store, block, rows, urls[block.shard], storage_options)
        for row, a, view in picks:
            partner_row = row + view.mix_partner
            partner = (
                (images[partner_row], block.view_params.view(partner_row, a))
                if view.mixed
                else None
            )
            out.append(Replayed(images[row], view, partner))
            order.append((shard, row, a))
    return out, order


def _decode_rows(
    store: CacheStore, block, rows: set[int], url: str, storage_options: dict | None
) -> dict[int, torch.Tensor]:
    """The decoded images of ``rows`` of a shard block, found by key in the shard."""
    wanted = {str(block.keys[row]): row for row in rows}
    # the limit the precompute decoded these rows under (its config is stored in the cache)
    limit = store.meta.config.get("data", {}).get("max_pixels", MAX_PIXELS)
    images = {}
    for sample in iter_shard(url, storage_options):
        if sample.key in wanted:
            row = wanted.pop(sample.key)
            images[row] = decode_image(sample.image, store.meta.recipe.channels, limit)
    if wanted:
        raise CacheMismatchError(
            f"shard {block.shard!r} no longer holds keys {sorted(wanted)[:3]}: "
            "it changed after the cache was built"
        )
    return images


def render_picked(store: CacheStore, picked: list[Replayed], rendering: Rendering) -> torch.Tensor:
    """The picked views as one teacher renders them, ``uint8[N, C, S, S]``."""
    recipe = store.meta.recipe
    return torch.stack([render(p.image, p.view, recipe, rendering, p.partner) for p in picked])


def load_teacher(store: CacheStore, teacher: str, checkpoint: str | None) -> torch.nn.Module:
    meta = store.teacher_meta(teacher)
    spec = ModelSpec.model_validate(meta.model)
    checkpoint = checkpoint or shipped_checkpoint(store.path, spec.checkpoint, meta.weights_digest)
    if checkpoint:
        spec = spec.model_copy(update={"checkpoint": checkpoint})
    model = build_teacher(spec, store.meta.num_classes, store.meta.recipe.channels)
    digest = weights_digest(model)
    if digest != meta.weights_digest:
        raise CacheMismatchError(
            f"teacher {teacher!r}: the weights built from {spec.checkpoint or spec.name!r} "
            f"have digest {digest}, the cache was made with {meta.weights_digest}"
        )
    return model


def compare(
    store: CacheStore,
    teacher: str,
    logits: torch.Tensor,
    order: list[tuple[int, int, int]],
    atol: float,
) -> TeacherVerify:
    """Compare fresh logits ``[N, C]`` with the cached values of the same views."""
    meta = store.teacher_meta(teacher)
    k = meta.k
    cached = _cached(store, teacher, order)
    cached_idx = cached["idx"]
    cached_logit = cached["logit"]
    cached_lse = cached["lse"]
    cached_tail = cached["tail_lse"]
    fresh = logits.cpu().numpy().astype(np.float32)
    fresh_at = np.take_along_axis(fresh, cached_idx, axis=1)
    delta = np.abs(fresh_at - cached_logit)
    tol = logit_tolerance(meta.encoding, cached_logit) + atol
    fresh_lse = torch.logsumexp(logits.float().cpu(), dim=1).numpy()
    tail_delta, tail_bad = _compare_tail(
        meta.encoding, fresh, fresh_lse, cached_idx, cached_tail - cached_lse, atol
    )
    fresh_top = np.argsort(-fresh, axis=1, kind="stable")[:, :k]
    same_set = np.array([set(a) == set(b) for a, b in zip(fresh_top, cached_idx, strict=True)])
    sorted_fresh = -np.sort(-fresh, axis=1)
    tie = (
        (sorted_fresh[:, k - 1] - sorted_fresh[:, k]) <= 2 * tol.max(axis=1)
        if k < fresh.shape[1]
        else np.zeros(len(fresh), bool)
    )
    bad = (delta > tol).any(axis=1) | (~same_set & ~tie) | tail_bad
    draws = None
    if meta.encoding == "sampled":
        same_draws, draws_bad = _compare_draws(store, teacher, logits, cached, atol)
        bad |= draws_bad
        draws = float(same_draws.mean())
    failures = int(bad.sum())
    return TeacherVerify(
        teacher=teacher,
        views=len(order),
        max_abs_delta=float(delta.max()),
        max_excess=float((delta - tol).max()),
        max_lse_delta=float(np.abs(fresh_lse - cached_lse).max()),
        max_tail_delta=float(tail_delta.max()),
        topk_agreement=float(same_set.mean()),
        top1_agreement=float((fresh_top[:, 0] == cached_idx[:, 0]).mean()),
        failures=failures,
        draws_agreement=draws,
    )


def _compare_draws(
    store: CacheStore,
    teacher: str,
    logits: torch.Tensor,
    cached: dict[str, np.ndarray],
    atol: float,
) -> tuple[np.ndarray, np.ndarray]:
    """(same draws, beyond tolerance) per view: the draws again from the fresh logits."""
    meta = store.teacher_meta(teacher)
    tau = meta.draw_temperature
    u = uniforms(store.meta.seed, cached["keys"], cached["views"], teacher, meta.samples)
    slots = sample_slots(meta.samples, meta.k, store.meta.num_classes)
    head = torch.from_numpy(cached["idx"])
    fresh = draw(logits, head, u, slots, meta.sample_temperatures, tau)
    count = cached["sample_count"].astype(np.int64)
    same = (fresh.count.astype(np.int64) == count).all(-1) & (
        (fresh.idx == cached["sample_idx"].astype(np.int64)) | (count == 0)
    ).all(-1)
    # a logit moved by atol moves l / τ by atol / τ: the CDF's boundaries by as much as at T=1
    # with atol / τ, and never less than 2 atol relative is allowed (τ < 1 sharpens)
    moved = ~same & ~_near_boundary(logits, head, u, 2 * atol * max(1.0, 1.0 / tau), tau)
    return same, moved | _normalisers_off(meta, fresh, cached, atol)


def _normalisers_off(
    meta: TeacherMeta, fresh: Draws, cached: dict[str, np.ndarray], atol: float
) -> np.ndarray:
    """Per view: is a stored ``logsumexp(l / T)`` (or the draws' tail one at τ) further from the
    fresh one than its fp16 rounding (it is stored relative to the top logit at T, and the top in
    fp16) and the logits' tolerance (each logit within ``atol``: the logsumexp within
    ``atol / T``; twice that, as for the tail)?"""
    top = cached["logit"][:, 0]
    temps = list(meta.sample_temperatures)
    stored = cached["lse_t"]
    again = fresh.lse_t
    if meta.draw_temperature != 1.0:  # at 1 it is the stored tail, compared as such already
        temps.append(meta.draw_temperature)
        stored = np.concatenate([stored, cached["draw_tail_lse"][:, None]], axis=1)
        again = np.concatenate([again, fresh.tail_lse[:, None]], axis=1)
    off = np.zeros(len(top), bool)
    for j, t in enumerate(temps):
        rel = np.abs(stored[:, j] - top / t) + np.abs(top) / t
        tol = FP16_REL * rel + 2 * atol / t
        with np.errstate(invalid="ignore"):  # -inf: no tail on either side is no difference
            gap = np.where(stored[:, j] == again[:, j], 0.0, np.abs(stored[:, j] - again[:, j]))
        off |= ~(gap <= tol)
    return off


def _near_boundary(
    logits: torch.Tensor, head: torch.Tensor, u: np.ndarray, rel: float, tau: float = 1.0
):
    """Per view: does a uniform lie within ``rel`` (of the tail's mass) of a class boundary of
    the tail's CDF at ``tau``, where a logit moved by the tolerance may move the draw?"""
    p = tail_probs(logits.cpu(), head, tau)
    cdf = torch.cumsum(p, -1)
    total = cdf[:, -1:]
    target = torch.from_numpy(u) * total
    i = torch.searchsorted(cdf, target, right=True).clamp_max(cdf.shape[1] - 1)
    above = cdf.gather(1, i)
    below = torch.where(i > 0, cdf.gather(1, (i - 1).clamp_min(0)), torch.zeros_like(above))
    gap = torch.minimum(above - target, target - below)
    return (gap <= rel * total + 1e-12).any(-1).numpy()


def _compare_tail(
    encoding: str,
    fresh: np.ndarray,
    fresh_lse: np.ndarray,
    cached_idx: np.ndarray,
    cached_log_tail: np.ndarray,
    atol: float,
) -> tuple[np.ndarray, np.ndarray]:
    """(|Δ tail mass|, beyond tolerance) per view: the fresh logits outside the cached top-k against
    the stored tail, in log space (each logit may move by ``atol``, so the log tail mass by 2
    atol)."""
    outside = fresh.copy()
    np.put_along_axis(outside, cached_idx, -np.inf, axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        fresh_log_tail = torch.logsumexp(torch.from_numpy(outside), dim=1).numpy() - fresh_lse
        gap = np.where(
            np.isneginf(fresh_log_tail) & np.isneginf(cached_log_tail),
            0.0,
            np.abs(fresh_log_tail - cached_log_tail),
        )
    bad = gap > log_tail_tolerance(encoding, cached_log_tail) + 2 * atol
    return np.abs(np.exp(fresh_log_tail) - np.exp(cached_log_tail)), bad


CACHED = ("idx", "logit", "lse", "label_logit", "tail_lse", "sample_idx", "sample_logit")
CACHED += ("sample_count", "lse_t", "temperatures", "draw_tail_lse")


def _cached(
    store: CacheStore, teacher: str, order: list[tuple[int, int, int]]
) -> dict[str, np.ndarray]:
    """The cached values of the ordered views (sampled: the draws too), with their keys and
    view indices."""
    rows: dict[str, list] = {"keys": [], "views": []}
    by_position: dict[int, tuple] = {}
    for shard in sorted({s for s, _, _ in order}):
        block = read_block(store, shard, [teacher])
        tb: TeacherBlock = block.teachers[teacher]
        for position, (s, row, view) in enumerate(order):
            if s == shard:
                values = tuple(a[row, view] for a in tb.fields()[: len(CACHED)])
                by_position[position] = (str(block.keys[row]), view, values)
    for position in range(len(order)):
        key, view, values = by_position[position]
        rows["keys"].append(key)
        rows["views"].append(view)
        for name, value in zip(CACHED, values, strict=False):
            rows.setdefault(name, []).append(value)
    out = {name: np.stack(values) for name, values in rows.items() if name in CACHED}
    out["idx"] = out["idx"].astype(np.int64)
    for name in ("logit", "lse", "tail_lse"):
        out[name] = out[name].astype(np.float32)
    out["keys"] = np.asarray(rows["keys"], dtype=object)  # the keys as the str objects read
    out["views"] = np.asarray(rows["views"], dtype=np.int64)
    return out


def verify_cache(
    store: CacheStore,
    *,
    teachers: list[str] | None = None,
    num: int = 64,
    seed: int = 0,
    shards: str | list[str] | None = None,
    checkpoint: str | None = None,
    device: str = "auto",
    amp: AmpMode = "auto",
    atol: float = 1e-3,
    batch_size: int = 256,
    storage_options: dict | None = None,
) -> VerifyResult:
    """Recompute ``num`` random stored views and compare, per teacher. ``storage_options``:
    fsspec's, for the shards (the cache's config saves its ``data.storage_options`` redacted, so
    pass them)."""
    teachers = teachers or store.teachers
    if not teachers:
        raise CacheMismatchError(f"cache {store.path!r} has no teachers to verify")
    picked = pick_views(store, teachers, num, seed)
    replayed, order = replay_picked(
        store, picked, shard_urls(store, shards, storage_options), storage_options
    )
    result = VerifyResult(cache=store.path, num=num, seed=seed, atol=atol)
    for teacher in teachers:
        models = teacher_models(store, teacher, checkpoint)
        logits = []
        for model, _, rendering in models:
            pixels = render_picked(store, replayed, rendering)
            runner = ModelRunner(model, rendering, device=device, amp=amp, name=teacher)
            logits.append(
                torch.cat(
                    [runner(pixels[i : i + batch_size]) for i in range(0, len(pixels), batch_size)]
                )
            )
        ensemble = store.teacher_meta(teacher).ensemble
        combine = ensemble.combine if ensemble else "probs"
        combined = combine_logits(logits, [w for _, w, _ in models], combine)
        result.teachers.append(compare(store, teacher, combined, order, atol))
        log.info("verified teacher %s on %d views", teacher, len(order))
    return result


def teacher_models(
    store: CacheStore, teacher: str, checkpoint: str | None
) -> list[tuple[torch.nn.Module, float, Rendering]]:
    """The models a teacher's targets came from: (model, weight, rendering); one unless the
    teacher is a stored ensemble."""
    meta = store.teacher_meta(teacher)
    if meta.ensemble is None:
        return [(load_teacher(store, teacher, checkpoint), 1.0, meta.rendering)]
    if checkpoint:
        raise ConfigError(
            f"--checkpoint names one model's weights; teacher {teacher!r} is an ensemble of "
            f"{len(meta.ensemble.members)} (verify it without --checkpoint)"
        )
    channels = store.meta.recipe.channels
    return build_members(teacher, shipped_members(store, meta), store.meta.num_classes, channels)


def shipped_members(store: CacheStore, meta: TeacherMeta) -> TeacherMeta:
    """A stored ensemble's metadata with each member's checkpoint found as
    :func:`~kdcache.cache_tools.portable.shipped_checkpoint` finds one."""
    if meta.ensemble is None:
        return meta
    members = []
    for member in meta.ensemble.members:
        found = shipped_checkpoint(
            store.path, member.model.get("checkpoint"), member.weights_digest
        )
        model = member.model | ({"checkpoint": found} if found else {})
        members.append(member.model_copy(update={"model": model}))
    ensemble = meta.ensemble.model_copy(update={"members": members})
    return meta.model_copy(update={"ensemble": ensemble})
