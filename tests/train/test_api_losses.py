"""The public losses: plain keyword functions and modules equal to what the trainer runs, mixed
labels, WSL's weight temperature against the official EffDstl code's formulas, and the registry
that makes a loss of one's own usable by name in a train config."""

from __future__ import annotations

import inspect
import json
import math

import pytest
import torch
import torch.nn.functional as F
import yaml

import kdcache
from kdcache.cli import main as kdcache_cli
from kdcache.core.config import validate
from kdcache.core.errors import ConfigError
from kdcache.targets.sparse import MixedLabels, from_logits
from kdcache.train.config import BUILTIN_LOSS_CONFIGS, TrainConfig
from kdcache.train.losses import TRAINER_KEYS, Criterion, teacher_label_ce, wsl_weights
from tests.support import lossplugin

torch.manual_seed(0)
STUDENT = torch.randn(6, 5)
TEACHER = torch.randn(6, 5) * 2
LABELS = torch.tensor([0, 1, 2, 3, 4, 0])
SETTINGS = {
    "ce": {"label_smoothing": 0.1},
    "kd": {"temperature": 2.0, "alpha": 0.7, "tail": "renorm", "label_smoothing": 0.1},
    "dist": {"beta": 1.0, "gamma": 0.5, "temperature": 2.0, "ce_weight": 1.0, "kd_weight": 2.0},
    "wsl": {"temperature": 2.0, "weight_temperature": 2.0, "kd_weight": 0.5},
    "effdstl": {"teacher_temperature": 0.7, "ce_weight": 0.5, "smooth_to": 0.99},
}


def exact(k: int = 5):
    return from_logits(TEACHER, LABELS, k)


@pytest.mark.parametrize("name", list(SETTINGS))
def test_each_plain_function_is_what_the_trainer_runs(name):
    settings = SETTINGS[name]
    config = BUILTIN_LOSS_CONFIGS[name](name=name, **settings)
    trainer = Criterion(config, 5)(STUDENT, LABELS, exact(3), 0).total
    if name == "ce":
        plain = kdcache.ce(STUDENT, LABELS, **settings)
        module = kdcache.CELoss(**settings)(STUDENT, LABELS)
    else:
        plain = getattr(kdcache, name)(STUDENT, exact(3), LABELS, **settings)
        module = kdcache.Loss(name, **settings)(STUDENT, exact(3), LABELS)
    assert torch.equal(plain, trainer) and torch.equal(module, trainer)


@pytest.mark.parametrize("name", ["kd", "dist", "wsl", "effdstl"])
def test_each_plain_function_takes_what_its_parts_form_takes(name):
    """Plain functions with real signatures (what editors show) that match the ``*_parts``."""
    plain = inspect.signature(getattr(kdcache, name), eval_str=True)
    parts = inspect.signature(getattr(kdcache, f"{name}_parts"), eval_str=True)
    assert plain.parameters == parts.parameters
    assert plain.return_annotation is torch.Tensor and getattr(kdcache, name).__name__ == name


@pytest.mark.parametrize("name", list(SETTINGS))
def test_the_functions_defaults_are_the_configs(name):
    """One set of defaults: a config that leaves a setting out trains like a call that does."""
    params = kdcache.get_loss(name).settings
    fields = BUILTIN_LOSS_CONFIGS[name].model_fields
    assert set(params) == set(fields) - set(TRAINER_KEYS)
    for key, param in params.items():
        assert param.default == fields[key].default, key


def test_dense_teacher_logits_are_exact_targets():
    assert torch.equal(
        kdcache.kd(STUDENT, TEACHER, LABELS, temperature=3.0),
        kdcache.kd(STUDENT, exact(), LABELS, temperature=3.0),
    )
    # pure KD needs no labels; with a CE term the error says what is missing
    kdcache.kd(STUDENT, TEACHER, temperature=3.0, alpha=1.0)
    with pytest.raises(ValueError, match=r"kd: labels are needed \(the CE term has weight 0.1"):
        kdcache.kd(STUDENT, TEACHER)


def test_the_modules_name_their_settings_and_the_registered_losses():
    module = kdcache.KDLoss(temperature=2.0, alpha=0.5)
    assert "'kd', temperature=2.0, alpha=0.5" in repr(module)
    with pytest.raises(ValueError, match=r"loss 'kd' has no setting\(s\) \['beta'\]; its settings"):
        kdcache.KDLoss(beta=1.0)
    with pytest.raises(KeyError, match="no loss named 'nope'; registered: ce, kd, dist, wsl"):
        kdcache.Loss("nope")


def test_mixed_labels_mix_the_two_cross_entropies():
    partner = torch.tensor([1, 1, 0, 0, 2, 2])
    lam = torch.tensor([1.0, 0.3, 0.5, 0.9, 0.0, 0.6])
    mixed = MixedLabels(LABELS, partner, lam)
    own = F.cross_entropy(STUDENT, LABELS, reduction="none", label_smoothing=0.1)
    other = F.cross_entropy(STUDENT, partner, reduction="none", label_smoothing=0.1)
    expected = (lam * own + (1 - lam) * other).mean()
    torch.testing.assert_close(kdcache.ce(STUDENT, mixed, label_smoothing=0.1), expected)
    unmixed = MixedLabels.unmixed(LABELS)
    torch.testing.assert_close(kdcache.ce(STUDENT, unmixed), kdcache.ce(STUDENT, LABELS))
    targets = from_logits(TEACHER, mixed, 5)  # as precompute stores a mixed view's targets
    for name in ("kd", "dist", "wsl", "effdstl"):
        assert torch.isfinite(getattr(kdcache, name)(STUDENT, targets, mixed))
    parts = kdcache.effdstl_parts(STUDENT, targets, mixed)
    assert not parts.mined[lam < 1].any()  # a mixed image's label is not one class


# ---- WSL's weight temperature and the official EffDstl code ----------------------------------


def test_the_teachers_ce_at_t_is_exact_with_every_class_and_bounded_with_a_tail():
    for temperature in (0.7, 1.0, 2.0):
        truth = -F.log_softmax(TEACHER / temperature, 1).gather(1, LABELS[:, None]).squeeze(1)
        torch.testing.assert_close(teacher_label_ce(exact(), 5, temperature), truth)
        cut = teacher_label_ce(exact(2), 5, temperature)
        if temperature == 1.0:  # exact from lse whatever k is
            torch.testing.assert_close(cut, truth)
        elif temperature > 1.0:  # equal tail logits maximise Z_T: an upper bound
            assert (cut >= truth - 1e-6).all() and (cut > truth + 1e-4).any()
        else:
            assert (cut <= truth + 1e-6).all()


def official_wsl_stage1(student, teacher_logits, labels, smoothing=0.1, t=2.0, alpha=0.5):
    """EffDstl's stage 1 as its code runs it (configs/*_distill_*.py, mmcls WSLLoss with
    temperature 2, CrossEntropySmoothLoss 0.1, distill_loss_alpha 0.5), rewritten here."""
    n = student.shape[1]
    soft = torch.zeros_like(student).scatter_(1, labels[:, None], 1) * (1 - smoothing)
    ce = (-(soft + smoothing / n) * F.log_softmax(student, 1)).sum(1).mean()
    teacher = (teacher_logits / t).softmax(1)
    log_s = F.log_softmax(student / t, 1)
    ce_s = F.nll_loss(log_s, labels, reduction="none")
    ce_t = F.nll_loss(teacher.log(), labels, reduction="none")
    w = 1 - torch.exp(-(ce_s / ce_t).detach().clamp_min(0))
    kd = ((-teacher * log_s).sum(1) * w * t * t).mean()
    return ce + alpha * kd


def test_wsl_at_weight_temperature_2_has_effdstl_stage_1_gradient():
    ours = STUDENT.clone().requires_grad_(True)
    theirs = STUDENT.clone().requires_grad_(True)
    loss = kdcache.wsl(
        ours,
        exact(),
        LABELS,
        temperature=2.0,
        weight_temperature=2.0,
        kd_weight=0.5,
        label_smoothing=0.1,
    )
    loss.backward()
    official_wsl_stage1(theirs, TEACHER, LABELS).backward()
    torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-5, atol=1e-7)
    # the weights themselves: the CEs at T=2, not at 1
    at_two = wsl_weights(STUDENT, LABELS, exact(), 2.0)
    assert not torch.allclose(at_two, wsl_weights(STUDENT, LABELS, exact(), 1.0))


def official_effdstl_stage2(student, teacher_logits, labels, t=0.7):
    """EffDstl's stage 2 as its code runs it (WSLv2Hook: WSLLoss(temperature 0.7,
    only_teacher_temperature, remove_not_noisy_reg), ce_loss_alpha 0), rewritten here."""
    n = student.shape[1]
    teacher = (teacher_logits / t).softmax(1)
    log_s = F.log_softmax(student, 1)
    ce_s = F.nll_loss(log_s, labels, reduction="none")
    ce_t = F.nll_loss(teacher.log(), labels, reduction="none")
    mask = (ce_s < ce_t) & (teacher.max(1).indices == labels)
    w = (~mask).float()
    soft = torch.zeros_like(student).scatter_(1, labels[:, None], 1) * 0.99 + 0.01 / n
    ce = (-soft * log_s).sum(1)
    kd = (-teacher * log_s).sum(1) * w
    return (ce * (1 - w) + kd * w).mean()


def test_effdstl_without_ce_has_the_official_stage_2_gradient():
    student = TEACHER * 1.3 + 0.2 * STUDENT  # confident where the teacher is: rows get mined
    ours = student.clone().requires_grad_(True)
    theirs = student.clone().requires_grad_(True)
    parts = kdcache.effdstl_parts(ours, exact(), LABELS)
    assert parts.mined.any() and not parts.mined.all()
    parts.total.backward()
    official_effdstl_stage2(theirs, TEACHER, LABELS).backward()
    # the official smoothed label is 0.99 + 0.01/C on the label (ours 0.99): ~1e-3 of a gradient
    torch.testing.assert_close(ours.grad, theirs.grad, rtol=0, atol=2e-3)


# ---- the registry ----------------------------------------------------------------------------


def raw(**stage_loss) -> dict:
    return {
        "imports": ["tests.support.lossplugin"],
        "data": {"shards": ["a-000000.tar"]},
        "cache": {"path": "/tmp/c"},
        "student": {"name": "kd_mlp"},
        "teacher": {"name": "t"},
        "stages": [{"epochs": 1, "loss": stage_loss}],
    }


def test_a_registered_loss_is_usable_by_name_with_its_settings():
    config = validate(TrainConfig, raw(name="scaled_kd", scale=2.0))
    assert config.stages[0].loss.model_extra == {"scale": 2.0}
    criterion = Criterion(config.stages[0].loss, 5)
    parts = criterion(STUDENT, LABELS, exact(), 0)
    expected = 2.0 * kdcache.kd(STUDENT, exact(), LABELS, alpha=1.0)
    assert torch.equal(parts.total, expected) and parts.ce is None
    assert "scaled_kd" in kdcache.registered_losses()
    assert lossplugin.scaled_kd is kdcache.get_loss("scaled_kd").fn


@pytest.mark.parametrize(
    ("loss", "match"),
    [
        (
            {"name": "nope"},
            r"stages.0.loss.name: Value error, unknown loss 'nope'; registered: ce, kd, dist, "
            r"wsl, effdstl, scaled_kd",
        ),
        (
            {"name": "scaled_kd", "tail": "renorm"},
            r"stages.0.loss: Value error, loss 'scaled_kd' has no setting\(s\) \['tail'\]; "
            r"its settings: scale, temperature",
        ),
        ({"name": "scaled_kd", "scale": "big"}, None),
    ],
)
def test_registered_loss_rejections_name_the_key(loss, match):
    if match is None:  # a value of the wrong type reaches the function: no silent coercion here
        config = validate(TrainConfig, raw(**loss))
        with pytest.raises(TypeError):
            Criterion(config.stages[0].loss, 5)(STUDENT, LABELS, exact(), 0)
        return
    with pytest.raises(ConfigError, match=match):
        validate(TrainConfig, raw(**loss))


def test_imports_that_fail_are_named():
    with pytest.raises(ConfigError, match=r"imports: Value error, cannot import 'no_such_mod'"):
        validate(TrainConfig, {**raw(name="kd"), "imports": ["no_such_mod"]})


def test_registration_refuses_clashes_and_wrong_signatures():
    with pytest.raises(ValueError, match="'kd' is built in and cannot be replaced"):
        kdcache.register_loss("kd", lossplugin.scaled_kd)
    with pytest.raises(ValueError, match="'scaled_kd' is already registered"):
        kdcache.register_loss("scaled_kd", lossplugin.scaled_kd)
    kdcache.register_loss("scaled_kd", lossplugin.scaled_kd, replace=True)
    with pytest.raises(TypeError, match=r"must take \(student_logits, targets, labels\)"):
        kdcache.register_loss("bad", lambda logits, *, t=1.0: logits.sum())
    assert "bad" not in kdcache.registered_losses()


def test_kdcache_train_runs_a_registered_loss_from_a_config(world, tmp_path, capsys):
    data = {
        "imports": ["tests.support.lossplugin"],
        "run": {"dir": str(tmp_path / "run"), "log_every": 1, "progress": False},
        "data": {"shards": world["urls"], "batch_size": 8, "num_workers": 0},
        "cache": {"path": str(world["root"] / "cache.zarr")},
        "student": {"name": "kd_mlp", "kwargs": {"img_size": 12, "hidden": 16}},
        "teacher": {"name": "tiny"},
        "stages": [{"epochs": 1, "loss": {"name": "scaled_kd", "scale": 0.5}}],
    }
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(data))
    assert kdcache_cli(["train", str(path), "run.max_steps=2"]) == 0
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_lines = [x for x in lines if x.get("kind", "train") == "train" and "loss" in x]
    assert train_lines and all(math.isfinite(x["loss"]) and "ce" not in x for x in train_lines)
    assert inspect.signature(kdcache.kd, eval_str=True).return_annotation is torch.Tensor
