"""The student: built and checked against the views, placed on its device, wrapped for DDP, fed
normalised views, and optionally averaged (EMA)."""

from __future__ import annotations

import copy
import logging
import os
import shutil
from typing import cast

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from kdcache.core.errors import CacheMismatchError, ConfigError
from kdcache.models.build import build_model
from kdcache.train.config import RunConfig, StudentConfig
from kdcache.train.data import RunData
from kdcache.train.distributed import DistInfo
from kdcache.views.recipe import Rendering, normalize

log = logging.getLogger(__name__)


def build_student(
    student: StudentConfig, data: RunData, dist: DistInfo, *, run: RunConfig
) -> nn.Module:
    """The ``student`` section's model on this rank's device, its initial weights from
    ``run.seed`` alone (``run`` also says channels_last)."""
    torch.manual_seed(run.seed)
    model = build_model(student, data.num_classes, data.recipe.channels)
    channels = data.recipe.channels
    from_cache = data.store is not None
    check_student(model, data.rendering, channels, data.num_classes, student, from_cache)
    # dropout and other global draws during training differ per rank
    torch.manual_seed(run.seed * 1000 + dist.rank + 1)
    model = model.to(dist.device)
    if dist.device.type == "cuda" and run.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def wrap_ddp(model: nn.Module, dist: DistInfo) -> nn.Module:
    """DDP over the model when the job has several ranks; else the model itself."""
    if not dist.distributed:
        return model
    device_ids = [dist.device] if dist.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def compile_unsupported(device: torch.device) -> str | None:
    """Why ``torch.compile`` cannot run here (None: it can): dynamo's own platform check, and on
    CPU a C++ compiler for inductor's kernels."""
    from torch._dynamo.eval_frame import is_dynamo_supported  # torch._dynamo lacks it in __all__

    if not is_dynamo_supported():
        return f"torch {torch.__version__} cannot compile on this Python or platform"
    compilers = (os.environ.get("CXX"), "c++", "g++", "clang++")
    if device.type == "cpu" and not any(c and shutil.which(c) for c in compilers):
        return "inductor needs a C++ compiler for CPU kernels and none is on PATH (set CXX)"
    return None


def compile_student(module: nn.Module, device: torch.device) -> nn.Module:
    """``torch.compile(module)`` (``run.compile``), or the module itself with a warning that
    says why where torch cannot compile. Weights are shared: checkpoints keep plain names."""
    reason = compile_unsupported(device)
    if reason is not None:
        log.warning("run.compile: %s; training the student uncompiled", reason)
        return module
    log.info("run.compile: compiling the student with torch.compile (the first steps are slow)")
    # a cast: torch types compile's result as the callable it was given; a Module gives an
    # OptimizedModule, a Module itself
    return cast(nn.Module, torch.compile(module))


def check_student(
    model: nn.Module,
    rendering: Rendering,
    channels: int,
    num_classes: int,
    student: StudentConfig,
    from_cache: bool,
) -> None:
    """Refuse a student (built from the ``student`` section, named in the error) that cannot take
    its rendering of the views or does not output ``num_classes`` logits."""
    error = CacheMismatchError if from_cache else ConfigError
    size = rendering.size
    where = f"its views ({channels}x{size}x{size}, student.render.size / student.input_size)"
    try:
        with torch.no_grad():
            out = model.eval()(torch.zeros(2, channels, size, size))
    except Exception as exc:  # any shape error of any model
        reason = str(exc)[:300]
        raise error(f"student {student.name!r} cannot take {where}: {reason}") from None
    finally:
        model.train()
    if tuple(out.shape) != (2, num_classes):
        raise error(
            f"student {student.name!r} outputs {tuple(out.shape)[1:]} logits, "
            f"the data has {num_classes} classes"
        )


class StudentInput:
    """uint8 views -> the student's input: normalised with its rendering's mean/std on the device
    (channels_last on CUDA when asked), for training and evaluation alike."""

    def __init__(self, rendering: Rendering, device: torch.device, channels_last: bool):
        self.rendering = rendering
        self.channels_last = channels_last and device.type == "cuda"

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = normalize(images, self.rendering)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x


class Ema:
    """Exponential moving average of a model's floating-point state (buffers copied as they are);
    a stateful part of checkpoints."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(model).eval()
        for param in self.module.parameters():
            param.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for ema, live in zip(
            self.module.state_dict().values(), model.state_dict().values(), strict=True
        ):
            if ema.dtype.is_floating_point:
                ema.mul_(self.decay).add_(live.detach(), alpha=1.0 - self.decay)
            else:
                ema.copy_(live)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)
