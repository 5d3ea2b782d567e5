"""Teacher and student weights as people have them: every checkpoint form kdcache reads, each one it
refuses (with the file named and the accepted forms listed), timm's local weights file, and a local
Hugging Face model directory. Real files written by torch, safetensors and timm; real tiny models.
The S3 checkpoint test is in tests/integration/test_objectstore.py (it needs the moto server).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.models import save_for_hf

from kdcache.cache.store import open_store
from kdcache.core.errors import TeacherError, WeightsError
from kdcache.models.build import ModelSpec, build_model, build_teacher, weights_digest
from kdcache.pipeline.plan import plan_precompute
from tests.support.precomputerun import make_config, run_in_process

CLASSES = 10


@pytest.fixture
def net() -> torch.nn.Module:
    """A trained-looking teacher: seeded weights that differ from kdcache's seeded init."""
    torch.manual_seed(123)
    return build_model(ModelSpec(name="kd_cnn_tiny"), CLASSES, 3)


def spec(path: Path | str, **kw) -> ModelSpec:
    return ModelSpec(name="kd_cnn_tiny", checkpoint=str(path), **kw)


def loads_as(net: torch.nn.Module, path: Path, **kw) -> None:
    assert weights_digest(build_teacher(spec(path, **kw), CLASSES, 3)) == weights_digest(net)


def ema_of(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v + 1 if v.is_floating_point() else v for k, v in net.state_dict().items()}


FORMS = {
    "plain": lambda net: net.state_dict(),
    "timm_train": lambda net: {  # timm's train.py: args, epoch, optimizer beside the weights
        "epoch": 3,
        "arch": "kd_cnn_tiny",
        "state_dict": net.state_dict(),
        "optimizer": torch.optim.SGD(net.parameters(), lr=0.1).state_dict(),
        "args": argparse.Namespace(model="kd_cnn_tiny", lr=0.1),
        "version": 2,
    },
    "model": lambda net: {"model": net.state_dict(), "ema": None, "step": 10},
    "ddp": lambda net: torch.nn.DataParallel(net).state_dict(),  # 'module.' prefixes
    "compiled": lambda net: torch.compile(net).state_dict(),  # '_orig_mod.' prefixes
    "ddp_in_state_dict": lambda net: {"state_dict": torch.nn.DataParallel(net).state_dict()},
}


@pytest.mark.parametrize("form", sorted(FORMS))
def test_each_checkpoint_form_loads_the_same_weights(tmp_path, net, form):
    path = tmp_path / "teacher.pth"
    torch.save(FORMS[form](net), path)
    loads_as(net, path)


def test_safetensors_and_ema_weights(tmp_path, net):
    save_file(net.state_dict(), tmp_path / "teacher.safetensors")
    loads_as(net, tmp_path / "teacher.safetensors")
    torch.save({"state_dict": net.state_dict(), "state_dict_ema": ema_of(net)}, tmp_path / "t.pth")
    loads_as(net, tmp_path / "t.pth")  # by default the weights, not the EMA
    ema = build_teacher(spec(tmp_path / "t.pth", use_ema=True), CLASSES, 3)
    first = next(iter(ema_of(net)))
    assert torch.equal(ema.state_dict()[first], ema_of(net)[first])


def write(path: Path, make) -> Path:
    make(path)
    return path


REFUSED = {
    "truncated": (
        lambda p, net: p.write_bytes(_saved(net)[: len(_saved(net)) // 2]),
        {},
        r"checkpoint '.*bad.pth' cannot be read as PyTorch or safetensors weights: it is "
        r"truncated, damaged or of another format \(.*\)\. kdcache loads a state dict",
    ),
    "garbage": (
        lambda p, net: p.write_bytes(b"\x80\x02}q\x00(X\x05\x00garbage" * 10),
        {},
        r"'.*bad.pth' cannot be read as PyTorch or safetensors weights",
    ),
    "empty": (
        lambda p, net: p.write_bytes(b""),
        {},
        r"'.*bad.pth' cannot be read as PyTorch or safetensors weights",
    ),
    "whole_model": (
        lambda p, net: torch.save(net, p),
        {},
        r"checkpoint '.*bad.pth' is a pickled Python object \(holding "
        r"kdcache.models.build.TinyCNN.*\), e.g. a whole model saved with torch.save\(model\), "
        r"not weights: unpickling it could run code. Save model.state_dict\(\) instead, or a "
        r"TorchScript file",
    ),
    "no_state_dict": (
        lambda p, net: torch.save({"epoch": 3, "weights": [1, 2]}, p),
        {},
        r"holds no state dict under 'state_dict' / 'model' \(its entries: \['epoch', 'weights'\]\)"
        r"\. kdcache loads",
    ),
    "ema_only": (
        lambda p, net: torch.save({"state_dict_ema": net.state_dict(), "epoch": 1}, p),
        {},
        r"holds no state dict under 'state_dict' / 'model' .*; it has 'state_dict_ema': "
        r"set use_ema: true to load that",
    ),
    "no_ema": (
        lambda p, net: torch.save({"state_dict": net.state_dict()}, p),
        {"use_ema": True},
        r"no state dict under 'state_dict_ema' / 'model_ema' / 'ema' .*; it has 'state_dict': "
        r"set use_ema: false",
    ),
    "plain_with_use_ema": (
        lambda p, net: torch.save(net.state_dict(), p),
        {"use_ema": True},
        r"checkpoint '.*bad.pth' is a plain state dict with no EMA weights; set use_ema: false",
    ),
    "not_a_dict": (
        lambda p, net: torch.save([torch.zeros(2)], p),
        {},
        r"checkpoint '.*bad.pth' holds a list, not weights",
    ),
    "other_model": (
        lambda p, net: torch.save(
            build_model(ModelSpec(name="kd_mlp"), CLASSES, 3).state_dict(), p
        ),
        {},
        r"checkpoint '.*bad.pth' does not fit the model: Error\(s\) in loading state_dict",
    ),
    "directory": (lambda p, net: p.mkdir(), {}, r"checkpoint '.*bad.pth' is a directory"),
    "missing": (lambda p, net: None, {}, r"checkpoint '.*bad.pth' does not exist"),
}


def _saved(net: torch.nn.Module) -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save(net.state_dict(), buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_unusable_checkpoints_are_refused_naming_the_file(tmp_path, net, case):
    make, extra, message = REFUSED[case]
    make(tmp_path / "bad.pth", net)
    with pytest.raises(WeightsError, match=message):
        build_teacher(spec(tmp_path / "bad.pth", **extra), CLASSES, 3)


def test_a_state_dict_given_as_torchscript_is_refused(tmp_path, net):
    torch.save(net.state_dict(), tmp_path / "weights.pt")
    with pytest.raises(
        WeightsError, match=r"could not load TorchScript file '.*weights.pt' \(.*\); source: "
    ):
        build_teacher(ModelSpec(source="torchscript", checkpoint=str(tmp_path / "weights.pt")), 10)


def test_precompute_with_a_timm_train_checkpoint_stores_the_plain_weights_digest(
    bad_dir,
    tmp_path,
    net,
):
    torch.save(FORMS["timm_train"](net), tmp_path / "model_best.pth.tar")
    cfg = make_config(
        str(bad_dir / "good-000000.tar"),
        tmp_path / "cache",
        "data.num_classes=10",
        f"teachers.0.model.checkpoint={tmp_path / 'model_best.pth.tar'}",
    )
    run_in_process(cfg)
    assert open_store(str(tmp_path / "cache")).teacher_meta("t1").weights_digest == (
        weights_digest(net)
    )


# ---- timm's own sources: a local weights file, a local Hugging Face model directory -----------


@pytest.fixture
def effnet() -> torch.nn.Module:
    """timm's tiny test_efficientnet (built through timm's pretrained machinery) for 4 classes."""
    torch.manual_seed(7)
    return timm.create_model("test_efficientnet", num_classes=4, in_chans=1)


def test_timm_model_with_a_local_weights_file(tmp_path, effnet):
    save_file(effnet.state_dict(), tmp_path / "effnet.safetensors")
    overlay = {"file": str(tmp_path / "effnet.safetensors"), "num_classes": 4}
    model = build_teacher(
        ModelSpec(
            name="test_efficientnet",
            pretrained=True,
            kwargs={"pretrained_cfg_overlay": overlay},
        ),
        4,
        1,
    )
    assert weights_digest(model) == weights_digest(effnet)
    with pytest.raises(
        TeacherError, match=r"pretrained weights classify 1000 classes but the data"
    ):
        build_teacher(
            ModelSpec(
                name="test_efficientnet",
                pretrained=True,
                kwargs={"pretrained_cfg_overlay": {"file": overlay["file"]}},
            ),
            4,
            1,
        )


def test_model_from_a_local_hugging_face_directory(tmp_path, effnet, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # nothing may be downloaded
    save_for_hf(effnet, tmp_path / "hf", safe_serialization=True)
    local = ModelSpec(name=f"local-dir:{tmp_path / 'hf'}")
    assert weights_digest(build_teacher(local, 4, 1)) == weights_digest(effnet)
    with pytest.raises(
        TeacherError, match=r"its pretrained weights classify 4 classes but the data"
    ):
        build_teacher(local, 10, 1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(TeacherError, match=r"model directory '.*empty' has no config.json"):
        build_teacher(ModelSpec(name=f"local-dir:{tmp_path / 'empty'}"), 4, 1)
    (tmp_path / "hf" / "model.safetensors").unlink()
    with pytest.raises(TeacherError, match=r"model directory '.*hf' has no weights file"):
        build_teacher(local, 4, 1)


def test_teacher_checkpoint_errors_name_the_teacher_key(bad_dir, tmp_path, net):  # noqa: F811
    torch.save(net, tmp_path / "whole.pth")
    cfg = make_config(
        str(bad_dir / "good-000000.tar"),
        tmp_path / "cache",
        "data.num_classes=10",
        f"teachers.0.model.checkpoint={tmp_path / 'whole.pth'}",
    )
    with pytest.raises(
        TeacherError,
        match=r"teachers.0.model \(teacher 't1'\): checkpoint '.*whole.pth' is a pickled",
    ):
        plan_precompute(cfg)
    assert not (tmp_path / "cache").exists()
