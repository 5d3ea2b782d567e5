"""``kdcache train CONFIG [dotted.key=value ...] [--resume]``:
parse, load, train, print the result (the run's ``summary.json``, a
:class:`~kdcache.core.results.TrainResult`).
"""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kdcache.core.results import TrainResult


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="train config YAML (e.g. configs/smoke/train.yaml)")
    parser.add_argument(
        "overrides",
        nargs=argparse.REMAINDER,
        metavar="dotted.key=value",
        help="config overrides, e.g. data.batch_size=64 stages.0.epochs=2 run.dir=runs/x "
        "(--resume and --force-unlock may come among them)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="resume from RUN_DIR/checkpoints/last.pt (same as run.resume=must)",
    )
    parser.add_argument(
        "--force-unlock",
        action="store_true",
        help="remove the run directory's lock left by a run that is gone (e.g. killed on another "
        "host; same as run.force_unlock=true)",
    )


def run(args: argparse.Namespace) -> int:
    flags = ("--resume", "--force-unlock")
    resume = args.resume or "--resume" in args.overrides
    unlock = args.force_unlock or "--force-unlock" in args.overrides
    overrides = [item for item in args.overrides if item not in flags]
    overrides += ["run.resume=must"] if resume else []
    overrides += ["run.force_unlock=true"] if unlock else []
    from kdcache.train.config import load_train_config

    refuse_flags(overrides)
    config = load_train_config(args.config, overrides)
    from kdcache.train.distributed import env_world
    from kdcache.train.trainer import train  # heavy imports after the config is known to be valid

    summary = train(config)
    if env_world()[0] == 0:
        print(format_summary(summary))
    return 0


FLAG_HINTS = {
    "--overwrite": "to start over in run.dir, give run.overwrite=true",
    "--force": "to start over in run.dir, give run.overwrite=true",
}
"""Flags a user may carry over from ``kdcache precompute`` (or habit), with what train takes."""


def refuse_flags(overrides: list[str]) -> None:
    """A flag that train does not take, among the overrides, is one line saying what it does
    take (argparse would pass it on as an override and the config loader would reject it)."""
    from kdcache.core.errors import ConfigError

    for item in overrides:
        if item.startswith("-"):
            hint = FLAG_HINTS.get(item.split("=", 1)[0], "overrides are dotted.key=value")
            raise ConfigError(f"{item}: kdcache train has no such flag (only --resume); {hint}")


def format_summary(summary: TrainResult) -> str:
    """The final metrics in two lines: a readable one and the JSON summary (``summary.json``)."""
    top1 = "n/a" if summary.top1 is None else f"{summary.top1:.2f}%"
    top5 = "n/a" if summary.top5 is None else f"{summary.top5:.2f}%"
    head = (
        f"kdcache train ({summary.mode}): {summary.epochs} epochs, {summary.steps} steps, "
        f"top-1 {top1}, top-5 {top5}, {summary.images_per_s:.0f} images/s, "
        f"{summary.teacher_forwards} teacher forwards, "
        f"{summary.time_s:.1f} s -> {summary.run_dir}"
    )
    if summary.sftn_branch_top1:
        branches = ", ".join(f"{v:.2f}%" for v in summary.sftn_branch_top1)
        head += f"\nSFTN student branches, top-1 from the first stage on: {branches}"
    return head + "\n" + json.dumps(summary.model_dump())
