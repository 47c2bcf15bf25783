"""Figures over all processes: every cross-process reduction of a training step, as plain functions.

Each function takes the accelerator and is a collective: every process calls it at the same point
with its own values and gets the same answer; on one process it returns its own figures without
communicating. Reductions are chosen per key so that N processes report what one process would on
the whole batch:
- `global_sum`, `global_max`: one number.
- `gather_rows`: a (B, T) tensor per process -> the whole batch's (N*B, T).
- (an update's and the accounting's figures carry their own reduction: metrics.reduce)
- `rollout_metrics`: the rollout batch's figures (reward/*, entropy/mean, disc/*, length/*) from the
  gathered rows; `batch_figures` is its pure part.
- `filter_rows`: the filter log's rows of every process (the engine writes them).
Nothing here writes to the run directory.
"""

from __future__ import annotations

from typing import Any

import torch

from entclip.contracts.metrics import Metric, reduce


def global_sum(accelerator, value: float) -> float:
    """Sum of a number over all processes (itself on one process)."""
    if accelerator.num_processes == 1:
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=accelerator.device)
    return float(accelerator.reduce(t, "sum"))


def global_max(accelerator, value: float) -> float:
    """Maximum of a number over all processes (itself on one process)."""
    if accelerator.num_processes == 1:
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=accelerator.device)
    return float(accelerator.gather(t).max())


def gather_rows(accelerator, x: torch.Tensor) -> torch.Tensor:
    """(B, T) per process -> (N*B, T) for the whole batch; identity on one process."""
    if accelerator.num_processes == 1:
        return x
    x = accelerator.pad_across_processes(x, dim=1, pad_index=0)
    return accelerator.gather(x)


def own_rows(accelerator, gathered: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This process's rows of a `gather_rows` result, cut back to the width of its own `like` (B, T)."""
    rank, b = accelerator.process_index, like.shape[0]
    return gathered[rank * b:(rank + 1) * b, :like.shape[1]]


def rollout_metrics(accelerator, group_size: int, rewards: torch.Tensor, correct: list[bool], stats,
                    mask: torch.Tensor, reward_metrics: dict[str, Metric]) -> dict[str, float]:
    """The rollout batch's figures over all processes' rows, and the reward functions' own metrics
    (reward/errors and reward/timeouts summed over processes, the rest averaged).

    `stats` is the step's batch.Stats (B, T) per process; rewards (B,), correct B flags, mask (B, T).
    """
    dev = accelerator.device
    g = lambda t: gather_rows(accelerator, t.to(dev))  # noqa: E731
    entropy, disc, baseline = g(stats.entropy), g(stats.disc), g(stats.baseline)
    out = batch_figures(group_size, accelerator.gather(rewards.to(dev)).cpu(),
                        [bool(c) for c in accelerator.gather(
                            torch.tensor([int(c) for c in correct], device=dev)).tolist()],
                        entropy, disc, baseline, g(mask))
    return {**out, **reduce(accelerator, reward_metrics)}


def batch_figures(group_size: int, rewards: torch.Tensor, correct: list[bool], entropy: torch.Tensor,
                  disc: torch.Tensor, baseline: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """reward/*, entropy/mean, disc/*, length/* of a whole batch: rewards (B,), the rest (B, T)."""
    groups = rewards.view(-1, group_size)
    lengths = mask.sum(dim=1).float()
    return {"reward/mean": float(rewards.mean()), "reward/std": float(rewards.std()),
            "reward/accuracy": sum(correct) / len(correct),
            "reward/zero_var_frac": float((groups.std(dim=1) < 1e-8).float().mean()),
            **token_figures(entropy, disc, baseline, mask),
            "length/mean": float(lengths.mean()), "length/max": float(lengths.max())}


def token_figures(entropy: torch.Tensor, disc: torch.Tensor, baseline: torch.Tensor,
                  mask: torch.Tensor) -> dict[str, float]:
    """entropy/mean and disc/* over a whole batch's valid tokens (all (B, T); population std)."""
    valid = mask.bool()
    dev = (disc - baseline)[valid]
    return {"entropy/mean": float(entropy[valid].mean()),
            "disc/mean": float(disc[valid].mean()), "disc/std": float(disc[valid].std(correction=0)),
            "disc/baseline_mean": float(baseline[valid].mean()),
            "disc/dev_mean": float(dev.mean()), "disc/dev_std": float(dev.std(correction=0))}


def filter_rows(accelerator, step: int, completion_ids: torch.Tensor, keep: torch.Tensor,
                mask: torch.Tensor, row_ids: list[tuple[int, int]]) -> list[dict[str, Any]]:
    """filter.jsonl's rows: every sequence of the step (all processes), its tokens and dropped
    positions, ordered by (problem, sample). completion_ids, keep, mask (B, T); row_ids B pairs."""
    from accelerate.utils import gather_object

    rows = []
    for b, (problem, sample) in enumerate(row_ids):
        n = int(mask[b].sum())
        dropped = (~keep[b, :n].bool()).nonzero().flatten().tolist()
        rows.append({"step": step, "problem": problem, "sample": sample,
                     "tokens": completion_ids[b, :n].tolist(), "dropped": dropped})
    if accelerator.num_processes > 1:
        rows = gather_object(rows)
    return sorted(rows, key=lambda r: (r["problem"], r["sample"]))
