"""Weights files as people have them: where they are (a path, or an fsspec URL fetched once per
node) and what is in them (a state dict, or a training checkpoint holding one).

Accepted: a file written by ``torch.save(model.state_dict())``; a ``.safetensors`` file; a
checkpoint dict holding the state dict under ``state_dict`` (timm's train.py), ``model`` (kdcache's
training checkpoints, many others) or, with ``use_ema: true``, its EMA under ``state_dict_ema``,
``model_ema`` or ``ema``. Prefixes left by DDP (``module.``) and ``torch.compile``
(``_orig_mod.``) are removed with timm's ``clean_state_dict``. Files are unpickled with
``weights_only=True`` (timm's train.py ``args`` namespace allowed, as timm does): a whole pickled
model (``torch.save(model)``) is refused, since unpickling it could run code.

A checkpoint URL (``s3://...``, ``gs://...``, any fsspec protocol) is opened with fsspec's defaults
(e.g. the standard AWS environment: ``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID`` ...; credentials
never go into a model spec, which the cache stores) and copied once per node into
:func:`cache_dir`, under a name made from the URL and the object's size and ETag / modification
time, so a changed object is fetched again. The precompute driver and every actor fingerprint the
loaded weights; the actors refuse weights other than the driver's.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import pickle
from pathlib import Path
from typing import Any

import fsspec
import torch
from timm.models import clean_state_dict

from kdcache.core.errors import WeightsError, short_reason

log = logging.getLogger(__name__)

CACHE_ENV = "KDCACHE_CHECKPOINT_CACHE"
STATE_KEYS = ("state_dict", "model")
EMA_KEYS = ("state_dict_ema", "model_ema", "ema")
ACCEPTED = (
    "kdcache loads a state dict (torch.save(model.state_dict())), a .safetensors file, or a "
    "checkpoint dict holding one under 'state_dict' or 'model' (with use_ema: true, "
    "'state_dict_ema', 'model_ema' or 'ema'); 'module.' / '_orig_mod.' prefixes are removed"
)
_VERSION_KEYS = ("ETag", "etag", "size", "mtime", "LastModified", "last_modified", "generation")


def cache_dir() -> Path:
    """Where fetched checkpoints are kept on this node: ``$KDCACHE_CHECKPOINT_CACHE``, else
    ``~/.cache/kdcache/checkpoints``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "kdcache" / "checkpoints")


def needs_local_copy(path: str) -> bool:
    """A URL to fetch into a node-local copy (``file://`` is local already)."""
    return "://" in path and not path.startswith("file://")


def local_checkpoint(path: str) -> str:
    """A local file holding the checkpoint: ``path`` itself, or a node-local copy of a URL
    (fetched once; other processes on the node wait for that one fetch)."""
    if not needs_local_copy(path):
        local = path.removeprefix("file://")
        if not Path(local).is_file():
            what = "is a directory, not a file" if Path(local).is_dir() else "does not exist"
            raise WeightsError(f"checkpoint {path!r} {what}")
        return local
    fs, remote = fsspec.core.url_to_fs(path)
    try:
        info = fs.info(remote)
    except FileNotFoundError:
        raise WeightsError(f"checkpoint {path!r} does not exist") from None
    except Exception as exc:  # credentials, network, permissions: each store raises its own
        raise WeightsError(f"checkpoint {path!r} cannot be reached ({_reason(exc)})") from None
    target = cache_dir() / _cached_name(path, info)
    target.parent.mkdir(parents=True, exist_ok=True)
    with _node_lock(target):
        if not target.is_file():
            _fetch(fs, remote, path, target)
    return str(target)


def _cached_name(url: str, info: dict[str, Any]) -> str:
    version = json.dumps({k: info.get(k) for k in _VERSION_KEYS}, default=str, sort_keys=True)
    digest = hashlib.sha256(f"{url}\n{version}".encode()).hexdigest()[:16]
    return f"{digest}-{url.rstrip('/').rsplit('/', 1)[-1]}"


@contextlib.contextmanager
def _node_lock(target: Path):
    with open(f"{target}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _fetch(fs: fsspec.AbstractFileSystem, remote: str, url: str, target: Path) -> None:
    partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
    log.info("fetching checkpoint %s into %s", url, target.parent)
    try:
        fs.get_file(remote, str(partial))
        os.replace(partial, target)  # whole or absent: never a half-written checkpoint
    except Exception as exc:
        raise WeightsError(f"checkpoint {url!r} cannot be fetched ({_reason(exc)})") from None
    finally:
        partial.unlink(missing_ok=True)


def read_state_dict(path: str, shown: str, use_ema: bool = False) -> dict[str, torch.Tensor]:
    """The state dict in a local weights file (``shown``: the name the user gave it)."""
    raw = _load(path, shown)
    if isinstance(raw, dict) and raw and all(isinstance(v, torch.Tensor) for v in raw.values()):
        if use_ema:
            raise WeightsError(
                f"checkpoint {shown!r} is a plain state dict with no EMA weights; "
                "set use_ema: false to load it"
            )
        return clean_state_dict(raw)
    state = _select(raw, shown, use_ema)
    return clean_state_dict(state)


def _load(path: str, shown: str) -> Any:
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(path, device="cpu")
        with torch.serialization.safe_globals([argparse.Namespace]):  # timm's train.py `args`
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        holding = _pickled_globals(path)
        if "Weights only load failed" not in str(exc) or not holding:  # random bytes, a cut file
            raise WeightsError(_unreadable(shown, exc)) from None
        raise WeightsError(
            f"checkpoint {shown!r} is a pickled Python object{holding}, e.g. a "
            "whole model saved with torch.save(model), not weights: unpickling it could run code. "
            "Save model.state_dict() instead, or a TorchScript file (source: torchscript). "
            + ACCEPTED
        ) from None
    except Exception as exc:  # torch and safetensors raise many types for a damaged file
        raise WeightsError(_unreadable(shown, exc)) from None


def _unreadable(shown: str, exc: BaseException) -> str:
    return (
        f"checkpoint {shown!r} cannot be read as PyTorch or safetensors weights: it is truncated, "
        f"damaged or of another format ({_reason(exc)}). {ACCEPTED}"
    )


def _pickled_globals(path: str) -> str:
    with contextlib.suppress(Exception):
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        if names:
            return f" (holding {', '.join(sorted(names)[:3])})"
    return ""


def _select(raw: Any, shown: str, use_ema: bool) -> dict[str, torch.Tensor]:
    """The state dict inside a checkpoint dict, by the keys timm and kdcache write."""
    if not isinstance(raw, dict):
        raise WeightsError(
            f"checkpoint {shown!r} holds a {type(raw).__name__}, not weights. {ACCEPTED}"
        )
    keys = EMA_KEYS if use_ema else STATE_KEYS
    found = next((k for k in keys if isinstance(raw.get(k), dict) and raw[k]), None)
    if found is None:
        other = EMA_KEYS if not use_ema else STATE_KEYS
        has_other = [k for k in other if isinstance(raw.get(k), dict) and raw[k]]
        hint = (
            f"; it has {has_other[0]!r}: set use_ema: {str(not use_ema).lower()} to load that"
            if has_other
            else f". {ACCEPTED}"
        )
        raise WeightsError(
            f"checkpoint {shown!r} holds no state dict under {' / '.join(repr(k) for k in keys)} "
            f"(its entries: {sorted(map(str, raw))[:8]}){hint}"
        )
    if not all(isinstance(v, torch.Tensor) for v in raw[found].values()):
        raise WeightsError(f"checkpoint {shown!r}: its {found!r} is not a state dict. {ACCEPTED}")
    log.info("checkpoint %s: loading its %r", shown, found)
    return raw[found]


def _reason(exc: BaseException) -> str:
    """The exception's type and its first sentence (torch's messages go on for lines)."""
    return short_reason(exc)
