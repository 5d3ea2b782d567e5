"""The README's "Your own data" walkthrough, run as written: the commands of
examples/own_data/walkthrough.sh with its three configs, on a tiny generated ImageFolder
(5 learnable classes of PNGs). Only sizes are overridden (a tiny CNN for resnet18 and the
student, a few epochs), each override appended to the command it changes."""

from __future__ import annotations

import shlex
import shutil
from pathlib import Path

from PIL import Image

from kdcache.cli import main as cli_main
from kdcache.core.results import read_run_records
from kdcache.shards.writing import synthetic_samples

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "own_data"
SIZES = {
    "teacher.yaml": [
        "student.name=kd_cnn_small",
        "stages.0.epochs=4",
        "data.batch_size=16",
        "data.num_workers=0",
    ],
    # the tiny teacher's own val top-1 after 4 epochs is about 0.5, not the example's 0.8
    "precompute.yaml": [
        "teachers.0.model.name=kd_cnn_small",
        "teachers.0.expect_top1=0.5",
        "cache.num_views=2",
    ],
    "student.yaml": [
        "student.name=kd_cnn_tiny",
        "stages.0.epochs=1",
        "data.batch_size=16",
        "data.num_workers=0",
    ],
}


def commands() -> list[list[str]]:
    """The walkthrough's ``kdcache`` commands, ``$CFG`` expanded, as argument lists."""
    out = []
    for line in (EXAMPLE / "walkthrough.sh").read_text().splitlines():
        if line.startswith("kdcache "):
            out.append(shlex.split(line.replace("$CFG", "examples/own_data"))[1:])
    return out


def image_folder(root: Path) -> None:
    """data/my_images/{train,val}/<class>/*.png: 5 classes, 24 and 8 images each, 32 px."""
    for split, num in (("train", 120), ("val", 40)):
        samples = synthetic_samples(split, num, classes=5, size=(32, 32), channels=3, seed=0)
        for sample in samples:
            folder = root / split / f"class_{sample.label}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(sample.image).save(folder / f"{sample.key}.png")


def test_the_own_data_walkthrough_runs_as_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(EXAMPLE, tmp_path / "examples" / "own_data")
    image_folder(tmp_path / "data" / "my_images")
    steps = commands()
    assert [step[0] for step in steps] == [
        "shards",
        "train",
        "precompute",
        "validate",
        "verify",
        "inspect",
        "train",
    ]
    for step in steps:
        config = next((Path(a).name for a in step if a.endswith(".yaml")), None)
        assert cli_main(step + SIZES.get(config, [])) == 0, step
    out = capsys.readouterr().out
    (record,) = read_run_records("runs/own/cache")
    (teacher,) = record.teachers
    assert teacher.check == "passed" and teacher.views_checked == 120 * 2
    assert teacher.rendering.startswith("size 64 [config teachers.0.render]")
    assert "teacher teacher: top-1" in out and "teacher check at precompute" in out
    assert Path("runs/own/student/summary.json").is_file()
