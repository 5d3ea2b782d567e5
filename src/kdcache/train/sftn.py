"""SFTN in the trainer (paper 004): the loss, the branches beside the teacher, their accuracy.

A run with an ``sftn:`` section trains ``SFTNNet(teacher, branches)`` (see
:mod:`kdcache.models.sftn`) with :func:`sftn_parts` instead of its stages' CE. The teacher
stays the run's model: ``checkpoints/model_final.pt`` is its plain state dict, loadable as any
checkpoint; the branches are saved aside as ``sftn_branches.pt`` in ``run.dir`` and are a part
of ``last.pt`` (so a resumed run continues them). Their top-1 on the validation set is logged
beside the teacher's (``branch<i>_top1``) and listed in the summary (``sftn_branch_top1``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from kdcache.models.runner import autocast_context
from kdcache.models.sftn import SFTNNet, StudentBranches, build_branches
from kdcache.train import distributed as D
from kdcache.train.config import RunConfig, SFTNConfig, StudentConfig
from kdcache.train.evaluate import Evaluator, eval_sums
from kdcache.train.losses import Labels, LossParts, cross_entropy

log = logging.getLogger(__name__)

Tensor = torch.Tensor
BRANCHES_FILE = "sftn_branches.pt"
BRANCHES_FORMAT = "kdcache-sftn-branches"


# ---- the loss -----------------------------------------------------------------------------------


def branch_kl(
    branch: Tensor,
    teacher: Tensor,
    *,
    temperature: float,
    direction: str = "teacher_to_branch",
    detach_teacher: bool = False,
) -> Tensor:
    """``T^2 * KL`` between the tempered softmaxes of a branch's and the teacher's logits, mean
    over the batch; ``teacher_to_branch`` is ``KL(q_T || q_R)`` (the teacher as target, as
    RepDistiller's DistillKL), ``branch_to_teacher`` ``KL(q_R || q_T)``."""
    if detach_teacher:
        teacher = teacher.detach()
    log_t = F.log_softmax(teacher.float() / temperature, dim=1)
    log_r = F.log_softmax(branch.float() / temperature, dim=1)
    target, other = (log_t, log_r) if direction == "teacher_to_branch" else (log_r, log_t)
    rows = (target.exp() * (target - other)).sum(dim=1)
    # T^2 keeps the gradient's scale independent of T (Hinton et al.); 1 at the presets' T = 1
    return rows.mean() * temperature**2


def sftn_parts(
    teacher_logits: Tensor,
    branch_logits: list[Tensor],
    labels: Labels,
    *,
    lambda_t: float,
    lambda_kl: float,
    lambda_ce: float,
    temperature: float,
    kl_direction: str = "teacher_to_branch",
    detach_teacher: bool = False,
    label_smoothing: float = 0.0,
) -> LossParts:
    """``lambda_t*CE(q_T) + lambda_kl*mean_i KL_i + lambda_ce*mean_i CE(q_R^i)`` (eq. 3-6 of
    the paper; the KL's direction and detaching as :func:`branch_kl`)."""
    ce_t = cross_entropy(teacher_logits, labels, label_smoothing)
    kls = [
        branch_kl(
            b,
            teacher_logits,
            temperature=temperature,
            direction=kl_direction,
            detach_teacher=detach_teacher,
        )
        for b in branch_logits
    ]
    kl = torch.stack(kls).mean()
    ce_r = torch.stack([cross_entropy(b, labels, label_smoothing) for b in branch_logits]).mean()
    total = lambda_t * ce_t + lambda_kl * kl + lambda_ce * ce_r
    return LossParts(total=total, ce=ce_t, kd=kl, kd_weight=lambda_kl, branch_ce=ce_r)


# ---- the branches in a run ----------------------------------------------------------------------


class SFTNRun:
    """The branches of one run around its teacher: the network trained, its loss, the branches'
    evaluation and their file."""

    def __init__(self, config: SFTNConfig, net: SFTNNet):
        self.config = config
        self.net = net

    @property
    def branches(self) -> StudentBranches:
        return self.net.branches

    def loss(
        self, output: tuple[Tensor, list[Tensor]], labels: Labels, smoothing: float
    ) -> LossParts:
        """The SFTN loss of ``net``'s output (teacher logits, branch logits)."""
        teacher_logits, branch_logits = output
        return sftn_parts(
            teacher_logits.float(),
            [b.float() for b in branch_logits],
            labels,
            lambda_t=self.config.lambda_t,
            lambda_kl=self.config.lambda_kl,
            lambda_ce=self.config.lambda_ce,
            temperature=self.config.temperature,
            kl_direction=self.config.kl_direction,
            detach_teacher=self.config.detach_teacher,
            label_smoothing=smoothing,
        )

    @torch.no_grad()
    def evaluate(self, evaluator: Evaluator) -> dict[str, float]:
        """Each branch's top-1 (percent) on the validation views, ``branch<i>_top1`` (i from 1,
        the branch after the teacher's first stage), summed over ranks (a collective)."""
        if evaluator.loader is None:
            return {}
        self.net.eval()
        count = len(self.branches.branches)
        sums = torch.zeros(count, 4, dtype=torch.float64, device=evaluator.device)
        for batch in evaluator.loader:
            batch = batch.to(evaluator.device)
            with autocast_context(evaluator.device, evaluator.amp):
                _, outputs = self.net(evaluator.to_input(batch.images))
            for i, logits in enumerate(outputs):
                sums[i] += eval_sums(logits.float(), batch.labels)
        self.net.train()
        totals = D.all_reduce_sum(sums).tolist()
        return {
            f"branch{i + 1}_top1": 100.0 * row[0] / row[3]
            for i, row in enumerate(totals)
            if row[3] > 0
        }

    def save(self, run_dir: str | Path) -> Path:
        """``run_dir/sftn_branches.pt``: the branches' state dict with what rebuilds them."""
        path = Path(run_dir) / BRANCHES_FILE
        payload = {
            "format": BRANCHES_FORMAT,
            "student": self.config.student.model_dump(),
            "teacher_modules": self.branches.modules_in,
            "state_dict": self.branches.state_dict(),
        }
        torch.save(payload, path)
        log.info("saved the SFTN branches to %s", path)
        return path


def build_sftn(
    sftn: SFTNConfig | None,
    teacher: nn.Module,
    num_classes: int,
    in_chans: int,
    size: int,
    *,
    run: RunConfig,
    student: StudentConfig,
) -> SFTNRun | None:
    """The run's SFTN part around ``teacher`` (None without an ``sftn:`` section). The
    branches' weights come from ``run.seed`` alone (the same on every rank); ``student`` is the
    section of the model this run trains (the teacher the branches attach to)."""
    if sftn is None:
        return None
    device = next(teacher.parameters()).device
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(run.seed + 1)
        branches = build_branches(
            teacher.cpu(), student.name, sftn.student, num_classes, in_chans, size
        )
    teacher.to(device)
    branches = branches.to(device)
    count = len(branches.branches)
    log.info("sftn: %d student branches of %s", count, sftn.student.name)
    return SFTNRun(sftn, SFTNNet(teacher, branches))
