"""What a config says about a model: :class:`ModelSpec`, without torch or timm (so configs
validate, and their errors show, before the heavy libraries load; :mod:`kdcache.models.build`
builds the network)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from kdcache.core.config import StrictModel

LOCAL_DIR = "local-dir:"
"""timm's prefix of a model read from a local Hugging Face model directory."""


class ModelSpec(StrictModel):
    """Which network to build and which weights to load."""

    source: Literal["timm", "torchvision", "torchscript"] = "timm"
    """Where the architecture comes from."""
    name: str = ""
    """timm or torchvision model name (e.g. ``resnet50``); unused for torchscript. timm also takes
    ``local-dir:/path/to/dir``: a Hugging Face model directory in timm's format (``config.json`` and
    its weights file), whose weights are always loaded, without downloading anything."""
    checkpoint: str | None = None
    """Weights to load (timm/torchvision) or a TorchScript file (torchscript): a path or an fsspec
    URL (``s3://...``: fetched once per node). A state dict, a ``.safetensors`` file, or a
    checkpoint holding one (``state_dict``, ``model``; timm's and DDP's files load as written)."""
    use_ema: bool = False
    """Load a checkpoint's EMA weights (``state_dict_ema``, ``model_ema`` or ``ema``) instead of
    ``state_dict`` / ``model`` (timm's ``--use-ema``)."""
    pretrained: bool = False
    """timm/torchvision: load the hub's weights (needs network access, or timm's
    ``pretrained_cfg_overlay: {file: ...}`` in ``kwargs`` for a local file)."""
    kwargs: dict[str, Any] = Field(default_factory=dict)
    """Extra keyword arguments for the model constructor (e.g. ``drop_rate``)."""

    @model_validator(mode="after")
    def _check(self) -> ModelSpec:
        if self.source == "torchscript" and not self.checkpoint:
            raise ValueError(
                "source 'torchscript' needs checkpoint: the path of the TorchScript file"
            )
        if self.source != "torchscript" and not self.name:
            raise ValueError(f"source {self.source!r} needs name: a model name")
        return self
