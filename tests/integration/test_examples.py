"""examples/ run on a tiny cache made by the real precompute code: the plain PyTorch loop, the
Lightning module and the timm train.py pattern. The plain loop trains what ``kdcache train``
trains on the same config: the same loss at every step and the same test accuracy."""

from __future__ import annotations

import importlib.util
import math
import warnings
from pathlib import Path
from types import ModuleType

import pytest
import yaml

from kdcache.train.config import load_train_config
from kdcache.train.hooks import StepHook
from kdcache.train.trainer import train

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def example(name: str) -> ModuleType:
    """An example script imported as a module (examples/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def config_file(world, tmp_path, workers: int = 0, epochs: int = 2) -> Path:
    data = {
        "run": {"dir": str(tmp_path / "run"), "seed": 5, "log_every": 1, "progress": False},
        "data": {
            "shards": world["urls"],
            "val_shards": world["val"],
            "batch_size": 8,
            "num_workers": workers,
            "shuffle_buffer": 10,
        },
        "cache": {"path": str(world["root"] / "cache.zarr")},
        "student": {"name": "kd_mlp", "kwargs": {"img_size": 12, "hidden": 16}},
        "teacher": {"name": "tiny"},
        "optimizer": {"lr": 0.2, "weight_decay": 1e-3, "momentum": 0.9},
        "scheduler": {"name": "cosine", "warmup_epochs": 0.5, "warmup_start": 0.1, "min_lr": 1e-3},
        "stages": [{"epochs": epochs, "loss": {"name": "kd", "alpha": 0.6, "temperature": 2.0}}],
    }
    path = tmp_path / "student.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


class Losses(StepHook):
    def __init__(self):
        self.values: list[float] = []

    def step_end(self, trainer, batch, parts) -> None:
        self.values.append(parts.total.item())


@pytest.mark.parametrize("workers", [0, 2])
def test_the_plain_loop_trains_what_kdcache_train_trains(world, tmp_path, workers):
    path = config_file(world, tmp_path, workers)
    recorder = Losses()
    summary = train(load_train_config(path), hooks=[recorder])
    ours = example("plain_loop").main(str(path), [])
    assert len(ours["losses"]) == len(recorder.values) == summary.steps == 12
    assert ours["losses"] == pytest.approx(recorder.values, rel=1e-6, abs=1e-7)
    assert ours["top1"] == pytest.approx(summary.top1, abs=1e-4)  # float32 mean vs float64


def test_the_plain_loop_is_short_and_the_readme_shows_it():
    source = (EXAMPLES / "plain_loop.py").read_text()
    assert len(source.splitlines()) < 60
    readme = (EXAMPLES.parent / "README.md").read_text()
    section = readme[readme.index("## Use from Python") :]
    snippet = section[section.index("```python\n") + 10 : section.index("```\n\n")]
    assert snippet in source and "kdcache.kd(" in snippet and "set_epoch" in snippet


def test_the_lightning_module_trains_and_validates(world, tmp_path):
    path = config_file(world, tmp_path)
    module = example("lightning_module")
    with warnings.catch_warnings():
        # Lightning's advice for a 0-worker CPU loader and its own deprecations are not failures
        warnings.simplefilter("ignore")
        metrics = module.main(
            str(path),
            [],
            accelerator="cpu",
            devices=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=str(tmp_path / "lightning"),
        )
    assert math.isfinite(metrics["train/loss"]) and 0.0 <= metrics["val/top1"] <= 100.0
    first = example("plain_loop").main(str(path), ["stages.0.epochs=1"])["losses"][0]
    fresh = module.DistillModule(str(path))  # its first step: the plain loop's first loss
    batch = next(iter(fresh.train_dataloader()))
    loss = fresh.loss(fresh.model(batch.images), batch.targets["tiny"], batch.hard_labels())
    assert loss.item() == pytest.approx(first, rel=1e-6)


def test_the_lightning_module_logs_into_run_dir_and_knows_its_length(world, tmp_path):
    path = config_file(world, tmp_path, epochs=1)
    module = example("lightning_module")
    loader = module.DistillModule(str(path)).train_dataloader()
    assert len(loader) == sum(1 for _ in loader) == 6  # 47 valid samples, batches of 8
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module.main(
            str(path),
            [],
            accelerator="cpu",
            devices=1,
            enable_progress_bar=False,
            log_every_n_steps=1,
        )
    logged = (tmp_path / "run" / "lightning" / "version_0" / "metrics.csv").read_text()
    assert "train/loss" in logged and "val/top1" in logged


def test_the_timm_pattern_trains_from_the_cache(world, tmp_path):
    path = config_file(world, tmp_path)
    result = example("timm_task").main(str(path), [])
    plain = example("plain_loop").main(str(path), [])
    assert len(result["losses"]) == 12 and all(map(math.isfinite, result["losses"]))
    assert result["losses"][0] == pytest.approx(plain["losses"][0], rel=1e-6)  # same init, batch
    assert 0.0 <= result["top1"] <= 100.0
