"""Running a model on replayed views: device, precision and memory format in one place.

Precompute, ``kdcache verify`` and the trainer's online mode all call a teacher through
:class:`ModelRunner`, so the three see the same numerics for the same settings.
"""

from __future__ import annotations

import contextlib
from typing import Literal

import torch
from torch import nn

from kdcache.core.errors import TeacherError
from kdcache.views.recipe import Rendering, normalize

AmpMode = Literal["auto", "bf16", "fp16", "off"]


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise TeacherError(f"device {device!r} was asked for but CUDA is not available")
    return torch.device(device)


def autocast_context(device: torch.device, amp: AmpMode):
    """bf16 autocast on CUDA by default ('auto'); full precision on CPU unless asked."""
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return contextlib.nullcontext()
    dtype = torch.float16 if amp == "fp16" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


class ModelRunner:
    """A model in eval mode on its device; ``runner(uint8 views) -> float32 logits``."""

    def __init__(
        self,
        model: nn.Module,
        rendering: Rendering,
        *,
        device: str = "auto",
        amp: AmpMode = "auto",
        channels_last: bool = True,
        name: str = "teacher",
    ):
        self.device = resolve_device(device)
        self.rendering = rendering
        self.amp: AmpMode = amp
        self.channels_last = channels_last and self.device.type == "cuda"
        self.name = name
        self.model = model.to(self.device).eval()
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)

    @torch.inference_mode()
    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        """``uint8[B, C, S, S]`` (any device) -> ``float32[B, num_classes]`` on the runner's
        device."""
        x = normalize(pixels.to(self.device, non_blocking=True), self.rendering)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast_context(self.device, self.amp):
            logits = self.model(x)
        if logits.ndim != 2:
            raise TeacherError(
                f"{self.name}: expected logits [batch, classes], got shape {tuple(logits.shape)}"
            )
        return logits.float()


FP16_MAX = 65504.0
"""The largest fp16 value: stored logits (fp16, or q8's top logit) must stay below it."""


def check_finite(logits: torch.Tensor, where: str) -> None:
    """Refuse NaN or inf logits, and logits the cache's fp16 cannot hold, naming where they came
    from."""
    bad = ~torch.isfinite(logits)
    if bool(bad.any()):
        rows = int(bad.any(dim=1).sum())
        raise TeacherError(
            f"{where}: the teacher produced NaN or inf logits in {rows} of {len(logits)} views"
        )
    largest = float(logits.abs().max()) if logits.numel() else 0.0
    if largest >= FP16_MAX:
        raise TeacherError(
            f"{where}: the teacher produced a logit of magnitude {largest:.4g}, "
            "beyond what the cache "
            f"stores in fp16 ({FP16_MAX:g}): it would be written as inf"
        )
