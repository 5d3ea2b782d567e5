"""Sampled targets: S classes drawn from a teacher's tail, reproducibly, for ``tail: sample``.

Precompute stores, per view, the top-k exactly (as encoding ``q8`` does) and S draws with
replacement from the teacher's distribution *outside* the top-k, renormalised, at the teacher's
``draw_temperature`` τ (default 1), as distinct classes with their counts and logits; plus
``logsumexp(l / T)`` for each temperature listed in the teacher's ``sample_temperatures``, and
(τ != 1) the tail's ``logsumexp(l / τ)``, the draws' own normaliser.
:func:`kdcache.targets.sparse.sampled_at` turns them into an unbiased estimate of the distribution
at T=1, at τ and at each of those temperatures. Draw at the temperature the loss uses: there the
estimate has no importance weights (a drawn class's probability is its share of the draws times
the exact tail mass at τ).

The draws of view ``a`` of sample ``key`` by teacher ``name`` come from a Philox generator keyed
by ``(cache seed, key, a, name)`` alone, by inverting the CDF of the tail in class order, so
``kdcache verify`` draws the same classes again from recomputed logits (up to classes whose CDF
boundary lies within rounding of a draw).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from kdcache.targets.encoding import sample_slots
from kdcache.targets.sparse import MixedLabels, SampledTargets, from_logits

MAX_SAMPLES = 255
"""Counts are stored as uint8."""


def draw_generator(seed: int, key: str, view: int, teacher: str) -> np.random.Generator:
    """The Philox generator of one view's draws, keyed by ``(seed, key, view, teacher)`` only."""
    text = f"{seed}\x1f{key}\x1f{view}\x1f{teacher}\x1fdraws"
    digest = hashlib.blake2b(text.encode(), digest_size=16).digest()
    return np.random.Generator(np.random.Philox(key=int.from_bytes(digest, "little")))


def uniforms(
    seed: int,
    keys: Sequence[str] | np.ndarray,
    view_ids: Sequence[int] | np.ndarray,
    teacher: str,
    samples: int,
) -> np.ndarray:
    """``float64[B, S]``: the uniforms behind each view's draws (row ``i``: ``keys[i]``,
    ``view_ids[i]``)."""
    out = np.empty((len(keys), samples), np.float64)
    for i, (key, view) in enumerate(zip(keys, view_ids, strict=True)):
        out[i] = draw_generator(seed, key, int(view), teacher).random(samples)
    return out


@dataclass
class Draws:
    """One batch's draws: ``idx``/``count``/``logit`` ``[B, slots]`` (distinct classes, most
    drawn first, then by class; empty slots have count 0 and class 0), ``lse_t`` ``[B, n]`` and
    ``tail_lse`` ``[B]``: ``logsumexp(l / τ)`` over the tail they were drawn from."""

    idx: np.ndarray
    count: np.ndarray
    logit: np.ndarray
    lse_t: np.ndarray
    tail_lse: np.ndarray


def tail_probs(logits: torch.Tensor, head: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``float64[B, C]``: ``softmax(logits / temperature)`` with the ``head`` classes zeroed
    (what the draws invert; its row sums are the tail masses at that temperature)."""
    z = logits.detach().double() / temperature
    return torch.softmax(z, dim=-1).scatter(1, head.long().to(z.device), 0.0)


def draw(
    logits: torch.Tensor,
    head: torch.Tensor,
    u: np.ndarray,
    slots: int,
    temperatures: Sequence[float] = (),
    draw_temperature: float = 1.0,
) -> Draws:
    """Draw ``u.shape[1]`` classes per row from ``softmax(logits / draw_temperature)`` outside
    ``head`` ``[B, k]``.

    Inverse CDF in float64 over the classes in index order: draw ``j`` of a row is the first
    class whose cumulative tail probability exceeds ``u[j]`` times the tail's total. A row whose
    tail has no probability (it underflows) gets no draws. Runs on the logits' device (a GPU's
    float64 sums may differ from a CPU's in the last bit: ``verify`` allows for draws that land
    that close to a class boundary).
    """
    p = tail_probs(logits, head, draw_temperature)
    cdf = torch.cumsum(p, dim=-1)
    total = cdf[:, -1:]
    x = torch.searchsorted(cdf, torch.from_numpy(u).to(p.device) * total, right=True)
    # u * total may round up to the total itself: the last class with probability, then
    last = p.shape[1] - 1 - torch.argmax(torch.flip(p > 0, [1]).to(torch.int8), dim=1)
    x = torch.minimum(x, last.unsqueeze(1)).cpu().numpy()
    empty = (total[:, 0] <= 0).cpu().numpy()
    idx, count = _distinct(x, empty, slots)
    z = logits.detach().float().cpu()  # once: the helpers below take it as it is
    logit = np.take_along_axis(z.numpy(), idx, axis=1)
    return Draws(idx, count, logit, lse_at(z, temperatures), tail_lse_at(z, head, draw_temperature))


def _distinct(x: np.ndarray, empty: np.ndarray, slots: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's drawn classes as distinct classes and counts, most drawn first (then by class),
    for all rows at once: sorted, each run of one class is one slot."""
    rows, draws = x.shape
    xs = np.sort(x, axis=1)
    starts = np.ones_like(xs, dtype=bool)
    starts[:, 1:] = xs[:, 1:] != xs[:, :-1]
    run = np.cumsum(starts, axis=1) - 1  # the slot of each draw, 0..distinct-1
    flat = (np.arange(rows)[:, None] * draws + run).ravel()
    count = np.bincount(flat, minlength=rows * draws).reshape(rows, draws)
    classes = np.zeros((rows, draws), np.int64)
    classes[np.nonzero(starts)[0], run[starts]] = xs[starts]
    count[empty] = 0
    classes[empty] = 0
    order = np.lexsort((classes, -count), axis=1)[:, :slots]
    idx = np.take_along_axis(classes, order, axis=1)
    count = np.take_along_axis(count, order, axis=1)
    return np.where(count > 0, idx, 0), count.astype(np.uint8)


def lse_at(logits: torch.Tensor, temperatures: Sequence[float]) -> np.ndarray:
    """``float32[B, n]``: ``logsumexp(logits / T)`` for each T."""
    z = logits.detach().float().cpu()
    columns = [torch.logsumexp(z / t, dim=-1) for t in temperatures]
    if not columns:
        return np.zeros((len(z), 0), np.float32)
    return torch.stack(columns, dim=-1).numpy()


def tail_lse_at(logits: torch.Tensor, head: torch.Tensor, temperature: float) -> np.ndarray:
    """``float32[B]``: ``logsumexp(logits / temperature)`` over the classes outside ``head``."""
    z = logits.detach().float().cpu() / temperature
    return torch.logsumexp(z.scatter(1, head.long().cpu(), float("-inf")), dim=-1).numpy()


def sampled_from_logits(
    logits: torch.Tensor,
    labels: torch.Tensor | MixedLabels,
    k: int,
    u: np.ndarray,
    temperatures: Sequence[float] = (),
    draw_temperature: float = 1.0,
) -> SampledTargets:
    """Sampled targets from full logits ``[B, C]`` and the views' uniforms ``[B, S]``, drawn at
    ``draw_temperature`` (what precompute stores, before rounding)."""
    head = from_logits(logits, labels, k)
    slots = sample_slots(u.shape[1], k, logits.shape[-1])
    d = draw(logits, head.idx, u, slots, temperatures, draw_temperature)
    temps = np.broadcast_to(np.asarray(temperatures, np.float32), d.lse_t.shape)
    device = head.idx.device

    def on_device(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a).to(device)

    # drawn at T=1: the draws' normaliser is the head's own tail_lse, bit for bit
    tail = head.tail_lse if draw_temperature == 1.0 else on_device(d.tail_lse)
    tau = torch.full_like(head.lse, draw_temperature, dtype=torch.float32)
    return SampledTargets(
        *head.tensors(),
        sample_idx=on_device(d.idx),
        sample_logit=on_device(d.logit),
        sample_count=on_device(d.count.astype(np.float32)),
        lse_t=on_device(d.lse_t),
        temperatures=on_device(temps.copy()),
        draw_tail_lse=tail,
        draw_temperature=tau,
    )
