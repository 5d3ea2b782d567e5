"""How a teacher's top-k targets are laid out on disk: ``fp16`` (plain) and ``q8`` (compact).

Both decode to the same in-memory form: indices sorted by logit (descending), float32 logits,
logsumexp and label logit (see :class:`cache_tools.reader.TeacherBlock`).

``fp16``: ``topk_idx`` uint16/int32, ``topk_logit`` fp16, ``lse`` fp32, ``label_logit`` fp32.

``q8`` (~21 B/view at k=10, C=1000): probabilities depend only on logit *differences*, so
``q8`` stores the top logit (fp16), every top-k logit as ``uint8`` steps of ``Q8_STEP`` below the
top, the logsumexp relative to the top (fp16) and the label's logit in steps below the top. The
indices are stored in ascending order as gaps (small numbers that compress well) and re-sorted by
logit on decoding. Error bound: every logit difference is within ``Q8_STEP / 2`` (1/32 nat) of
the exact one, so each log-probability moves by at most 1/32 + the fp16 error of ``lse - top``;
logits more than ``255 * Q8_STEP`` (≈16 nats, a probability ratio of 1e-7) below the top are
clipped there.
"""

from __future__ import annotations

import numpy as np

ENCODINGS = ("fp16", "q8")
Q8_STEP = 1.0 / 16
Q8_MAX = 255

# name -> (dtype or "index", has the k axis, fill value)
_SPECS: dict[str, dict[str, tuple[str, bool, float]]] = {
    "fp16": {
        "topk_idx": ("index", True, 0), "topk_logit": ("float16", True, 0),
        "lse": ("float32", False, 0), "label_logit": ("float32", False, 0),
    },
    "q8": {
        "topk_idx": ("index", True, 0), "topk_q": ("uint8", True, 0), "top_logit": ("float16", False, 0),
        "lse_rel": ("float16", False, 0), "label_q": ("uint8", False, Q8_MAX),
    },
}


def array_specs(encoding: str, index_dtype: str) -> dict[str, tuple[str, bool, float]]:
    """The arrays of ``encoding``: name -> (dtype, has the k axis, fill value)."""
    return {name: (index_dtype if dtype == "index" else dtype, has_k, fill)
            for name, (dtype, has_k, fill) in _SPECS[encoding].items()}


def encode(encoding: str, idx: np.ndarray, logit: np.ndarray, lse: np.ndarray, label_logit: np.ndarray) -> dict[str, np.ndarray]:
    """Arrays to store, from top-k indices/logits ``[..., k]`` (sorted by logit) and ``[...]`` scalars."""
    if encoding == "fp16":
        return {"topk_idx": idx, "topk_logit": logit.astype(np.float16), "lse": lse.astype(np.float32),
                "label_logit": label_logit.astype(np.float32)}
    top = logit[..., :1].astype(np.float32)
    order = np.argsort(idx, axis=-1, kind="stable")
    idx_sorted = np.take_along_axis(idx.astype(np.int64), order, axis=-1)
    gaps = np.diff(idx_sorted, axis=-1, prepend=0)
    q = _steps_below(top, np.take_along_axis(logit.astype(np.float32), order, axis=-1))
    return {
        "topk_idx": gaps, "topk_q": q, "top_logit": top[..., 0].astype(np.float16),
        "lse_rel": (lse - top[..., 0]).astype(np.float16), "label_q": _steps_below(top[..., 0], label_logit),
    }


def _steps_below(top: np.ndarray, values: np.ndarray) -> np.ndarray:
    steps = np.rint((top - values.astype(np.float32)) / Q8_STEP)
    return np.clip(np.nan_to_num(steps, nan=Q8_MAX), 0, Q8_MAX).astype(np.uint8)


def decode(encoding: str, arrays: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(indices sorted by logit, float32 logits, lse, label logit) from the stored arrays."""
    if encoding == "fp16":
        return arrays["topk_idx"], arrays["topk_logit"], arrays["lse"], arrays["label_logit"]
    idx = np.cumsum(arrays["topk_idx"].astype(np.int64), axis=-1)
    q = arrays["topk_q"]
    order = np.argsort(q, axis=-1, kind="stable")
    top = arrays["top_logit"].astype(np.float32)
    logit = top[..., None] - np.take_along_axis(q, order, axis=-1).astype(np.float32) * Q8_STEP
    lse = top + arrays["lse_rel"].astype(np.float32)
    label_logit = top - arrays["label_q"].astype(np.float32) * Q8_STEP
    return np.take_along_axis(idx, order, axis=-1), logit, lse, label_logit
