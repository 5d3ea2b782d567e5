"""Sampled targets: reproducible draws from the tail (at T=1 or at a chosen draw temperature),
an unbiased KD gradient, every loss takes them."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kdcache.cache.reader import read_block
from kdcache.cache.store import STATUS_VALID, Fingerprint, TeacherSpec
from kdcache.cache.writer import add_teacher, create_store, write_targets, write_views
from kdcache.targets.sampling import draw_generator, sampled_from_logits, tail_probs, uniforms
from kdcache.targets.sparse import (
    SampledTargets,
    TemperedTargets,
    dense_probs,
    from_logits,
    loss_targets,
    sampled_at,
    stored_temperature,
    targets_from_arrays,
)
from kdcache.train.config import (
    DISTLossConfig,
    EffDstlLossConfig,
    KDLossConfig,
    WSLLossConfig,
)
from kdcache.train.losses import Criterion
from kdcache.views.recipe import ViewParams, ViewRecipe, draw_view

C = 30
K = 2
S = 6


@pytest.fixture
def logits() -> torch.Tensor:
    torch.manual_seed(0)
    z = torch.randn(5, C) * 2.0
    z[:, 3] += 6.0  # a confident teacher with a long tail, as image classifiers are
    return z


def test_draws_depend_on_seed_key_view_and_teacher_only():
    one = uniforms(7, ["a", "b"], [0, 1], "t", 4)
    np.testing.assert_array_equal(one, uniforms(7, ["a", "b"], [0, 1], "t", 4))
    np.testing.assert_array_equal(one[1], draw_generator(7, "b", 1, "t").random(4))
    for other in (
        uniforms(8, ["a", "b"], [0, 1], "t", 4),
        uniforms(7, ["a", "c"], [0, 1], "t", 4),
        uniforms(7, ["a", "b"], [0, 2], "t", 4),
        uniforms(7, ["a", "b"], [0, 1], "u", 4),
    ):
        assert not np.array_equal(one[1], other[1])


def test_draws_come_from_the_tail_as_distinct_classes_with_counts(logits):
    u = np.random.default_rng(0).random((len(logits), S))
    t = sampled_from_logits(logits, torch.zeros(len(logits), dtype=torch.long), K, u, [4.0])
    counts = t.sample_count
    assert torch.equal(counts.sum(-1), torch.full((len(logits),), float(S)))
    for row in range(len(logits)):
        used = t.sample_idx[row][counts[row] > 0]
        assert len(set(used.tolist())) == len(used)  # distinct
        assert not set(used.tolist()) & set(t.idx[row].tolist())  # never the top-k
        assert torch.all(counts[row][:-1] >= counts[row][1:])  # most drawn first
        torch.testing.assert_close(
            t.sample_logit[row][counts[row] > 0], logits[row, used], rtol=0, atol=0
        )
    torch.testing.assert_close(t.lse_t[:, 0], torch.logsumexp(logits / 4.0, -1))


def test_inverse_cdf_in_class_order():
    """A tail of three classes with probabilities 0.2/0.3/0.5 of it: uniforms pick by the CDF."""
    probs = torch.tensor([[0.9, 0.02, 0.03, 0.05]])
    u = np.array([[0.1, 0.25, 0.49, 0.51, 0.99]])
    t = sampled_from_logits(probs.log(), torch.zeros(1, dtype=torch.long), 1, u)
    got = dict(zip(t.sample_idx[0].tolist(), t.sample_count[0].tolist(), strict=True))
    assert {c: n for c, n in got.items() if n} == {1: 1.0, 2: 2.0, 3: 2.0}


def _kd_gradients(targets, student: torch.Tensor, temperature: float) -> torch.Tensor:
    """d KD / d student logits, per row, through the real loss (alpha 1: the KD term alone)."""
    cfg = KDLossConfig(alpha=1.0, temperature=temperature, tail="sample")
    z = student.clone().requires_grad_(True)
    labels = torch.zeros(len(z), dtype=torch.long)
    Criterion(cfg, C)(z, labels, targets, epoch=0).total.backward()
    return z.grad * len(z)  # the loss is a mean over rows


@pytest.mark.parametrize(
    ("temperature", "draw_temperature"),
    [(1.0, 1.0), (4.0, 1.0), (4.0, 4.0), (1.0, 4.0), (2.0, 4.0)],
    ids=["T1-drawn-at-1", "T4-drawn-at-1", "T4-drawn-at-4", "T1-drawn-at-4", "T2-drawn-at-4"],
)
def test_mean_sampled_gradient_is_the_full_kd_gradient(logits, temperature, draw_temperature):
    """Over many independent draws the KD gradient of sampled targets averages to the gradient of
    the full teacher distribution, within Monte Carlo error: at T=1 and at a stored T (4, 2),
    whether the draws come from the tail at T=1 or at another temperature."""
    draws = 4000
    teacher = logits.repeat(draws, 1)
    student = (0.5 * logits + torch.randn_like(logits)).repeat(draws, 1)
    labels = torch.zeros(len(teacher), dtype=torch.long)
    u = np.random.default_rng(1).random((len(teacher), S))
    stored = [t for t in (2.0, 4.0) if t != draw_temperature]
    sampled = sampled_from_logits(teacher, labels, K, u, stored, draw_temperature)
    grads = _kd_gradients(sampled, student, temperature).view(draws, len(logits), C)
    full = _kd_gradients(
        from_logits(teacher[: len(logits)], labels[:5], C), student[:5], temperature
    )
    mean = grads.mean(0)
    error = grads.std(0) / draws**0.5
    assert torch.all((mean - full).abs() <= 4 * error + 1e-6), float(
        ((mean - full).abs() / (error + 1e-9)).max()
    )


def test_top_k_gradient_is_biased_where_the_sampled_one_is_not(logits):
    """The reason for sampling: at T=4 a spread tail's gradient is off by far more than the
    sampled gradient's Monte Carlo error."""
    student = 0.5 * logits
    labels = torch.zeros(len(logits), dtype=torch.long)
    full = _kd_gradients(from_logits(logits, labels, C), student, 4.0)
    cfg = KDLossConfig(alpha=1.0, temperature=4.0, tail="spread")
    z = student.clone().requires_grad_(True)
    Criterion(cfg, C)(z, labels, from_logits(logits, labels, K), epoch=0).total.backward()
    assert float((z.grad * len(z) - full).abs().max()) > 1e-3


def test_unstored_temperature_is_a_self_normalised_estimate(logits):
    u = np.random.default_rng(0).random((len(logits), S))
    t = sampled_from_logits(logits, torch.zeros(len(logits), dtype=torch.long), K, u, [4.0])
    assert stored_temperature(t, 1.0) and stored_temperature(t, 4.0)
    assert not stored_temperature(t, 2.0)
    torch.testing.assert_close(sampled_at(t, 2.0).probs.sum(-1), torch.ones(len(logits)))
    # exact where exact: the top-k at a stored temperature
    at4 = sampled_at(t, 4.0)
    torch.testing.assert_close(
        at4.probs[:, :K], torch.softmax(logits / 4.0, -1).gather(1, t.idx), rtol=1e-5, atol=1e-7
    )


@pytest.mark.parametrize(
    "cfg",
    [
        KDLossConfig(tail="sample"),
        DISTLossConfig(tail="sample"),
        WSLLossConfig(tail="sample"),
        EffDstlLossConfig(tail="sample"),
    ],
    ids=["kd", "dist", "wsl", "effdstl"],
)
def test_every_distillation_loss_takes_sampled_targets(logits, cfg):
    labels = torch.tensor([3, 3, 1, 3, 0])
    u = np.random.default_rng(0).random((len(logits), S))
    t = sampled_from_logits(logits, labels, K, u, [0.7, 2.0, 4.0])
    z = torch.randn(len(logits), C, requires_grad=True)
    parts = Criterion(cfg, C)(z, labels, t, epoch=0)
    parts.total.backward()
    assert torch.isfinite(parts.total) and torch.isfinite(z.grad).all()


def test_sampled_targets_with_spread_use_their_top_k(logits):
    labels = torch.zeros(len(logits), dtype=torch.long)
    u = np.random.default_rng(0).random((len(logits), S))
    t = sampled_from_logits(logits, labels, K, u)
    head = loss_targets(t, KDLossConfig(tail="spread"), C)
    assert type(head).__name__ == "SparseTargets"
    torch.testing.assert_close(
        dense_probs(head, C, 4.0, "spread"),
        dense_probs(from_logits(logits, labels, K), C, 4.0, "spread"),
    )


def test_sample_tail_needs_sampled_targets_unless_k_is_c(logits):
    labels = torch.zeros(len(logits), dtype=torch.long)
    cfg = KDLossConfig(tail="sample")
    z = torch.randn(len(logits), C)
    with pytest.raises(ValueError, match="tail 'sample' needs sampled targets"):
        Criterion(cfg, C)(z, labels, from_logits(logits, labels, K), epoch=0)
    exact = Criterion(cfg, C)(z, labels, from_logits(logits, labels, C), epoch=0)
    spread = Criterion(KDLossConfig(), C)(z, labels, from_logits(logits, labels, C), epoch=0)
    torch.testing.assert_close(exact.total, spread.total)


def test_topk_with_the_sample_tail_is_refused(logits):
    labels = torch.zeros(len(logits), dtype=torch.long)
    u = np.random.default_rng(0).random((len(logits), S))
    t = sampled_from_logits(logits, labels, K, u)
    with pytest.raises(ValueError, match="topk 1 with tail 'sample'"):
        loss_targets(t, KDLossConfig(tail="sample", topk=1), C)


def test_sampled_targets_round_trip_through_their_tensors(logits):
    labels = torch.zeros(len(logits), dtype=torch.long)
    u = np.random.default_rng(0).random((len(logits), S))
    t = sampled_from_logits(logits, labels, K, u, [4.0])
    again = t.map(lambda x: x.clone())
    assert isinstance(again, SampledTargets)
    for a, b in zip(t.tensors(), again.tensors(), strict=True):
        assert torch.equal(a, b)


# ---- draws at a chosen temperature -----------------------------------------------------------


def _old_estimate(t: SampledTargets, temperature: float) -> torch.Tensor:
    """The estimate as it was before the draw temperature could be chosen (draws at T=1), kept
    here verbatim so the default is pinned to it bit for bit."""
    inverse = 1.0 / temperature
    draws = t.sample_count.float()
    total = draws.sum(-1, keepdim=True).clamp_min(1.0)
    log_weight = torch.log(draws / total) + t.tail_lse.float().unsqueeze(-1)
    sampled = log_weight + t.sample_logit.float() * (inverse - 1.0)
    head = t.logit.float() * inverse
    if temperature == 1.0:
        log_z = t.lse.float()
    elif temperature in t.temperatures[0].tolist():
        log_z = t.lse_t[:, t.temperatures[0].tolist().index(temperature)].float()
    else:
        log_z = torch.logsumexp(torch.cat([head, sampled], dim=-1), dim=-1)
    return torch.exp(torch.cat([head, sampled], dim=-1) - log_z.unsqueeze(-1))


def test_draws_at_t1_are_what_they_were(logits):
    """The default (draws at T=1): the same draw distribution, the draws' normaliser is the
    stored tail itself, and the estimate at every temperature is the old one, bit for bit."""
    labels = torch.zeros(len(logits), dtype=torch.long)
    u = np.random.default_rng(0).random((len(logits), S))
    t = sampled_from_logits(logits, labels, K, u, [4.0])
    old_p = torch.softmax(logits.double(), dim=-1).scatter(1, t.idx, 0.0)
    assert torch.equal(tail_probs(logits, t.idx), old_p)
    assert torch.equal(t.draw_tail_lse, t.tail_lse)
    assert torch.equal(t.draw_temperature, torch.ones(len(logits)))
    for temperature in (1.0, 4.0, 2.0, 0.7):
        assert torch.equal(sampled_at(t, temperature).probs, _old_estimate(t, temperature))


def test_draws_come_from_the_tail_at_the_draw_temperature():
    """Inverse CDF of the tail at τ: three tail classes with logits 0, log 2 and log 4 have
    probabilities (1, 2, 4) / 7 at T=1 and (1, √2, 2) / (3 + √2) at τ=2."""
    z = torch.tensor([[8.0, 0.0, math.log(2.0), math.log(4.0)]])
    u = np.array([[0.2, 0.2]])
    head = torch.tensor([[0]])
    at1 = tail_probs(z, head)[0, 1:] / tail_probs(z, head)[0, 1:].sum()
    at2 = tail_probs(z, head, 2.0)[0, 1:] / tail_probs(z, head, 2.0)[0, 1:].sum()
    torch.testing.assert_close(at1, torch.tensor([1, 2, 4], dtype=torch.float64) / 7)
    q = torch.tensor([1.0, 2.0**0.5, 2.0], dtype=torch.float64)
    torch.testing.assert_close(at2, q / q.sum())
    # u = 0.2 is past 1/7 (class 1's share at T=1) but below 1/(3 + √2) = 0.227 (its share at 2)
    drawn = {tau: sampled_from_logits(z, head[0], 1, u, [], tau) for tau in (1.0, 2.0)}
    assert int(drawn[1.0].sample_idx[0, 0]) == 2 and int(drawn[2.0].sample_idx[0, 0]) == 1


@pytest.mark.parametrize("tau", [4.0, 0.7])
def test_at_the_draw_temperature_there_are_no_importance_weights(logits, tau):
    """At T = τ a drawn class's probability is its share of the draws times the exact tail mass
    at τ, whatever its logit (also for a τ that float32 cannot hold exactly); the top-k keep
    their exact probabilities and each view sums to 1."""
    labels = torch.zeros(len(logits), dtype=torch.long)
    u = np.random.default_rng(0).random((len(logits), S))
    t = sampled_from_logits(logits, labels, K, u, [], tau)
    at4 = sampled_at(t, tau)
    exact = torch.softmax(logits / tau, -1)
    tail_mass = exact.sum(-1) - exact.gather(1, t.idx).sum(-1)
    torch.testing.assert_close(at4.probs[:, K:], t.sample_count / S * tail_mass[:, None])
    torch.testing.assert_close(at4.probs[:, :K], exact.gather(1, t.idx))
    torch.testing.assert_close(at4.probs.sum(-1), torch.ones(len(logits)))
    shuffled = SampledTargets(
        *(x if name != "sample_logit" else x + 5.0 * torch.randn_like(x) for name, x in _fields(t))
    )
    assert torch.equal(sampled_at(shuffled, tau).probs, at4.probs)
    assert stored_temperature(t, tau) and stored_temperature(t, 1.0)
    assert not stored_temperature(t, 2.0)


def _fields(t: SampledTargets) -> list[tuple[str, torch.Tensor]]:
    return list(zip(SampledTargets.__dataclass_fields__, t.tensors(), strict=True))


# ---- the same through a real store -------------------------------------------------------------

RECIPE = ViewRecipe(size=8, channels=1, mean=(0.5,), std=(0.5,))


def stored_copies(
    path, logits: torch.Tensor, copies: int, draw_temperature: float, temperatures=()
) -> SampledTargets:
    """``copies`` copies of every row of ``logits`` as the samples of a one-shard, one-view
    cache (row ``i`` holds ``logits[i % len(logits)]``; each copy draws independently, being
    another key), written by the real writer (encoding ``sampled``) and read back."""
    n = len(logits) * copies
    keys = [f"r{i:06d}" for i in range(n)]
    store = create_store(
        str(path),
        fingerprint=Fingerprint(shards=["d-000000.tar"], counts=[n], key_digest="d"),
        keys=[keys],
        recipe=RECIPE,
        num_views=1,
        num_classes=C,
        class_names=[],
        seed=0,
        config={},
    )
    add_teacher(
        store,
        TeacherSpec(
            name="t",
            model={"name": "m"},
            weights_digest="w",
            k=K,
            encoding="sampled",
            samples=S,
            sample_temperatures=tuple(temperatures),
            draw_temperature=draw_temperature,
        ),
    )
    params = ViewParams.empty(RECIPE, n, 1)
    for row, key in enumerate(keys):
        params.put(row, 0, draw_view(RECIPE, 0, key, 0, (10, 10)))
    labels = np.zeros(n, np.int64)
    status = np.full(n, STATUS_VALID)
    write_views(store, 0, labels=labels, status=status, errors=[""] * n, params=params)
    u = uniforms(0, keys, [0] * n, "t", S)
    z = logits.repeat(copies, 1)
    targets = sampled_from_logits(z, torch.from_numpy(labels), K, u, temperatures, draw_temperature)
    write_targets(store, 0, "t", targets)
    block = read_block(store, 0, ["t"]).teachers["t"]
    return targets_from_arrays([x.reshape(n, *x.shape[2:]) for x in block.fields()])


@pytest.fixture
def q8_logits(logits) -> torch.Tensor:
    """The logits on the q8 grid (multiples of 1/16, the top exact in fp16): the stored top-k and
    drawn logits are then exact, and only the normalisers' fp16 rounding remains."""
    return torch.round(logits * 16) / 16


@pytest.mark.parametrize("temperature", [4.0, 1.0])
def test_stored_draws_at_tau_give_the_full_kd_gradient_on_average(q8_logits, tmp_path, temperature):
    """Drawn at τ = 4 and stored: over many draws the KD gradient at T=4 (and at T=1) averages
    to the full distribution's within Monte Carlo error, plus what the stored normaliser's fp16
    rounding (2^-11 relative) can move it."""
    copies = 2000
    stored = stored_copies(tmp_path / "c.zarr", q8_logits, copies, 4.0)
    assert stored.lse_t.shape[-1] == 0 and torch.all(stored.draw_temperature == 4.0)
    rows = len(q8_logits)
    student = 0.5 * q8_logits + torch.randn_like(q8_logits)
    grads = _kd_gradients(stored, student.repeat(copies, 1), temperature).view(copies, rows, C)
    labels = torch.zeros(rows, dtype=torch.long)
    full = _kd_gradients(from_logits(q8_logits, labels, C), student, temperature)
    mean = grads.mean(0)
    error = grads.std(0) / copies**0.5
    assert torch.all((mean - full).abs() <= 4 * error + 2e-3), float(
        ((mean - full).abs() / (error + 1e-9)).max()
    )


def test_stored_draws_at_tau_have_no_importance_weights_at_tau(q8_logits, tmp_path):
    """Stored at τ = 4 and read back: at T=4 each drawn class's probability is its count / S
    times the exact tail mass at τ (within the fp16 rounding of the stored normaliser), the same
    for every drawn class of a view with the same count."""
    stored = stored_copies(tmp_path / "c.zarr", q8_logits, 4, 4.0)
    at4: TemperedTargets = sampled_at(stored, 4.0)
    exact = torch.softmax(q8_logits.repeat(4, 1) / 4.0, -1)
    tail_mass = exact.sum(-1) - exact.gather(1, stored.idx).sum(-1)
    expected = stored.sample_count.float() / S * tail_mass[:, None]
    torch.testing.assert_close(at4.probs[:, K:], expected, rtol=2e-3, atol=1e-6)
    torch.testing.assert_close(at4.probs.sum(-1), torch.ones(len(expected)), rtol=0, atol=1e-5)
