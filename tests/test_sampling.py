"""Sampled targets: reproducible draws from the tail, an unbiased KD gradient, every loss takes
them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdcache.sampling import draw_generator, sampled_from_logits, uniforms
from kdcache.targets import (
    SampledTargets,
    dense_probs,
    from_logits,
    loss_targets,
    sampled_at,
    stored_temperature,
)
from kdcache.train.config import (
    DISTLossConfig,
    EffDstlLossConfig,
    KDLossConfig,
    WSLLossConfig,
)
from kdcache.train.losses import Criterion

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


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_mean_sampled_gradient_is_the_full_kd_gradient(logits, temperature):
    """Over many independent draws the KD gradient of sampled targets averages to the gradient of
    the full teacher distribution, within Monte Carlo error (T=1, and T=4 whose normaliser is
    stored)."""
    draws = 4000
    teacher = logits.repeat(draws, 1)
    student = (0.5 * logits + torch.randn_like(logits)).repeat(draws, 1)
    labels = torch.zeros(len(teacher), dtype=torch.long)
    u = np.random.default_rng(1).random((len(teacher), S))
    sampled = sampled_from_logits(teacher, labels, K, u, [4.0])
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
