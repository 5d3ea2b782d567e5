"""``kdcache config precompute|train``: templates generated from the typed configs, and the
resolved config of a run."""

from __future__ import annotations

import pytest
import yaml

from kdcache.cli import main as cli_main
from kdcache.core.config import load_config
from kdcache.pipeline.config import PrecomputeConfig
from kdcache.train.config import TrainConfig

MODELS = {"precompute": PrecomputeConfig, "train": TrainConfig}


@pytest.mark.parametrize("kind", ["precompute", "train"])
def test_template_loads_back_with_every_key_and_its_default(kind, tmp_path, capsys):
    assert cli_main(["config", kind]) == 0
    text = capsys.readouterr().out
    path = tmp_path / f"{kind}.yaml"
    path.write_text(text)
    config = load_config(MODELS[kind], path)
    # every key is written out, with the value the run uses (nothing left to defaults)
    assert yaml.safe_load(text) == config.model_dump(mode="json")
    assert "# Values you must set: data.shards, cache.path" in text


def test_template_comments_come_from_the_field_docstrings(capsys):
    cli_main(["config", "precompute"])
    text = capsys.readouterr().out
    assert "  # A: views per sample. On an existing cache it must be the cache's, unless" in text
    assert "    # ``accept_low_accuracy``" not in text  # docs precede keys, not the reverse
    lines = text.splitlines()
    keep = lines.index("    accept_low_accuracy: false")
    assert lines[keep - 1].startswith("    # ")  # each key has its comment above it
    cli_main(["config", "precompute", "--bare"])
    assert "#" not in capsys.readouterr().out.split("\n\n", 1)[1]


def test_resolved_merges_bases_applies_overrides_and_fills_defaults(tmp_path, capsys):
    (tmp_path / "base.yaml").write_text(
        "data: {shards: s/train-000000.tar, batch_size: 32, num_classes: 10}\n"
        "student: {name: kd_mlp}\n"
        "stages: [{name: ce, epochs: 2, loss: {name: ce}}]\nteacher: {mode: none}\n"
    )
    (tmp_path / "run.yaml").write_text("base: base.yaml\noptimizer: {lr: 0.05}\n")
    args = ["config", "train", "--resolved", str(tmp_path / "run.yaml"), "stages.0.epochs=5"]
    assert cli_main(args) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["data"]["batch_size"] == 32  # from the base
    assert resolved["optimizer"]["lr"] == 0.05  # from the file
    assert resolved["stages"][0]["epochs"] == 5  # from the override
    assert resolved["run"]["seed"] == TrainConfig.model_fields["run"].default_factory().seed


def test_resolved_reports_a_bad_key_as_the_run_would(tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text(
        "data: {shards: a.tar}\ncache: {path: c}\nteachers: [{name: t, model: {name: x}}]\n"
        "cache_typo: 1\n"
    )
    assert cli_main(["config", "precompute", "--resolved", str(tmp_path / "bad.yaml")]) == 2
    assert "cache_typo" in capsys.readouterr().err
