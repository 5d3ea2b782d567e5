"""``grad_cos`` of ``kdcache bench cache``: how close the KD gradient of sparse targets comes to the
full distribution's, top-k against sampled targets at equal bytes per view.

The caches are written by the real writer and read back (so the encodings' rounding counts):
``q8`` at the largest k whose stored layout fits the budget, ``sampled`` (its top-1 plus the
largest number of draws that fits, drawn from the T=1 tail, with ``logsumexp(l / T)`` stored at
the KD temperature) and ``sampled_tau`` (the same, drawn from the tail at τ = the KD temperature,
``draw_temperature``: the tail's logsumexp at τ takes the place of the stored ``logsumexp``).
Bytes are the layout's bytes per view before compression (what the arrays hold; on disk, blosc
shrinks both, the sampled cache's empty slots most, and the on-disk bytes are reported too).

The gradient is the KD term's (``alpha = 1``, ``T^2 KL``) with respect to the student's logits,
through :class:`kdcache.train.losses.Criterion`, on the bench's teacher logits with a student
``0.5 * teacher + N(0, 1)`` (:data:`STUDENT`). Three figures per target and temperature:

- ``view`` (the headline ``grad_cos``): the mean over views of the cosine between a view's
  sparse-target gradient and its full-distribution gradient: what one step sees of one view.
- ``batch``: the cosine of the gradients summed over batches of 256 views (the gradient of a
  logit bias the views share), averaged over batches: per-view noise averages out there, bias
  does not.
- ``mean_of_draws``: sampled targets only, the per-view cosine of the gradient averaged over
  ``DRAWS`` independent draws of the same views (in memory, exact values): it tends to 1 as the
  draws grow, because the estimate is unbiased; a top-k gradient has no draws to average and
  keeps its ``view`` figure.

``sampled`` is the unbiased estimate (the normaliser stored at the KD temperature);
``sampled_sn`` the same draws self-normalised (what a temperature left out of
``sample_temperatures`` gets: each view's estimate sums to 1). Per view both point the same way
(the normalisation scales a view's gradient); summed over views, the unbiased one is dominated by
the few views whose importance weights are huge. ``sampled_tau`` is unbiased at T=1 and at τ; at
T = τ it has no importance weights (each drawn class: its share of the draws times the exact
tail mass at τ), at T=1 its weights are ``p_1(x) / p_τ(x)``.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from kdcache.cache.reader import read_block
from kdcache.cache.writer import index_dtype
from kdcache.targets.encoding import array_shapes
from kdcache.targets.sampling import sampled_from_logits, uniforms
from kdcache.targets.sparse import SampledTargets, SparseTargets, from_logits, targets_from_arrays
from kdcache.train.config import KDLossConfig
from kdcache.train.losses import Criterion

STUDENT = {"scale": 0.5, "noise_std": 1.0, "seed": 1234}
"""The student's logits: ``scale * teacher + N(0, noise_std)``."""
BATCH = 256
DRAWS = 32
DRAW_VIEWS = 2000
"""Views of the ``mean_of_draws`` figure (the first ones of the first shard)."""


def layout_bytes(
    encoding: str,
    classes: int,
    k: int,
    slots: int = 0,
    temperatures: int = 0,
    draw_tail: bool = False,
) -> int:
    """Bytes per view of a teacher's stored arrays before compression (``draw_tail``: drawn at
    a temperature other than 1)."""
    shapes = array_shapes(encoding, index_dtype(classes), k, slots, temperatures, draw_tail)
    return sum(np.dtype(d).itemsize * int(np.prod(shape)) for d, shape, _ in shapes.values())


def fit_budget(budget: int, classes: int) -> tuple[int, int]:
    """(the q8 top-k's k, the sampled teacher's draws) that fit ``budget`` bytes per view."""
    k = max(
        (j for j in range(1, classes + 1) if layout_bytes("q8", classes, j) <= budget), default=1
    )
    return k, fit_draws(budget, classes, temperatures=1)


def fit_draws(budget: int, classes: int, temperatures: int = 0, draw_tail: bool = False) -> int:
    """The most draws of a top-1 sampled teacher (``temperatures`` stored, ``draw_tail``: drawn
    at a temperature other than 1) that fit ``budget`` bytes per view."""
    return max(
        (
            s
            for s in range(1, 256)
            if layout_bytes("sampled", classes, 1, s, temperatures, draw_tail) <= budget
        ),
        default=1,
    )


def sampled_targets(
    z: np.ndarray,
    y: np.ndarray,
    keys: list[str],
    draws: int,
    temperatures: list[float],
    seed: int = 0,
    draw_temperature: float = 1.0,
) -> SampledTargets:
    """A shard's sampled targets as precompute makes them (top-1, ``draws`` draws at
    ``draw_temperature``, ``logsumexp`` at ``temperatures``)."""
    n, views, classes = z.shape
    flat_keys = [key for key in keys for _ in range(views)]
    flat_views = [a for _ in keys for a in range(views)]
    u = uniforms(seed, flat_keys, flat_views, "teacher", draws)
    logits = torch.from_numpy(z.reshape(-1, classes))
    labels = torch.from_numpy(y).repeat_interleave(views)
    return sampled_from_logits(logits, labels, 1, u, temperatures, draw_temperature)


@dataclasses.dataclass(frozen=True)
class SampledSetting:
    """How one sampled row's teacher draws: how many, the stored ``logsumexp`` temperatures and
    the draw temperature."""

    draws: int
    temperatures: tuple[float, ...] = ()
    draw_temperature: float = 1.0

    def targets(self, z, y, keys, seed: int = 0) -> SampledTargets:
        return sampled_targets(
            z, y, keys, self.draws, list(self.temperatures), seed, self.draw_temperature
        )

    def teacher(self) -> dict[str, Any]:
        """:class:`~kdcache.cache.store.TeacherSpec`'s sampling fields."""
        return {
            "samples": self.draws,
            "sample_temperatures": self.temperatures,
            "draw_temperature": self.draw_temperature,
        }

    def layout_bytes(self, classes: int) -> int:
        n = len(self.temperatures)
        return layout_bytes("sampled", classes, 1, self.draws, n, self.draw_temperature != 1.0)


def read_targets(store) -> SparseTargets:
    """The first shard's stored targets, flattened to ``[n * A, ...]``."""
    tb = read_block(store, 0, ["teacher"]).teachers["teacher"]
    n = tb.lse.size
    return targets_from_arrays(
        [np.ascontiguousarray(x.reshape(n, *x.shape[2:])) for x in tb.fields()]
    )


def kd_gradient(
    targets, student: torch.Tensor, labels, classes: int, temperature: float, tail: str
):
    """``d (T^2 KL) / d student logits`` per view ``[V, C]``, through the real loss."""
    z = student.clone().requires_grad_(True)
    cfg = KDLossConfig(alpha=1.0, temperature=temperature, tail=tail)
    Criterion(cfg, classes)(z, labels, targets, epoch=0).total.backward()
    return z.grad.double() * len(z)  # the loss is a mean over views


def cosines(g: torch.Tensor, full: torch.Tensor) -> dict[str, float]:
    cos = torch.nn.functional.cosine_similarity
    batches = [
        float(cos(g[i : i + BATCH].sum(0), full[i : i + BATCH].sum(0), dim=0))
        for i in range(0, len(g), BATCH)
    ]
    return {"view": float(cos(g, full, dim=1).mean()), "batch": float(np.mean(batches))}


def grad_cos(
    args: argparse.Namespace,
    data: list[tuple[np.ndarray, np.ndarray]],
    write: Callable[..., Any],
    keys: list[list[str]],
) -> dict[str, Any]:
    """The ``grad_cos`` result (see the module docstring). ``write(encoding, k, exact, name,
    **teacher)`` writes a cache through the real writer and returns it."""
    classes = args.classes
    kd_t = args.kd_temperature
    k, draws = fit_budget(args.budget, classes)
    settings = {
        "sampled": SampledSetting(draws, (kd_t,)),
        "sampled_tau": SampledSetting(
            fit_draws(args.budget, classes, draw_tail=True), draw_temperature=kd_t
        ),
    }
    labels_of = [torch.from_numpy(y).repeat_interleave(args.views) for _, y in data]
    exact = [
        from_logits(torch.from_numpy(z.reshape(-1, classes)), labels, k)
        for (z, _), labels in zip(data, labels_of, strict=True)
    ]
    stores = {"topk": write("q8", k, exact, f"grad-q8-k{k}")}
    for name, setting in settings.items():
        shards = [setting.targets(z, y, ks) for (z, y), ks in zip(data, keys, strict=True)]
        stores[name] = write(
            "sampled", 1, shards, f"grad-{name}-s{setting.draws}", **setting.teacher()
        )
    z0 = torch.from_numpy(data[0][0].reshape(-1, classes))
    labels = labels_of[0]
    student = student_logits(z0)
    stored = {name: read_targets(store) for name, store in stores.items()}
    stored["sampled_sn"] = self_normalised(stored["sampled"])
    tails = {"topk": "spread", "topk_renorm": "renorm"}
    result: dict[str, Any] = {}
    detail: dict[str, Any] = {}
    for t in sorted({args.temperature, kd_t}):
        full = kd_gradient(from_logits(z0, labels, classes), student, labels, classes, t, "spread")
        figures = {}
        for name in ("topk", "topk_renorm", "sampled", "sampled_sn", "sampled_tau"):
            targets = stored[name.removesuffix("_renorm")]
            g = kd_gradient(targets, student, labels, classes, t, tails.get(name, "sample"))
            figures[name] = cosines(g, full)
        for name, setting, normalise in (
            ("sampled", settings["sampled"], False),
            ("sampled_sn", settings["sampled"], True),
            ("sampled_tau", settings["sampled_tau"], False),
        ):
            figures[name]["mean_of_draws"] = mean_of_draws(
                data[0], keys[0], student, setting, t, normalise=normalise
            )
        result[f"T={t:g}"] = {name: f["view"] for name, f in figures.items()}
        detail[f"T={t:g}"] = figures
    return {
        "grad_cos": result,
        "grad_cos_detail": {
            "budget_bytes_per_view": args.budget,
            "topk": {"encoding": "q8", "k": k, "layout_bytes": layout_bytes("q8", classes, k)},
            **{
                name: {
                    "encoding": "sampled",
                    "k": 1,
                    "draws": setting.draws,
                    "sample_temperatures": list(setting.temperatures),
                    "draw_temperature": setting.draw_temperature,
                    "layout_bytes": setting.layout_bytes(classes),
                }
                for name, setting in settings.items()
            },
            "disk_bytes_per_view": {
                name: disk_bytes(store, args) for name, store in stores.items()
            },
            "student": STUDENT,
            "views": int(len(z0)),
            "figures": detail,
        },
    }


def self_normalised(t: SampledTargets) -> SampledTargets:
    """The same draws without their stored normalisers: every T but 1 is then self-normalised."""
    return dataclasses.replace(t, lse_t=t.lse_t[:, :0], temperatures=t.temperatures[:, :0])


def student_logits(teacher: torch.Tensor) -> torch.Tensor:
    g = torch.Generator().manual_seed(STUDENT["seed"])
    noise = torch.randn(teacher.shape, generator=g) * STUDENT["noise_std"]
    return STUDENT["scale"] * teacher + noise


def mean_of_draws(
    shard: tuple[np.ndarray, np.ndarray],
    keys: list[str],
    student: torch.Tensor,
    setting: SampledSetting,
    temperature: float,
    normalise: bool = False,
) -> float:
    """Per-view cosine of the sampled gradient averaged over ``DRAWS`` independent draws
    (``normalise``: of the self-normalised estimate)."""
    z, y = shard
    rows = max(1, DRAW_VIEWS // z.shape[1])
    z = z[:rows]
    classes = z.shape[-1]
    logits = torch.from_numpy(z.reshape(-1, classes))
    labels = torch.from_numpy(y[:rows]).repeat_interleave(z.shape[1])
    s = student[: len(logits)]
    full = kd_gradient(
        from_logits(logits, labels, classes), s, labels, classes, temperature, "spread"
    )
    total = torch.zeros_like(full)
    for seed in range(DRAWS):
        t = setting.targets(z, y[:rows], keys[:rows], seed=seed + 1)
        t = self_normalised(t) if normalise else t
        total += kd_gradient(t, s, labels, classes, temperature, "sample")
    return float(torch.nn.functional.cosine_similarity(total / DRAWS, full, dim=1).mean())


def disk_bytes(store, args: argparse.Namespace) -> float:
    """Bytes of the teacher's chunk files per view (blosc-zstd), as the size table reports."""
    from benchmarks.cache_bench import array_bytes

    views = args.shards * args.samples * args.views
    group = store.teacher_group("teacher")
    names = [n for n in group.array_keys() if n != "done"]
    return sum(array_bytes(store, f"teachers/teacher/{n}") for n in names) / views


def format_grad_cos(result: dict[str, Any], table: Callable[..., str]) -> str:
    d = result["grad_cos_detail"]
    top = d["topk"]
    disk = d["disk_bytes_per_view"]
    rows = []
    for t, figures in d["figures"].items():
        for name, f in figures.items():
            rows.append([t, name, f["view"], f["batch"], f.get("mean_of_draws", float("nan"))])
    sampled = ", ".join(
        f"{name} top-1 + {d[name]['draws']} draws at T={d[name]['draw_temperature']:g} "
        f"({d[name]['layout_bytes']} B, {disk[name]:.1f} on disk)"
        for name in ("sampled", "sampled_tau")
    )
    head = (
        f"KD gradient vs the full distribution's, at {d['budget_bytes_per_view']} B/view "
        f"(layout): top-k q8 k={top['k']} ({top['layout_bytes']} B, {disk['topk']:.1f} on disk), "
        f"{sampled}; student 0.5 x teacher + N(0, 1), {d['views']} views"
    )
    body = table(
        ["T", "targets", "cos per view", "cos of batch sums", f"cos, mean of {DRAWS} draws"],
        rows,
    )
    return head + "\n" + body
