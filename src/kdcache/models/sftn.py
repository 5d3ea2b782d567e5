"""Student branches of a student-friendly teacher (SFTN, Park et al., NeurIPS 2021).

A teacher trained the SFTN way carries, after each of its stages but the last, a *student
branch*: a feature transform 𝒯ⁱ that maps the teacher's stage-i features to the input of the
student's stage i+1, then the student's remaining stages and its head. Training pulls the
branches' predictions towards the teacher's (and the teacher's towards theirs), so the teacher
learns features a student can follow.

The stages are the levels of timm's ``feature_info`` without the first one (the stem at
stride 2, which the paper counts inside block 1): ResNets have 4 (``layer1``..``layer4``),
timm's MobileNets 4 as well, so resnet→resnet and resnet→mobilenet pairs line up. A branch is a
whole student whose modules up to its entry level are replaced by ``nn.Identity``: this relies on
the student's forward being the sequence of its modules (true of timm's ResNets, MobileNets,
EfficientNets), which :func:`build_branches` checks numerically before training starts.

Only the branches live here; the teacher stays the plain timm model, so its state dict is an
ordinary checkpoint (``precompute``, ``inspect``, ``verify`` and online mode load it unchanged).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from kdcache.core.errors import ConfigError
from kdcache.models.build import ModelSpec, build_model

Tensor = torch.Tensor


@dataclass(frozen=True)
class Level:
    """One stage output of a model: the module that produces it and its shape ``[C, H, W]``."""

    module: str
    channels: int
    height: int
    width: int


def stage_modules(model: nn.Module, name: str) -> list[str]:
    """The modules whose outputs are the model's stage features (timm ``feature_info`` without
    the stem level), in forward order."""
    info = getattr(model, "feature_info", None)
    if not info or len(info) < 3:
        raise ConfigError(
            f"sftn: model {name!r} exposes no stage features (timm feature_info with a stem and "
            "at least two stages); use a timm CNN such as a ResNet or a MobileNet"
        )
    modules = [entry["module"] for entry in info]
    return modules[1:]  # level 0 is the stem: the paper's block 1 includes it


def stage_levels(model: nn.Module, name: str, example: Tensor) -> list[Level]:
    """The stage outputs' shapes on ``example`` (one forward in eval mode, by hooks)."""
    modules = stage_modules(model, name)
    outputs = capture(model, modules, example)
    return [Level(m, *outputs[m].shape[1:]) for m in modules]


def capture(model: nn.Module, modules: list[str], x: Tensor) -> dict[str, Tensor]:
    """Run ``model`` on ``x`` (in its current mode, without gradients) and return the named
    modules' outputs."""
    with torch.no_grad():
        return forward_with(model, modules, x)[1]


def forward_with(
    model: nn.Module, modules: list[str], x: Tensor
) -> tuple[Tensor, dict[str, Tensor]]:
    """``model(x)`` and the named modules' outputs on the way (hooks only for this call)."""
    found: dict[str, Tensor] = {}
    handles = [
        model.get_submodule(m).register_forward_hook(_store(found, m), always_call=True)
        for m in modules
    ]
    try:
        out = model(x)
    finally:
        for handle in handles:
            handle.remove()
    return out, found


def _store(found: dict[str, Tensor], name: str):
    def hook(_module: nn.Module, _inputs: tuple, output: Tensor) -> None:
        found[name] = output

    return hook


# ---- the feature transform ------------------------------------------------------------------


def feature_transform(source: Level, target: Level) -> nn.Sequential:
    """𝒯ⁱ: teacher stage features -> the student's input of the next stage.

    Same spatial size: a 1x1 conv; the teacher's map twice as large: a 3x3 stride-2 conv (4x:
    two of them); half as large: a 4x4 stride-2 transposed conv (two for 4x). Each conv is
    followed by BatchNorm and ReLU, as the FitNets-style regressor of the RepDistiller code base
    that SFTN's CIFAR-100 set-up builds on.
    """
    ratio = source.height / target.height
    if source.height * target.width != source.width * target.height or not _power_of_two(ratio):
        raise ConfigError(
            f"sftn: teacher stage {source.module!r} ({source.height}x{source.width}) and student "
            f"input {target.module!r} ({target.height}x{target.width}) differ by a factor that "
            "is not a power of two per side; choose models of matching strides"
        )
    steps = round(abs(math.log2(ratio)))
    out = target.channels
    if steps == 0:
        return _conv_bn_relu(nn.Conv2d(source.channels, out, 1, bias=False), out)
    layers: list[nn.Module] = []
    channels = source.channels
    for _ in range(steps):
        if ratio > 1:  # the teacher's map is larger: shrink
            conv = nn.Conv2d(channels, out, 3, stride=2, padding=1, bias=False)
        else:  # grow: (H - 1) * 2 - 2 + 4 = 2H
            conv = nn.ConvTranspose2d(channels, out, 4, stride=2, padding=1, bias=False)
        layers += list(_conv_bn_relu(conv, out))
        channels = out
    return nn.Sequential(*layers)


def _conv_bn_relu(conv: nn.Module, channels: int) -> nn.Sequential:
    return nn.Sequential(conv, nn.BatchNorm2d(channels), nn.ReLU(inplace=True))


def _power_of_two(ratio: float) -> bool:
    return ratio > 0 and abs(math.log2(ratio) - round(math.log2(ratio))) < 1e-9


# ---- the branches -------------------------------------------------------------------------------


def truncate_before(model: nn.Module, module: str) -> nn.Module:
    """``model`` with every module up to and including ``module`` (forward order, one level of
    ``nn.Sequential`` unfolded where a stage lives inside it) replaced by ``nn.Identity``: its
    forward then starts from ``module``'s output."""
    for name in _forward_order(model, module):
        parent, _, leaf = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, leaf, nn.Identity())
        if name == module:
            return model
    raise ConfigError(f"sftn: module {module!r} not found in the student")


def _forward_order(model: nn.Module, module: str) -> list[str]:
    """Top-level children in registration order; a Sequential that holds ``module`` unfolded."""
    names = []
    for name, child in model.named_children():
        if isinstance(child, nn.Sequential) and module.startswith(name + "."):
            names += [f"{name}.{sub}" for sub, _ in child.named_children()]
        else:
            names.append(name)
    return names


class StudentBranch(nn.Module):
    """One branch: 𝒯ⁱ, then the student from its stage i+1 on (its head included)."""

    def __init__(self, transform: nn.Module, student: nn.Module):
        super().__init__()
        self.transform = transform
        self.student = student

    def forward(self, features: Tensor) -> Tensor:
        return self.student(self.transform(features))


class StudentBranches(nn.Module):
    """The N-1 branches of a teacher: ``branches(features) -> [logits of branch i]``, where
    ``features`` are the teacher's stage outputs named by ``modules`` (the first N-1 stages)."""

    def __init__(self, modules: list[str], branches: list[StudentBranch]):
        super().__init__()
        self.modules_in = list(modules)
        self.branches = nn.ModuleList(branches)

    def forward(self, features: dict[str, Tensor]) -> list[Tensor]:
        return [b(features[m]) for m, b in zip(self.modules_in, self.branches, strict=True)]


def build_branches(
    teacher: nn.Module,
    teacher_name: str,
    student: ModelSpec,
    num_classes: int,
    in_chans: int,
    size: int,
) -> StudentBranches:
    """The student branches of ``teacher`` for ``student`` at input side ``size``.

    Each branch's student is built afresh (its own weights, as the paper's branches) and
    checked: fed its own stage features, the truncated student must give the whole student's
    logits, else its forward is not a sequence of modules and cannot be split."""
    example = torch.randn(2, in_chans, size, size)
    was_training = teacher.training
    teacher.eval()
    source = stage_levels(teacher, teacher_name, example)
    teacher.train(was_training)
    probe = build_model(student, num_classes, in_chans).eval()
    target = stage_levels(probe, student.name, example)
    if len(source) != len(target):
        raise ConfigError(
            f"sftn.student: {student.name!r} has {len(target)} stages, the teacher "
            f"{teacher_name!r} {len(source)}; SFTN pairs stage i of one with stage i+1 of the other"
        )
    branches = []
    for i in range(len(source) - 1):
        model = build_model(student, num_classes, in_chans)
        _check_split(model, student.name, target[i].module, example)
        branches.append(StudentBranch(feature_transform(source[i], target[i]), model))
    return StudentBranches([level.module for level in source[:-1]], branches)


def _check_split(model: nn.Module, name: str, module: str, example: Tensor) -> None:
    """Truncate ``model`` before ``module`` in place, after checking that the truncated model on
    ``module``'s output reproduces the whole model's logits (eval mode)."""
    model.eval()
    features = capture(model, [module], example)[module]
    with torch.no_grad():
        whole = model(example)
        truncate_before(model, module)
        split = model(features)
    model.train()
    if split.shape != whole.shape or not torch.allclose(split, whole, atol=1e-4, rtol=1e-4):
        raise ConfigError(
            f"sftn.student: {name!r} cannot be entered at {module!r} (its forward is not the "
            "sequence of its modules); choose a timm ResNet, MobileNet or EfficientNet"
        )


class SFTNNet(nn.Module):
    """The teacher with its branches, trained as one: ``net(x) -> (teacher logits, [branch
    logits])``. ``teacher`` is the plain model (its state dict is the run's checkpoint)."""

    def __init__(self, teacher: nn.Module, branches: StudentBranches):
        super().__init__()
        self.teacher = teacher
        self.branches = branches

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        logits, features = forward_with(self.teacher, self.branches.modules_in, x)
        return logits, self.branches(features)
