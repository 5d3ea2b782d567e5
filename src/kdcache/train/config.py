"""The typed config of ``kdcache train``: run, data, cache, views, student, teacher, stages.

Loaded with :func:`kdcache.core.config.load_config` (YAML + ``dotted.key=value`` overrides); every
rejection is one :class:`~kdcache.core.errors.ConfigError` naming the dotted key. Cross-field rules
(a distillation loss needs a teacher, ``teacher.mode: cache`` needs ``cache.path`` ...) belong to
:class:`TrainConfig` itself (a model validator), so a config built in code is checked as one read
from YAML; each problem names its dotted key.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, cast

from pydantic import ConfigDict, Discriminator, Field, Tag, field_validator, model_validator
from pydantic_core import PydanticCustomError

from kdcache.core.config import StrictModel, dump_config, load_config
from kdcache.core.errors import KdcacheError
from kdcache.models.ensemble import StageEnsemble
from kdcache.models.preprocess import RenderSpec
from kdcache.models.spec import ModelSpec
from kdcache.shards.reading import DEFAULT_LABEL_KEY, MAX_PIXELS
from kdcache.targets.sparse import LossTail
from kdcache.train.losses import get_loss, registered_losses
from kdcache.views.augment import UnseenOps
from kdcache.views.recipe import ViewRecipe

CONFIG_VERSION = 1
RESUME_MUTABLE = (
    "run.max_steps",
    "run.resume",
    "run.progress",
    "run.tensorboard",
    "run.csv",
    "run.wandb",
    "run.mlflow",
    "run.log_every",
    "run.ckpt_every_steps",
    "run.overwrite",
    "run.force_unlock",
    "data.storage_options",
    "cache.storage_options",
)
"""Keys (and the keys under them) that may differ between a checkpoint's config and the resuming
run's config: storage options (credentials rotate; they are saved redacted) change no result."""


# ---- losses ---------------------------------------------------------------------------------


class CELossConfig(StrictModel):
    """Plain cross-entropy (supervised training of students or teachers)."""

    name: Literal["ce"] = "ce"
    label_smoothing: float = Field(default=0.0, ge=0.0, lt=1.0)
    """Label smoothing of the hard-label CE (timm/torch convention: eps spread over all classes)."""


class _DistillBase(StrictModel):
    """Fields every distillation loss shares."""

    label_smoothing: float = Field(default=0.0, ge=0.0, lt=1.0)
    """Label smoothing of the CE part."""
    tail: LossTail = "spread"
    """Classes outside the cached top-k: ``spread`` (exact tail mass at T=1, spread evenly),
    ``renorm`` (drop the tail, renormalise the top-k) or ``sample`` (teachers stored with encoding
    ``sampled``: the tail estimated from its draws, unbiased at T=1 and at the teacher's
    ``sample_temperatures``). Irrelevant when k equals the class count."""
    stop_epoch: int | None = Field(default=None, ge=0)
    """Early-stopped KD (paper 002): from this (0-based, run-global) epoch on, the loss is plain
    CE."""
    topk: int | None = Field(default=None, ge=1)
    """Use only the first ``topk`` of the teacher's top-k classes (None: all of them). The first j
    of the stored top-k (sorted by logit) with the exact logsumexp and label logit are exactly what
    a cache made with k = j holds (up to ties), so one k = 10 cache serves students at k = 1..10;
    the tail mass grows accordingly and ``tail`` says how it is treated. Online targets are
    truncated the same way. At most the cache's k (online: the class count)."""


class KDLossConfig(_DistillBase):
    """Hinton KD: ``(1-alpha)*CE + alpha*T^2*KL(p_t^T || p_s^T)``."""

    name: Literal["kd"] = "kd"
    alpha: float = Field(default=0.9, ge=0.0, le=1.0)
    """Weight of the KD term; the CE term gets ``1 - alpha``."""
    temperature: float = Field(default=4.0, gt=0.0)
    """Softmax temperature of teacher and student in the KD term."""


class DISTLossConfig(_DistillBase):
    """DIST (paper 001): ``ce_weight*CE + kd_weight*(beta*T^2*inter + gamma*T^2*intra)``."""

    name: Literal["dist"] = "dist"
    beta: float = Field(default=1.0, ge=0.0)
    """Weight of the inter-class relation (1 - mean Pearson over rows)."""
    gamma: float = Field(default=1.0, ge=0.0)
    """Weight of the intra-class relation (1 - mean Pearson over columns, i.e. over the batch)."""
    temperature: float = Field(default=1.0, gt=0.0)
    """Softmax temperature of both outputs."""
    ce_weight: float = Field(default=1.0, ge=0.0)
    """Weight of the CE term (reference 1)."""
    kd_weight: float = Field(default=2.0, ge=0.0)
    """Weight of the DIST term: 2 beside CE 1 in the official ImageNet and CIFAR-100 configs (i.e.
    beta = gamma = 2 overall)."""


class WSLLossConfig(_DistillBase):
    """WSL (Zhou et al. 2021, cited by paper 000): ``ce_weight*CE + kd_weight*T^2*mean(w*KL)``."""

    name: Literal["wsl"] = "wsl"
    temperature: float = Field(default=2.0, gt=0.0)
    """Temperature of the KD term (2 in WSL and EffDstl stage 1)."""
    weight_temperature: float = Field(default=1.0, gt=0.0)
    """Temperature of the two cross-entropies the sample weights compare: 1 in WSL's paper, 2 (the
    KD temperature) in EffDstl's official code. The teacher's CE at T comes from the sparse
    targets: exact at 1, elsewhere with the tail spread (see ``losses.teacher_label_ce``)."""
    ce_weight: float = Field(default=1.0, ge=0.0)
    """Weight of the (label-smoothed) CE term."""
    kd_weight: float = Field(default=2.5, ge=0.0)
    """Weight of the weighted KD term (WSL's ImageNet alpha = 2.5; EffDstl's official stage 1
    uses 0.5)."""


class EffDstlLossConfig(_DistillBase):
    """EffDstl stage 2 (paper 000): KD against mined targets (consistent knowledge mining)."""

    name: Literal["effdstl"] = "effdstl"
    teacher_temperature: float = Field(default=0.7, gt=0.0)
    """Temperature of the teacher's distribution (0.7 sharpens it)."""
    student_temperature: float = Field(default=1.0, gt=0.0)
    """Temperature of the student in the KD term."""
    smooth_to: float = Field(default=0.99, gt=0.0, le=1.0)
    """Mined rows get the label smoothed to this probability (rest spread over the other
    classes)."""
    ce_weight: float = Field(default=0.0, ge=0.0)
    """Weight of a CE term beside the mined KD term: 0 as in the official code (after the switch
    it sets ``ce_loss_alpha = 0``; the mined targets already hold the smoothed labels)."""
    kd_weight: float = Field(default=1.0, ge=0.0)
    """Weight of the KD term against the mined targets."""


class CustomLossConfig(StrictModel):
    """A loss registered with :func:`kdcache.register_loss`: its ``name`` and its settings (the
    keyword arguments of its function), checked against the function's signature. The module
    that registers it is listed under ``imports``."""

    model_config = ConfigDict(extra="allow")
    union_tag: ClassVar[str] = "custom"
    """The tag of this member of :data:`LossConfig` (not a key)."""

    name: str
    """The registered name."""

    @field_validator("name")
    @classmethod
    def _registered(cls, name: str) -> str:
        try:
            get_loss(name)
        except KeyError:
            raise ValueError(
                f"unknown loss {name!r}; registered: {', '.join(registered_losses())} (a loss of "
                "your own: register it with kdcache.register_loss in a module listed under "
                "imports)"
            ) from None
        return name

    @model_validator(mode="after")
    def _settings(self) -> CustomLossConfig:
        get_loss(self.name).check_settings(self.model_extra or {})
        return self

    @property
    def needs_teacher(self) -> bool:
        return get_loss(self.name).needs_teacher


BUILTIN_LOSS_CONFIGS = {
    "ce": CELossConfig,
    "kd": KDLossConfig,
    "dist": DISTLossConfig,
    "wsl": WSLLossConfig,
    "effdstl": EffDstlLossConfig,
}


def _loss_tag(value: Any) -> str:
    """The member of :data:`LossConfig` a value is validated as: its built-in name, else
    ``custom`` (a registered loss of one's own)."""
    name = value.get("name", "ce") if isinstance(value, dict) else getattr(value, "name", None)
    return name if name in BUILTIN_LOSS_CONFIGS else CustomLossConfig.union_tag


LossConfig = Annotated[
    Annotated[CELossConfig, Tag("ce")]
    | Annotated[KDLossConfig, Tag("kd")]
    | Annotated[DISTLossConfig, Tag("dist")]
    | Annotated[WSLLossConfig, Tag("wsl")]
    | Annotated[EffDstlLossConfig, Tag("effdstl")]
    | Annotated[CustomLossConfig, Tag(CustomLossConfig.union_tag)],
    Discriminator(_loss_tag),
]
DISTILL_LOSSES = ("kd", "dist", "wsl", "effdstl")
"""The built-in losses that need a teacher."""


def uses_teacher(loss: Any) -> bool:
    """Whether a stage's loss needs teacher targets (built-in distillation losses, and registered
    losses that said so)."""
    if isinstance(loss, CustomLossConfig):
        return loss.needs_teacher
    return loss.name in DISTILL_LOSSES


# ---- optimisation -----------------------------------------------------------------------------

BUILTIN_OPTIMIZERS = ("sgd", "adamw", "rmsprop")
BUILTIN_SCHEDULERS = ("cosine", "step", "constant")
TIMM_SCHEDULERS = ("cosine", "tanh", "step", "multistep", "poly", "wsd", "rsqrt", "constant")
"""timm's schedulers that are a function of the step (its ``plateau`` needs a metric)."""


def timm_name(name: str) -> str:
    """A timm optimizer's or scheduler's name without the ``timm:`` prefix."""
    return name.removeprefix("timm:")


def timm_optimizers() -> list[str]:
    """The optimizer names timm's factory builds."""
    # timm.optim re-exports it without __all__ or an alias, which pyright reads as private
    from timm.optim import list_optimizers  # pyright: ignore[reportPrivateImportUsage]

    # a cast: timm types the names and the (name, description) pairs of with_description=True
    # as one list; without it every item is a name
    return cast("list[str]", list_optimizers())


class OptimizerConfig(StrictModel):
    """An optimizer; a stage that sets one starts a new optimizer (fresh state, new LR schedule)."""

    name: str = "sgd"
    """``sgd`` (momentum), ``adamw`` or ``rmsprop`` (torch's RMSprop with ``alpha``, ``eps`` and
    ``momentum``; timm's ``rmsproptf``, used by DIST's B2, adds eps inside the square root), or
    any other optimizer of ``timm.optim.list_optimizers()`` (``lamb``, ``lars``, ``adan`` ...),
    built by ``timm.optim.create_optimizer_v2``; ``timm:NAME`` takes timm's for a name kdcache
    builds itself (``timm:adamw``)."""
    layer_decay: float | None = Field(default=None, gt=0.0, le=1.0)
    """Layer-wise LR decay (timm's ``layer_decay``; the optimizer is then always timm's): each
    layer's LR is scaled by ``layer_decay ** (depth from the head)``."""
    kwargs: dict[str, Any] = Field(default_factory=dict)
    """Further keyword arguments of a timm optimizer (``trust_coeff``, ``caution`` ...)."""
    lr: float = Field(default=0.1, gt=0.0)
    """Peak learning rate (after warm-up), for the global batch as configured (no automatic
    scaling)."""
    weight_decay: float = Field(default=1e-4, ge=0.0)
    """Weight decay (coupled L2 for SGD, decoupled for AdamW)."""
    decay_norm_and_bias: bool = False
    """Also decay 1-d parameters (norm weights, biases); timm's default excludes them."""
    momentum: float = Field(default=0.9, ge=0.0, lt=1.0)
    """SGD and RMSprop momentum."""
    nesterov: bool = False
    """SGD Nesterov momentum."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    eps: float = Field(default=1e-8, gt=0.0)
    """AdamW and RMSprop epsilon."""
    alpha: float = Field(default=0.9, gt=0.0, lt=1.0)
    """RMSprop smoothing of the squared gradients (timm's and TensorFlow's 0.9)."""
    grad_clip: float | None = Field(default=None, gt=0.0)
    """Clip the global gradient norm to this value (None: no clipping)."""

    @field_validator("name")
    @classmethod
    def _known_optimizer(cls, name: str) -> str:
        if name in BUILTIN_OPTIMIZERS or timm_name(name) in timm_optimizers():
            return name
        raise ValueError(
            f"unknown optimizer {name!r}; kdcache's: {', '.join(BUILTIN_OPTIMIZERS)}; or one of "
            "timm.optim.list_optimizers()"
        )

    @property
    def from_timm(self) -> bool:
        """Built by timm's factory: a name kdcache does not build, ``timm:``, or layer decay."""
        return self.name not in BUILTIN_OPTIMIZERS or self.layer_decay is not None


class SchedulerConfig(StrictModel):
    """The LR schedule of one optimizer, spanning the epochs of the stages that share it (per
    step)."""

    name: str = "cosine"
    """``cosine`` decay to ``min_lr``; ``step``: times ``gamma`` at each milestone; ``constant``;
    or any other scheduler of ``timm.scheduler.create_scheduler_v2`` (``tanh``, ``multistep``,
    ``poly``, ``wsd``, ``rsqrt``; ``timm:cosine`` for timm's own cosine), stepped per optimizer
    step, with the keys below mapped to timm's (``every`` -> ``decay_epochs``, ``milestones`` ->
    ``decay_milestones``, ``gamma`` -> ``decay_rate``, ``warmup_start * lr`` -> ``warmup_lr``)."""
    warmup_epochs: float = Field(default=0.0, ge=0.0)
    """Linear warm-up length in epochs (fractions allowed)."""
    warmup_start: float = Field(default=0.0, ge=0.0, le=1.0)
    """Warm-up starts at ``warmup_start * lr``."""
    min_lr: float = Field(default=0.0, ge=0.0)
    """cosine: the learning rate at the end of the schedule."""
    milestones: list[int] = Field(default_factory=list)
    """step: epochs (counted from the schedule's start) at which the LR is multiplied by
    ``gamma``."""
    every: float | None = Field(default=None, gt=0.0)
    """step: multiply by ``gamma`` every this many epochs instead (timm's ``decay_epochs``,
    e.g. 2.4 with gamma 0.97 in DIST's B2)."""
    gamma: float = Field(default=0.1, gt=0.0)
    """step: the factor at each milestone (or period)."""
    kwargs: dict[str, Any] = Field(default_factory=dict)
    """Further keyword arguments of a timm scheduler (``cycle_limit``, ``k_decay`` ...)."""

    @field_validator("name")
    @classmethod
    def _known_scheduler(cls, name: str) -> str:
        if name in BUILTIN_SCHEDULERS or timm_name(name) in TIMM_SCHEDULERS:
            return name
        raise ValueError(
            f"unknown scheduler {name!r}; kdcache's: {', '.join(BUILTIN_SCHEDULERS)}; timm's: "
            + ", ".join(TIMM_SCHEDULERS)
        )


class StageConfig(StrictModel):
    """A run is a list of stages, trained one after the other."""

    name: str = ""
    """A label for logs (default ``stage<i>``)."""
    epochs: int = Field(ge=1)
    """Epochs of this stage."""
    loss: LossConfig = Field(default_factory=CELossConfig)
    """The loss and its settings: ``name`` is ce, kd, dist, wsl, effdstl or a loss registered with
    ``kdcache.register_loss`` (its module listed under ``imports``)."""
    teacher: str | None = None
    """The teacher (its name in the cache, or in ``teacher.models`` online); default
    ``teacher.name``."""
    teachers: dict[str, Annotated[float, Field(gt=0.0)]] | None = None
    """Instead of ``teacher``: an ensemble of teachers as one target, ``{name: weight}`` (weights
    normalised to sum to 1) or a list of names (equal weights); each a cached teacher (online: a
    teacher run live). See ``combine``."""
    combine: Literal["probs", "logits"] | None = None
    """With ``teachers``: ``probs`` (default) mixes the teachers' probabilities at the loss's
    temperature, each with the loss's ``tail``; ``logits`` averages their logits (the classes
    outside a teacher's top-k at its spread tail's logit; needs ``tail: spread``)."""
    optimizer: OptimizerConfig | None = None
    """Start a new optimizer with these settings at this stage (default: keep the previous one;
    the first stage uses the top-level ``optimizer``)."""
    scheduler: SchedulerConfig | None = None
    """The LR schedule of the new optimizer (only with ``optimizer``; default top-level
    ``scheduler``)."""

    @field_validator("teachers", mode="before")
    @classmethod
    def _names_list(cls, value: Any) -> Any:
        """A list of names is an ensemble of equal weights."""
        if not isinstance(value, list):
            return value
        repeated = sorted({n for n in value if isinstance(n, str) and value.count(n) > 1})
        if repeated:
            raise ValueError(f"teachers listed more than once: {repeated}")
        if not all(isinstance(n, str) for n in value):
            raise ValueError("expected teacher names")
        return {name: 1.0 for name in value}


# ---- sections ---------------------------------------------------------------------------------


class WandbConfig(StrictModel):
    """A Weights & Biases run (``wandb.init``'s arguments)."""

    project: str = "kdcache"
    entity: str | None = None
    name: str | None = None
    """Default: the name of ``run.dir``."""
    tags: list[str] = Field(default_factory=list)


class MlflowConfig(StrictModel):
    """An MLflow run."""

    tracking_uri: str | None = None
    """``file:/path/mlruns``, ``http://server:5000`` ... (None: MLflow's default, e.g.
    ``MLFLOW_TRACKING_URI``)."""
    experiment: str = "kdcache"
    run_name: str | None = None
    """Default: the name of ``run.dir``."""


class RunConfig(StrictModel):
    """Where outputs go and how the loop runs."""

    dir: str = "runs/train"
    """Run directory: ``config.yaml``, ``metrics.jsonl``, ``summary.json``, ``checkpoints/``."""
    seed: int = Field(default=0, ge=0, lt=2**32)
    """Seed of the student's init, the shard order, the shuffle buffer and the view schedule."""
    device: str = "auto"
    """``auto`` (CUDA if available), ``cpu`` or ``cuda``; under torchrun each rank takes its local
    GPU."""
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"
    """Autocast: ``auto`` is bf16 on CUDA and full precision on CPU; ``fp16`` (GPUs without bf16,
    V100/T4) scales the loss with a ``torch.amp.GradScaler`` whose state the checkpoint keeps."""
    accumulate: int = Field(default=1, ge=1)
    """Gradient accumulation: one optimizer step per this many batches (the loss of each batch
    divided by the group's batch count, so a group equals one batch that many times larger; an
    epoch's last group may be shorter). ``log_every``, ``ckpt_every_steps`` and ``max_steps``
    count optimizer steps."""
    compile: bool = False
    """``torch.compile`` the student (skipped with a warning where torch cannot compile)."""
    channels_last: bool = True
    """channels_last memory format (CUDA only)."""
    resume: Literal["never", "auto", "must"] = "never"
    """``auto``: resume from ``dir/checkpoints/last.pt`` if it exists; ``must`` (``--resume``): it
    has to; ``never``: a new run (refused if ``dir`` already holds one, unless ``overwrite``)."""
    overwrite: bool = False
    """With ``resume: never``: start over in a ``dir`` that already holds a run."""
    force_unlock: bool = False
    """Remove ``<dir>.lock`` left by a run that is gone (``--force-unlock``; e.g. killed on
    another host); a holder alive on this host is refused even so."""
    max_steps: int | None = Field(default=None, ge=1)
    """Stop (after saving a checkpoint) once this many optimizer steps are done in total (tests)."""
    log_every: int = Field(default=50, ge=1)
    """Steps between ``metrics.jsonl`` train lines."""
    ckpt_every_steps: int | None = Field(default=None, ge=1)
    """Also checkpoint every N steps (mid-epoch); checkpoints are always written at epoch ends."""
    eval_every: int = Field(default=1, ge=1)
    """Evaluate every N epochs (and always after the last)."""
    save_model_epochs: list[int] = Field(default_factory=list)
    """After these epoch counts, save the model's state dict as ``checkpoints/model_e<N>.pt``
    (loadable by ``build_model`` via ``checkpoint:``): early-stopped teachers (paper 002)."""
    progress: bool = True
    """A tqdm progress bar with images/s (rank 0, when stderr is a terminal)."""
    tensorboard: bool = False
    """Also write the metrics as TensorBoard scalars (``train/loss``, ``eval/top1`` ...) in
    ``dir/tensorboard``; needs the ``tensorboard`` package
    (``pip install kdcache[tensorboard]``)."""
    threads: int | None = Field(default=None, ge=1)
    """torch intra-op threads of the training process. Unset: the cores this process may use
    divided among the processes that share them, ``max(1, cores // (local ranks x
    (data.num_workers + 1)))`` (each DataLoader worker runs one thread), so training never
    oversubscribes the CPUs; set it to override."""
    csv: bool = False
    """Also write the metrics as ``train.csv`` and ``eval.csv`` in ``dir`` (one row per line of
    ``metrics.jsonl``, rebuilt from it at start, so a resume cuts them back too)."""
    wandb: WandbConfig | None = None
    """Also log the metrics to Weights & Biases (``pip install kdcache[wandb]``); offline with
    ``WANDB_MODE=offline``. A resume continues the same W&B run."""
    mlflow: MlflowConfig | None = None
    """Also log the metrics to MLflow (``pip install kdcache[mlflow]``). A resume continues the
    same MLflow run."""
    on_nonfinite: Literal["stop", "skip"] = "stop"
    """A step whose loss is NaN or inf: ``stop`` the run naming step, epoch and shards (exit
    status 2, no ``summary.json`` claiming completion); ``skip`` the step (no update) and count it
    as ``nonfinite_steps_skipped`` in the summary."""


class SelectConfig(StrictModel):
    """``data.select``: train on ``per_class`` samples of each class chosen from the cache by a
    teacher's entropy (paper 003's example selection); see :mod:`kdcache.train.selection`."""

    per_class: int = Field(ge=1)
    """Samples kept per class (all of a class's samples when it has fewer)."""
    by: Literal["entropy_high", "entropy_low", "random"] = "entropy_high"
    """Highest or lowest mean entropy over the sample's cached views, or a seeded random pick."""
    teacher: str | None = None
    """The cached teacher whose entropy ranks the samples (default ``teacher.name``)."""
    temperature: float = Field(default=1.0, gt=0.0)
    """The temperature of that entropy (the paper ranks at T = 9)."""
    tail: Literal["spread", "renorm"] = "spread"
    """The classes outside the stored top-k: ``spread`` (the tail mass shared equally) or
    ``renorm`` (dropped)."""


class DataConfig(StrictModel):
    """The shards and how they are streamed."""

    shards: str | list[str]
    """Training shards: brace pattern, glob, fsspec URL or a list; the cache's shards, all of
    them (or some of them, with ``cache.shard_subset``)."""
    val_shards: str | list[str] | None = None
    """Validation shards from anywhere (evaluated with a center view; no cache needed); None: no
    evaluation."""
    storage_options: dict[str, Any] = Field(default_factory=dict)
    """fsspec storage options for ``shards``, ``val_shards`` and the manifest beside them
    (credentials, endpoint ...), used by every rank and DataLoader worker; empty: fsspec's defaults
    (for S3 the standard AWS environment). Saved with the config with their values redacted."""
    num_classes: int | None = Field(default=None, ge=1)
    """Class count; default the cache's. Needed without a cache."""
    max_pixels: int | None = Field(default=MAX_PIXELS, ge=1)
    """An image whose header claims more pixels is refused before decoding (default PIL's
    decompression-bomb limit, 89478485; None: no limit)."""
    label_key: str = Field(default=DEFAULT_LABEL_KEY, min_length=1)
    """The label's key in a sample's ``.json`` entry (with a cache, the same as its precompute's).
    A sample's label comes from the first of its ``.cls``, ``.json`` and ``.txt`` entries (``.cls``
    and ``.txt``: the integer as text)."""
    batch_size: int = Field(default=128, ge=1)
    """Samples per step per rank (the global batch is ``batch_size * world_size``)."""
    eval_batch_size: int | None = Field(default=None, ge=1)
    """Evaluation batch size per rank (default ``batch_size``)."""
    num_workers: int = Field(default=2, ge=0)
    """DataLoader worker processes per rank (0: load in the training process)."""
    shuffle_buffer: int = Field(default=1000, ge=0)
    """Seeded sample shuffle buffer per worker (0: shard order only)."""
    shard_shuffle: bool = True
    """Shuffle the shard order each epoch, from (seed, epoch)."""
    verify_keys: bool = False
    """Scan every training shard's keys and compare the key digest with the cache's fingerprint
    (reads all tar headers); by default shard names and counts are compared, keys as they stream."""
    pin_memory: bool = True
    """Pin host memory of batches (CUDA only)."""
    prefetch_factor: int = Field(default=2, ge=1)
    """Batches prefetched per worker."""
    select: SelectConfig | None = None
    """Train on a selection of the cache's samples (per class, by a teacher's entropy); None:
    every sample. Needs ``cache.path``; recorded in ``summary.json`` (``selection``)."""
    exclude_classes: list[Annotated[int, Field(ge=0)]] = Field(default_factory=list)
    """Classes whose samples never reach the student (paper 003's "a class never seen"); the
    evaluation still reports them (``top1_class_<c>``). Needs ``cache.path`` (labels come from
    the cache) and a recipe that mixes no images."""
    persistent_workers: bool = True
    """Keep the training DataLoader's workers from epoch to epoch (started once, not per epoch;
    the order, views and resumption are the same either way)."""


class CacheConfig(StrictModel):
    """The teacher-logit cache."""

    path: str | None = None
    """The cache (local path or fsspec URL); needed for ``teacher.mode: cache``; gives the views
    (stored parameters) in every mode when set."""
    storage_options: dict[str, Any] = Field(default_factory=dict)
    """fsspec storage options for ``path`` (saved with the config with their values redacted)."""
    shard_subset: bool = False
    """Train on a subset of the cache's shards (a quick sweep on 10 % of them): ``data.shards``
    may name any of the cache's shards, in any order; each is still checked by name and sample
    count (and by keys with ``data.verify_keys``), and shards the cache does not hold are refused.
    False: ``data.shards`` must be the cache's shards, all of them."""


class ViewsConfig(StrictModel):
    """Views when no cache is given (online or supervised runs); ignored when ``cache.path`` is
    set."""

    recipe: ViewRecipe = Field(default_factory=ViewRecipe)
    """How views are made (the validation center view uses its ``size`` and ``crop_pct``)."""
    num_views: int | None = Field(default=None, ge=1)
    """A views per sample cycled by the view schedule; None: a fresh view every epoch (view index =
    epoch)."""
    seed: int = 0
    """Seed of the view parameters (as a cache's ``seed``)."""


class StudentConfig(ModelSpec):
    """The network trained (a ModelSpec: ``source``, ``name``, ``checkpoint``, ``kwargs`` ...)."""

    render: RenderSpec = Field(default_factory=RenderSpec)
    """How the student renders the views: size, interpolation, mean and std (default: the
    recipe's; a ``pretrained: true`` timm student: its timm config). The teacher may see the same
    views at another size, e.g. teacher 320 px bicubic, student 224 px bilinear."""
    input_size: int | None = Field(default=None, ge=1)
    """Shorthand for ``render.size``: the input side the student gets."""
    unseen_augment: UnseenOps | None = None
    """Augmentation applied to the student's views only (``policy``, ``color_jitter``,
    ``erasing``), drawn afresh every epoch from ``(run.seed, key, epoch)``: the teacher never saw
    it, so the cached targets describe another image; off unless set here (the log says so)."""

    @model_validator(mode="after")
    def _input_size(self) -> StudentConfig:
        size = self.render.size
        if self.input_size is not None and size is not None and size != self.input_size:
            raise ValueError(f"input_size {self.input_size} and render.size {size} differ")
        if self.input_size is not None and size is None:
            self.render = self.render.model_copy(update={"size": self.input_size})
        return self


class TeacherConfig(StrictModel):
    """Where soft targets come from."""

    mode: Literal["cache", "online", "none"] = "cache"
    """``cache``: cached targets, no teacher forward passes; ``online``: run the teacher on the same
    replayed views (A/B, parity); ``none``: plain supervised (train teachers)."""
    name: str | None = None
    """Default teacher of stages that do not name one."""
    models: dict[str, ModelSpec] = Field(default_factory=dict)
    """online: teacher name -> ModelSpec; default the spec stored in the cache for that teacher."""
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"
    """online: autocast of the teacher's forward pass."""
    render: dict[str, RenderSpec] = Field(default_factory=dict)
    """online: teacher name -> how it renders the views; default the rendering the cache
    recorded for that teacher, else its timm config (``pretrained: true``) or the recipe's."""


class EmaConfig(StrictModel):
    """Exponential moving average of the student's weights."""

    enabled: bool = False
    """Keep an EMA copy (evaluated beside the model, saved in checkpoints)."""
    decay: float = Field(default=0.9998, gt=0.0, lt=1.0)
    """Per-step decay."""


SFTN_PRESETS: dict[str, dict[str, float]] = {
    "cifar100": {"lambda_t": 1.0, "lambda_kl": 3.0, "lambda_ce": 1.0, "temperature": 1.0},
    "imagenet": {"lambda_t": 1.0, "lambda_kl": 1.0, "lambda_ce": 1.0, "temperature": 1.0},
}
"""The loss weights and KL temperature of SFTN's paper (section 4: CIFAR-100 and ImageNet)."""


class SFTNConfig(StrictModel):
    """Student-friendly teacher training (SFTN, paper 004): the teacher this run trains carries
    student branches, one after each of its stages but the last, and is trained with
    ``lambda_t*CE(q_T) + lambda_kl*mean_i KL_i + lambda_ce*mean_i CE(q_R^i)``.

    Where paper and code differ. The paper writes the branch term as ``KL(q_R^i || q_T)``. The
    official code (github.com/GITSHOHOKU/SFTN) could not be read where this was written; its
    CIFAR-100 set-up is RepDistiller's, whose ``DistillKL(branch, teacher)`` computes
    ``T^2 * KL(q_T || q_R^i)`` (the teacher's distribution as the target) and detaches neither
    side, so the KL term trains the teacher too. That is the default (``kl_direction:
    teacher_to_branch``, ``detach_teacher: false``); ``kl_direction: branch_to_teacher`` is the
    paper's formula read literally. At the presets' temperature 1 the ``T^2`` factor is 1.
    """

    student: ModelSpec
    """The student the branches are made of: a timm model (``name``, ``kwargs``) whose forward is
    the sequence of its stages (ResNets, MobileNets, EfficientNets), with as many stages as the
    teacher (timm ``feature_info`` levels after the stem)."""
    preset: Literal["cifar100", "imagenet"] = "cifar100"
    """The paper's settings: ``cifar100`` lambda_t 1, lambda_kl 3, lambda_ce 1, temperature 1;
    ``imagenet`` 1 / 1 / 1, temperature 1. Each field below overrides its value."""
    lambda_t: float = Field(ge=0.0)
    """Weight of the teacher's CE (default: the preset's)."""
    lambda_kl: float = Field(ge=0.0)
    """Weight of the branches' mean KL term (default: the preset's)."""
    lambda_ce: float = Field(ge=0.0)
    """Weight of the branches' mean CE (default: the preset's)."""
    temperature: float = Field(gt=0.0)
    """Softmax temperature of both sides of the KL term (default: the preset's)."""
    kl_direction: Literal["teacher_to_branch", "branch_to_teacher"] = "teacher_to_branch"
    """``teacher_to_branch``: ``KL(q_T || q_R^i)`` (RepDistiller's DistillKL, the default);
    ``branch_to_teacher``: ``KL(q_R^i || q_T)``, the paper's equation (5) as printed."""
    detach_teacher: bool = False
    """Stop the KL term's gradient into the teacher's output (the default lets it flow, so the
    teacher moves towards its branches: what makes it student-friendly)."""

    @field_validator("student")
    @classmethod
    def _timm_student(cls, spec: ModelSpec) -> ModelSpec:
        if spec.source != "timm":
            raise ValueError(f"source {spec.source!r}: the branches are built from timm models")
        return spec

    @model_validator(mode="before")
    @classmethod
    def _fill_preset(cls, data: Any) -> Any:
        """Unset weights take the preset's values, so the saved config holds the numbers used
        (an unknown preset is left to the field's own error)."""
        if not isinstance(data, dict):
            return data
        preset = SFTN_PRESETS.get(data.get("preset", "cifar100"), {})
        return {**preset, **{k: v for k, v in data.items() if v is not None or k not in preset}}


class TrainConfig(StrictModel):
    """``kdcache train``: one student run (or a teacher run with ``teacher.mode: none``)."""

    version: int = CONFIG_VERSION
    """Config schema version."""
    imports: list[str] = Field(default_factory=list)
    """Python modules imported before the rest of the config is checked, e.g. the module that
    registers a loss of your own with ``kdcache.register_loss`` (``[my_project.losses]``). They
    must be importable where kdcache runs: installed, on ``PYTHONPATH``, or (with
    ``python -m kdcache``) in the working directory."""
    run: RunConfig = Field(default_factory=RunConfig)
    """Output directory, seed, device, resumption, logging."""
    data: DataConfig
    """Shards and streaming."""
    cache: CacheConfig = Field(default_factory=CacheConfig)
    """The teacher-logit cache."""
    views: ViewsConfig = Field(default_factory=ViewsConfig)
    """Views when there is no cache."""
    student: StudentConfig
    """The network to train."""
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    """Soft-target source."""
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    """The first stage's optimizer."""
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    """The default LR schedule of each optimizer."""
    stages: list[StageConfig] = Field(min_length=1)
    """The stages, in order."""
    ema: EmaConfig = Field(default_factory=EmaConfig)
    """EMA of weights."""
    sftn: SFTNConfig | None = None
    """Train the model (a teacher, ``teacher.mode: none``) as a student-friendly teacher with
    student branches (paper 004); None: plain training."""

    @field_validator("version")
    @classmethod
    def _version(cls, value: int) -> int:
        if value != CONFIG_VERSION:
            raise ValueError(
                f"this kdcache reads train config version {CONFIG_VERSION}, found {value}"
            )
        return value

    @field_validator("imports")
    @classmethod
    def _import(cls, names: list[str]) -> list[str]:
        """Import each module now: fields are validated in order, so ``stages`` (below) sees the
        losses they register."""
        for name in names:
            try:
                importlib.import_module(name)
            except Exception as exc:  # any failure of the user's module: one line naming it
                reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                raise ValueError(
                    f"cannot import {name!r}: {type(exc).__name__}: {reason}"
                ) from None
        return names

    @model_validator(mode="after")
    def _cross_field_rules(self) -> TrainConfig:
        """Rules between sections, whoever builds the config: each problem is one line that names
        its dotted key (:func:`kdcache.core.config.validate` lists them one per line)."""
        problems = cross_field_problems(self)
        if problems:
            raise PydanticCustomError(
                "cross_field", "{problems}", {"problems": "\n  ".join(problems)}
            )
        return self

    @property
    def total_epochs(self) -> int:
        return sum(stage.epochs for stage in self.stages)


def stage_teacher(stage: StageConfig, *, teacher: TeacherConfig) -> str | None:
    """The teacher name ``stage`` uses (None for a CE stage): its own, else the ``teacher``
    section's default name; for an ensemble its label
    (:attr:`~kdcache.models.ensemble.StageEnsemble.label`), which names no single teacher."""
    if not uses_teacher(stage.loss):
        return None
    ensemble = stage_ensemble(stage)
    if ensemble is not None:
        return ensemble.label
    return stage.teacher or teacher.name


def stage_ensemble(stage: StageConfig) -> StageEnsemble | None:
    """The ensemble ``stage`` trains against (None: one teacher, or none)."""
    if not stage.teachers or not uses_teacher(stage.loss):
        return None
    return StageEnsemble.of(stage.teachers, stage.combine or "probs")


def stage_members(stage: StageConfig, *, teacher: TeacherConfig) -> list[str]:
    """The teachers whose targets ``stage`` reads: its teacher, its ensemble's, or none."""
    ensemble = stage_ensemble(stage)
    if ensemble is not None:
        return list(ensemble.names)
    name = stage_teacher(stage, teacher=teacher)
    return [name] if name else []


def segment_starts(stages: list[StageConfig]) -> list[int]:
    """Indices of the stages that start an optimizer segment: the first, and each that sets
    ``optimizer``."""
    return [i for i, stage in enumerate(stages) if i == 0 or stage.optimizer is not None]


def stage_starts(stages: list[StageConfig]) -> list[int]:
    """The run-global epoch each stage starts at (0-based)."""
    starts = []
    epoch = 0
    for stage in stages:
        starts.append(epoch)
        epoch += stage.epochs
    return starts


def cross_field_problems(config: TrainConfig) -> list[str]:
    """The cross-field rules :class:`TrainConfig` enforces: one line per problem, each naming its
    dotted key (empty when the config is consistent)."""
    return (
        _mode_problems(config)
        + _stage_problems(config)
        + _segment_problems(config)
        + _run_problems(config)
        + _sftn_problems(config)
    )


def _mode_problems(config: TrainConfig) -> list[str]:
    mode = config.teacher.mode
    out = []
    if mode == "cache" and not config.cache.path:
        out.append("cache.path: teacher.mode 'cache' needs the cache's path")
    if not config.cache.path and config.data.num_classes is None:
        out.append("data.num_classes: required when no cache.path is given")
    for key in ("select", "exclude_classes"):
        if getattr(config.data, key) and not config.cache.path:
            out.append(f"data.{key}: needs cache.path (the selection is read from the cache)")
    select = config.data.select
    if select is not None and select.by != "random" and not (select.teacher or config.teacher.name):
        out.append(f"data.select.teacher: ranking by {select.by!r} needs a teacher name")
    return out


def _stage_problems(config: TrainConfig) -> list[str]:
    out = []
    for i, stage in enumerate(config.stages):
        key = f"stages.{i}"
        distill = uses_teacher(stage.loss)
        if distill and config.teacher.mode == "none":
            out.append(
                f"{key}.loss.name: {stage.loss.name!r} needs a teacher "
                "but teacher.mode is 'none' (use 'ce')"
            )
        if distill and not stage_teacher(stage, teacher=config.teacher):
            out.append(
                f"{key}.teacher: {stage.loss.name!r} needs a teacher name (or set teacher.name)"
            )
        if stage.scheduler is not None and stage.optimizer is None and i > 0:
            out.append(
                f"{key}.scheduler: a schedule belongs to a new optimizer; set {key}.optimizer too"
            )
        if stage.scheduler is not None and _steps_undefined(stage.scheduler):
            out.append(f"{key}.scheduler.milestones: a 'step' schedule needs milestones (or every)")
        if not distill and stage.teacher is not None:
            out.append(
                f"{key}.teacher: a {stage.loss.name!r} stage uses no teacher "
                f"(found {stage.teacher!r})"
            )
        out += _ensemble_problems(config, i)
        out += _weight_temperature_problems(config, i)
        out += _stop_epoch_problems(config, i)
    if _steps_undefined(config.scheduler):
        out.append("scheduler.milestones: a 'step' schedule needs milestones (or every)")
    return out


def _steps_undefined(scheduler: SchedulerConfig) -> bool:
    return scheduler.name == "step" and not scheduler.milestones and scheduler.every is None


def _ensemble_problems(config: TrainConfig, i: int) -> list[str]:
    """``teachers`` replaces ``teacher`` on a distillation stage; ``combine`` goes with it."""
    stage = config.stages[i]
    key = f"stages.{i}"
    if stage.teachers is None:
        if stage.combine is not None:
            return [f"{key}.combine: only for an ensemble ({key}.teachers)"]
        return []
    if not stage.teachers:
        return [f"{key}.teachers: name at least one teacher"]
    if not uses_teacher(stage.loss):
        return [f"{key}.teachers: a {stage.loss.name!r} stage uses no teacher"]
    if stage.teacher is not None:
        return [f"{key}.teachers: set {key}.teacher or {key}.teachers, not both"]
    tail = getattr(stage.loss, "tail", "spread")
    if stage.combine == "logits" and tail != "spread":
        return [
            f"{key}.combine: 'logits' averages every teacher's logits, which needs "
            f"{key}.loss.tail 'spread' (found {tail!r}: it leaves some classes without one)"
        ]
    return []


def _weight_temperature_problems(config: TrainConfig, i: int) -> list[str]:
    """WSL's weights at T != 1 need the top-k logits, which sampled estimates and ensembles do
    not keep (they give the teacher's label cross-entropy at T=1 only)."""
    stage = config.stages[i]
    weight_t = getattr(stage.loss, "weight_temperature", 1.0)
    estimated = stage.teachers is not None or getattr(stage.loss, "tail", None) == "sample"
    if weight_t == 1.0 or not estimated:
        return []
    return [
        f"stages.{i}.loss.weight_temperature: {weight_t:g} needs one top-k teacher; with "
        f"an ensemble or tail 'sample' the teacher's weights are known at T=1 only (set 1)"
    ]


def _stop_epoch_problems(config: TrainConfig, i: int) -> list[str]:
    """``stop_epoch`` must fall inside its stage: before it the term is never on, after it never
    off."""
    stop = getattr(config.stages[i].loss, "stop_epoch", None)
    if stop is None:
        return []
    start = stage_starts(config.stages)[i]
    end = start + config.stages[i].epochs
    if stop <= start:
        return [
            f"stages.{i}.loss.stop_epoch: {stop} is not after the stage's first epoch "
            f"({start}, 0-based): "
            "the distillation term would never be on (use loss 'ce')"
        ]
    if stop >= end:
        return [
            f"stages.{i}.loss.stop_epoch: {stop} is not before the stage's end "
            f"(epoch {end}): the distillation "
            "term would never stop (leave stop_epoch out)"
        ]
    return []


def _segment_problems(config: TrainConfig) -> list[str]:
    """Each optimizer segment's schedule must fit its optimizer and its length in epochs."""
    out = []
    firsts = segment_starts(config.stages)
    epochs = stage_starts(config.stages) + [
        config.total_epochs
    ]  # epochs[len(stages)]: the run's end
    for i, after in zip(firsts, firsts[1:] + [len(config.stages)], strict=True):
        stage = config.stages[i]
        length = epochs[after] - epochs[i]
        opt_key = f"stages.{i}.optimizer" if stage.optimizer is not None else "optimizer"
        key = f"stages.{i}.scheduler" if stage.scheduler is not None else "scheduler"
        optimizer = stage.optimizer or config.optimizer
        scheduler = stage.scheduler or config.scheduler
        if scheduler.name == "cosine" and scheduler.min_lr > optimizer.lr:
            out.append(f"{key}.min_lr: {scheduler.min_lr:g} is above {opt_key}.lr {optimizer.lr:g}")
        if scheduler.warmup_epochs > length:
            out.append(
                f"{key}.warmup_epochs: {scheduler.warmup_epochs:g} is longer than "
                f"the {length} epoch(s) "
                f"of its optimizer (stages {i}..)"
            )
        late = [m for m in scheduler.milestones if m >= length] if scheduler.name == "step" else []
        if late:
            out.append(
                f"{key}.milestones: {late} are not before the end of its {length} epoch(s) "
                "(never applied)"
            )
    return out


def _run_problems(config: TrainConfig) -> list[str]:
    total = config.total_epochs
    outside = [e for e in config.run.save_model_epochs if not 1 <= e <= total]
    if outside:
        return [
            f"run.save_model_epochs: {outside} are not epoch counts of this run (1..{total}); "
            "no checkpoint "
            "would be written for them"
        ]
    return []


def _sftn_problems(config: TrainConfig) -> list[str]:
    """SFTN trains a teacher from labels: no teacher targets, CE stages, a timm model."""
    if config.sftn is None:
        return []
    out = []
    if config.teacher.mode != "none":
        out.append(
            f"sftn: trains a teacher from labels; teacher.mode must be 'none' "
            f"(found {config.teacher.mode!r})"
        )
    if config.student.source != "timm":
        out.append(f"student.source: sftn needs a timm teacher (found {config.student.source!r})")
    for i, stage in enumerate(config.stages):
        if stage.loss.name != "ce":
            out.append(
                f"stages.{i}.loss.name: with sftn the loss is SFTN's (its CE terms take the "
                f"stage's label_smoothing); set 'ce' (found {stage.loss.name!r})"
            )
    return out


def load_train_config(path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    """Read, override and validate a train config (cross-field rules included): one ConfigError
    listing every problem, one line each."""
    return load_config(TrainConfig, path, overrides)


def config_differences(
    saved: dict[str, Any], current: dict[str, Any], ignore: tuple[str, ...] = RESUME_MUTABLE
) -> list[str]:
    """Dotted keys whose values differ between two dumped configs (``ignore`` and the keys under
    them left out)."""
    flat_a = _flatten(saved)
    flat_b = _flatten(current)
    keys = sorted(set(flat_a) | set(flat_b))
    return [
        f"{k}: checkpoint {flat_a.get(k, '<absent>')!r} vs now {flat_b.get(k, '<absent>')!r}"
        for k in keys
        if not _ignored(k, ignore) and flat_a.get(k, "<absent>") != flat_b.get(k, "<absent>")
    ]


def _ignored(key: str, ignore: tuple[str, ...]) -> bool:
    return any(key == i or key.startswith(i + ".") for i in ignore)


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out if out or not prefix else {prefix[:-1]: {}}
    if isinstance(data, list) and any(isinstance(v, dict) for v in data):
        out = {}
        for i, value in enumerate(data):
            out.update(_flatten(value, f"{prefix}{i}."))
        return out
    return {prefix[:-1]: data}


def resolved(config: TrainConfig) -> dict[str, Any]:
    """The resolved config as plain data (saved as ``run_dir/config.yaml`` and in checkpoints)."""
    return dump_config(config)


def with_defaults(saved: dict[str, Any]) -> dict[str, Any]:
    """A config saved by an earlier kdcache, with the keys added since at their defaults (a run
    saved before a key existed resumes when the key is left at its default); as saved when it
    no longer validates (a removed key: the comparison then names it)."""
    try:
        return resolved(TrainConfig.model_validate(saved))
    except (ValueError, KdcacheError):  # a key removed since, or a rule the old config breaks
        return saved
