"""Building teachers and students: timm names, torchvision names, TorchScript files.

Shared by precompute (teachers), the trainer (students, online teachers) and ``kdcache verify``.
Importing this module registers kdcache's tiny CPU-friendly models with timm (``kd_*``), which
the demo and the tests use.

Weights come from ``checkpoint:`` (a path or an fsspec URL; the forms read are listed in
:mod:`kdcache.models.weights`), from a local Hugging Face model directory in timm's format (``name:
local-dir:/models/my-resnet``: its ``config.json`` and ``model.safetensors`` or
``pytorch_model.bin``, nothing downloaded), or from timm's hub (``pretrained: true``; a local file
instead with ``kwargs: {pretrained_cfg_overlay: {file: /path/weights.safetensors}}``).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import timm
import torch
from timm.models import register_model
from torch import nn

from kdcache.core.errors import TeacherError, WeightsError
from kdcache.models.spec import LOCAL_DIR, ModelSpec
from kdcache.models.weights import local_checkpoint, read_state_dict

log = logging.getLogger(__name__)


def build_model(spec: ModelSpec, num_classes: int, in_chans: int = 3) -> nn.Module:
    """Build the model and load its checkpoint; errors name the model and the file."""
    if spec.source == "torchscript":
        if spec.checkpoint is None:  # ModelSpec's validator already requires it
            raise ValueError(
                "source 'torchscript' needs checkpoint: the path of the TorchScript file"
            )
        return _load_torchscript(spec.checkpoint)
    if spec.source == "timm":
        model = _build_timm(spec, num_classes, in_chans)
    else:
        model = _build_torchvision(spec, num_classes, in_chans)
    if spec.checkpoint:
        load_checkpoint(model, spec.checkpoint, use_ema=spec.use_ema)
    return model


TEACHER_INIT_SEED = 0
"""torch seed teachers are built under, so a teacher without a checkpoint (random init) is the
same network in the precompute driver, every actor, every run, ``verify`` and online training."""


def build_teacher(spec: ModelSpec, num_classes: int, in_chans: int = 3) -> nn.Module:
    """:func:`build_model` under :data:`TEACHER_INIT_SEED`, leaving the global RNG untouched.

    A teacher's hub weights must have the data's classes: for another class count timm and
    torchvision replace the classifier with a random one, and the cache would hold its noise."""
    loads_pretrained = spec.pretrained or spec.name.startswith(LOCAL_DIR)
    pretrained_classes = (
        _pretrained_classes(spec) if loads_pretrained and not spec.checkpoint else None
    )
    if pretrained_classes is not None and pretrained_classes != num_classes:
        raise TeacherError(
            f"{spec.source} model {spec.name!r}: its pretrained weights classify "
            f"{pretrained_classes} "
            f"classes but the data has {num_classes}, so its classifier would be random; give the "
            "checkpoint of a teacher trained on these classes (checkpoint:)"
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TEACHER_INIT_SEED)
        return build_model(spec, num_classes, in_chans)


def _pretrained_classes(spec: ModelSpec) -> int | None:
    """The class count of the hub weights ``pretrained: true`` loads (None where unknown)."""
    try:
        overlay = spec.kwargs.get("pretrained_cfg_overlay") or {}
        if spec.source == "timm" and "num_classes" in overlay:
            return int(overlay["num_classes"])
        if spec.source == "timm" and spec.name.startswith(LOCAL_DIR):
            config = json.loads((Path(spec.name[len(LOCAL_DIR) :]) / "config.json").read_text())
            return int(config.get("num_classes", config.get("pretrained_cfg", {})["num_classes"]))
        if spec.source == "timm":
            cfg = timm.get_pretrained_cfg(spec.name)
            return None if cfg is None else int(cfg.num_classes)
        if spec.source == "torchvision":
            import torchvision

            weights = torchvision.models.get_model_weights(spec.name)
            return len(weights["DEFAULT"].meta["categories"])
    except Exception:  # unknown names are reported by build_model itself
        return None
    return None


def _build_timm(spec: ModelSpec, num_classes: int, in_chans: int) -> nn.Module:
    local_dir = spec.name.startswith(LOCAL_DIR)
    if local_dir:
        _check_local_dir(spec.name[len(LOCAL_DIR) :])
    elif ":" not in spec.name and not timm.is_model(spec.name):  # hf-hub: names are timm's
        close = timm.list_models(f"*{spec.name[:4]}*")[:8]
        raise TeacherError(f"unknown timm model {spec.name!r}; similar names: {close}")
    try:
        return timm.create_model(
            spec.name,
            pretrained=spec.pretrained or local_dir,
            num_classes=num_classes,
            in_chans=in_chans,
            **spec.kwargs,
        )
    except Exception as exc:  # hub download failures, bad kwargs
        raise TeacherError(f"could not build timm model {spec.name!r}: {exc}") from exc


def _check_local_dir(path: str) -> None:
    """A Hugging Face model directory in timm's format: ``config.json`` beside a weights file."""
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise TeacherError(
            f"model directory {path!r} has no config.json (a Hugging Face model directory in "
            "timm's format: config.json and model.safetensors or pytorch_model.bin)"
        )
    weights = ("*.safetensors", "*.bin", "*.pth", "*.pt")
    if not any(next(folder.glob(pattern), None) for pattern in weights):
        raise TeacherError(
            f"model directory {path!r} has no weights file (model.safetensors or pytorch_model.bin)"
        )


def _build_torchvision(spec: ModelSpec, num_classes: int, in_chans: int) -> nn.Module:
    import torchvision

    if spec.name not in torchvision.models.list_models():
        raise TeacherError(f"unknown torchvision model {spec.name!r}")
    if in_chans != 3:
        raise TeacherError(
            f"torchvision model {spec.name!r} takes 3 channels; the recipe has {in_chans}"
        )
    weights = "DEFAULT" if spec.pretrained else None
    try:
        return torchvision.models.get_model(
            spec.name, weights=weights, num_classes=num_classes, **spec.kwargs
        )
    except Exception as exc:
        raise TeacherError(f"could not build torchvision model {spec.name!r}: {exc}") from exc


def _load_torchscript(path: str) -> nn.Module:
    local = local_checkpoint(path)
    try:
        return torch.jit.load(local, map_location="cpu")
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise WeightsError(
            f"could not load TorchScript file {path!r} ({reason}); source: torchscript takes a "
            "file written by torch.jit.save (weights go with source: timm or torchvision)"
        ) from None


def load_checkpoint(model: nn.Module, path: str, use_ema: bool = False) -> None:
    """Load the weights of ``path`` (a path or an fsspec URL; the forms of
    :mod:`kdcache.models.weights`) strictly: every tensor must fit."""
    state = read_state_dict(local_checkpoint(path), path, use_ema)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise WeightsError(
            f"checkpoint {path!r} does not fit the model: {str(exc)[:500]}"
        ) from None


def weights_digest(model: nn.Module) -> str:
    """sha256 over the parameters and buffers, in name order: identifies the teacher's weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(
            tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        )
    return digest.hexdigest()[:32]


# ---- tiny models for CPUs, tests and the demo -------------------------------------------------


class TinyCNN(nn.Module):
    """A narrow conv net: ``depth`` conv-BN-ReLU stages of ``width`` channels, strided, then a
    linear head."""

    def __init__(
        self, num_classes: int = 10, in_chans: int = 3, width: int = 16, depth: int = 2, **_: Any
    ):
        super().__init__()
        layers = []
        chans = in_chans
        for i in range(depth):
            out = width * (2**i)
            layers += [
                nn.Conv2d(chans, out, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(out),
                nn.ReLU(inplace=True),
            ]
            chans = out
        self.features = nn.Sequential(*layers)
        self.num_features = chans
        self.head = nn.Linear(chans, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


class TinyMLP(nn.Module):
    """Flatten, one hidden layer (dropout ``drop_rate`` after it, as timm's ``drop_rate``), a
    linear head."""

    def __init__(
        self,
        num_classes: int = 10,
        in_chans: int = 3,
        img_size: int = 28,
        hidden: int = 128,
        drop_rate: float = 0.0,
        **_: Any,
    ):
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_chans * img_size * img_size, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(drop_rate),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _strip(kwargs: dict[str, Any]) -> dict[str, Any]:
    for unused in ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(unused, None)
    return kwargs


@register_model
def kd_cnn_tiny(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """2 stages, 8 then 16 channels."""
    return TinyCNN(**{"width": 8, "depth": 2, **_strip(kwargs)})


@register_model
def kd_cnn_small(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """3 stages, 16/32/64 channels."""
    return TinyCNN(**{"width": 16, "depth": 3, **_strip(kwargs)})


@register_model
def kd_mlp(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """One 128-unit hidden layer; pass ``img_size`` for inputs other than 28x28."""
    return TinyMLP(**_strip(kwargs))
