"""Read a kdcache cache with zarr and numpy alone (docs/format.md, implemented): a shard's keys,
labels, mixing weights and each teacher's targets, decoded from any encoding; plain views
re-rendered with torchvision.

    python examples/read_cache_without_kdcache.py CACHE [SHARD_INDEX]

prints, for the shard's first rows, the key, the label and each teacher's top-3 probabilities
at T=1 of view 0. Nothing here imports kdcache: copy it into a project that reads soft labels
made by someone else.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np
import zarr

Q8_STEP = 1.0 / 16  # q8 logits are steps of 1/16 nat below the top logit
Q8_TAIL_MAX = 36.0  # q8 log tail masses are companded over [-36, 0]
NO_CODE = 255  # q8: no tail; Mixup views' CutMix centre; jitter not applied
BOX_STEPS = 255  # boxes and lam in 1/255 steps
CENTER_STEPS = 254  # CutMix centres in 1/254 steps


@dataclass
class Targets:
    """One teacher's decoded targets for ``n`` rows x A views: the top-k sorted by logit
    (descending), their logits, ``lse`` at T=1, the label's logit, ``tail_lse``; sampled
    teachers add their draws (class, logit, count), ``lse_t`` per stored temperature and the
    tail's logsumexp at the draw temperature."""

    idx: np.ndarray
    logit: np.ndarray
    lse: np.ndarray
    label_logit: np.ndarray
    tail_lse: np.ndarray
    sample_idx: np.ndarray | None = None
    sample_logit: np.ndarray | None = None
    sample_count: np.ndarray | None = None
    lse_t: np.ndarray | None = None
    draw_tail_lse: np.ndarray | None = None

    def probs_t1(self) -> np.ndarray:
        """The top-k probabilities at T=1, exact up to the stored rounding."""
        return np.exp(self.logit - self.lse[..., None])

    def tail_mass_t1(self) -> np.ndarray:
        return np.exp(self.tail_lse - self.lse)


def shard_rows(cache: zarr.Group, shard: int) -> slice:
    """The rows of input shard ``shard`` (one chunk of every per-row array)."""
    per_shard = int(cache.attrs["rows_per_shard"])
    return slice(shard * per_shard, (shard + 1) * per_shard)


def valid_rows(cache: zarr.Group, rows: slice) -> np.ndarray:
    """Row indices (within ``rows``) that hold a sample: status 1."""
    return np.flatnonzero(np.asarray(cache["status"][rows]) == 1)


def teacher_targets(cache: zarr.Group, teacher: str, rows: slice) -> Targets:
    """Decode ``teachers/<teacher>`` for ``rows``, whatever its encoding."""
    group = cache[f"teachers/{teacher}"]
    encoding = group.attrs.get("encoding", "fp16")
    read = {name: np.asarray(group[name][rows]) for name in _arrays(group)}
    if encoding == "fp16":
        lse = read["lse"].astype(np.float32)
        tail = lse + read["log_tail"].astype(np.float32)
        logit = read["topk_logit"].astype(np.float32)
        return Targets(read["topk_idx"], logit, lse, read["label_logit"], tail)
    head = _decode_q8(read)
    if encoding == "q8":
        return head
    return _decode_draws(group, read, head)


def _arrays(group: zarr.Group) -> list[str]:
    return [name for name in group.array_keys() if not name.startswith("done")]


def _decode_q8(read: dict[str, np.ndarray]) -> Targets:
    """q8: indices as ascending gaps, logits as 1/16-nat steps below the top, companded tail."""
    idx = np.cumsum(read["topk_idx"].astype(np.int64), axis=-1)
    order = np.argsort(read["topk_q"], axis=-1, kind="stable")  # by logit, descending
    top = read["top_logit"].astype(np.float32)
    steps = np.take_along_axis(read["topk_q"], order, axis=-1).astype(np.float32)
    logit = top[..., None] - steps * Q8_STEP
    lse = top + read["lse_rel"].astype(np.float32)
    label_logit = top - read["label_q"].astype(np.float32) * Q8_STEP
    code = read["tail_q"]
    log_tail = -Q8_TAIL_MAX * (code.astype(np.float32) / 254) ** 2
    log_tail = np.where(code == NO_CODE, np.float32(-np.inf), log_tail)
    sorted_idx = np.take_along_axis(idx, order, axis=-1)
    return Targets(sorted_idx, logit, lse, label_logit, lse + log_tail)


def _decode_draws(group: zarr.Group, read: dict[str, np.ndarray], head: Targets) -> Targets:
    """sampled: the q8 head plus the draws and the stored normalisers."""
    top = read["top_logit"].astype(np.float32)
    head.sample_idx = read["sample_idx"]
    head.sample_count = read["sample_count"]
    head.sample_logit = top[..., None] - read["sample_q"].astype(np.float32) * Q8_STEP
    temperatures = np.asarray(group.attrs.get("sample_temperatures", []), np.float32)
    if temperatures.size:
        head.lse_t = read["lse_t"].astype(np.float32) + top[..., None] / temperatures
    tau = float(group.attrs.get("draw_temperature", 1.0))
    if tau != 1.0:
        head.draw_tail_lse = read["draw_tail"].astype(np.float32) + top / np.float32(tau)
    else:
        head.draw_tail_lse = head.tail_lse.copy()  # drawn from the T=1 tail
    return head


def own_label_weight(cache: zarr.Group, rows: slice) -> np.ndarray:
    """``[n, A]``: the weight of each view's own label (1 unless mixed; Mixup's lam; one minus
    CutMix's clipped box area)."""
    views = cache["views"]
    names = set(views.array_keys())
    if "mix_partner" not in names:
        return np.ones((rows.stop - rows.start, int(cache.attrs["num_views"])))
    partner = np.asarray(views["mix_partner"][rows])
    lam = np.asarray(views["mix_lam"][rows]).astype(np.float64)
    weight = np.where(partner != 0, lam / BOX_STEPS, 1.0)
    if "mix_center" in names:
        center = np.asarray(views["mix_center"][rows])
        cutmix = (partner != 0) & (center[..., 0] != NO_CODE)
        box = cutmix_boxes(center, lam)
        weight = np.where(cutmix, 1.0 - box[..., 2] * box[..., 3] / BOX_STEPS**2, weight)
    return weight


def cutmix_boxes(center: np.ndarray, lam_code: np.ndarray) -> np.ndarray:
    """``(top, left, height, width)`` in 1/255 of the side: the square of side sqrt(1 - lam)
    around the centre, clipped to the image."""
    side = np.sqrt(1.0 - np.asarray(lam_code, np.float64) / BOX_STEPS)[..., None]
    mid = np.asarray(center, np.float64) / CENTER_STEPS
    low = np.rint(np.clip(mid - side / 2, 0.0, 1.0) * BOX_STEPS).astype(np.int64)
    high = np.rint(np.clip(mid + side / 2, 0.0, 1.0) * BOX_STEPS).astype(np.int64)
    return np.concatenate([low, high - low], axis=-1)


def render_plain_view(image, cache: zarr.Group, row: int, view: int, rendering: dict):
    """The uint8 ``[C, size, size]`` pixels of an unmixed view of a recipe without strong ops
    (crop, resize, flip), from the decoded ``uint8[C, H, W]`` source image (a torch tensor)."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    top, left, height, width = (int(v) for v in cache["views/crop"][row, view])
    size = [int(rendering["size"]), int(rendering["size"])]
    mode = InterpolationMode(rendering.get("interpolation", "bilinear"))
    out = F.resized_crop(image, top, left, height, width, size, interpolation=mode, antialias=True)
    return F.horizontal_flip(out) if int(cache["views/flip"][row, view]) else out


def main(path: str, shard: int = 0) -> None:
    cache = zarr.open_group(path, mode="r")
    rows = shard_rows(cache, shard)
    keys = np.asarray(cache["keys"][rows])
    labels = np.asarray(cache["labels"][rows])
    teachers = sorted(cache["teachers"].group_keys())
    decoded = {name: teacher_targets(cache, name, rows) for name in teachers}
    for row in valid_rows(cache, rows)[:5]:
        parts = [f"{keys[row]} (label {labels[row]})"]
        for name, t in decoded.items():
            top3 = ", ".join(
                f"{int(c)}: {p:.3f}"
                for c, p in zip(t.idx[row, 0, :3], t.probs_t1()[row, 0, :3], strict=True)
            )
            parts.append(f"{name} [{top3}]")
        print("  ".join(parts))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 0)
