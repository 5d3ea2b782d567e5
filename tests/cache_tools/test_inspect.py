"""``kdcache inspect``: every figure checked against plain numpy on the full logits the cache was
made from."""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from kdcache.cache.store import STATUS_INVALID, STATUS_VALID, Fingerprint, TeacherSpec, open_store
from kdcache.cache.writer import add_teacher, create_store, write_targets, write_views
from kdcache.cache_tools.stats import FINE_BINS, inspect_cache, js_divergence
from kdcache.cli import main
from kdcache.core.errors import CacheIncompleteError, CacheMismatchError, ConfigError
from kdcache.core.results import InspectResult
from kdcache.targets.sparse import from_logits
from kdcache.views.recipe import ViewParams, ViewRecipe

C = 5
A = 2
COUNTS = (7, 5, 4)  # shard 2 has views but no "strong" targets: incomplete, skipped
INVALID = (0, 3)  # (shard, row) written as invalid, with garbage logits
TEACHERS = {"weak": 3, "strong": 5}  # name -> k (weak has a tail, strong stores every class)
NAMES = ["ant", "bee", "cat", "dog", "eel"]


@dataclass
class Truth:
    """The full logits of the complete shards' valid rows, in cache order."""

    labels: np.ndarray  # [n]
    logits: dict[str, np.ndarray]  # teacher -> [n, A, C] float64


def _logits(rng: np.random.Generator, labels: np.ndarray, step: float, hit: float) -> np.ndarray:
    """Distinct fp16-exact logits per view (no ties, no rounding); the label wins with prob
    ~``hit``."""
    grid = np.arange(-16, 33) * step
    out = np.stack(
        [rng.choice(grid, size=C, replace=False) for _ in range(len(labels) * A)]
    ).reshape(len(labels), A, C)
    for i, j in zip(*np.nonzero(rng.random((len(labels), A)) < hit), strict=True):
        top = out[i, j].argmax()
        out[i, j, [top, labels[i]]] = out[i, j, [labels[i], top]]
    return out


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Truth]:
    path = str(tmp_path_factory.mktemp("inspect") / "cache")
    return path, build_cache(path)


def build_cache(path: str) -> Truth:
    """Three shards (7, 5, 4 rows; one invalid row; the last incomplete), A=2, C=5, two teachers."""
    rng = np.random.default_rng(0)
    shards = [f"s{i}" for i in range(len(COUNTS))]
    keys = [[f"{s}_{r}" for r in range(n)] for s, n in zip(shards, COUNTS, strict=True)]
    fp = Fingerprint(shards=shards, counts=list(COUNTS), key_digest="test")
    store = create_store(
        path,
        fingerprint=fp,
        keys=keys,
        recipe=ViewRecipe(),
        num_views=A,
        num_classes=C,
        class_names=NAMES,
        seed=0,
        config={},
    )
    for name, k in TEACHERS.items():
        add_teacher(store, TeacherSpec(name=name, model={"name": name}, weights_digest=name, k=k))
    labels = []
    logits = {n: [] for n in TEACHERS}
    for s, n in enumerate(COUNTS):
        lab = rng.integers(0, C, n)
        status = np.full(n, STATUS_VALID)
        if s == INVALID[0]:
            status[INVALID[1]] = STATUS_INVALID
        write_views(
            store,
            s,
            labels=lab,
            status=status,
            errors=[""] * n,
            params=ViewParams.empty(ViewRecipe(), n, A),
        )
        for name in TEACHERS:
            full = _logits(
                rng, lab, 0.125 if name == "weak" else 0.25, 0.5 if name == "weak" else 0.8
            )
            if s == INVALID[0]:
                full[INVALID[1]] = 1e4  # garbage that must not count
            if name == "strong" and s == 2:
                continue
            _write(store, s, name, full, lab)
            if s < 2:
                logits[name].append(full[status == STATUS_VALID])
        if s < 2:
            labels.append(lab[status == STATUS_VALID])
    return Truth(np.concatenate(labels), {n: np.concatenate(v) for n, v in logits.items()})


def _write(store, shard: int, name: str, full: np.ndarray, labels: np.ndarray) -> None:
    n = len(labels)
    t = from_logits(
        torch.from_numpy(full.reshape(n * A, C)),
        torch.from_numpy(np.repeat(labels, A)),
        TEACHERS[name],
    )
    write_targets(store, shard, name, t)


# ---- the hand computation: plain numpy on the full logits -----------------------------------
def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _target(
    logits: np.ndarray, k: int, temperature: float = 1.0, tail: str = "spread"
) -> np.ndarray:
    """Dense ``[n, A, C]`` targets: exact when k == C, else top-k exact plus the tail treatment."""
    classes = logits.shape[-1]
    if k == classes:
        return _softmax(logits / temperature)
    in_top = np.argsort(np.argsort(-logits, -1), -1) < k
    if tail == "renorm":
        return _softmax(np.where(in_top, logits / temperature, -np.inf))
    tail_mass = _stored_tail(1 - (_softmax(logits) * in_top).sum(-1))
    lse = np.log(np.exp(logits).sum(-1))
    tail_logit = np.log(tail_mass / (classes - k)) + lse
    return _softmax(np.where(in_top, logits, tail_logit[..., None]) / temperature)


def _stored_tail(tail: np.ndarray) -> np.ndarray:
    """The tail mass as the cache keeps it: its log in fp16 (kdcache.targets.encoding)."""
    return np.where(
        tail > 0,
        np.exp(np.log(np.maximum(tail, 1e-300)).astype(np.float16).astype(np.float64)),
        0.0,
    )


def _entropy(p: np.ndarray) -> np.ndarray:
    return -(p * np.log(np.where(p > 0, p, 1))).sum(-1)


def _js(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    m = (p + q) / 2
    kl = lambda a: (a * np.log(np.where(a > 0, a, 1) / np.where(a > 0, m, 1))).sum(-1)  # noqa: E731
    return (kl(p) + kl(q)) / 2


def _ece(conf: np.ndarray, correct: np.ndarray, bins: int = 15) -> float:
    total = 0.0
    for i in range(bins):
        in_bin = (conf > i / bins) & (conf <= (i + 1) / bins)
        if in_bin.any():
            total += in_bin.mean() * abs(correct[in_bin].mean() - conf[in_bin].mean())
    return total


@dataclass
class Hand:
    """Every per-view quantity of one teacher, flattened over views."""

    p: np.ndarray  # [n, A, C]
    label: np.ndarray  # [n, A]
    pred: np.ndarray  # [n, A]

    @classmethod
    def of(cls, truth: Truth, name: str) -> Hand:
        p = _softmax(truth.logits[name])
        return cls(p, np.repeat(truth.labels[:, None], A, 1), p.argmax(-1))

    @property
    def correct(self) -> np.ndarray:
        return (self.pred == self.label).ravel()

    @property
    def label_prob(self) -> np.ndarray:
        return np.take_along_axis(self.p, self.label[..., None], -1).ravel()

    @property
    def max_prob(self) -> np.ndarray:
        return self.p.max(-1).ravel()


@pytest.fixture(scope="module")
def report(cache) -> InspectResult:
    return inspect_cache(open_store(cache[0]), temperatures=(1.0, 2.0))


def _close(value, expected, tol: float = 1e-5) -> None:
    assert value == pytest.approx(expected, abs=tol)


def _check_dist(d: dict, x: np.ndarray, hi: float = 1.0) -> None:
    """Exact mean/min/max and count; quantiles within one fine bin; the merged histogram."""
    assert d["n"] == len(x) and d["scale"] == "linear"
    _close(d["mean"], x.mean())
    _close(d["min"], x.min())
    _close(d["max"], x.max())
    assert d["resolution"] == pytest.approx(hi / FINE_BINS)
    for q in (5, 25, 50, 75, 95):
        _close(
            d["quantiles"][f"p{q}"],
            np.quantile(x, q / 100, method="inverted_cdf"),
            hi / FINE_BINS + 1e-6,
        )
    counts, edges = np.histogram(np.clip(x, 0, hi), bins=len(d["hist"]["counts"]), range=(0, hi))
    assert d["hist"]["counts"] == counts.tolist()
    np.testing.assert_allclose(d["hist"]["edges"], edges, atol=1e-6)


def _check_log_dist(d: dict, x: np.ndarray, floor: float = 1e-8) -> None:
    """The tail mass: exact mean/min/max; log10 bins on [floor, 1], quantiles within one bin's
    factor (values below the floor, 0 among them, in the first bin)."""
    assert d["n"] == len(x) and d["scale"] == "log10"
    for name, value in (("mean", x.mean()), ("min", x.min()), ("max", x.max())):
        assert d[name] == pytest.approx(value, rel=1e-6, abs=1e-12)
    decades = -math.log10(floor)
    assert d["resolution"] == pytest.approx(decades / FINE_BINS)
    factor = 10 ** (decades / FINE_BINS)
    for q in (5, 25, 50, 75, 95):
        exact = np.quantile(x, q / 100, method="inverted_cdf")
        got = d["quantiles"][f"p{q}"]
        assert (
            (got <= floor * factor)
            if exact < floor
            else (exact / factor <= got * (1 + 1e-6) and got <= exact * factor * (1 + 1e-6))
        )
    counts, edges = np.histogram(
        np.log10(np.clip(x, floor, 1.0)), bins=len(d["hist"]["counts"]), range=(-decades, 0.0)
    )
    assert d["hist"]["counts"] == counts.tolist()
    np.testing.assert_allclose(d["hist"]["edges"], 10.0**edges, rtol=1e-5)


# ---- per-teacher figures ---------------------------------------------------------------------
@pytest.mark.parametrize("name", list(TEACHERS))
def test_accuracy_wrong_and_under_confident(report, cache, name) -> None:
    h = Hand.of(cache[1], name)
    t = report.teachers[name]
    k = TEACHERS[name]
    n = h.correct.size
    assert (
        (t["k"], t["views"], t["labelled_views"]) == (k, n, n) == (k, 2 * (sum(COUNTS[:2]) - 1), n)
    )
    _close(t["top1"], h.correct.mean())
    ranks = np.argsort(np.argsort(-h.p, -1), -1)
    in_top = (np.take_along_axis(ranks, h.label[..., None], -1)[..., 0] < min(k, 5)).mean()
    assert t["topk"] == {"k": min(k, 5), "accuracy": pytest.approx(in_top)}
    assert t["top5"] == (pytest.approx(in_top) if k >= 5 else None)
    assert t["wrong"] == {
        "views": int((~h.correct).sum()),
        "fraction": pytest.approx((~h.correct).mean()),
    }
    for thr in (0.5, 0.7, 0.9):
        hits = h.correct & (h.label_prob < thr)
        assert t["under_confident"][str(thr)] == {
            "views": int(hits.sum()),
            "fraction": pytest.approx(hits.mean()),
            "fraction_of_correct": pytest.approx(hits.sum() / h.correct.sum()),
        }


@pytest.mark.parametrize("name", list(TEACHERS))
def test_calibration(report, cache, name) -> None:
    h = Hand.of(cache[1], name)
    t = report.teachers[name]
    _close(t["ece"], _ece(h.max_prob, h.correct))
    rel = t["reliability"]
    counts = [int(((h.max_prob > i / 15) & (h.max_prob <= (i + 1) / 15)).sum()) for i in range(15)]
    assert rel["counts"] == counts and len(rel["edges"]) == 16
    for i, n in enumerate(counts):
        in_bin = (h.max_prob > i / 15) & (h.max_prob <= (i + 1) / 15)
        assert rel["accuracy"][i] == (pytest.approx(h.correct[in_bin].mean()) if n else None)
        assert rel["confidence"][i] == (
            pytest.approx(h.max_prob[in_bin].mean(), abs=1e-5) if n else None
        )


@pytest.mark.parametrize("name", list(TEACHERS))
def test_distributions(report, cache, name) -> None:
    h = Hand.of(cache[1], name)
    t = report.teachers[name]
    k = TEACHERS[name]
    top = -np.sort(-h.p, -1)
    _check_dist(t["max_prob"], h.max_prob)
    _check_dist(t["label_prob"], h.label_prob)
    _check_log_dist(t["tail_mass"], _stored_tail(1 - top[..., :k].sum(-1)).ravel())
    _check_dist(t["margin"], (top[..., 0] - top[..., 1]).ravel())


@pytest.mark.parametrize("name", list(TEACHERS))
def test_entropy_spread_at_each_temperature(report, cache, name) -> None:
    logits = cache[1].logits[name]
    k = TEACHERS[name]
    t = report.teachers[name]
    assert list(t["entropy"]) == ["T=1.0", "T=2.0"]
    for temp in (1.0, 2.0):
        _check_dist(
            t["entropy"][f"T={temp}"], _entropy(_target(logits, k, temp)).ravel(), hi=math.log(C)
        )
    if k == C:  # exact teacher entropy
        _close(t["entropy"]["T=1.0"]["mean"], _entropy(_softmax(logits)).mean())


def test_entropy_and_js_with_renorm_tail(cache) -> None:
    report = inspect_cache(open_store(cache[0]), tail="renorm")
    assert report.settings.tail == "renorm"
    target = _target(cache[1].logits["weak"], 3, tail="renorm")
    _close(report.teachers["weak"]["entropy"]["T=1.0"]["mean"], _entropy(target).mean())
    _close(
        report.teachers["weak"]["view_consistency"]["js"]["mean"],
        _js(target[:, 0], target[:, 1]).mean(),
    )
    strong = _target(cache[1].logits["strong"], 5)
    _close(report.pairs[0]["js"]["mean"], _js(strong, target).mean())


@pytest.mark.parametrize("name", list(TEACHERS))
def test_per_class_and_confused_pairs(report, cache, name) -> None:
    h = Hand.of(cache[1], name)
    t = report.teachers[name]
    label = h.label.ravel()
    pred = h.pred.ravel()
    for c, row in enumerate(t["per_class"]):
        mine = label == c
        assert (row["class"], row["name"], row["views"]) == (c, NAMES[c], int(mine.sum()))
        assert row["top1"] == (pytest.approx(h.correct[mine].mean()) if mine.any() else None)
        assert row["label_prob_mean"] == (
            pytest.approx(h.label_prob[mine].mean(), abs=1e-5) if mine.any() else None
        )
        assert row["max_prob_mean"] == (
            pytest.approx(h.max_prob[mine].mean(), abs=1e-5) if mine.any() else None
        )
    errors = Counter((int(a), int(b)) for a, b in zip(label, pred, strict=True) if a != b)
    expected = sorted(errors.items(), key=lambda e: (-e[1], e[0]))[:10]
    assert [(p["true"], p["pred"], p["count"]) for p in t["confused_pairs"]] == [
        (a, b, n) for (a, b), n in expected
    ]
    for p in t["confused_pairs"]:
        assert (p["true_name"], p["pred_name"]) == (NAMES[p["true"]], NAMES[p["pred"]])
        _close(p["fraction_of_true"], p["count"] / (label == p["true"]).sum())


@pytest.mark.parametrize("name", list(TEACHERS))
def test_view_consistency(report, cache, name) -> None:
    h = Hand.of(cache[1], name)
    t = report.teachers[name]["view_consistency"]
    target = _target(cache[1].logits[name], TEACHERS[name])
    assert (t["samples"], t["views_per_sample"]) == (len(h.pred), A)
    _close(t["top1_disagree"], (h.pred[:, 0] != h.pred[:, 1]).mean())
    _check_dist(t["js"], _js(target[:, 0], target[:, 1]), hi=math.log(2))


def test_teacher_pairs(report, cache) -> None:
    (pair,) = report.pairs
    assert (pair["a"], pair["b"]) == ("strong", "weak")
    a = Hand.of(cache[1], "strong")
    b = Hand.of(cache[1], "weak")
    ca = a.correct
    cb = b.correct
    assert pair["views"] == ca.size
    _close(pair["top1_agreement"], (a.pred == b.pred).mean())
    js = _js(_target(cache[1].logits["strong"], 5), _target(cache[1].logits["weak"], 3)).ravel()
    _check_dist(pair["js"], js, hi=math.log(2))
    cells = [ca & cb, ca & ~cb, ~ca & cb, ~ca & ~cb]
    assert pair["correctness"] == pytest.approx(
        dict(
            zip(
                ("both_right", "a_only", "b_only", "both_wrong"),
                [c.mean() for c in cells],
                strict=True,
            )
        )
    )
    both = cells[0]
    pa = a.label_prob
    pb = b.label_prob
    assert pair["both_right"] == pytest.approx(
        {
            "views": int(both.sum()),
            "label_prob_mean_a": pa[both].mean(),
            "label_prob_mean_b": pb[both].mean(),
            "a_more_confident": (pa[both] > pb[both]).mean(),
            "b_more_confident": (pb[both] > pa[both]).mean(),
        }
    )
    counts, _, _ = np.histogram2d(pa, pb, bins=40, range=[[0, 1], [0, 1]])
    assert pair["label_prob_2d"]["counts"] == counts.astype(int).tolist()


def test_unlabelled_rows_three_views_and_top5_below_the_class_count(tmp_path) -> None:
    """C=8, A=3, k=6, two rows without a label: label figures count labelled views only, the
    others every view; view consistency compares all 3 pairs of views; top-5 is read from a
    top-6."""
    c = 8
    a = 3
    k = 6
    n = 9
    rng = np.random.default_rng(5)
    labels = rng.integers(0, c, n)
    labels[[2, 7]] = -1
    grid = np.arange(-16, 33) * 0.25  # fp16-exact, no ties within a row
    logits = np.stack([rng.choice(grid, size=c, replace=False) for _ in range(n * a)]).reshape(
        n, a, c
    )
    store = create_store(
        str(tmp_path / "cache"),
        fingerprint=Fingerprint(shards=["s0"], counts=[n], key_digest="t"),
        keys=[[f"k{i}" for i in range(n)]],
        recipe=ViewRecipe(),
        num_views=a,
        num_classes=c,
        class_names=[],
        seed=0,
        config={},
    )
    add_teacher(store, TeacherSpec(name="t", model={"name": "t"}, weights_digest="t", k=k))
    write_views(
        store,
        0,
        labels=labels,
        status=np.full(n, STATUS_VALID),
        errors=[""] * n,
        params=ViewParams.empty(ViewRecipe(), n, a),
    )
    write_targets(
        store,
        0,
        "t",
        from_logits(
            torch.from_numpy(logits.reshape(n * a, c)), torch.from_numpy(np.repeat(labels, a)), k
        ),
    )
    t = inspect_cache(open_store(str(tmp_path / "cache"))).teachers["t"]

    p = _softmax(logits)
    label = np.repeat(labels[:, None], a, 1)
    pred = p.argmax(-1)
    has = label >= 0
    correct = (pred == label)[has]
    label_prob = np.take_along_axis(p, label.clip(0)[..., None], -1)[..., 0][has]
    rank = np.take_along_axis(np.argsort(np.argsort(-p, -1), -1), label.clip(0)[..., None], -1)[
        ..., 0
    ][has]
    assert (t["views"], t["labelled_views"]) == (n * a, int(has.sum())) == (27, 21)
    _close(t["top1"], correct.mean())
    assert t["top5"] == pytest.approx((rank < 5).mean()) and t["topk"]["k"] == 5
    _check_dist(t["max_prob"], p.max(-1).ravel())  # every view
    _check_dist(t["label_prob"], label_prob)  # labelled views only
    _close(t["ece"], _ece(p.max(-1)[has], correct))
    assert t["wrong"]["views"] == int((~correct).sum())
    assert sum(row["views"] for row in t["per_class"]) == 21
    vc = t["view_consistency"]
    target = _target(logits, k)
    assert (vc["samples"], vc["views_per_sample"]) == (n, a)
    _close(vc["top1_disagree"], (pred != pred[:, :1]).any(1).mean())
    pairs = np.concatenate([_js(target[:, i], target[:, j]) for i, j in ((0, 1), (0, 2), (1, 2))])
    _check_dist(vc["js"], pairs, hi=math.log(2))


# ---- pieces ------------------------------------------------------------------------------------
def test_js_divergence_equals_dense() -> None:
    rng = np.random.default_rng(1)
    num = 200
    kp = 3
    kq = 4
    classes = 9
    perm = np.argsort(rng.random((num, classes)), -1)
    idx_p = perm[:, :kp]
    idx_q = np.argsort(rng.random((num, classes)), -1)[:, :kq]
    idx_q[:50] = perm[:50, kq - 1 :: -1][:, :kq]  # some holding p's whole support, in another order
    dense = []
    sparse = []
    for idx, k, other_scale in ((idx_p, kp, 0.1), (idx_q, kq, 0.0)):  # q has no tail (renorm-like)
        top = rng.dirichlet(np.ones(k), num) * (1 - other_scale)
        other = np.full(num, other_scale / (classes - k))
        d = np.repeat(other[:, None], classes, 1)
        np.put_along_axis(d, idx, top, 1)
        dense.append(d)
        sparse += [idx, top, other]
    np.testing.assert_allclose(js_divergence(*sparse, classes), _js(*dense), atol=1e-12)


def test_histogram_quantiles_within_one_bin() -> None:
    from kdcache.cache_tools.stats import Histogram

    rng = np.random.default_rng(2)
    x = rng.beta(0.5, 2.0, 5001)
    hist = Histogram(0.0, 1.0)
    for part in np.array_split(x, 7):  # streamed in pieces
        hist.add(part)
    for q in (0.01, 0.05, 0.5, 0.95, 1.0):
        _close(hist.quantile(q), np.quantile(x, q, method="inverted_cdf"), hist.width)
    assert Histogram(0.0, 1.0).summary()["mean"] is None


# ---- incomplete shards, teacher selection, settings ----------------------------------------
def test_incomplete_shards_are_skipped_with_a_warning(cache, report, caplog) -> None:
    with caplog.at_level("WARNING", logger="kdcache.cache_tools.stats"):
        inspect_cache(open_store(cache[0]))
    assert "skipping incomplete shards" in caplog.text and "strong: s2" in caplog.text
    assert report.cache.model_dump() | {"path": None, "recipe": None} == {
        "path": None,
        "shards": 3,
        "shards_read": 2,
        "skipped_shards": {"strong": ["s2"]},
        "samples": sum(COUNTS),
        "num_views": A,
        "num_classes": C,
        "recipe": None,
    }
    with pytest.raises(CacheIncompleteError, match=r"incomplete shards \(strong: s2\)"):
        inspect_cache(open_store(cache[0]), require_complete=True)


def test_one_teacher_reads_the_shards_complete_for_it(cache) -> None:
    report = inspect_cache(open_store(cache[0]), ["weak"])
    assert list(report.teachers) == ["weak"] and report.pairs == []
    assert (report.cache.shards_read, report.cache.skipped_shards) == (3, {})
    assert report.teachers["weak"]["views"] == A * (sum(COUNTS) - 1)


def test_unknown_teacher_names_the_valid_ones(cache, capsys) -> None:
    with pytest.raises(CacheMismatchError, match="unknown teacher 'nope'.*valid: strong, weak"):
        inspect_cache(open_store(cache[0]), ["weak", "nope"])
    assert main(["inspect", cache[0], "--teacher", "nope"]) == 2
    assert "valid: strong, weak" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"tail": "drop"}, "tail must be one of renorm, spread, found 'drop'"),
        ({"temperatures": (1.0, 0.0)}, "temperatures must be positive"),
        ({"temperatures": ()}, "temperatures must be positive"),
    ],
)
def test_bad_settings_are_rejected(cache, kwargs, match) -> None:
    with pytest.raises(ConfigError, match=match):
        inspect_cache(open_store(cache[0]), **kwargs)


# ---- the command line --------------------------------------------------------------------------
def test_cli_tables_json_and_plots(cache, report, tmp_path, capsys) -> None:
    out_json = tmp_path / "r" / "inspect.json"
    plots = tmp_path / "plots"
    argv = [
        "inspect",
        cache[0],
        "--json",
        str(out_json),
        "--plots",
        str(plots),
        "--temperature",
        "1,2",
    ]
    assert main(argv) == 0
    text = capsys.readouterr().out
    for needle in (
        "== summary",
        "top-1 accuracy",
        "- (top-3:",
        "== weak: per class",
        "ant -> ",
        "strong vs weak",
        "== similarity information (paper 003",
    ):
        assert needle in text
    loaded = json.loads(out_json.read_text(), parse_constant=_no_nan)
    assert loaded == json.loads(json.dumps(report.model_dump()))  # the report, without NaN
    assert InspectResult.read(out_json) == report  # and reads back as the typed result
    names = sorted(p.name for p in plots.iterdir())
    assert names == sorted(
        [f"dist_{q}.png" for q in ("max_prob", "label_prob", "tail_mass", "margin")]
        + ["dist_entropy_T1.0.png", "dist_entropy_T2.0.png", "pair_strong_vs_weak.png"]
        + ["similarity.png"]
        + [f"{kind}_{t}.png" for kind in ("reliability", "per_class") for t in TEACHERS]
    )
    for path in plots.iterdir():
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def _no_nan(name: str) -> None:
    raise AssertionError(f"{name} in the JSON")


def test_cli_require_complete_fails(cache, capsys) -> None:
    assert main(["inspect", cache[0], "--require-complete"]) == 2
    assert "incomplete shards" in capsys.readouterr().err


def test_sparse_counts_merge_across_compactions(monkeypatch) -> None:
    from kdcache.cache_tools import stats

    monkeypatch.setattr(stats, "COMPACT_EVERY", 7)
    rng = np.random.default_rng(3)
    codes = rng.integers(0, 12, 100)
    counter = stats.SparseCounts()
    for part in np.array_split(codes, 9):
        counter.add(part)
    expected = sorted(Counter(codes.tolist()).items(), key=lambda e: (-e[1], e[0]))
    assert counter.most_common(5) == expected[:5]
    assert counter.codes.size <= 12
