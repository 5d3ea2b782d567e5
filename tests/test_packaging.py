"""Packaging: one top-level name, ``kdcache``, usable from a project that has its own
``train.py`` and ``pipeline.py`` (as most ML projects do), including the DDP launch line."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import yaml

from tests.support.cachebuild import build_cache, write_shards

REPO = Path(__file__).resolve().parents[1]
IGNORE = shutil.ignore_patterns("__pycache__", "*.egg-info")
SHADOWS = "raise SystemExit('the project\\'s own {name}.py was imported instead of kdcache\\'s')\n"


def user_project(tmp_path: Path) -> Path:
    """A folder holding a ``train.py`` and a ``pipeline.py`` that fail loudly when imported."""
    project = tmp_path / "project"
    project.mkdir()
    for name in ("train", "pipeline", "cache_tools"):
        (project / f"{name}.py").write_text(SHADOWS.format(name=name))
    return project


def run(args: list[str], cwd: Path, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_the_wheel_installs_kdcache_only(tmp_path) -> None:
    source = tmp_path / "source"  # a copy: pip builds in the tree, leaving build/ behind
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "src", source / "src", ignore=IGNORE)
    wheel_dir = tmp_path / "wheel"
    command = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
    built = run([*command, "-w", str(wheel_dir), str(source)], cwd=tmp_path, timeout=300)
    assert built.returncode == 0, built.stderr
    [wheel] = wheel_dir.glob("kdcache-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert tops == {"kdcache"}
    for module in (
        "kdcache/pipeline/worker.py",
        "kdcache/train/trainer.py",
        "kdcache/cli/__init__.py",
        "kdcache/cache_tools/stats.py",
        "kdcache/cache/store.py",
        "kdcache/__main__.py",
        "kdcache/py.typed",
    ):
        assert module in names


def test_kdcache_runs_beside_a_projects_train_and_pipeline_modules(tmp_path) -> None:
    project = user_project(tmp_path)
    helped = run([sys.executable, "-m", "kdcache", "--help"], cwd=project)
    assert helped.returncode == 0, helped.stderr
    assert "precompute" in helped.stdout and "train" in helped.stdout
    version = run([sys.executable, "-m", "kdcache", "--version"], cwd=project)
    assert version.returncode == 0 and version.stdout.startswith("kdcache ")
    code = (
        "import kdcache, kdcache.train.losses, kdcache.pipeline.worker, kdcache.cli; "
        "print(kdcache.__version__)"
    )
    imported = run([sys.executable, "-c", code], cwd=project)
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.strip() == version.stdout.split()[1]


def test_the_ddp_launch_line_trains_beside_a_projects_train_module(tmp_path) -> None:
    """``torchrun --nproc_per_node 2 -m kdcache train cfg.yaml`` from the project's folder."""
    project = user_project(tmp_path)
    urls = write_shards(tmp_path / "shards", num_shards=2)
    build_cache(tmp_path / "cache.zarr", urls, teachers={"tiny": 4})
    config = {
        "run": {"dir": str(tmp_path / "run"), "progress": False},
        "data": {"shards": urls, "batch_size": 4, "num_workers": 0, "shuffle_buffer": 0},
        "cache": {"path": str(tmp_path / "cache.zarr")},
        "student": {"name": "kd_mlp", "kwargs": {"img_size": 12, "hidden": 8}},
        "teacher": {"mode": "cache", "name": "tiny"},
        "stages": [{"epochs": 1, "loss": {"name": "kd"}}],
    }
    (project / "cfg.yaml").write_text(yaml.safe_dump(config))
    torchrun = Path(sys.executable).with_name("torchrun")
    launched = run(
        [
            str(torchrun),
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "kdcache",
            "train",
            "cfg.yaml",
        ],
        cwd=project,
        timeout=300,
    )
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert "kdcache train (cache)" in launched.stdout
    assert (tmp_path / "run" / "summary.json").is_file()
