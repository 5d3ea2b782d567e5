"""SFTN teacher training (paper 004): the loss, the branches, the run, and its teacher as a
cache's teacher.

Tiny timm models on 32x32 grey images (timm's ``test_resnet`` teacher, ``test_resnet`` and
``mobilenetv3_small_050`` students), one torch thread (a step well under a second on CPU).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdcache.cache_tools.verify import verify_cache
from kdcache.cli.train import format_summary
from kdcache.core.errors import ConfigError
from kdcache.core.results import TrainResult
from kdcache.models.build import ModelSpec, build_model
from kdcache.models.sftn import Level, SFTNNet, build_branches, feature_transform
from kdcache.train.config import SFTNConfig, TrainConfig
from kdcache.train.sftn import BRANCHES_FILE, branch_kl, sftn_parts
from kdcache.train.trainer import train
from tests.support.cachebuild import precompute_config, run_precompute, tiny_recipe, write_shards
from tests.support.trainrun import read_metrics

SIZE = 32
CLASSES = 4
TEACHER = "test_resnet"
PAPER_CIFAR = {"lambda_t": 1.0, "lambda_kl": 3.0, "lambda_ce": 1.0, "temperature": 1.0}


@pytest.fixture(autouse=True)
def one_thread():
    """2 shared cores: one intra-op thread is many times faster than two under load."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict[str, list[str]]:
    root = tmp_path_factory.mktemp("sftn")
    return {
        "train": write_shards(root, num_shards=2, per_shard=16, size=SIZE),
        "val": write_shards(root, prefix="val", num_shards=1, per_shard=12, size=SIZE),
    }


def teacher_config(shards, run_dir: Path, student: str = TEACHER, **run) -> TrainConfig:
    """One epoch of SFTN training of ``test_resnet`` with ``student`` branches, no cache."""
    return TrainConfig.model_validate(
        {
            "run": {"dir": str(run_dir), "log_every": 1, "progress": False, "device": "cpu", **run},
            "data": {
                "shards": shards["train"],
                "val_shards": shards["val"],
                "num_classes": CLASSES,
                "batch_size": 8,
                "num_workers": 0,
                "shuffle_buffer": 8,
            },
            "views": {"recipe": tiny_recipe(SIZE).model_dump()},
            "student": {"name": TEACHER},
            "teacher": {"mode": "none"},
            "sftn": {"student": {"name": student}},
            "optimizer": {"lr": 0.02},
            "stages": [{"epochs": 1, "loss": {"name": "ce"}}],
        }
    )


def sftn_net(student: str = TEACHER) -> SFTNNet:
    torch.manual_seed(0)
    teacher = build_model(ModelSpec(name=TEACHER), CLASSES, 1)
    branches = build_branches(teacher, TEACHER, ModelSpec(name=student), CLASSES, 1, SIZE)
    return SFTNNet(teacher, branches)


# ---- the loss -----------------------------------------------------------------------------------


def hand_kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q, strict=True))


def softmax(row: list[float], t: float = 1.0) -> list[float]:
    exps = [math.exp(v / t) for v in row]
    return [e / sum(exps) for e in exps]


def test_loss_matches_a_hand_computation_at_the_papers_cifar_settings():
    teacher = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 0.3]])
    branches = [torch.tensor([[1.0, 1.0, 0.0], [0.2, -0.4, 2.0]]), torch.tensor([[0.0, 3, 0]] * 2)]
    labels = torch.tensor([0, 2])
    parts = sftn_parts(teacher, branches, labels, **PAPER_CIFAR)

    def ce(rows, ys):
        return sum(-math.log(softmax(r)[y]) for r, y in zip(rows, ys, strict=True)) / len(ys)

    t_rows = teacher.tolist()
    ce_t = ce(t_rows, [0, 2])
    # RepDistiller's direction: the teacher's distribution is the target, KL(q_T || q_R^i)
    kls = [
        sum(hand_kl(softmax(t), softmax(r)) for t, r in zip(t_rows, b.tolist(), strict=True)) / 2
        for b in branches
    ]
    ce_r = sum(ce(b.tolist(), [0, 2]) for b in branches) / 2
    expected = 1.0 * ce_t + 3.0 * sum(kls) / 2 + 1.0 * ce_r
    assert parts.total.item() == pytest.approx(expected, rel=1e-6)
    assert parts.ce.item() == pytest.approx(ce_t, rel=1e-6)
    assert parts.kd.item() == pytest.approx(sum(kls) / 2, rel=1e-6)
    assert parts.branch_ce.item() == pytest.approx(ce_r, rel=1e-6)
    assert parts.kd_weight == 3.0


def test_kl_direction_and_temperature():
    teacher = torch.tensor([[2.0, 0.5, -1.0]])
    branch = torch.tensor([[0.0, 1.5, 0.5]])
    t_probs = softmax(teacher[0].tolist(), 4.0)
    r_probs = softmax(branch[0].tolist(), 4.0)
    forward = branch_kl(branch, teacher, temperature=4.0)
    reverse = branch_kl(branch, teacher, temperature=4.0, direction="branch_to_teacher")
    assert forward.item() == pytest.approx(16.0 * hand_kl(t_probs, r_probs), rel=1e-6)
    assert reverse.item() == pytest.approx(16.0 * hand_kl(r_probs, t_probs), rel=1e-6)
    assert forward.item() != pytest.approx(reverse.item(), rel=1e-3)


def test_presets_and_overrides():
    cifar = SFTNConfig.model_validate({"student": {"name": TEACHER}})
    assert cifar.model_dump(include=set(PAPER_CIFAR)) == PAPER_CIFAR
    imagenet = SFTNConfig.model_validate(
        {"student": {"name": TEACHER}, "preset": "imagenet", "temperature": 4}
    )
    assert (imagenet.lambda_t, imagenet.lambda_kl, imagenet.lambda_ce) == (1.0, 1.0, 1.0)
    assert imagenet.temperature == 4.0
    with pytest.raises(ValueError, match="lambda_kl"):
        SFTNConfig.model_validate({"student": {"name": TEACHER}, "lambda_kl": -1})
    with pytest.raises(ValueError, match="branches are built from timm models"):
        SFTNConfig.model_validate({"student": {"name": "resnet18", "source": "torchvision"}})


# ---- gradients into the teacher -----------------------------------------------------------------


def teacher_grads(net: SFTNNet, images: torch.Tensor, labels: torch.Tensor, **weights) -> dict:
    net.zero_grad(set_to_none=True)
    logits, branches = net(images)
    sftn_parts(logits, branches, labels, **{**PAPER_CIFAR, **weights}).total.backward()
    return {n: p.grad.clone() for n, p in net.teacher.named_parameters() if p.grad is not None}


def test_branch_losses_change_the_teachers_gradients():
    net = sftn_net()
    torch.manual_seed(1)
    images = torch.randn(6, 1, SIZE, SIZE)
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    alone = teacher_grads(net, images, labels, lambda_kl=0.0, lambda_ce=0.0)
    # with the branch terms off the teacher's gradients are plain CE's
    net.teacher.zero_grad(set_to_none=True)
    F.cross_entropy(net.teacher(images), labels).backward()
    for name, param in net.teacher.named_parameters():
        torch.testing.assert_close(alone[name], param.grad, msg=name)
    paper = teacher_grads(net, images, labels)
    # the branch after layer1 reaches the teacher's first stage (and the stem below it); at
    # init some of its tensors have no gradient at all (timm zero-inits each block's last BN)
    first_stage = [n for n in alone if n.startswith(("layer1.", "conv1", "bn1"))]
    moved = [n for n in first_stage if not torch.allclose(alone[n], paper[n])]
    assert len(moved) > len(first_stage) // 2, moved
    # the KL term alone moves the teacher's head too (its output is not detached) ...
    kl_only = teacher_grads(net, images, labels, lambda_t=0.0, lambda_ce=0.0)
    assert kl_only["fc.weight"].abs().sum() > 0
    # ... unless asked to detach it: then only the features feeding the branches move
    detached = teacher_grads(net, images, labels, lambda_t=0.0, lambda_ce=0.0, detach_teacher=True)
    assert "fc.weight" not in detached or detached["fc.weight"].abs().sum() == 0
    assert sum(g.abs().sum() for n, g in detached.items() if n.startswith("layer1.")) > 0


# ---- the branches -------------------------------------------------------------------------------


def test_a_heterogeneous_pair_builds_and_trains():
    net = sftn_net("mobilenetv3_small_050")
    assert net.branches.modules_in == ["layer1", "layer2", "layer3"]  # N = 4 stages, 3 branches
    images = torch.randn(4, 1, SIZE, SIZE)
    logits, branches = net(images)
    assert logits.shape == (4, CLASSES)
    assert [b.shape for b in branches] == [(4, CLASSES)] * 3
    loss = sftn_parts(logits, branches, torch.tensor([0, 1, 2, 3]), **PAPER_CIFAR).total
    loss.backward()
    for branch in net.branches.branches:
        assert branch.transform[0].weight.grad.abs().sum() > 0
        # the student's stages before the entry point are gone (identity), its head is there
        assert isinstance(branch.student.conv_stem, nn.Identity)
        assert branch.student.classifier.weight.grad is not None


@pytest.mark.parametrize(
    ("teacher_side", "student_side", "first"),
    [(8, 8, nn.Conv2d), (8, 4, nn.Conv2d), (8, 2, nn.Conv2d), (4, 8, nn.ConvTranspose2d)],
)
def test_feature_transforms_map_shapes(teacher_side, student_side, first):
    transform = feature_transform(
        Level("t", 12, teacher_side, teacher_side), Level("s", 5, student_side, student_side)
    )
    assert isinstance(transform[0], first)
    kernel = {8: 1, 4: 3, 2: 3}[student_side] if first is nn.Conv2d else 4
    assert transform[0].kernel_size == (kernel, kernel)
    out = transform(torch.randn(2, 12, teacher_side, teacher_side))
    assert out.shape == (2, 5, student_side, student_side)


def test_shapes_that_do_not_pair_are_refused():
    with pytest.raises(ConfigError, match="not a power of two"):
        feature_transform(Level("layer1", 8, 6, 6), Level("blocks.0", 8, 4, 4))
    teacher = build_model(ModelSpec(name=TEACHER), CLASSES, 1)
    with pytest.raises(ConfigError, match="sftn: model 'kd_mlp' exposes no stage features"):
        build_branches(teacher, TEACHER, ModelSpec(name="kd_mlp"), CLASSES, 1, SIZE)


def test_config_rules(shards, tmp_path):
    data = teacher_config(shards, tmp_path).model_dump()
    data["teacher"] = {"mode": "online", "name": "x"}
    with pytest.raises(ValueError, match="sftn: trains a teacher from labels; teacher.mode"):
        TrainConfig.model_validate(data)
    data = teacher_config(shards, tmp_path).model_dump()
    data["stages"][0]["loss"] = {"name": "kd"}
    with pytest.raises(ValueError, match="stages.0.loss.name: with sftn the loss is SFTN's"):
        TrainConfig.model_validate(data)


# ---- a run, its checkpoint, a cache and a student -----------------------------------------------


def test_an_sftn_teacher_run_saves_the_plain_teacher_and_its_branches(shards, tmp_path):
    run = tmp_path / "teacher"
    result = train(teacher_config(shards, run))
    assert result.completed and len(result.sftn_branch_top1) == 3
    assert TrainResult.read(run / "summary.json").sftn_branch_top1 == result.sftn_branch_top1
    assert "SFTN student branches, top-1 from the first stage on: " in format_summary(result)
    evals = [m for m in read_metrics(run) if m["kind"] == "eval"]
    assert {"top1", "branch1_top1", "branch2_top1", "branch3_top1"} <= set(evals[-1])
    trains = [m for m in read_metrics(run) if m["kind"] == "train"]
    assert all({"ce", "kd", "branch_ce"} <= set(m) for m in trains)
    # the checkpoint is the plain teacher: it loads strictly into a fresh test_resnet
    spec = ModelSpec(name=TEACHER, checkpoint=str(run / "checkpoints" / "model_final.pt"))
    build_model(spec, CLASSES, 1)
    branches = torch.load(run / BRANCHES_FILE, weights_only=True)
    assert branches["teacher_modules"] == ["layer1", "layer2", "layer3"]
    assert any(k.startswith("branches.2.student.") for k in branches["state_dict"])


def test_a_resumed_sftn_run_ends_where_an_uninterrupted_one_does(shards, tmp_path):
    whole = tmp_path / "whole"
    train(teacher_config(shards, whole))
    parted = tmp_path / "parted"
    first = train(teacher_config(shards, parted, max_steps=2))
    assert not first.completed
    train(teacher_config(shards, parted, resume="must"))
    for name in ("checkpoints/model_final.pt", BRANCHES_FILE):
        a = torch.load(whole / name, weights_only=True)
        b = torch.load(parted / name, weights_only=True)
        a = a.get("state_dict", a)
        b = b.get("state_dict", b)
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], msg=f"{name}: {key}")
    assert read_metrics(whole) == read_metrics(parted)


def test_an_sftn_teacher_precomputes_and_teaches_a_student_from_the_cache(shards, tmp_path):
    run = tmp_path / "teacher"
    train(teacher_config(shards, run))
    spec = {"name": TEACHER, "checkpoint": str(run / "checkpoints" / "model_final.pt")}
    cache = tmp_path / "cache.zarr"
    teachers = [{"name": "sftn", "model": spec, "k": CLASSES, "encoding": "fp16"}]
    config = precompute_config(
        cache, shards["train"], teachers, recipe=tiny_recipe(SIZE), num_views=2, classes=CLASSES
    )
    store = run_precompute(config)
    assert store.teachers == ["sftn"] and store.teacher_done("sftn").all()
    verified = verify_cache(store, num=16, device="cpu")  # recomputes with the checkpoint
    assert verified.ok, verified
    student = TrainConfig.model_validate(
        {
            "run": {"dir": str(tmp_path / "student"), "progress": False, "device": "cpu"},
            "data": {"shards": shards["train"], "batch_size": 8, "num_workers": 0},
            "cache": {"path": str(cache)},
            "student": {"name": "kd_mlp", "kwargs": {"img_size": SIZE, "hidden": 16}},
            "teacher": {"mode": "cache", "name": "sftn"},
            "stages": [{"epochs": 1, "loss": {"name": "kd", "temperature": 4.0}}],
        }
    )
    result = train(student)
    assert result.completed and result.teacher_forwards == 0
    kd = [m["kd"] for m in read_metrics(tmp_path / "student") if m["kind"] == "train"]
    assert kd and all(v > 0 for v in kd)
    assert json.loads((tmp_path / "student" / "summary.json").read_text())["mode"] == "cache"
