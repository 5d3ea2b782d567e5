"""How a teacher's targets are laid out on disk: top-k ``fp16`` (plain) and ``q8`` (compact), and
``sampled`` (the top-k as ``q8`` plus S classes drawn from the tail,
:mod:`kdcache.targets.sampling`).

All decode to the same in-memory form: indices sorted by logit (descending), float32 logits,
logsumexp, label logit and the tail's logsumexp (see :class:`kdcache.cache.reader.TeacherBlock`);
``sampled`` adds the draws.

``fp16``: ``topk_idx`` uint16/int32, ``topk_logit`` fp16, ``lse`` fp32, ``label_logit`` fp32,
``log_tail`` fp16 = ``tail_lse - lse``, the log of the mass outside the top-k (``-inf``: none).
Error bound: each stored value is its fp16 rounding (relative 2^-11: a logit near 20 within 0.008
nat, a log tail mass of -10 within 0.004 nat, i.e. the tail mass within 0.4 %).

``q8`` (~24 B/view at k=10, C=1000): probabilities depend only on logit *differences*, so
``q8`` stores the top logit (fp16), every top-k logit as ``uint8`` steps of ``Q8_STEP`` below the
top, the logsumexp relative to the top (fp16), the label's logit in steps below the top and the
log tail mass ``-x`` as ``uint8`` ``u = round(254 sqrt(x / Q8_TAIL_MAX))`` (fine steps for large
tails, where the absolute mass matters, coarse ones for tiny tails, which matter only at T > 1;
255: no tail). The indices are stored in
ascending order as gaps (small numbers that compress well) and re-sorted by logit on decoding.
Error bound: every logit difference is within ``Q8_STEP / 2`` (1/32 nat) of the exact one, so
each log-probability moves by at most 1/32 + the fp16 error of ``lse - top``; logits more than
``255 * Q8_STEP`` (≈16 nats, a probability ratio of 1e-7) below the top are clipped there. The
log tail mass ``-x`` comes back within ``sqrt(Q8_TAIL_MAX x) / 254 + Q8_TAIL_MAX / (4 * 254^2)``
nats (x = 0.7: 0.02 nat, x = 10: 0.075; the tail mass within 0.011 absolute), plus the fp16
error of ``lse - top``; tails below ``exp(-Q8_TAIL_MAX)`` (≈ 2e-16) are clipped there.

``sampled`` (~``3k + 6 + 4 slots + 2 n (+ 2)`` B/view before compression, ``n`` stored
temperatures): the ``q8`` arrays of the top-k, then per slot ``sample_idx`` (the class),
``sample_count`` (uint8; 0: empty slot) and ``sample_q`` (its logit in ``Q8_STEP`` steps below
the top, as ``topk_q``), and ``lse_t`` fp16 ``= logsumexp(l / T) - top / T`` (in ``[0, log C]``)
for each temperature of the teacher's ``sample_temperatures``. A teacher whose draws come from
the tail at a ``draw_temperature`` τ other than 1 also stores ``draw_tail`` fp16 ``=
logsumexp(l / τ over the classes outside the top-k) - top / τ`` (at most ``log C``): the draws'
own normaliser, from which the tail mass and ``logsumexp(l / τ)`` at τ follow (with the top-k);
at τ = 1 the draws' normaliser is the stored tail itself and nothing is added. Error bound: the
top-k as ``q8``; a drawn class's logit within ``Q8_STEP / 2``, which moves its importance weight
at T by at most ``|1/τ - 1/T| Q8_STEP / 2`` in log (nothing at T = τ, where the weight is the
tail mass at τ times the count's share); ``lse_t`` and ``draw_tail`` within ``2^-11`` relative.
"""

from __future__ import annotations

import numpy as np

ENCODINGS = ("fp16", "q8", "sampled")
FP16_REL = 2.0**-10
"""fp16 keeps 11 significant bits: rounding moves a value by <= 2^-11 relative
(twice that: slack)."""
Q8_STEP = 1.0 / 16
Q8_TAIL_MAX = 36.0
Q8_MAX = 255

# name -> (dtype or "index", its last axis: None, "k" top-k, "s" sample slots, "t"
# temperatures or "d" (none, stored only for draws at a temperature other than 1), fill value)
_Q8: dict[str, tuple[str, str | None, float]] = {
    "topk_idx": ("index", "k", 0),
    "topk_q": ("uint8", "k", 0),
    "top_logit": ("float16", None, 0),
    "lse_rel": ("float16", None, 0),
    "label_q": ("uint8", None, Q8_MAX),
    "tail_q": ("uint8", None, Q8_MAX),
}
_SPECS: dict[str, dict[str, tuple[str, str | None, float]]] = {
    "fp16": {
        "topk_idx": ("index", "k", 0),
        "topk_logit": ("float16", "k", 0),
        "lse": ("float32", None, 0),
        "label_logit": ("float32", None, 0),
        "log_tail": ("float16", None, 0),
    },
    "q8": _Q8,
    "sampled": {
        **_Q8,
        "sample_idx": ("index", "s", 0),
        "sample_count": ("uint8", "s", 0),
        "sample_q": ("uint8", "s", Q8_MAX),
        "lse_t": ("float16", "t", 0),
        "draw_tail": ("float16", "d", 0),
    },
}
HEAD = {"fp16": "fp16", "q8": "q8", "sampled": "q8"}
"""The encoding of each encoding's top-k (its rounding and error bounds)."""


def array_specs(encoding: str, index_dtype: str) -> dict[str, tuple[str, str | None, float]]:
    """The arrays of ``encoding``: name -> (dtype, last axis (None, "k", "s", "t" or "d"),
    fill)."""
    return {
        name: (index_dtype if dtype == "index" else dtype, axis, fill)
        for name, (dtype, axis, fill) in _SPECS[encoding].items()
    }


def sample_slots(samples: int, k: int, num_classes: int) -> int:
    """Slots per view of encoding ``sampled``: the draws, at most one per class outside the
    top-k."""
    return max(0, min(samples, num_classes - k))


def array_shapes(
    encoding: str,
    index_dtype: str,
    k: int,
    slots: int = 0,
    temperatures: int = 0,
    draw_tail: bool = False,
) -> dict[str, tuple[str, tuple[int, ...], float]]:
    """The arrays a teacher stores: name -> (dtype, shape after ``[rows, A]``, fill). An axis of
    length 0 (no stored temperature) leaves its array out, and so does ``draw_tail=False`` (draws
    at T=1) the ``draw_tail`` array."""
    sizes = {None: (), "k": (k,), "s": (slots,), "t": (temperatures,), "d": ()}
    return {
        name: (dtype, sizes[axis], fill)
        for name, (dtype, axis, fill) in array_specs(encoding, index_dtype).items()
        if 0 not in sizes[axis] and (axis != "d" or draw_tail)
    }


def encode(
    encoding: str,
    idx: np.ndarray,
    logit: np.ndarray,
    lse: np.ndarray,
    label_logit: np.ndarray,
    tail_lse: np.ndarray,
    samples: tuple[np.ndarray, ...] | None = None,
    temperatures: tuple[float, ...] = (),
    draw_temperature: float = 1.0,
) -> dict[str, np.ndarray]:
    """Arrays to store, from top-k indices/logits ``[..., k]`` (sorted by logit) and ``[...]``
    scalars; ``sampled`` also from ``samples`` = (class ``[..., s]``, logit, count, lse_t
    ``[..., n]`` at ``temperatures``, the tail's logsumexp at ``draw_temperature`` ``[...]``)."""
    if encoding == "sampled":
        head = (idx, logit, lse, label_logit, tail_lse)
        return _encode_sampled(head, samples, temperatures, draw_temperature)
    with np.errstate(invalid="ignore"):  # -inf - finite is -inf; padding rows may hold anything
        log_tail = np.minimum(tail_lse.astype(np.float32) - lse.astype(np.float32), 0.0)
    if encoding == "fp16":
        return {
            "topk_idx": idx,
            "topk_logit": logit.astype(np.float16),
            "lse": lse.astype(np.float32),
            "label_logit": label_logit.astype(np.float32),
            "log_tail": log_tail.astype(np.float16),
        }
    top = logit[..., :1].astype(np.float32)
    order = np.argsort(idx, axis=-1, kind="stable")
    idx_sorted = np.take_along_axis(idx.astype(np.int64), order, axis=-1)
    gaps = np.diff(idx_sorted, axis=-1, prepend=0)
    q = _steps_below(top, np.take_along_axis(logit.astype(np.float32), order, axis=-1))
    return {
        "topk_idx": gaps,
        "topk_q": q,
        "top_logit": top[..., 0].astype(np.float16),
        "lse_rel": (lse - top[..., 0]).astype(np.float16),
        "label_q": _steps_below(top[..., 0], label_logit),
        "tail_q": _tail_code(log_tail),
    }


def _encode_sampled(
    head: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    samples: tuple[np.ndarray, ...] | None,
    temperatures: tuple[float, ...],
    draw_temperature: float,
) -> dict[str, np.ndarray]:
    if samples is None:
        raise ValueError("encoding 'sampled' needs the draws (samples=...)")
    sample_idx, sample_logit, sample_count, lse_t, draw_tail_lse = samples
    top = head[1][..., 0].astype(np.float32)
    temps = np.asarray(temperatures, np.float32)
    out = encode("q8", *head)
    out["sample_idx"] = sample_idx
    out["sample_count"] = sample_count.astype(np.uint8)
    # an empty slot's logit is stored as the clip value: it decodes finite, and count 0 drops it
    q = _steps_below(top[..., None], sample_logit)
    out["sample_q"] = np.where(sample_count > 0, q, np.uint8(Q8_MAX))
    if temps.size:
        # relative to the top logit at T: in [0, log C], where fp16 keeps 2^-11 relative
        out["lse_t"] = (lse_t - top[..., None] / temps).astype(np.float16)
    if draw_temperature != 1.0:
        # relative to the exact top at τ, as lse_t: decoded against the fp16 top, it moves with
        # the decoded top-k logits (also steps below the exact top), so their ratio is kept
        with np.errstate(invalid="ignore"):  # padding rows may hold anything
            out["draw_tail"] = (draw_tail_lse - top / draw_temperature).astype(np.float16)
    return out


def _steps_below(top: np.ndarray | float, values: np.ndarray, step: float = Q8_STEP) -> np.ndarray:
    """``uint8`` steps of ``step`` below ``top``; NaN and anything 255 steps below or more
    (``-inf``) -> 255."""
    steps = np.rint((top - values.astype(np.float32)) / step)
    return np.clip(np.nan_to_num(steps, nan=Q8_MAX, posinf=Q8_MAX), 0, Q8_MAX).astype(np.uint8)


def _tail_code(log_tail: np.ndarray) -> np.ndarray:
    """``uint8`` code of the log tail mass (<= 0): square-root companding, 255 = no tail."""
    x = np.clip(np.nan_to_num(-log_tail, nan=0.0, posinf=Q8_TAIL_MAX), 0.0, Q8_TAIL_MAX)
    code = np.rint(254 * np.sqrt(x / Q8_TAIL_MAX)).astype(np.uint8)
    return np.where(np.isneginf(log_tail), np.uint8(Q8_MAX), code)


def _tail_value(code: np.ndarray) -> np.ndarray:
    """The log tail mass of a code (``-inf`` for 255)."""
    x = Q8_TAIL_MAX * (code.astype(np.float32) / 254) ** 2
    return np.where(code == Q8_MAX, np.float32(-np.inf), -x)


def decode(
    encoding: str,
    arrays: dict[str, np.ndarray],
    temperatures: tuple[float, ...] = (),
    draw_temperature: float = 1.0,
) -> tuple[np.ndarray, ...]:
    """(indices sorted by logit, logits, lse, label logit, tail lse) from the stored arrays;
    ``sampled`` adds (drawn classes, their logits, counts, ``logsumexp(l / T)`` per T, the
    logsumexp of ``l / draw_temperature`` over the tail the draws came from)."""
    if encoding == "sampled":
        return _decode_sampled(arrays, temperatures, draw_temperature)
    if encoding == "fp16":
        lse = arrays["lse"]
        return (
            arrays["topk_idx"],
            arrays["topk_logit"],
            lse,
            arrays["label_logit"],
            lse + arrays["log_tail"].astype(np.float32),
        )
    idx = np.cumsum(arrays["topk_idx"].astype(np.int64), axis=-1)
    q = arrays["topk_q"]
    order = np.argsort(q, axis=-1, kind="stable")
    top = arrays["top_logit"].astype(np.float32)
    logit = top[..., None] - np.take_along_axis(q, order, axis=-1).astype(np.float32) * Q8_STEP
    lse = top + arrays["lse_rel"].astype(np.float32)
    label_logit = top - arrays["label_q"].astype(np.float32) * Q8_STEP
    tail_lse = lse + _tail_value(arrays["tail_q"])
    return np.take_along_axis(idx, order, axis=-1), logit, lse, label_logit, tail_lse


def _decode_sampled(
    arrays: dict[str, np.ndarray], temperatures: tuple[float, ...], draw_temperature: float
) -> tuple[np.ndarray, ...]:
    head = decode("q8", arrays)
    top = arrays["top_logit"].astype(np.float32)
    logit = top[..., None] - arrays["sample_q"].astype(np.float32) * Q8_STEP
    temps = np.asarray(temperatures, np.float32)
    if temps.size:
        lse_t = arrays["lse_t"].astype(np.float32) + top[..., None] / temps
    else:
        lse_t = np.zeros(top.shape + (0,), np.float32)
    if draw_temperature != 1.0:
        draw_tail_lse = arrays["draw_tail"].astype(np.float32) + top / np.float32(draw_temperature)
    else:
        draw_tail_lse = head[4].copy()  # drawn from the T=1 tail: its logsumexp is the tail's
    return (*head, arrays["sample_idx"], logit, arrays["sample_count"], lse_t, draw_tail_lse)


def consistency_tolerance(encoding: str, logit: np.ndarray, lse: np.ndarray) -> np.ndarray:
    """How far ``logsumexp(top-k logits, tail_lse)`` of decoded values may be from the decoded
    ``lse`` through rounding alone, per view (``logit`` ``[..., k]``, ``lse`` ``[...]``).

    The logsumexp is a probability-weighted mean of its terms' errors, so it errs by at most the
    largest: fp16 logits ``2^-11 |l|`` (the stored log tail's error is scaled down by the tail
    mass: < 2^-11 / e); q8: 1/32 per logit difference, the log tail's error times the tail mass
    (< 0.012), plus the fp16 rounding of ``lse - top``.
    """
    if HEAD[encoding] == "fp16":
        return FP16_REL * np.maximum(np.abs(logit).max(-1), 1.0) + 1e-4
    return Q8_STEP / 2 + 0.012 + FP16_REL * np.maximum(np.abs(lse - logit[..., 0]), 1.0) + 1e-4


def logit_tolerance(encoding: str, logit: np.ndarray) -> np.ndarray:
    """How far each decoded top-k logit ``[..., k]`` may be from the exact one through rounding
    alone (``inf`` for q8 logits clipped 16 nats below the top)."""
    if HEAD[encoding] == "fp16":
        return FP16_REL * np.maximum(np.abs(logit), 1.0)
    top = logit[..., :1]
    tol = np.broadcast_to(Q8_STEP / 2 + FP16_REL * np.maximum(np.abs(top), 1.0), logit.shape)
    return np.where(logit <= top - (Q8_MAX - 0.5) * Q8_STEP, np.inf, tol)


def log_tail_tolerance(encoding: str, log_tail: np.ndarray) -> np.ndarray:
    """How far a decoded log tail mass (``tail_lse - lse``, ``[...]``) may be from the exact one
    through rounding alone (the bounds in this module's docstring)."""
    x = np.abs(np.nan_to_num(log_tail, neginf=0.0))
    if HEAD[encoding] == "fp16":
        return FP16_REL / 2 * x + 1e-5
    bound = (
        np.sqrt(Q8_TAIL_MAX * x) / 254 + Q8_TAIL_MAX / (4 * 254**2) + 0.01
    )  # + fp16 rounding of lse - top
    return np.where(x >= Q8_TAIL_MAX, np.inf, bound)
