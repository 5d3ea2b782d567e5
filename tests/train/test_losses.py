"""Every loss against its formula on small hand-checked tensors; sparse targets and tails;
schedules."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kdcache.models.build import ModelSpec, build_model
from kdcache.targets.sparse import SparseTargets, dense_probs, from_logits, sparse_probs
from kdcache.train.config import (
    CELossConfig,
    DISTLossConfig,
    EffDstlLossConfig,
    KDLossConfig,
    OptimizerConfig,
    SchedulerConfig,
    TrainConfig,
    WSLLossConfig,
)
from kdcache.train.losses import Criterion, dense_kl, mined_targets, pearson, sparse_kl, wsl_weights
from kdcache.train.schedule import Segment, build_optimizer, lr_at, place_stages, stage_at

STUDENT = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.5, 0.2, 1.5, -0.3], [0.3, -0.2, 0.1, 0.0]])
TEACHER = torch.tensor([[3.0, 0.5, 0.2, -2.0], [0.1, 2.5, 0.3, 0.0], [1.0, -1.0, 2.0, 0.5]])
LABELS = torch.tensor([0, 2, 2])


def softmax(row: list[float], t: float = 1.0) -> list[float]:
    exps = [math.exp(v / t) for v in row]
    return [e / sum(exps) for e in exps]


def kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q, strict=True) if a > 0)


def exact(
    logits: torch.Tensor = TEACHER, labels: torch.Tensor = LABELS, k: int | None = None
) -> SparseTargets:
    return from_logits(logits, labels, k or logits.shape[1])


# ---- CE and KD -------------------------------------------------------------------------------


def test_ce_with_label_smoothing_matches_formula():
    parts = Criterion(CELossConfig(label_smoothing=0.1), 4)(STUDENT, LABELS, None, 0)
    expected = 0.0
    for row, y in zip(STUDENT.tolist(), LABELS.tolist(), strict=True):
        p = softmax(row)
        target = [0.1 / 4 + (0.9 if c == y else 0.0) for c in range(4)]
        expected -= sum(t * math.log(q) for t, q in zip(target, p, strict=True))
    assert parts.total.item() == pytest.approx(expected / 3, rel=1e-6)
    assert parts.kd is None


def test_kd_matches_hinton_formula():
    cfg = KDLossConfig(alpha=0.7, temperature=2.0)
    parts = Criterion(cfg, 4)(STUDENT, LABELS, exact(), 0)
    t = 2.0
    kd = (
        sum(
            kl(softmax(tr, t), softmax(sr, t))
            for tr, sr in zip(TEACHER.tolist(), STUDENT.tolist(), strict=True)
        )
        / 3
        * t
        * t
    )
    ce = (
        sum(
            -math.log(softmax(sr)[y])
            for sr, y in zip(STUDENT.tolist(), LABELS.tolist(), strict=True)
        )
        / 3
    )
    assert parts.kd.item() == pytest.approx(kd, rel=1e-5)
    assert parts.ce.item() == pytest.approx(ce, rel=1e-6)
    assert parts.total.item() == pytest.approx(0.3 * ce + 0.7 * kd, rel=1e-5)
    assert parts.log().keys() == {"loss", "ce", "kd"}


def test_kd_gradient_is_scaled_difference_of_probabilities():
    logits = STUDENT.clone().requires_grad_(True)
    Criterion(KDLossConfig(alpha=1.0, temperature=2.0), 4)(
        logits, LABELS, exact(), 0
    ).total.backward()
    p_s = torch.softmax(STUDENT / 2, 1)
    p_t = torch.softmax(TEACHER / 2, 1)
    torch.testing.assert_close(logits.grad, 2.0 * (p_s - p_t) / 3, rtol=1e-5, atol=1e-6)


def test_early_stopped_kd_is_plain_ce_from_stop_epoch():
    criterion = Criterion(KDLossConfig(alpha=0.9, stop_epoch=3), 4)
    before = criterion(STUDENT, LABELS, exact(), 2)
    after = criterion(STUDENT, LABELS, None, 3)
    assert before.kd is not None and before.kd_weight == 0.9
    assert after.kd is None and after.kd_weight == 0.0
    assert after.total.item() == pytest.approx(
        torch.nn.functional.cross_entropy(STUDENT, LABELS).item()
    )


def test_distillation_without_targets_is_an_error():
    with pytest.raises(ValueError, match="needs teacher targets"):
        Criterion(KDLossConfig(), 4)(STUDENT, LABELS, None, 0)


# ---- sparse targets and tails -------------------------------------------------------------------


def test_sparse_reconstruction_exact_at_t1_and_tail_mass_kept():
    t = exact(k=2)
    p_top, p_other = sparse_probs(t, 4, 1.0, "spread")
    full = torch.softmax(TEACHER, 1)
    torch.testing.assert_close(p_top, full.gather(1, t.idx), rtol=1e-6, atol=1e-7)
    tail = 1 - full.gather(1, t.idx).sum(1)
    torch.testing.assert_close(2 * p_other, tail, rtol=1e-5, atol=1e-7)
    renorm_top, renorm_other = sparse_probs(t, 4, 1.0, "renorm")
    torch.testing.assert_close(renorm_top.sum(1), torch.ones(3))
    assert renorm_other.abs().max() == 0


@pytest.mark.parametrize("tail", ["spread", "renorm"])
@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.7])
def test_sparse_kl_equals_dense_kl_of_the_same_target(tail, temperature):
    t = exact(k=2)
    log_q = torch.log_softmax(STUDENT / temperature, 1)
    dense = dense_probs(t, 4, temperature, tail)
    torch.testing.assert_close(
        sparse_kl(log_q, t, 4, temperature, tail), dense_kl(dense, log_q), rtol=1e-5, atol=1e-6
    )


def test_kd_with_full_k_is_the_same_for_both_tails():
    a = Criterion(KDLossConfig(tail="spread"), 4)(STUDENT, LABELS, exact(), 0).total
    b = Criterion(KDLossConfig(tail="renorm"), 4)(STUDENT, LABELS, exact(), 0).total
    assert a.item() == pytest.approx(b.item(), rel=1e-6)


def test_tail_choice_changes_truncated_kd():
    a = Criterion(KDLossConfig(tail="spread"), 4)(STUDENT, LABELS, exact(k=1), 0).kd
    b = Criterion(KDLossConfig(tail="renorm"), 4)(STUDENT, LABELS, exact(k=1), 0).kd
    assert abs(a.item() - b.item()) > 1e-3


# ---- DIST ---------------------------------------------------------------------------------------


def test_pearson_matches_numpy():
    a, b = np.random.default_rng(0).normal(size=(2, 5, 7))
    ours = pearson(torch.tensor(a), torch.tensor(b)).numpy()
    expected = [np.corrcoef(x, y)[0, 1] for x, y in zip(a, b, strict=True)]
    np.testing.assert_allclose(ours, expected, rtol=1e-6)


def test_dist_matches_formula():
    cfg = DISTLossConfig(beta=1.0, gamma=0.5, temperature=2.0, ce_weight=1.0, kd_weight=2.0)
    parts = Criterion(cfg, 4)(STUDENT, LABELS, exact(), 0)
    p_s = np.array([softmax(r, 2.0) for r in STUDENT.tolist()])
    p_t = np.array([softmax(r, 2.0) for r in TEACHER.tolist()])
    inter = 1 - np.mean([np.corrcoef(x, y)[0, 1] for x, y in zip(p_s, p_t, strict=True)])
    intra = 1 - np.mean([np.corrcoef(x, y)[0, 1] for x, y in zip(p_s.T, p_t.T, strict=True)])
    kd = 4.0 * (1.0 * inter + 0.5 * intra)
    assert parts.kd.item() == pytest.approx(kd, rel=1e-5)
    assert parts.total.item() == pytest.approx(parts.ce.item() + 2.0 * kd, rel=1e-5)


def test_dist_is_zero_for_identical_outputs():
    parts = Criterion(DISTLossConfig(), 4)(TEACHER, LABELS, exact(), 0)
    assert abs(parts.kd.item()) < 1e-6


# ---- WSL ----------------------------------------------------------------------------------------


def test_wsl_weights_match_formula():
    w = wsl_weights(STUDENT, LABELS, exact())
    for i, (sr, tr, y) in enumerate(
        zip(STUDENT.tolist(), TEACHER.tolist(), LABELS.tolist(), strict=True)
    ):
        ce_s = -math.log(softmax(sr)[y])
        ce_t = -math.log(softmax(tr)[y])
        assert w[i].item() == pytest.approx(1 - math.exp(-ce_s / ce_t), rel=1e-5)


def test_wsl_weight_of_equal_ces_is_one_minus_inverse_e():
    assert wsl_weights(TEACHER, LABELS, exact()).tolist() == pytest.approx(
        [1 - math.exp(-1)] * 3, rel=1e-5
    )


def test_wsl_loss_matches_formula_and_detaches_weights():
    cfg = WSLLossConfig(temperature=2.0, ce_weight=1.0, kd_weight=2.5, label_smoothing=0.1)
    logits = STUDENT.clone().requires_grad_(True)
    parts = Criterion(cfg, 4)(logits, LABELS, exact(), 0)
    w = wsl_weights(STUDENT, LABELS, exact()).tolist()
    per_row = [
        kl(softmax(tr, 2.0), softmax(sr, 2.0))
        for tr, sr in zip(TEACHER.tolist(), STUDENT.tolist(), strict=True)
    ]
    kd = 4.0 * sum(a * b for a, b in zip(w, per_row, strict=True)) / 3
    ce = torch.nn.functional.cross_entropy(STUDENT, LABELS, label_smoothing=0.1).item()
    assert parts.kd.item() == pytest.approx(kd, rel=1e-5)
    assert parts.total.item() == pytest.approx(ce + 2.5 * kd, rel=1e-5)
    assert parts.weight.item() == pytest.approx(sum(w) / 3, rel=1e-6)
    assert (
        parts.sample_weights.tolist() == pytest.approx(w, rel=1e-6)
        and not parts.sample_weights.requires_grad
    )
    parts.total.backward()  # the weights carry no gradient: only CE and KL terms do
    assert torch.isfinite(logits.grad).all()


# ---- EffDstl consistent knowledge mining ---------------------------------------------------------


def test_mining_replaces_only_correct_teacher_rows_where_student_is_more_confident():
    teacher = torch.tensor([[2.0, 1.0, 0.0], [2.0, 1.0, 0.0], [0.0, 3.0, 0.0], [5.0, 0.0, 0.0]])
    student = torch.tensor([[9.0, 0.0, 0.0], [0.0, 0.0, 0.0], [9.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    labels = torch.tensor([0, 0, 0, 0])
    target, mined = mined_targets(
        student,
        labels,
        exact(teacher, labels),
        teacher_temperature=0.7,
        student_temperature=1.0,
        smooth_to=0.99,
    )
    # row 0: teacher correct, student more confident -> mined; row 1: teacher correct, student less
    # confident -> kept; row 2: teacher wrong -> kept (even though the student is confident); row 3:
    # teacher correct and sharper than the student -> kept
    assert mined.tolist() == [True, False, False, False]
    torch.testing.assert_close(target[0], torch.tensor([0.99, 0.005, 0.005]))
    torch.testing.assert_close(target[1:], torch.softmax(teacher[1:] / 0.7, 1))


def test_effdstl_loss_matches_formula():
    cfg = EffDstlLossConfig(ce_weight=0.5, kd_weight=1.0)
    parts = Criterion(cfg, 4)(STUDENT, LABELS, exact(), 0)
    target, mined = mined_targets(STUDENT, LABELS, exact())
    expected = (
        sum(kl(t, softmax(s)) for t, s in zip(target.tolist(), STUDENT.tolist(), strict=True)) / 3
    )
    assert parts.kd.item() == pytest.approx(expected, rel=1e-5)
    assert parts.mining_rate.item() == pytest.approx(mined.float().mean().item())
    assert torch.equal(parts.mined, mined)
    assert parts.total.item() == pytest.approx(0.5 * parts.ce.item() + expected, rel=1e-5)


# ---- LR schedules --------------------------------------------------------------------------------


def segment(**sched) -> Segment:
    return Segment(0, 0, 10, OptimizerConfig(lr=1.0), SchedulerConfig(**sched))


def test_cosine_with_warmup_and_min_lr():
    seg = segment(name="cosine", warmup_epochs=2, warmup_start=0.1, min_lr=0.01)
    assert lr_at(seg, 0.0) == pytest.approx(0.1)
    assert lr_at(seg, 1.0) == pytest.approx(0.55)
    assert lr_at(seg, 2.0) == pytest.approx(1.0)
    assert lr_at(seg, 6.0) == pytest.approx(0.01 + 0.99 * 0.5)
    assert lr_at(seg, 10.0) == pytest.approx(0.01)


def test_step_and_constant_schedules():
    step = segment(name="step", milestones=[3, 6], gamma=0.1)
    assert [lr_at(step, e) for e in (0, 2.9, 3, 6.5)] == pytest.approx([1.0, 1.0, 0.1, 0.01])
    assert lr_at(segment(name="constant"), 7.3) == 1.0


# ---- stages and optimizers -----------------------------------------------------------------------


def test_stages_share_an_optimizer_until_one_sets_its_own():
    config = TrainConfig.model_validate(
        {
            "data": {"shards": "x.tar", "num_classes": 4},
            "student": {"name": "kd_mlp"},
            "teacher": {"mode": "online", "name": "t"},
            "cache": {"path": None},
            "optimizer": {"lr": 0.5},
            "scheduler": {"warmup_epochs": 1},
            "stages": [
                {"epochs": 2, "loss": {"name": "kd", "stop_epoch": 1}},
                {"epochs": 3},
                {
                    "epochs": 1,
                    "teacher": "u",
                    "loss": {"name": "effdstl"},
                    "optimizer": {"lr": 0.05, "weight_decay": 0},
                    "scheduler": {"min_lr": 5e-4},
                },
            ],
        }
    )
    stages, segments = place_stages(
        config.stages,
        teacher=config.teacher,
        optimizer=config.optimizer,
        scheduler=config.scheduler,
    )
    assert [(s.start, s.end, s.segment, s.teacher) for s in stages] == [
        (0, 2, 0, "t"),
        (2, 5, 0, None),
        (5, 6, 1, "u"),
    ]
    assert [
        (g.start, g.end, g.optimizer.lr, g.scheduler.min_lr, g.scheduler.warmup_epochs)
        for g in segments
    ] == [(0, 5, 0.5, 0.0, 1.0), (5, 6, 0.05, 5e-4, 0.0)]
    assert stage_at(stages, 4).index == 1 and stage_at(stages, 5).index == 2


def test_optimizers_and_weight_decay_groups():
    model = build_model(ModelSpec(name="kd_cnn_tiny"), 4, 1)
    adamw = build_optimizer(model, OptimizerConfig(name="adamw", lr=1e-3, weight_decay=0.05))
    assert isinstance(adamw, torch.optim.AdamW)
    decay, no_decay = adamw.param_groups
    assert decay["weight_decay"] == 0.05 and all(p.ndim > 1 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and all(p.ndim == 1 for p in no_decay["params"])
    sgd = build_optimizer(
        model, OptimizerConfig(name="sgd", nesterov=True, decay_norm_and_bias=True)
    )
    assert (
        isinstance(sgd, torch.optim.SGD) and len(sgd.param_groups) == 1 and sgd.defaults["nesterov"]
    )
