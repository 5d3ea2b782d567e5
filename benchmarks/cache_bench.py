"""``kdcache bench cache``: bytes per view, block read speed and reconstruction error per encoding
and k.

Caches of ``--shards`` x ``--samples`` samples x A views, C = 1000 classes, are written with the
real writer (``create_store`` / ``write_views`` / ``add_teacher`` / ``write_targets``) for each
encoding (``fp16``, ``q8``) and k, and read back with :func:`~kdcache.cache.reader.read_block`.

**Teacher logits** (no ImageNet teacher can be run here): a documented generator of peaked,
long-tailed logits with the structure that matters for compression (:func:`teacher_logits`).
Its statistics (mean top-1 probability, entropy, top-k mass, accuracy) are reported with the
results so they can be compared with a real teacher's (``kdcache inspect`` prints the same).

**Sizes** are the bytes of each array's chunk files on disk (blosc-zstd level 5 + shuffle), per
view; view parameters and per-sample arrays are shared by all teachers and reported apart.
**Read speed** is views per wall second and per CPU second (all threads) of ``read_block`` over
every shard, the encodings interleaved round by round. **Error**: the decoded targets against
the fp32 top-k they were made from, as dense distributions at T: with the top-k renormalised
(tail ``renorm``; the headline ``kl_k10``, as ``tests/targets/test_encoding.py`` measures
it) and with the tail mass spread over the other classes (tail ``spread``): max |Δp| over all
classes and views, the mean KL(fp32 ‖ decoded), and the largest error of the T=1 tail mass.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import machine, rotated, table, target_divergence
from benchmarks.grad_cos import format_grad_cos, grad_cos
from kdcache.cache.reader import read_block
from kdcache.cache.store import STATUS_VALID, CacheStore, Fingerprint, TeacherSpec
from kdcache.cache.writer import add_teacher, create_store, write_targets, write_views
from kdcache.targets.sparse import MixedLabels, SparseTargets, from_logits, tail_mass_t1, truncate
from kdcache.views.augment import ErasingConfig, JitterConfig, MixConfig
from kdcache.views.recipe import ViewParams, ViewRecipe, draw_group, grouped

ENCODINGS = ("fp16", "q8")
GENERATOR = {
    "tail_std": 1.5,
    "view_std": 0.5,
    "confusable": 10,
    "confusable_boost_mean": 3.0,
    "near_window": 40,
    "near_fraction": 0.7,
    "top_boost": (12.0, 20.0),
    "accuracy": 0.8,
    "view_scale": (0.5, 1.0),
}
"""Parameters of :func:`teacher_logits` (recorded in the results)."""
STRONG = {"policy": "rand-m9-mstd0.5", "erasing": ErasingConfig(prob=0.25)}
RECIPES = {
    "crop": ViewRecipe(),
    "b2": ViewRecipe(**STRONG),
    "b3": ViewRecipe(
        **STRONG,
        color_jitter=JitterConfig(brightness=0.4, contrast=0.4, saturation=0.4),
        mix=MixConfig(mixup_alpha=0.8, cutmix_alpha=1.0),
    ),
}
"""DIST's training strategies (paper 001, Table 1) as view recipes: B1 = crop + flip; B2 = B1 +
RandAugment (timm ``rand-m9-mstd0.5``) + random erasing (0.25, DeiT's); B3 = B2 + colour jitter
(0.4) + Mixup (0.8) / CutMix (1.0) as DeiT runs them."""
RECIPE_K = 10
RECIPE_ENCODING = "q8"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out", type=Path, default=Path("runs/bench/cache"), help="where the caches are written"
    )
    parser.add_argument("--shards", type=int, default=4, help="shards (default 4)")
    parser.add_argument(
        "--samples", type=int, default=2000, help="samples per shard (default 2000)"
    )
    parser.add_argument(
        "--views", type=int, default=4, help="A, views per sample (default 4: 8000 views a block)"
    )
    parser.add_argument("--classes", type=int, default=1000, help="C (default 1000)")
    parser.add_argument(
        "--ks", default="5,10,20", help="comma-separated k values (default 5,10,20)"
    )
    parser.add_argument(
        "--reads", type=int, default=5, help="read rounds over every shard (default 5)"
    )
    parser.add_argument(
        "--temperature", type=float, default=1.0, help="T of the headline error (default 1)"
    )
    parser.add_argument(
        "--kd-temperature",
        type=float,
        default=4.0,
        help="a second T for the error (default 4, KD's)",
    )
    parser.add_argument(
        "--budget",
        type=int,
        default=24,
        help="bytes per view (layout) of the grad_cos comparison, top-k vs sampled (default 24)",
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes (tests)")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Write one cache per (encoding, k), measure sizes, reads and errors; return the results."""
    if args.quick:
        args.shards = 2
        args.samples = 100
        args.views = 2
        args.reads = 1
    ks = [int(k) for k in str(args.ks).split(",")]
    data = [
        teacher_logits(args.samples, args.views, args.classes, seed=s) for s in range(args.shards)
    ]
    exact = [
        from_logits(
            torch.from_numpy(z.reshape(-1, args.classes)),
            torch.from_numpy(y).repeat_interleave(args.views),
            max(ks),
        )
        for z, y in data
    ]
    stores = {
        (enc, k): write_cache(args, enc, k, exact, [y for _, y in data])
        for enc in ENCODINGS
        for k in ks
    }
    reads = read_rounds(stores, args.reads)
    views = args.shards * args.samples * args.views
    temperatures = (args.temperature, args.kd_temperature)
    rows = [
        measure(store, enc, k, exact, views, reads[(enc, k)], temperatures)
        for (enc, k), store in stores.items()
    ]
    shared = shared_bytes(next(iter(stores.values())), views)
    recipes = {name: recipe_bytes(args, name, recipe, data) for name, recipe in RECIPES.items()}
    labels = [y for _, y in data]

    def write(encoding: str, k: int, targets: list, name: str, **teacher) -> CacheStore:
        return write_cache(args, encoding, k, targets, labels, name=name, **teacher)

    gradients = grad_cos(args, data, write, bench_keys(args))
    return summarise(args, rows, shared, logit_stats(data, args.classes), recipes) | gradients


# ---- teacher-like logits -------------------------------------------------------------------------


def teacher_logits(n: int, views: int, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``float32[n, views, classes]`` logits and ``int64[n]`` labels of a peaked, long-tailed
    teacher.

    Every logit is ``N(0, 1.5)`` per sample plus ``N(0, 0.5)`` per view (the long tail). Each sample
    has 10 confusable classes, 70% of them within ±40 ids of its label (ImageNet's class order puts
    similar classes together), boosted by ``Exp(mean 3)``; its top class (the label with
    probability 0.8, else its first confusable class) is boosted by ``U(12, 20)``. Each view scales
    the boosts by ``U(0.5, 1)`` (a small crop makes the teacher less sure). See :data:`GENERATOR`.
    """
    g = GENERATOR
    rng = np.random.default_rng(seed)
    labels = rng.integers(classes, size=n)
    z = rng.normal(0, g["tail_std"], (n, 1, classes)) + rng.normal(
        0, g["view_std"], (n, views, classes)
    )
    m = g["confusable"]
    near = (
        labels[:, None] + rng.integers(-g["near_window"], g["near_window"] + 1, (n, m))
    ) % classes
    confusable = np.where(
        rng.random((n, m)) < g["near_fraction"], near, rng.integers(classes, size=(n, m))
    )
    boost = np.zeros((n, classes))
    np.put_along_axis(boost, confusable, rng.exponential(g["confusable_boost_mean"], (n, m)), 1)
    top = np.where(rng.random(n) < g["accuracy"], labels, confusable[:, 0])
    boost[np.arange(n), top] = rng.uniform(*g["top_boost"], n)
    scale = rng.uniform(*g["view_scale"], (n, views, 1))
    return (z + scale * boost[:, None, :]).astype(np.float32), labels


def logit_stats(data: list[tuple[np.ndarray, np.ndarray]], classes: int) -> dict[str, float]:
    """Mean top-1 probability, entropy (nats), top-5/10/20 mass and top-1 accuracy of the generated
    logits."""
    z, y = data[0]
    p = torch.softmax(torch.from_numpy(z.reshape(-1, classes)), dim=-1)
    top = p.topk(20, dim=-1).values
    labels = torch.from_numpy(y).repeat_interleave(z.shape[1])
    return {
        "top1_prob": float(top[:, 0].mean()),
        "entropy_nats": float(-(torch.xlogy(p, p)).sum(-1).mean()),
        "top5_mass": float(top[:, :5].sum(-1).mean()),
        "top10_mass": float(top[:, :10].sum(-1).mean()),
        "top20_mass": float(top.sum(-1).mean()),
        "accuracy": float((p.argmax(-1) == labels).float().mean()),
    }


# ---- writing -------------------------------------------------------------------------------------


def write_cache(
    args: argparse.Namespace,
    encoding: str,
    k: int,
    exact: list[SparseTargets],
    labels: list[np.ndarray],
    recipe: ViewRecipe | None = None,
    params: list[ViewParams] | None = None,
    name: str | None = None,
    **teacher: Any,
) -> CacheStore:
    """A complete cache of one teacher (views + targets) through the real writer (``teacher``:
    more fields of :class:`~kdcache.cache.store.TeacherSpec`, e.g. ``samples``)."""
    recipe = recipe or ViewRecipe()
    path = args.out / (name or f"{encoding}-k{k}")
    shutil.rmtree(path, ignore_errors=True)
    keys = bench_keys(args)
    fingerprint = Fingerprint(
        shards=[f"train-{s:06d}.tar" for s in range(args.shards)],
        counts=[args.samples] * args.shards,
        key_digest="bench",
    )
    store = create_store(
        str(path),
        fingerprint=fingerprint,
        keys=keys,
        recipe=recipe,
        num_views=args.views,
        num_classes=args.classes,
        class_names=[],
        seed=0,
        config={"bench": "cache"},
    )
    add_teacher(
        store,
        TeacherSpec(
            name="teacher",
            model={"name": "generator"},
            weights_digest="bench",
            k=k,
            rendering=recipe.rendering(),
            encoding=encoding,
            **teacher,
        ),
    )
    params = params or [
        imagenet_like_params(recipe, keys[s], args.views, seed=s) for s in range(args.shards)
    ]
    for s, (t, y) in enumerate(zip(exact, labels, strict=True)):
        write_views(
            store,
            s,
            labels=y,
            status=np.full(args.samples, STATUS_VALID),
            errors=[""] * args.samples,
            params=params[s],
        )
        write_targets(store, s, "teacher", truncate(t, k))
    return store


def bench_keys(args: argparse.Namespace) -> list[list[str]]:
    return [[f"s{s:03d}_{i:06d}" for i in range(args.samples)] for s in range(args.shards)]


def imagenet_like_params(recipe: ViewRecipe, keys: list[str], views: int, seed: int) -> ViewParams:
    """Stored parameters of every view of images of ImageNet-like sizes (sides 300..500), drawn
    as precompute draws them (mixing partners within each group of the shard)."""
    rng = np.random.default_rng(1000 + seed)
    sizes = rng.integers(300, 501, (len(keys), 2))
    params = ViewParams.empty(recipe, len(keys), views)
    hw = {row: (int(h), int(w)) for row, (h, w) in enumerate(sizes)}
    for _, group in grouped(range(len(keys)), recipe.group_size):
        draw_group(params, recipe, 0, group, dict(enumerate(keys)), hw)
    return params


def recipe_bytes(
    args: argparse.Namespace, name: str, recipe: ViewRecipe, data: list
) -> dict[str, float]:
    """Bytes on disk per view of a whole cache (views, per-sample arrays and one teacher at
    k=10, q8) made with ``recipe``. A mixed view's logits are the log of the mixture of its two
    images' distributions by lam (how a teacher answers a Mixup image, roughly): two peaks."""
    keys = bench_keys(args)
    params = [imagenet_like_params(recipe, keys[s], args.views, seed=s) for s in range(args.shards)]
    exact = []
    for (z, y), p in zip(data, params, strict=True):
        logits, labels = mixed_logits(torch.from_numpy(z), torch.from_numpy(y), p)
        exact.append(from_logits(logits, labels, RECIPE_K))
    store = write_cache(
        args,
        RECIPE_ENCODING,
        RECIPE_K,
        exact,
        [y for _, y in data],
        recipe,
        params,
        f"recipe-{name}",
    )
    views = args.shards * args.samples * args.views
    files = [p for p in Path(store.path).rglob("*") if p.is_file()]
    total = sum(p.stat().st_size for p in files)
    # zarr.json files are a fixed cost (a few KB per array), whatever the cache's size.
    metadata = sum(p.stat().st_size for p in files if p.name == "zarr.json")
    return {
        "bytes_per_view": total / views,
        "chunk_bytes_per_view": (total - metadata) / views,
        "views": float(views),
    }


def mixed_logits(
    z: torch.Tensor, labels: torch.Tensor, params: ViewParams
) -> tuple[torch.Tensor, MixedLabels]:
    """Flat ``[n * A, C]`` logits with every mixed view's replaced by the log of the lam-mixture
    of its own and its partner's distributions, and the views' mixed labels."""
    n, views, classes = z.shape
    rows = np.repeat(np.arange(n), views)
    view = np.tile(np.arange(views), n)
    partner, lam = params.mixing(rows, view)
    log_p = torch.log_softmax(z.reshape(-1, classes).double(), dim=-1)
    other = log_p[torch.from_numpy(partner * views + view)]
    weight = torch.from_numpy(lam).double().unsqueeze(1)
    mixed = torch.logaddexp(log_p + weight.log(), other + (1 - weight).log())
    mixed = torch.where(weight < 1, mixed, log_p).float()
    own = labels[torch.from_numpy(rows)]
    return mixed, MixedLabels(own, labels[torch.from_numpy(partner)], torch.from_numpy(lam))


# ---- measuring -----------------------------------------------------------------------------------


def array_bytes(store: CacheStore, name: str) -> int:
    """Bytes of an array's chunk files (its metadata left out)."""
    root = Path(store.path) / name
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and p.name != "zarr.json")


def shared_bytes(store: CacheStore, views: int) -> dict[str, float]:
    """Per-view bytes of what all teachers share: view params, and per-sample
    keys/labels/status/errors."""
    names = [f"views/{n}" for n in store.view_group.array_keys()] + [
        "keys",
        "labels",
        "status",
        "errors",
    ]
    out = {name: array_bytes(store, name) / views for name in names}
    out["total"] = sum(out.values())
    return out


def read_rounds(
    stores: dict[tuple[str, int], CacheStore], rounds: int
) -> dict[tuple[str, int], dict[str, float]]:
    """Wall and CPU seconds of reading every shard's block, the caches interleaved round by
    round."""
    wall = {key: 0.0 for key in stores}
    cpu = dict(wall)
    for store in stores.values():  # warm-up: metadata, page cache
        read_block(store, 0, ["teacher"])
    keys = tuple(stores)
    for r in range(rounds):
        for key in rotated(keys, r):  # each cache leads in turn
            store = stores[key]
            w = time.perf_counter()
            c = time.process_time()
            for shard in range(store.num_shards):
                read_block(store, shard, ["teacher"])
            wall[key] += time.perf_counter() - w
            cpu[key] += time.process_time() - c
    return {key: {"wall_s": wall[key], "cpu_s": cpu[key], "rounds": rounds} for key in stores}


def measure(
    store: CacheStore,
    encoding: str,
    k: int,
    exact: list[SparseTargets],
    views: int,
    read: dict[str, float],
    temperatures: tuple[float, float],
) -> dict[str, Any]:
    """Sizes, read speed and reconstruction error of one cache."""
    group = "teachers/teacher"
    arrays = {
        name: array_bytes(store, f"{group}/{name}") / views
        for name in store.teacher_group("teacher").array_keys()
        if name != "done"
    }
    errors = [block_error(store, s, t, k, temperatures) for s, t in enumerate(exact)]
    read_views = views * read["rounds"]
    error = {
        name: (max if name.startswith("max") else np.mean)([e[name] for e in errors])
        for name in errors[0]
    }
    return {
        "encoding": encoding,
        "k": k,
        "arrays": arrays,
        "bytes_per_view": sum(arrays.values()),
        "read_vps_wall": read_views / read["wall_s"],
        "read_vps_cpu": read_views / read["cpu_s"],
        "block_ms": 1e3 * read["wall_s"] / (read["rounds"] * store.num_shards),
        "mean_kl": float(error["kl_renorm"]),
        "max_dprob": float(error["max_dprob_renorm"]),
        "mean_kl_spread": float(error["kl_spread"]),
        "max_dprob_spread": float(error["max_dprob_spread"]),
        "mean_kl_kd": float(error["kl_renorm_kd"]),
        "mean_kl_spread_kd": float(error["kl_spread_kd"]),
        "max_dprob_spread_kd": float(error["max_dprob_spread_kd"]),
        "max_dtail": float(error["max_dtail"]),
    }


def block_error(
    store: CacheStore, shard: int, exact: SparseTargets, k: int, temperatures: tuple[float, float]
) -> dict[str, float]:
    """One shard's decoded targets against the fp32 top-k they were made from, as dense
    distributions: per tail treatment and temperature (headline, KD) the max |Δp| and mean
    KL(fp32 ‖ decoded), and the T=1 tail mass error."""
    t = read_block(store, shard, ["teacher"]).teachers["teacher"]
    n = t.lse.size
    decoded = SparseTargets(
        torch.from_numpy(t.topk_idx.reshape(n, k).astype(np.int64)),
        torch.from_numpy(t.topk_logit.reshape(n, k).astype(np.float32)),
        *(torch.from_numpy(x.reshape(n)) for x in (t.lse, t.label_logit, t.tail_lse)),
    )
    reference = truncate(exact, k)
    out = {"max_dtail": float((tail_mass_t1(reference) - tail_mass_t1(decoded)).abs().max())}
    for tail in ("renorm", "spread"):
        for which, temperature in zip(("", "_kd"), temperatures, strict=True):
            kl, max_dprob = target_divergence(
                reference, decoded, store.meta.num_classes, temperature, tail
            )
            out[f"max_dprob_{tail}{which}"] = max_dprob
            out[f"kl_{tail}{which}"] = kl
    return out


# ---- results -------------------------------------------------------------------------------------


def summarise(
    args: argparse.Namespace,
    rows: list[dict[str, Any]],
    shared: dict[str, float],
    stats: dict[str, float],
    recipes: dict[str, dict[str, float]],
) -> dict[str, Any]:
    """Headline numbers at k=10 (or the middle k) plus every row."""
    k10 = 10 if any(r["k"] == 10 for r in rows) else rows[len(rows) // 2]["k"]
    at = {r["encoding"]: r for r in rows if r["k"] == k10}
    return {
        "bench": "cache",
        "machine": machine(),
        "settings": {
            "shards": args.shards,
            "samples_per_shard": args.samples,
            "views": args.views,
            "classes": args.classes,
            "reads": args.reads,
            "temperature": args.temperature,
            "kd_temperature": args.kd_temperature,
            "quick": args.quick,
            "headline_k": k10,
        },
        "bytes_per_view_k10": {e: r["bytes_per_view"] for e, r in at.items()},
        "read_vps": {e: r["read_vps_cpu"] for e, r in at.items()},
        "kl_k10": {e: r["mean_kl"] for e, r in at.items()},
        "max_dprob_k10": {e: r["max_dprob"] for e, r in at.items()},
        "kl_k10_spread": {e: r["mean_kl_spread"] for e, r in at.items()},
        "kl_k10_spread_kd": {e: r["mean_kl_spread_kd"] for e, r in at.items()},
        "max_dtail_k10": {e: r["max_dtail"] for e, r in at.items()},
        "shared_bytes_per_view": shared,
        "recipe_bytes_per_view": {name: r["bytes_per_view"] for name, r in recipes.items()},
        "recipe_chunk_bytes_per_view": {
            name: r["chunk_bytes_per_view"] for name, r in recipes.items()
        },
        "generator": {"params": GENERATOR, "stats": stats},
        "rows": rows,
    }


def format_result(result: dict[str, Any]) -> str:
    """The tables printed by ``kdcache bench cache``."""
    s = result["settings"]
    stats = result["generator"]["stats"]
    head = (
        f"cache bench: {s['shards']} shards x {s['samples_per_shard']} samples x "
        f"{s['views']} views, C={s['classes']}; generated logits: "
        f"top-1 p {stats['top1_prob']:.2f}, entropy {stats['entropy_nats']:.2f} nats, "
        f"top-10 mass {stats['top10_mass']:.3f}, accuracy {stats['accuracy']:.2f}"
    )
    names = sorted({n for r in result["rows"] for n in r["arrays"]})
    sizes = table(
        ["encoding", "k"] + names + ["total B/view"],
        [
            [r["encoding"], r["k"]]
            + [r["arrays"].get(n, float("nan")) for n in names]
            + [r["bytes_per_view"]]
            for r in result["rows"]
        ],
    )
    shared = table(
        ["shared by all teachers", "B/view"],
        [[n, v] for n, v in result["shared_bytes_per_view"].items()],
    )
    speed = table(
        ["encoding", "k", "block read ms", "views/s (wall)", "views/s per CPU s"],
        [
            [r["encoding"], r["k"], r["block_ms"], r["read_vps_wall"], r["read_vps_cpu"]]
            for r in result["rows"]
        ],
    )
    t = f"T={s['temperature']:g}"
    kd = f"T={s['kd_temperature']:g}"
    error = table(
        [
            "encoding",
            "k",
            f"top-k max |Δp| {t}",
            f"top-k mean KL {t}",
            f"top-k mean KL {kd}",
            f"spread max |Δp| {t}",
            f"spread mean KL {t}",
            f"spread mean KL {kd}",
            "max |Δ tail mass|",
        ],
        [
            [
                r["encoding"],
                r["k"],
                r["max_dprob"],
                r["mean_kl"],
                r["mean_kl_kd"],
                r["max_dprob_spread"],
                r["mean_kl_spread"],
                r["mean_kl_spread_kd"],
                r["max_dtail"],
            ]
            for r in result["rows"]
        ],
    )
    note = (
        "error against the fp32 top-k: 'top-k' renormalises the k classes (tail renorm), "
        "'spread' adds the tail mass over the other C-k classes (tail spread), "
        "read from the stored tail"
    )
    chunks = result["recipe_chunk_bytes_per_view"]
    recipes = table(
        [
            f"recipe (k={RECIPE_K}, {RECIPE_ENCODING}, one teacher)",
            "B/view, whole cache",
            "B/view, chunks only",
        ],
        [[name, value, chunks[name]] for name, value in result["recipe_bytes_per_view"].items()],
    )
    parts = [head, sizes, shared, recipes, speed, note, error]
    if "grad_cos_detail" in result:
        parts.append(format_grad_cos(result, table))
    return "\n\n".join(parts)
