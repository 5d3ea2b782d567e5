"""The trainer's staples (issue 23, item 3): fp16 with a gradient scaler, gradient accumulation,
torch.compile, timm's optimizers and schedulers by name, and the CSV / W&B / MLflow loggers, each
resumed bit for bit as an uninterrupted run."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
import torch

from kdcache.core.errors import ConfigError
from kdcache.train.config import SchedulerConfig
from kdcache.train.schedule import Segment, build_optimizer, lr_at
from kdcache.train.student import compile_unsupported
from kdcache.train.trainer import Trainer, train
from tests.support.trainrun import read_metrics as metrics
from tests.support.trainrun import world_train_config as make

STAGES = [{"epochs": 2, "loss": {"name": "kd", "alpha": 0.5, "temperature": 2.0}}]


def resumed_equals_full(world, tmp_path: Path, cut_at: int = 3, **sections) -> tuple[dict, dict]:
    """Train uninterrupted, then stopped at ``cut_at`` optimizer steps and resumed; assert the
    metrics and the last checkpoints' models match bit for bit; return both checkpoints."""
    sections.setdefault("stages", STAGES)
    run = sections.pop("run", {})
    full = train(make(world, tmp_path / "full", run=run, **sections))
    stopped = train(make(world, tmp_path / "cut", run={**run, "max_steps": cut_at}, **sections))
    assert not stopped.completed and stopped.steps == cut_at
    resumed = train(make(world, tmp_path / "cut", run={**run, "resume": "must"}, **sections))
    assert resumed.completed and resumed.steps == full.steps
    assert metrics(tmp_path / "cut") == metrics(tmp_path / "full")
    a = torch.load(tmp_path / "full" / "checkpoints" / "last.pt")
    b = torch.load(tmp_path / "cut" / "checkpoints" / "last.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    return a, b


def fp16_autocast_on_cpu() -> bool:
    try:
        with torch.autocast("cpu", dtype=torch.float16):
            out = torch.nn.Linear(2, 2)(torch.ones(1, 2))
        return out.dtype == torch.float16
    except RuntimeError:
        return False


@pytest.mark.skipif(not fp16_autocast_on_cpu(), reason="this torch has no fp16 autocast on CPU")
def test_fp16_with_a_grad_scaler_resumes_bit_exactly(world, tmp_path):
    a, b = resumed_equals_full(world, tmp_path, run={"amp": "fp16", "device": "cpu"})
    assert a["scaler"] == b["scaler"] and a["scaler"]["scale"] > 0
    plain = make(world, tmp_path / "plain")
    assert Trainer(plain).scaler.is_enabled() is False  # fp32 runs keep no scaler state


def test_accumulation_resumes_bit_exactly_mid_epoch(world, tmp_path):
    # 6 batches of 8 per epoch (47 valid samples): groups of 4 give 2 optimizer steps, the
    # second of 2 batches; the cut at step 3 lands in the second epoch
    a, _ = resumed_equals_full(world, tmp_path, run={"accumulate": 4, "log_every": 1})
    assert a["state"]["global_step"] == 4 and a["state"]["accumulated"] == 0
    steps = [line["step"] for line in metrics(tmp_path / "full") if line["kind"] == "train"]
    assert steps == [1, 2, 3, 4]


def test_accumulation_equals_a_batch_that_many_times_larger(world, tmp_path):
    """Four batches of 4 accumulated train what one batch of 16 trains (a mean-reduced loss)."""
    common = {
        "teacher": {"mode": "none", "name": None},
        "cache": {"path": None},
        "views": {"recipe": {"size": 12, "channels": 1, "mean": [0.5], "std": [0.25]}},
        "stages": [{"epochs": 2, "loss": {"name": "ce"}}],
        "optimizer": {"lr": 0.5},
        "scheduler": {"warmup_epochs": 0.5},
    }
    data = {"shards": world["clean"], "num_classes": 4, "shuffle_buffer": 0}
    big = make(world, tmp_path / "big", data={**data, "batch_size": 16}, **common)
    small = make(
        world,
        tmp_path / "small",
        data={**data, "batch_size": 4},
        run={"accumulate": 4},
        **common,
    )
    assert train(big).steps == train(small).steps == 6
    a = torch.load(tmp_path / "big" / "checkpoints" / "model_final.pt")
    b = torch.load(tmp_path / "small" / "checkpoints" / "model_final.pt")
    assert any(not torch.equal(a[k], b[k]) for k in a)  # summed in another order: not bitwise
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # three compilations: about 4 minutes on 2 busy cores
@pytest.mark.skipif(
    compile_unsupported(torch.device("cpu")) is not None,
    reason=f"torch.compile unsupported here: {compile_unsupported(torch.device('cpu'))}",
)
def test_compiled_student_resumes_bit_exactly(world, tmp_path):
    stages = [{"epochs": 1, "loss": {"name": "kd", "alpha": 0.5, "temperature": 2.0}}]
    a, _ = resumed_equals_full(world, tmp_path, run={"compile": True}, stages=stages)
    assert not any(k.startswith("_orig_mod.") for k in a["model"])  # plain names in checkpoints


def test_a_timm_optimizer_with_layer_decay_and_scheduler_resume_bit_exactly(world, tmp_path):
    optimizer = {"name": "lamb", "lr": 0.01, "layer_decay": 0.5, "weight_decay": 0.01}
    scheduler = {"name": "tanh", "warmup_epochs": 0.5, "warmup_start": 0.1}
    student = {"name": "test_resnet", "kwargs": {}}  # a timm model: layers by group_matcher
    a, _ = resumed_equals_full(
        world, tmp_path, optimizer=optimizer, scheduler=scheduler, student=student
    )
    scales = {group["lr_scale"] for group in a["optimizer"]["param_groups"]}
    assert len(scales) > 1  # layer decay: each depth its own scale
    lrs = [line["lr"] for line in metrics(tmp_path / "full") if line["kind"] == "train"]
    assert len(set(lrs)) == len(lrs)  # timm's tanh schedule moved the LR every line


def test_timm_names_are_checked_and_built_by_timm(world, tmp_path):
    config = make(world, tmp_path, optimizer={"name": "timm:adamw", "lr": 0.01})
    model = torch.nn.Linear(3, 2)
    from timm.optim import AdamW as TimmAdamW

    assert isinstance(build_optimizer(model, config.optimizer), TimmAdamW)
    assert type(build_optimizer(model, make(world, tmp_path).optimizer)) is torch.optim.SGD
    with pytest.raises(ValueError, match="unknown optimizer 'lambda'"):
        make(world, tmp_path, optimizer={"name": "lambda"})
    with pytest.raises(ValueError, match="unknown scheduler 'plateau'"):
        make(world, tmp_path, scheduler={"name": "plateau"})
    segment = Segment(0, 0, 10, config.optimizer, SchedulerConfig(name="timm:cosine"))
    with pytest.raises(ValueError, match="needs updates_per_epoch"):
        lr_at(segment, 1.0)
    assert lr_at(segment, 0.0, 5) == pytest.approx(0.01)
    assert lr_at(segment, 10.0, 5) == pytest.approx(0.0, abs=1e-12)


def csv_rows(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_csv_wandb_and_mlflow_loggers_follow_a_resumed_run(world, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    store = tmp_path / "mlruns"
    run = {
        "csv": True,
        "wandb": {"project": "kdcache-test"},
        "mlflow": {"tracking_uri": f"file:{store}", "experiment": "staples"},
    }
    resumed_equals_full(world, tmp_path, run=run)
    cut = tmp_path / "cut"
    lines = [json.loads(t) for t in (cut / "metrics.jsonl").read_text().splitlines()]
    for kind in ("train", "eval"):
        rows = csv_rows(cut / f"{kind}.csv")
        own = [line for line in lines if line["kind"] == kind]
        assert [int(r["step"]) for r in rows] == [line["step"] for line in own]
        assert [float(r["loss"]) for r in rows] == [line["loss"] for line in own]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"file:{store}")
    run_id = (cut / "mlflow_run_id").read_text()
    history = client.get_metric_history(run_id, "train/loss")
    train_steps = [line["step"] for line in lines if line["kind"] == "train"]
    # the cut run logged up to its checkpoint, the resumed run on from it: one run, every step
    assert sorted({m.step for m in history}) == train_steps
    assert client.get_run(run_id).info.status == "FINISHED"
    wandb_id = (cut / "wandb_id").read_text()
    # the stopped run and its resumption, under one W&B id: one folder each. W&B names offline
    # folders by the second and the id; a second folder of the same second gets a "-1" suffix
    # (older W&B releases shared the folder instead)
    offline = sorted((cut / "wandb").glob(f"offline-run-*-{wandb_id}*"))
    assert 1 <= len(offline) <= 2
    assert len(list((cut / "wandb").glob("offline-run-*"))) == len(offline)


def test_a_missing_logger_package_is_named_with_its_extra(world, tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "wandb", None)  # as if not installed
    with pytest.raises(ConfigError, match=r"run.wandb: needs the wandb package.*kdcache\[wandb\]"):
        Trainer(make(world, tmp_path, run={"wandb": {}}))
    assert os.path.isdir(tmp_path) and not (tmp_path / "metrics.jsonl").exists()
