"""The forward passes over a rollout batch that are not updates: the statistics before the first update,
and the entropy accounting's measurements after an update or the step.

Every pass runs the policy in training mode (dropout is off, so it is the same function as in eval
mode, and activation checkpointing only works there). Hbar is the mean token entropy over the valid
tokens of all processes; its gradient goes through DDP, which averages over processes (hence x N).
"""

from __future__ import annotations

import torch

from entclip.core import theory
from entclip.training import parallel
from entclip.training.accounting import ACCOUNT_LOGITS_MAX, StepAccount
from entclip.training.batch import Batch, FirstForward, Stats
from entclip.training.rollout import completion_logits
from entclip.training.session import Learner, Session, ref_logits, trainable


def statistics(session: Session, learner: Learner | None, batch: Batch, micro: list[torch.Tensor],
               account: bool = False) -> tuple[Stats, StepAccount | None, FirstForward | None]:
    """Old log-probs and the token statistics, one forward per micro-batch of `micro`, before any update.

    `micro` are the first epoch's micro-batches in plan order, so the first one's forward - taken with
    its graph - is the first update's forward too (returned as FirstForward): no duplicated pass. With
    `account`, the same forwards also give grad_theta Hbar (one backward each) and keep the old logits
    and parameters in a StepAccount (which needs the learner: its optimizer's gradients are reset).
    Without a learner (nothing will train) no graph is kept and no KL reference is read.
    """
    cfg, roll, accelerator = session.cfg, batch.rollout, session.accelerator
    T = roll.completion_ids.shape[1]
    ids, am, mask = roll.input_ids, roll.attention_mask, roll.completion_mask
    B = ids.shape[0]
    n_proc = accelerator.num_processes
    n_valid = max(parallel.global_sum(accelerator, mask.sum()), 1.0)
    out = {k: torch.empty(B, T, device=ids.device) for k in ("logp", "entropy", "disc", "baseline", "ref")}
    old_logits = None
    keep_logits = None  # decided on the first logits: their width is the model's vocabulary
    first = None
    # Reusing the first forward for the first update needs a second backward through the same
    # DDP forward when accounting: not allowed, so with N > 1 processes accounting forgoes it.
    reuse = learner is not None and not (account and n_proc > 1)
    session.model.train()
    for i, rows in enumerate(micro):
        with torch.set_grad_enabled(account or (i == 0 and reuse)):
            with session.autocast():
                logits = completion_logits(session.model, ids[rows], am[rows], T)  # (b, T, V)
        st = theory.token_stats(logits.detach(), roll.completion_ids[rows], cfg.temperature)
        for k in ("logp", "entropy", "disc", "baseline"):
            out[k][rows] = getattr(st, k)
        if account:  # grad of Hbar = mean entropy over the batch's valid tokens
            _hbar_backward(session, logits, mask[rows], n_valid, retain_graph=i == 0 and reuse)
            if keep_logits is None:  # the same decision on every process (their T differ)
                keep_logits = parallel.global_max(accelerator, B * T * logits.shape[-1]) <= ACCOUNT_LOGITS_MAX
            if keep_logits:
                old_logits = _kept(old_logits, rows, logits, B)
        if i == 0 and reuse:
            first = FirstForward(logits)
        if cfg.kl_coef > 0 and learner is not None:
            ref = ref_logits(session, learner, ids[rows], am[rows], T)
            out["ref"][rows] = theory.token_logp(ref, roll.completion_ids[rows], cfg.temperature)
    with_ref = cfg.kl_coef > 0 and learner is not None
    stats = Stats(out["logp"], out["entropy"], out["disc"], out["baseline"], out["ref"] if with_ref else None)
    if not account:
        return stats, None, first
    params = trainable(session.model)  # with LoRA: the adapters only (the rest never moves)
    grad_h = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in params]
    learner.opt.zero_grad(set_to_none=True)
    h_sum = parallel.global_sum(accelerator, float((stats.entropy * mask).sum()))
    acct = StepAccount(params=[p.detach().clone() for p in params], grad_h=grad_h,
                       logits=old_logits, h_old=h_sum / n_valid, n_valid=n_valid, shape=(B, T),
                       per_update=cfg.accounting_unit == "update")
    return stats, acct, first


def entropy_grad(session: Session, batch: Batch, micro: list[torch.Tensor], keep_logits: bool
                 ) -> tuple[float, torch.Tensor | None]:
    """Hbar (all processes) at the current parameters, with grad_theta Hbar left in .grad: one forward
    and backward per micro-batch of `micro` (this process's rows). Also the logits (B, T, V) if asked.
    The per-update accounting's pass: it measures Hbar(theta_u+1) and gives g_u+1 at once."""
    cfg, roll, accelerator = session.cfg, batch.rollout, session.accelerator
    T = roll.completion_ids.shape[1]
    ids, am, mask = roll.input_ids, roll.attention_mask, roll.completion_mask
    n_valid = max(parallel.global_sum(accelerator, mask.sum()), 1.0)
    session.model.train()
    h_sum, kept = 0.0, None
    for rows in micro:
        with session.autocast():
            logits = completion_logits(session.model, ids[rows], am[rows], T)  # (b, T, V)
        # token_stats, as for Hbar before the step: "measured" is a difference of one computation
        ent = theory.token_stats(logits.detach(), roll.completion_ids[rows], cfg.temperature).entropy
        h_sum += float((ent * mask[rows]).sum())
        _hbar_backward(session, logits, mask[rows], n_valid)
        if keep_logits:
            kept = _kept(kept, rows, logits, ids.shape[0])
    return parallel.global_sum(accelerator, h_sum) / n_valid, kept


def _hbar_backward(session: Session, logits: torch.Tensor, mask: torch.Tensor, n_valid: float,
                   retain_graph: bool = False) -> None:
    """Backpropagate one micro-batch's share of Hbar (its tokens' entropy summed / all valid tokens);
    DDP averages gradients over processes, hence x N."""
    n_proc = session.accelerator.num_processes
    part = (theory.token_entropy(logits, session.cfg.temperature) * mask).sum() * n_proc / n_valid
    session.accelerator.backward(part, retain_graph=retain_graph)


def _kept(buffer: torch.Tensor | None, rows: torch.Tensor, logits: torch.Tensor, B: int) -> torch.Tensor:
    """The (B, T, V) buffer of kept logits (made on first use) with this micro-batch's rows filled in."""
    if buffer is None:
        buffer = torch.empty(B, *logits.shape[1:], dtype=logits.dtype, device=logits.device)
    buffer[rows] = logits.detach()
    return buffer


@torch.no_grad()
def entropy_after(session: Session, batch: Batch, keep_logits: bool = True) -> tuple[torch.Tensor | None, float]:
    """Logits (B, T, V) (None without `keep_logits`) and Hbar (all processes) after the step's updates,
    on the same tokens: the whole-step accounting's one forward."""
    cfg, roll = session.cfg, batch.rollout
    T = roll.completion_ids.shape[1]
    ids, am, mask = roll.input_ids, roll.attention_mask, roll.completion_mask
    size = cfg.micro_batch_size or max(ids.shape[0] // cfg.minibatches, 1)  # as in the updates
    parts, h_sum = [], 0.0
    for s in range(0, ids.shape[0], size):
        with session.autocast():
            logits = completion_logits(session.model, ids[s:s + size], am[s:s + size], T)
        # token_stats, as for Hbar before the step: "measured" is a difference of one computation
        ent = theory.token_stats(logits, roll.completion_ids[s:s + size], cfg.temperature).entropy
        h_sum += float((ent * mask[s:s + size]).sum())
        if keep_logits:
            parts.append(logits)
    n_valid = max(parallel.global_sum(session.accelerator, mask.sum()), 1.0)
    return (torch.cat(parts) if keep_logits else None), parallel.global_sum(session.accelerator, h_sum) / n_valid
