"""The teacher check at precompute (issue 24): each teacher's top-1 on its views is measured,
recorded and judged; a teacher loaded from a local file never silently takes the hub's
preprocessing."""

from __future__ import annotations

import pytest
import torch

from kdcache.cli import main as cli_main
from kdcache.core.errors import ConfigError
from kdcache.core.results import TeacherRun, read_run_records
from kdcache.models.build import build_model
from kdcache.models.preprocess import RenderSpec, resolve_sourced
from kdcache.pipeline.plan import plan_precompute
from kdcache.pipeline.teachercheck import TeacherCheckError, problem, upper_bound
from tests.support.precomputerun import make_config, precompute, shards_url

OVERLAY = "teachers.0.model.kwargs.pretrained_cfg_overlay"


@pytest.fixture(scope="module")
def random_checkpoint(tmp_path_factory):
    """A kd_cnn_tiny checkpoint of untrained weights: a "teacher" whose file holds no training."""
    path = tmp_path_factory.mktemp("ckpt") / "untrained.pth"
    torch.manual_seed(123)
    torch.save(build_model_spec_free(), path)
    return str(path)


def build_model_spec_free() -> dict:
    from kdcache.models.build import ModelSpec

    return build_model(ModelSpec(name="kd_cnn_tiny"), num_classes=10).state_dict()


def random_teacher_config(data_dir, cache, checkpoint, *overrides):
    """data_dir's 160 samples x 6 views through an untrained checkpoint."""
    return make_config(
        shards_url(data_dir),
        cache,
        "cache.num_views=6",
        f"teachers.0.model.checkpoint={checkpoint}",
        *overrides,
    )


def test_untrained_checkpoint_fails_the_run_with_one_line(data_dir, tmp_path, random_checkpoint):
    """In this process (ray.mode: local); the next test runs the check on Ray actors."""
    cache = tmp_path / "cache"
    cfg = random_teacher_config(data_dir, cache, random_checkpoint, "ray.mode=local")
    with pytest.raises(TeacherCheckError) as failed:
        precompute(cfg)
    message = str(failed.value)
    assert "\n" not in message
    assert "teacher 't1' (teachers.0)" in message and "near chance" in message
    # the rendering and where each part of it came from
    assert "size 16 [recipe], bilinear [recipe], mean (0.485, 0.456, 0.406) [recipe]" in message
    assert "teachers.0.accept_low_accuracy: true" in message
    (record,) = read_run_records(str(tmp_path / "cache"))
    assert record.status == "error" and record.error == f"TeacherCheckError: {message}"
    assert record.teachers[0].check.startswith("failed: top-1")
    assert record.teachers[0].top1 < 0.15


def test_accepted_low_accuracy_is_recorded_printed_and_inspected(
    ray_session, data_dir, tmp_path, random_checkpoint, capsys
):
    cache = tmp_path / "cache"
    cfg = random_teacher_config(
        data_dir, cache, random_checkpoint, "teachers.0.accept_low_accuracy=true", "ray.mode=ray"
    )
    result = precompute(cfg)
    run = result.teachers[0]
    assert run.views_checked == 160 * 6 and run.unmixed_checked == 160 * 6
    assert run.check.startswith("accepted: top-1") and run.rendering.startswith("size 16 [recipe]")
    (record,) = read_run_records(str(cache))
    assert record.teachers[0].views_correct == run.views_correct
    assert record.teachers[0].top1 == pytest.approx(run.top1)
    assert cli_main(["inspect", str(cache)]) == 0
    shown = capsys.readouterr().out
    assert "teacher check at precompute" in shown and "accepted: top-1" in shown
    assert "t1 renders at size 16 [recipe]" in shown


def test_random_init_teacher_is_measured_but_not_judged(data_dir, tmp_path):
    """No weights in the config at all: a pipeline try-out, reported as such."""
    cfg = make_config(shards_url(data_dir), tmp_path / "cache", "ray.mode=local")
    run = precompute(cfg).teachers[0]
    assert run.views_checked == 160 * 2
    assert run.check == "not judged: no weights in the config (seeded random init)"


def test_the_rule_needs_clear_evidence():
    def run(correct, n):
        return TeacherRun(
            name="t",
            model="m",
            k=1,
            weights_digest="",
            views_correct=correct,
            views_checked=n,
            unmixed_correct=correct,
            unmixed_checked=n,
        )

    assert upper_bound(10, 100) == pytest.approx(0.1915, abs=1e-3)
    assert problem(run(100, 1000), 10, None).startswith("top-1 10.0% on 1000 views is near")
    assert problem(run(10, 100), 10, None) == ""  # 100 views: could be a weak teacher's luck
    assert problem(run(800, 1000), 10, 0.9) == ""
    assert "far below its expect_top1 91.0%" in problem(run(370, 1000), 10, 0.91)


def overlay_config(data_dir, tmp_path, *overrides):
    return make_config(
        shards_url(data_dir),
        tmp_path / "cache",
        "teachers.0.model.name=test_resnet",
        "teachers.0.model.pretrained=true",
        f"{OVERLAY}.file={tmp_path / 'finetuned.safetensors'}",
        f"{OVERLAY}.num_classes=10",
        *overrides,
    )


def test_local_overlay_without_its_rendering_is_refused_naming_the_hubs(data_dir, tmp_path):
    """The README's local-file route: the hub's 160 px / mean 0.5 would be taken silently."""
    cfg = overlay_config(data_dir, tmp_path)
    with pytest.raises(ConfigError) as refused:
        plan_precompute(cfg)
    message = str(refused.value)
    assert "\n" not in message and message.startswith("teachers.0.render: the weights of")
    assert "size, interpolation, mean, std are not stated" in message
    assert "size 160, bilinear, mean (0.5, 0.5, 0.5), std (0.5, 0.5, 0.5)" in message
    assert not (tmp_path / "cache").exists()  # refused before anything is written


def test_local_overlay_renders_as_its_weights_were_trained(data_dir, tmp_path):
    import timm
    from safetensors.torch import save_file

    model = timm.create_model("test_resnet", num_classes=10)
    save_file(model.state_dict(), str(tmp_path / "finetuned.safetensors"))
    cfg = overlay_config(
        data_dir,
        tmp_path,
        f"{OVERLAY}.input_size=[3,24,24]",
        f"{OVERLAY}.mean=[0.3,0.3,0.3]",
        f"{OVERLAY}.std=[0.2,0.2,0.2]",
        "teachers.0.render.interpolation=bicubic",
    )
    teacher = plan_precompute(cfg).teachers[0]
    assert (teacher.rendering.size, teacher.rendering.interpolation) == (24, "bicubic")
    assert teacher.rendering.mean == (0.3, 0.3, 0.3)
    assert teacher.rendering_from == (
        "size 24 [config pretrained_cfg_overlay], bicubic [config teachers.0.render], "
        "mean (0.3, 0.3, 0.3) [config pretrained_cfg_overlay], "
        "std (0.2, 0.2, 0.2) [config pretrained_cfg_overlay]"
    )


def test_hub_rendering_is_named_as_timms(data_dir, tmp_path):
    cfg = overlay_config(data_dir, tmp_path, "teachers.0.render.source=timm")
    model = cfg.teachers[0].model
    rendering, sources = resolve_sourced(cfg.teachers[0].render, cfg.cache.recipe, model, "r")
    assert rendering.size == 160 and set(sources.values()) == {
        "timm pretrained_cfg of 'test_resnet'"
    }
    assert resolve_sourced(RenderSpec(size=20), cfg.cache.recipe, None, "r")[1]["size"] == (
        "config r"
    )
