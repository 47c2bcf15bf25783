"""The typed records one training step carries from stage to stage, and the seeds that make it redoable.

collect -> `Batch` (the rollout, which problem and sample each row is) -> score -> `Batch` with rewards
and advantages -> statistics -> `Stats` (per-token quantities before any update) -> filter -> the
keep-mask -> update. Every record holds this process's rows; the G samples of a prompt are consecutive.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from typing import Any

import torch

from entclip.contracts.metrics import Metric
from entclip.training.rollout import Rollout


def derive_seed(*parts: Any) -> int:
    """A stable 62-bit seed from (seed, step, purpose...): per-step randomness that resume can redo."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 2


@dataclass(frozen=True)
class Batch:
    """This process's rows of one rollout batch: collected, then scored (`with_scores`)."""

    step: int
    rollout: Rollout
    row_ids: list[tuple[int, int]]          # (problem index, sample index) per row
    rewards: torch.Tensor | None = None     # (B,) total reward per row
    correct: list[bool] | None = None       # (B,) the verifier's verdict per row
    reward_metrics: dict[str, Metric] = dataclasses.field(default_factory=dict)  # the reward functions' own
    advantages: torch.Tensor | None = None  # (B,) group-normalized, on the rollout's device

    def with_scores(self, rewards: torch.Tensor, correct: list[bool], reward_metrics: dict[str, Metric],
                    advantages: torch.Tensor) -> "Batch":
        return dataclasses.replace(self, rewards=rewards, correct=correct, reward_metrics=reward_metrics,
                                   advantages=advantages)

    @property
    def mask(self) -> torch.Tensor:
        """(B, T) 1 on the completion's valid tokens (up to and including the first EOS)."""
        return self.rollout.completion_mask

    @property
    def adv_tok(self) -> torch.Tensor:
        """(B, T) each row's advantage on every position, float32."""
        return self.advantages[:, None].expand_as(self.mask).float()


@dataclass
class Stats:
    """Per-token quantities of one rollout batch, taken before the first update. All (B, T)."""

    old_logp: torch.Tensor
    entropy: torch.Tensor
    disc: torch.Tensor                 # S* = p (H + log p)
    baseline: torch.Tensor             # E_p[S], the expectation of the token statistic under the policy
    ref_logp: torch.Tensor | None      # log p under the KL reference (None without one)


@dataclass
class FirstForward:
    """The statistics pass's first micro-batch forward (plan[0][0][0]), its graph kept: the first
    update's first forward too."""

    logits: torch.Tensor | None        # (b, T, V) with graph; None once taken

    def take(self) -> torch.Tensor:
        """The logits, handed over once: the record keeps no reference (the update frees them)."""
        logits, self.logits = self.logits, None
        return logits


Plan = list[list[list[torch.Tensor]]]  # row indices per epoch, minibatch (one update each) and micro-batch


@dataclass
class Prepared:
    """A scored batch ready for its updates: what the statistics pass and the filter made of it."""

    batch: Batch
    stats: Stats
    keep: torch.Tensor                 # (B, T) the rollout-scope keep-mask (objective.batch_filter)
    plan: Plan                         # the step's epochs x minibatches x micro-batches
    account: Any                       # accounting.StepAccount on an accounted step, else None
    first: FirstForward | None         # the forward of plan[0][0][0], for the first update's first micro-batch
    is_weight: torch.Tensor | None = None  # (B, T) the rollout correction's weights (objective.rollout_correction)


def minibatch_plan(cfg, step: int, n_rows: int, device) -> Plan:
    """Row indices per epoch, minibatch and micro-batch, shuffled per epoch from (seed, step).

    `n_rows` are this process's rows; each minibatch takes 1/minibatches of them (the same minibatch
    index on every process forms one update) in micro-batches of at most micro_batch_size rows.
    """
    gen = torch.Generator().manual_seed(derive_seed(cfg.seed, "minibatch", step))
    size = max(n_rows // cfg.minibatches, 1)
    micro = cfg.micro_batch_size or size
    return [[list(rows.split(micro)) for rows in torch.randperm(n_rows, generator=gen).to(device).split(size)]
            for _ in range(cfg.epochs)]
