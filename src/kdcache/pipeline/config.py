"""The typed config of ``kdcache precompute``: data, cache, teachers, Ray and runtime sections.

Loaded with :func:`kdcache.core.config.load_config`, which turns every validation error into one
:class:`~kdcache.core.errors.ConfigError` naming the dotted key. Cross-field rules (unique teacher
names, ``k <= num_classes`` ...) are checked here when the values are in the config, and again
by the planner once ``num_classes`` is known from the shards' manifest.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from kdcache.cache.store import ENCODINGS
from kdcache.core.config import StrictModel
from kdcache.core.errors import ConfigError
from kdcache.models.preprocess import RenderSpec
from kdcache.models.spec import ModelSpec
from kdcache.shards.reading import DEFAULT_LABEL_KEY, MAX_PIXELS
from kdcache.views.recipe import ViewRecipe

TEACHER_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


class DataSection(StrictModel):
    """The input shards."""

    shards: str | list[str]
    """WebDataset shards: a glob, a brace pattern (``dir/train-{000000..000009}.tar``), an fsspec
    URL, or a list of any of these. Order matters: it is part of the cache's fingerprint. Ray
    actors open them, so on a cluster use a shared filesystem or a URL every node can read."""
    storage_options: dict[str, Any] = Field(default_factory=dict)
    """fsspec storage options for ``shards`` and the manifest beside them (credentials, endpoint
    ...), used by the driver and every Ray actor; empty: fsspec's defaults (for S3 the standard
    AWS environment). Saved with the config with their values redacted."""
    index: str | None = None
    """A shard index with each shard's sample count, so planning reads no shard: a WebDataset
    (wids) shard index (``{"shardlist": [{"url", "nsamples", "filesize"}]}``, as ``widsindex
    create`` writes) or a kdcache manifest; a path or a URL (read with ``storage_options``).
    Default: the ``<prefix>-manifest.json`` beside the shards, else a ``shardindex.json`` beside
    them, else each shard's tar headers (range requests that skip the payloads)."""
    num_classes: int | None = Field(default=None, ge=1)
    """Number of classes; default: from the ``<prefix>-manifest.json`` beside the shards."""
    class_names: list[str] = Field(default_factory=list)
    """Class names in label order; default: from the manifest, if any."""
    label_key: str = Field(default=DEFAULT_LABEL_KEY, min_length=1)
    """The label's key in a sample's ``.json`` entry. A sample's label comes from the first of its
    ``.cls``, ``.json`` and ``.txt`` entries (``.cls`` and ``.txt``: the integer as text)."""
    on_error: Literal["raise", "skip"] = "raise"
    """A corrupt image or a missing / out-of-range label: ``raise`` fails the shard naming shard
    and key; ``skip`` stores the row as invalid (status 2) with its reason in ``errors``."""
    max_pixels: int | None = Field(default=MAX_PIXELS, ge=1)
    """An image whose header claims more pixels is refused before decoding, like a corrupt one
    (``on_error``); default PIL's decompression-bomb limit (89478485); None: no limit."""

    @field_validator("shards")
    @classmethod
    def _non_empty(cls, value: str | list[str]) -> str | list[str]:
        if not value:
            raise ValueError("expected a shard pattern or a non-empty list of them")
        return value


class CacheSection(StrictModel):
    """Where the cache lives and how its views are made."""

    path: str
    """The cache: a local directory or an fsspec URL (``s3://bucket/cache.zarr``)."""
    storage_options: dict[str, Any] = Field(default_factory=dict)
    """fsspec storage options for ``path`` (credentials, endpoint ...); saved with the config with
    their values redacted."""
    seed: int = 0
    """Seed of the view parameters: view ``a`` of ``key`` depends on ``(seed, key, a)`` only."""
    num_views: int = Field(default=4, ge=1, le=1024)
    """A: views per sample. On an existing cache it must be the cache's, unless ``grow``."""
    grow: bool = False
    """Add views to an existing cache whose ``num_views`` is below this config's (A -> A'): the
    stored views and targets are kept, this run draws views A..A'-1 and runs its teachers on
    them; the cache's other teachers fill them when a precompute runs with them (``--grow``).
    Without it a different ``num_views`` is refused, so a typo never grows a cache."""
    recipe: ViewRecipe = Field(default_factory=ViewRecipe)
    """How views are made (stored in the cache; the trainer replays with the cache's copy)."""
    overwrite: bool = False
    """Delete an existing cache at ``path`` and start over (``--overwrite``)."""
    check: bool = False
    """On an existing cache, read every chunk of the shards marked complete and check its
    checksum before the run (``--check``); damaged shards are redone. Without it only the chunk
    files' existence is checked (one listing per array), which finds lost files but not flipped
    bytes."""
    force_unlock: bool = False
    """Remove the cache's writer lock (``<path>.lock``) even if its holder may still run
    (``--force-unlock``): for a precompute killed on another host. A lock whose holder died on
    this host is taken over without it."""


class MemberSection(StrictModel):
    """One model of an ensemble stored as one teacher."""

    model: ModelSpec
    """The network and its weights (as ``teachers[].model``)."""
    weight: float = Field(default=1.0, gt=0.0)
    """Its weight in the ensemble (the weights are normalised to sum to 1)."""
    render: RenderSpec = Field(default_factory=RenderSpec)
    """How this model renders the views (as ``teachers[].render``)."""


class EnsembleSection(StrictModel):
    """Several models run on every view and stored as one teacher: their combination."""

    members: list[MemberSection] = Field(min_length=1)
    """The models and their weights."""
    combine: Literal["probs", "logits"] = "probs"
    """``probs``: the weighted mean of the models' T=1 probabilities (tempering the stored teacher
    later tempers that mixture); ``logits``: the weighted mean of their logits."""


class TeacherSection(StrictModel):
    """One teacher run over every view."""

    name: str
    """Subgroup name in the cache (letters, digits, ``_`` and ``-``; no dot)."""
    model: ModelSpec | None = None
    """The network and its weights. Real teachers need ``checkpoint:`` (or ``pretrained: true``
    with network access); without either, timm's random init is used, seeded so runs agree.
    Exactly one of ``model`` and ``ensemble``."""
    ensemble: EnsembleSection | None = None
    """Instead of ``model``: several models whose combined distribution is stored as this
    teacher (its metadata records each model's spec, weights digest, weight and rendering)."""
    k: int = Field(default=10, ge=1)
    """How many top classes to store per view."""
    render: RenderSpec = Field(default_factory=RenderSpec)
    """How this teacher renders the views (size, interpolation, mean, std); default: the timm
    pretrained config of a ``pretrained: true`` timm model, else the recipe's. E.g. ``{size: 320,
    interpolation: bicubic}`` for a teacher at a higher resolution than the student."""
    encoding: str = "fp16"
    """How targets are stored: ``fp16`` or ``q8`` (top-k), or ``sampled`` (the top-k as ``q8``
    plus ``samples`` classes drawn from the rest, for ``tail: sample`` in training)."""
    samples: int | None = Field(default=None, ge=1, le=255)
    """``sampled``: classes drawn per view from the distribution outside the top-k (at
    ``draw_temperature``)."""
    sample_temperatures: list[Annotated[float, Field(gt=0.0)]] = Field(default_factory=list)
    """``sampled``: temperatures other than 1 and ``draw_temperature`` at which training should
    be unbiased (each stores ``logsumexp(l / T)``, 2 B per view); e.g. ``[4]`` for KD at T=4."""
    draw_temperature: float | None = Field(default=None, gt=0.0, allow_inf_nan=False)
    """``sampled``: the temperature τ of the tail distribution the ``samples`` are drawn from
    (default 1). Set it to the KD temperature: there the estimate has no importance weights (each
    drawn class gets its share of the draws times the exact tail mass at τ), and it is unbiased
    at τ as at T=1 (the tail's ``logsumexp(l / τ)`` is stored, 2 B per view)."""

    expect_top1: float | None = Field(default=None, gt=0.0, le=1.0)
    """The teacher's known top-1 (0..1, e.g. its validation accuracy). The run fails when its
    top-1 on the unmixed views it computes falls below ``EXPECT_FRACTION`` (3/4) of it: the sign
    of a wrong rendering or checkpoint (see "The teacher check" in the README)."""
    accept_low_accuracy: bool = False
    """Keep the run going when this teacher fails the teacher check (near chance, or far below
    ``expect_top1``): its top-1 is still measured and recorded."""

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not TEACHER_NAME.match(value):
            raise ValueError(f"expected letters, digits, '_' or '-' (no dot), found {value!r}")
        return value

    @field_validator("encoding")
    @classmethod
    def _encoding(cls, value: str) -> str:
        if value not in ENCODINGS:
            raise ValueError(f"expected one of {', '.join(ENCODINGS)}, found {value!r}")
        return value


class RaySection(StrictModel):
    """The Ray cluster and the shard actors."""

    mode: Literal["auto", "ray", "local"] = "auto"
    """``ray``: shard tasks on Ray actors; ``local``: in this process, one after the other, no
    Ray (one worker using every CPU); ``auto``: ``local`` for a small job (at most 20000 views
    to compute) with no cluster named (``address``, ``RAY_ADDRESS``) and Ray not started by
    this process, else ``ray``. Ray's start and its actors' cost a few seconds each; for a few
    hundred images that is most of the run."""
    address: str | None = None
    """The cluster to join (``auto``, ``head:6379``, ``ray://head:10001``), reached before the
    cache is created (an unreachable address is an error, nothing written). ``None``: the cluster
    in ``RAY_ADDRESS`` if set (as under ``ray job submit``), else an embedded local Ray (or one
    this process started already)."""
    connect_timeout_s: float = Field(default=30.0, gt=0)
    """How long joining the cluster at ``address`` may take: an address where no Ray answers in
    time (a closed port, another server on it, a cluster that does not respond) is one error
    naming it, instead of Ray's retries for minutes."""
    num_actors: int | None = Field(default=None, ge=1)
    """Shard actors; default: as many as the cluster holds now (one per GPU when actors use GPUs,
    else min(CPUs, shards)), at least one. Set it on an autoscaling cluster: actors that do not
    fit yet wait for the nodes the autoscaler adds."""
    cpus_per_actor: float | None = Field(default=None, gt=0)
    """CPUs reserved per actor: they read, decode and replay the views
    (``runtime.data_workers``) and run a CPU teacher (``runtime.torch_threads``). Default: 1 for
    CPU actors; for GPU actors each one's share of a GPU node's CPUs (the node's CPUs divided by
    its GPUs, times ``gpus_per_actor``; the smallest share over the GPU nodes), e.g. 16 on a node
    with 128 CPUs and 8 GPUs."""
    gpus_per_actor: float | None = Field(default=None, ge=0)
    """GPUs per actor; default 1 when the cluster has GPUs now, else 0 (set it to 1 on a cluster
    whose GPU nodes the autoscaler starts on demand)."""
    max_restarts: int = Field(default=3, ge=0)
    """How many times kdcache replaces a dead actor with a fresh one, per actor slot over the run
    (only while shards wait). A slot whose budget is spent, or whose actor's constructor raised, is
    given up."""
    max_task_retries: int = Field(default=3, ge=0)
    """How many times a shard whose actor died is retried, on a fresh actor, after the shards not
    yet tried; then it fails by name and the other shards still complete. (kdcache does this itself:
    Ray neither restarts the actors nor retries their tasks.)"""
    wait_for_resources_s: float | None = Field(default=900.0, gt=0)
    """How long the run waits, with no shard actor up, for Ray to place one (free CPUs/GPUs, or
    nodes the autoscaler adds), logging what it waits for every 30 s; then the shards fail with
    an error naming this key. ``null``: wait as long as it takes. Also covers building the
    teachers in the first actor."""
    temp_dir: str | None = None
    """Embedded Ray only: its session directory root (keep it short: socket paths)."""


class RuntimeSection(StrictModel):
    """How teachers run inside an actor."""

    batch_size: int = Field(default=256, ge=1)
    """Views per teacher forward pass."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """``auto``: the actor's GPU if it has one, else CPU."""
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"
    """Autocast: ``auto`` is bf16 on CUDA and full precision on CPU."""
    channels_last: bool = True
    """channels_last memory format on CUDA."""
    torch_threads: int | None = Field(default=None, ge=1)
    """torch intra-op threads per actor; default ``ray.cpus_per_actor`` (at least 1)."""
    data_workers: int | None = Field(default=None, ge=0)
    """Processes per actor that read, decode and replay the views and collate the batches,
    overlapped with the teachers' forward. 0: one background thread of the actor. Default: the
    actor's CPUs (``ray.cpus_per_actor``) when it has 2 or more, else 0. The cache is the same
    for every value."""


class PrecomputeConfig(StrictModel):
    """``kdcache precompute``: teachers over shards x views into a cache."""

    data: DataSection
    """The input shards."""
    cache: CacheSection
    """The output cache."""
    teachers: list[TeacherSection] = Field(min_length=1)
    """The teachers to run (one cache subgroup each)."""
    ray: RaySection = Field(default_factory=RaySection)
    """Ray cluster and actors."""
    runtime: RuntimeSection = Field(default_factory=RuntimeSection)
    """Batch size, device and precision."""

    @model_validator(mode="after")
    def _cross_checks(self) -> PrecomputeConfig:
        problems = cross_field_problems(self, self.data.num_classes)
        if problems:
            raise ValueError("\n  ".join(problems))  # kdcache.core.config.validate: one line each
        return self


def cross_field_problems(cfg: PrecomputeConfig, num_classes: int | None) -> list[str]:
    """Problems between fields, each naming its dotted keys; ``num_classes`` may come from a
    manifest."""
    source = (
        "data.num_classes" if cfg.data.num_classes == num_classes else "from the shards' manifest"
    )
    problems: list[str] = []
    seen: dict[str, int] = {}
    for i, teacher in enumerate(cfg.teachers):
        if teacher.name in seen:
            problems.append(
                f"teachers.{i}.name: {teacher.name!r} is already used by "
                f"teachers.{seen[teacher.name]}"
            )
        seen.setdefault(teacher.name, i)
        if num_classes is not None and teacher.k > num_classes:
            problems.append(
                f"teachers.{i}.k: {teacher.k} is more than num_classes={num_classes} ({source})"
            )
        problems += _model_problems(i, teacher) + _sampling_problems(i, teacher, num_classes)
    names = cfg.data.class_names
    if names and num_classes is not None and len(names) != num_classes:
        problems.append(
            f"data.class_names: {len(names)} names for num_classes={num_classes} ({source})"
        )
    return problems


def _model_problems(i: int, teacher: TeacherSection) -> list[str]:
    """Exactly one of ``model`` and ``ensemble``; an ensemble renders per model."""
    key = f"teachers.{i}"
    if (teacher.model is None) == (teacher.ensemble is None):
        return [f"{key}.model: give exactly one of {key}.model and {key}.ensemble"]
    if teacher.ensemble is not None and "render" in teacher.model_fields_set:
        return [
            f"{key}.render: an ensemble renders per model: set "
            f"{key}.ensemble.members.N.render instead"
        ]
    return []


def _sampling_problems(i: int, teacher: TeacherSection, num_classes: int | None) -> list[str]:
    """``samples``, ``sample_temperatures`` and ``draw_temperature`` go with encoding
    ``sampled``, and it with ``samples``."""
    key = f"teachers.{i}"
    sampled = teacher.encoding == "sampled"
    out = []
    if sampled and teacher.samples is None:
        out.append(f"{key}.samples: encoding 'sampled' needs the number of classes to draw")
    if not sampled and teacher.samples is not None:
        out.append(f"{key}.samples: only for encoding 'sampled' (found {teacher.encoding!r})")
    if not sampled and teacher.sample_temperatures:
        out.append(
            f"{key}.sample_temperatures: only for encoding 'sampled' (found {teacher.encoding!r})"
        )
    if not sampled and teacher.draw_temperature is not None:
        out.append(
            f"{key}.draw_temperature: only for encoding 'sampled' (found {teacher.encoding!r})"
        )
    temps = teacher.sample_temperatures
    if any(math.isclose(t, 1.0) for t in temps) or len(set(temps)) != len(temps):
        out.append(
            f"{key}.sample_temperatures: each temperature once, none of them 1 (T=1 is always "
            f"unbiased), found {temps}"
        )
    tau = teacher.draw_temperature
    if tau is not None and not math.isclose(tau, 1.0) and any(math.isclose(t, tau) for t in temps):
        out.append(
            f"{key}.sample_temperatures: {tau:g} is the draw_temperature, whose normaliser is "
            f"stored with the draws (leave it out), found {temps}"
        )
    if sampled and num_classes is not None and teacher.k >= num_classes:
        out.append(
            f"{key}.k: encoding 'sampled' draws from the classes outside the top-k; "
            f"k={teacher.k} leaves none of the {num_classes}"
        )
    return out


def check_with_classes(cfg: PrecomputeConfig, num_classes: int) -> None:
    """Raise ConfigError for cross-field problems once ``num_classes`` is known."""
    problems = cross_field_problems(cfg, num_classes)
    if problems:
        raise ConfigError("config is invalid:\n  " + "\n  ".join(problems))
