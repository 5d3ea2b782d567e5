"""``kdcache demo``: its commands against the configs and schemas, its readers, and the quick demo
end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from kdcache.cli import COMMANDS, main
from kdcache.cli import demo as D
from kdcache.core.config import load_config
from kdcache.core.errors import DataError
from kdcache.core.results import PrecomputeResult
from kdcache.pipeline.config import PrecomputeConfig
from kdcache.train.config import load_train_config

HAVE_FMNIST = all((D.FASHION_MNIST_DIR / name).is_file() for name in D.FASHION_MNIST_FILES)
needs_fmnist = pytest.mark.skipif(
    not HAVE_FMNIST,
    reason=f"Fashion-MNIST is not in {D.FASHION_MNIST_DIR} "
    "(sudo apt-get install dataset-fashion-mnist, or `make fmnist`)",
)


def _load(step: D.Step):
    """The validated config a ``kdcache train`` / ``precompute`` step would run with."""
    command, config, *rest = step.argv
    overrides = [item for item in rest if not item.startswith("--")]
    if command == "train":
        return load_train_config(config, overrides)
    return load_config(PrecomputeConfig, config, overrides)


def test_dispatcher_runs_this_module(capsys) -> None:
    assert COMMANDS["demo"][0] is D
    assert main(["demo", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "kdcache precompute configs/demo/precompute.yaml --overwrite" in out
    assert out.count("kdcache train ") == 1 + len(D.METHODS)


def test_default_out_needs_no_path_overrides() -> None:
    """The demo configs' own paths are the default --out's layout, so the printed commands are the
    short ones."""
    demo = D.Demo(Path("runs/demo"), D.FULL, D.FASHION_MNIST_DIR, seed=0)
    overrides = {
        step.name: [a for a in step.argv[2:]]
        for step in demo.steps()
        if step.argv[0] in ("train", "precompute")
    }
    assert overrides == {
        "teacher": [],
        "precompute": ["--overwrite"],
        "student ce": [],
        "student kd_early": ["teacher.name=early", "run.dir=runs/demo/students/kd_early"],
        "student kd_final": [],
        "student dist": [],
        "student effdstl": [],
        "student kd_online": ["teacher.mode=online", "run.dir=runs/demo/students/kd_online"],
    }


@pytest.mark.parametrize("sizes", [D.FULL, D.QUICK], ids=["full", "quick"])
def test_every_command_is_a_valid_config(tmp_path: Path, sizes: D.Sizes) -> None:
    demo = D.Demo(tmp_path / "out", sizes, D.FASHION_MNIST_DIR, seed=3)
    steps = {step.name: step for step in demo.steps()}
    teacher = _load(steps["teacher"])
    pre = _load(steps["precompute"])
    assert teacher.teacher.mode == "none" and sizes.early_epoch in teacher.run.save_model_epochs
    assert (
        sizes.early_epoch % teacher.run.eval_every == 0
    )  # the early teacher's test accuracy is logged
    assert (
        teacher.views.recipe == pre.cache.recipe
    )  # the cache holds the kind of view the teacher learnt from
    assert teacher.run.dir == str(demo.teacher_dir) and teacher.run.seed == 3
    assert [t.name for t in pre.teachers] == [D.EARLY, D.FINAL]
    assert pre.teachers[0].model.checkpoint == str(
        demo.teacher_dir / "checkpoints" / f"model_e{sizes.early_epoch}.pt"
    )
    assert pre.cache.path == str(demo.cache) and pre.data.shards == demo.student_shards
    students = {m: _load(steps[f"student {m}"]) for m in D.METHODS}
    for method, cfg in students.items():
        assert (cfg.run.dir, cfg.run.seed) == (str(demo.student_dir(method)), 3)
        assert (cfg.data.shards, cfg.cache.path) == (pre.data.shards, pre.cache.path)
        assert (
            cfg.student == students["ce"].student
            and cfg.total_epochs == students["ce"].total_epochs
        )
    assert students["ce"].teacher.mode == "none"
    assert [(s.loss.name, s.teacher) for s in students["effdstl"].stages] == [
        ("wsl", D.EARLY),
        ("effdstl", D.FINAL),
    ]
    assert (students["kd_early"].teacher.name, students["kd_final"].teacher.name) == (
        D.EARLY,
        D.FINAL,
    )
    assert (students["kd_online"].teacher.mode, students["kd_final"].teacher.mode) == (
        "online",
        "cache",
    )
    assert students["kd_online"].stages == students["kd_final"].stages


def test_precompute_figures_are_read_from_the_run_record(tmp_path: Path) -> None:
    """The demo reads precompute's numbers from the run record in the cache, never its output."""
    with pytest.raises(D.DemoStepError, match="holds no run record"):
        D.read_precompute(tmp_path / "cache")
    older = PrecomputeResult(cache_path=str(tmp_path / "cache"), run_id="20250101T000000.000Z-h-1")
    older.write(older.record_path())
    run = PrecomputeResult(
        cache_path=str(tmp_path / "cache"),
        run_id="20250101T000001.000Z-h-1",
        status="complete",
        tasks=2,
        shards_done=["a.tar", "b.tar"],
        views=4000,
        wall_seconds=10.0,
        busy_seconds=2.0,
        store_bytes=165_600,
        cache_views=4000,
        cache_teachers=2,
    )
    run.write(run.record_path())
    assert D.read_precompute(tmp_path / "cache") == {  # the latest run's
        "views": 4000,
        "views_per_s": 400.0,
        "views_per_s_actors_up": 2000.0,
        "store_mb": 0.166,
        "bytes_per_view": 20.7,
        "cache_views": 4000,
        "teachers": 2,
        "run_record": str(tmp_path / "cache" / "runs" / "20250101T000001.000Z-h-1.json"),
    }
    Path(run.record_path()).write_text("{}")
    with pytest.raises(
        D.DemoStepError, match="cannot read the precompute run record: .*cache_path"
    ):
        D.read_precompute(tmp_path / "cache")


def test_absent_data_says_how_to_get_it(tmp_path: Path, capsys) -> None:
    code = main(
        ["demo", "--out", str(tmp_path / "out"), "--data", str(tmp_path / "none"), "--no-download"]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "sudo apt-get install dataset-fashion-mnist" in err and "--data DIR" in err
    assert not (tmp_path / "out" / "fashion-mnist").exists()  # --no-download: nothing fetched


def test_a_previous_download_is_found(tmp_path: Path) -> None:
    got = tmp_path / "out" / "fashion-mnist"
    got.mkdir(parents=True)
    for name in D.FASHION_MNIST_FILES:
        (got / name).write_bytes(b"")
    assert D.find_data(tmp_path / "none", tmp_path / "out", download=False) == got
    with pytest.raises(DataError, match="dataset-fashion-mnist"):
        D.find_data(tmp_path / "none", tmp_path / "elsewhere", download=False)


@needs_fmnist
def test_download_fetches_and_checks_the_files(tmp_path: Path, monkeypatch, capsys) -> None:
    """The download path, with the installed files standing in for the official server (file://
    URLs)."""
    monkeypatch.setattr(D, "FASHION_MNIST_URL", D.FASHION_MNIST_DIR.as_uri() + "/")
    got = D.find_data(tmp_path / "none", tmp_path / "out", download=True)
    assert got == tmp_path / "out" / "fashion-mnist"
    assert all(
        (got / n).read_bytes() == (D.FASHION_MNIST_DIR / n).read_bytes()
        for n in D.FASHION_MNIST_FILES
    )
    assert "Trying to download" in capsys.readouterr().out

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / D.FASHION_MNIST_FILES[0]).write_bytes(b"<html>not gzip</html>")
    monkeypatch.setattr(D, "FASHION_MNIST_URL", bad.as_uri() + "/")
    with pytest.raises(DataError, match="download failed too"):
        D.find_data(tmp_path / "none", tmp_path / "elsewhere", download=True)
    assert not list((tmp_path / "elsewhere" / "fashion-mnist").iterdir())  # nothing half-written


@needs_fmnist
def test_quick_demo_end_to_end(tmp_path: Path, capsys) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert D.DemoResult.read(out / "summary.json").setup.quick  # the typed result, as JSON

    assert set(summary["teacher_acc"]) == {D.EARLY, D.FINAL}
    assert set(summary["student_acc"]) == set(D.METHODS)
    for acc in [*summary["teacher_acc"].values(), *summary["student_acc"].values()]:
        assert 0.0 <= acc <= 100.0
    assert summary["student_acc"]["ce"] > 10.0  # better than chance even at this size
    assert 0 < summary["bytes_per_view"] < 100  # top-5 of 10 classes: a few tens of bytes
    assert summary["precompute_vps"] > 0
    assert set(summary["train_ips"]) == {"plain", "cached", "online"}
    assert all(v > 0 and math.isfinite(v) for v in summary["train_ips"].values())
    forwards = summary["teacher_forwards"]
    assert forwards["kd_online"] > 0 and all(
        forwards[m] == 0 for m in D.METHODS if m != "kd_online"
    )
    assert summary["setup"]["num_views"] == D.QUICK.num_views and summary["setup"]["quick"] is True
    assert set(summary["step_seconds"]) == {
        "shards",
        "teacher",
        "precompute",
        "inspect",
        "students",
    }

    report = (out / "report.md").read_text()
    assert summary["plots"] and all(f"(inspect/{name})" in report for name in summary["plots"])
    assert all((out / "inspect" / name).is_file() for name in summary["plots"])
    assert "kdcache train configs/demo/student_kd.yaml" in report
    assert "== kdcache demo on Fashion-MNIST" in printed and "$ kdcache precompute" in printed
