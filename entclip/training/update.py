"""The optimizer updates of one step: `update` takes one per minibatch of the plan (epochs x minibatches).

One update (`_one_update`): the micro-batches' losses are backpropagated one by one (gradients
accumulate; under several processes DDP syncs once, on the last micro-batch), then clip, skip a
non-finite update, optimizer and schedule step, the per-update entropy accounting, the adaptive
bonus's coefficient. One micro-batch (`_micro_loss`): forward (or the statistics pass's first one),
the method's micro-batch selection, the per-token terms, the aggregate with its bonus.

A minibatch is this process's rows of it on every process; its loss is aggregated over all of them
(micro-batches and processes), so the gradient equals one process's on the whole minibatch.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass

import torch
from torch.profiler import record_function

from entclip.core import losses, methods, theory
from entclip.training import objective, parallel
from entclip.training.accounting import StepAccount, loss_weights
from entclip.training.batch import Batch, FirstForward, Plan, Stats, derive_seed
from entclip.training.metrics import Max, Mean, Metric, Min, Tally, reduce
from entclip.training.passes import entropy_grad
from entclip.training.rollout import completion_logits
from entclip.training.session import Learner, Session, TrainState, trainable


class NonFiniteStop(Exception):
    """Too many non-finite updates in a row; carries the step it happened in."""

    def __init__(self, step: int):
        super().__init__(step)
        self.step = step


@dataclass
class Timings:
    """Seconds a step spends on its phases beyond rollout and update (perf/* metrics)."""

    stats_pass_s: float = 0.0  # the statistics pass (with grad Hbar on an accounted step)
    filter_s: float = 0.0      # the rollout-scope filter
    accounting_s: float = 0.0  # the entropy accounting, wherever it runs


@dataclass
class _Micro:
    """What one micro-batch's loss hands its update: the accounting's inputs and its metrics."""

    loss: float
    policy: float
    kl_sum: float
    n_tok: int
    metrics: dict[str, Metric]
    h_sum: float
    h_n: float


def update(session: Session, learner: Learner, state: TrainState, batch: Batch, stats: Stats,
           keep: torch.Tensor, plan: Plan, account: StepAccount | None, first: FirstForward | None,
           timings: Timings) -> dict[str, float]:
    """One optimizer update per minibatch of `plan`; the update metrics averaged over the updates taken.

    `keep` (B, T): the rollout-scope filter's keep-mask (every valid token when the method selects per
    micro-batch, objective.micro_filter). `first` is consumed by the first micro-batch it belongs to.
    """
    cfg = session.cfg
    means = Tally()  # every update's figures, each weighing 1: their mean over the updates
    n_updates = skipped = 0
    session.model.train()
    upd_keep = keep.clone()  # micro scope: the current update's selections, row by row
    for e, minibatches in enumerate(plan):
        for i, micro in enumerate(minibatches):
            row = _one_update(session, learner, state, batch, stats, keep, upd_keep, plan, (e, i), micro,
                              account, first, timings)
            first = None  # only ever the first update's
            if row is None:
                skipped += 1
                continue
            means.add({k: Mean(v, 1.0) for k, v in row.items()})
            n_updates += 1
    out = {k: m.value for k, m in means.result().items()}
    out["train/updates"] = n_updates
    out["train/skipped_updates"] = skipped
    out["train/nonfinite_total"] = state.nonfinite_total
    out["lr"] = learner.sched.get_last_lr()[0]
    return out


def _one_update(session: Session, learner: Learner, state: TrainState, batch: Batch, stats: Stats,
                keep: torch.Tensor, upd_keep: torch.Tensor, plan: Plan, where: tuple[int, int],
                micro: list[torch.Tensor], account: StepAccount | None, first: FirstForward | None,
                timings: Timings) -> dict[str, float] | None:
    """One optimizer update on the micro-batches `micro`; its metrics over all processes, or None when
    it was skipped (a non-finite loss or gradient)."""
    cfg, accelerator = session.cfg, session.accelerator
    mask, adv_tok = batch.mask, batch.adv_tok
    n_proc = accelerator.num_processes
    norm_all = objective.loss_masks(cfg, mask, keep)[0]  # (B, T) the normalizer's tokens
    # The aggregate's denominator over the whole minibatch (all micro-batches, processes).
    local = sum(float(norm_all[m].sum()) if cfg.loss_agg == "token-mean" else float(len(m)) for m in micro)
    denom = max(parallel.global_sum(accelerator, local), 1.0)
    coef = methods.bonus_coef(state.entropy_coef, state.last_entropy, cfg.entropy_target)
    lr = learner.sched.get_last_lr()[0]  # this update's learning rate (the accounting's)
    tally = Tally()
    n_tok = 0  # valid tokens (the fractions, kl/ref)
    loss_sum = policy_sum = kl_sum = 0.0
    h_sum = h_n = 0.0  # the bonus tokens' entropy, for the adaptive coefficient
    saved = account.snapshot() if account is not None else None  # undone if skipped
    for j, rows in enumerate(micro):
        # Non-final micro-batches accumulate locally: DDP syncs once per update, on the last.
        sync = j == len(micro) - 1 or n_proc == 1
        with contextlib.nullcontext() if sync else accelerator.no_sync(session.model):
            part = _micro_loss(session, state, batch, stats, keep, upd_keep, where, j, rows, coef, denom,
                               len(micro), lr, account, first if first is not None and first.rows is rows else None,
                               timings)
        loss_sum += part.loss
        policy_sum += part.policy
        kl_sum += part.kl_sum
        tally.add(part.metrics)
        n_tok += part.n_tok
        h_sum += part.h_sum
        h_n += part.h_n
    clip_to = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
    grad_norm = accelerator.clip_grad_norm_(session.model.parameters(), clip_to)
    figures = tally.result()
    if cfg.scope == "micro":  # this update's selections, over its rows
        rows = torch.cat(micro)
        figures.update({k: Mean(v, n_tok) for k, v in
                        objective.filter_stats(upd_keep[rows], mask[rows], adv_tok[rows]).items()})
    figures.update({"loss/total": Mean(loss_sum * n_proc), "loss/policy": Mean(policy_sum * n_proc),
                    "kl/ref": Mean(kl_sum / max(n_tok, 1), n_tok), "grad/norm": Mean(float(grad_norm))})
    row = reduce(accelerator, figures)
    if not (math.isfinite(row["loss/total"]) and math.isfinite(float(grad_norm))):
        # Skip the update (parameters and optimizer state untouched), count it.
        learner.opt.zero_grad(set_to_none=True)
        if saved is not None:  # and it predicts no entropy change
            account.restore(saved)
        state.nonfinite_total += 1
        state.nonfinite_streak += 1
        if state.nonfinite_streak >= cfg.max_nonfinite:
            raise NonFiniteStop(batch.step)
        return None
    state.nonfinite_streak = 0
    learner.opt.step()
    learner.sched.step()
    if account is not None and account.per_update:  # this update accounted on its own
        t_acc = time.perf_counter()
        _account_update(session, learner, batch, plan, account)
        timings.accounting_s += time.perf_counter() - t_acc
    learner.opt.zero_grad(set_to_none=True)
    if cfg.entropy_target is not None:  # adaptive bonus: once per optimizer update, as TRL
        h = parallel.global_sum(accelerator, h_sum) / max(parallel.global_sum(accelerator, h_n), 1.0)
        state.entropy_coef = methods.adapt_entropy_coef(
            state.entropy_coef, h, cfg.entropy_target, cfg.entropy_coef_delta, cfg.entropy_coef_min,
            cfg.entropy_coef_max)
        state.last_entropy = h
    return row


def _micro_loss(session: Session, state: TrainState, batch: Batch, stats: Stats, keep: torch.Tensor,
                upd_keep: torch.Tensor, where: tuple[int, int], j: int, rows: torch.Tensor, coef: float,
                denom: float, n_micro: int, lr: float, account: StepAccount | None,
                first: FirstForward | None, timings: Timings) -> _Micro:
    """One micro-batch: its loss backpropagated, its share of the update's figures returned."""
    cfg, accelerator = session.cfg, session.accelerator
    roll, mask, adv_tok = batch.rollout, batch.mask, batch.adv_tok
    T = roll.completion_ids.shape[1]
    n_proc, rank = accelerator.num_processes, accelerator.process_index
    if first is not None:
        logits = first.take()  # the statistics pass's forward, graph kept, same parameters
    else:
        with session.autocast():
            logits = completion_logits(session.model, roll.input_ids[rows], roll.attention_mask[rows], T)  # (b, T, V)
    logp = theory.token_logp(logits, roll.completion_ids[rows], cfg.temperature)
    m, adv, old = mask[rows], adv_tok[rows], stats.old_logp[rows]
    ent = None
    if coef > 0:  # the bonus differentiates H
        ent = theory.token_entropy(logits, cfg.temperature)
    elif objective.update_reads_entropy(cfg):
        with torch.no_grad():  # read only: no (b, T, V) graph kept alive
            ent = theory.token_entropy(logits, cfg.temperature)
    k = keep[rows]
    if cfg.scope == "micro":
        e, i = where
        gen = torch.Generator().manual_seed(  # on the CPU: the same draw on any device
            derive_seed(cfg.seed, cfg.entropy_control, batch.step, e, i, j, rank))
        k = objective.micro_filter(cfg, accelerator, logp, ent, old, adv, m, gen)
        upd_keep[rows] = k
    norm, bonus_mask = objective.loss_masks(cfg, m, k)
    terms = objective.token_terms(cfg, logp, old, adv, None if stats.ref_logp is None else stats.ref_logp[rows],
                                  None if ent is None else ent.detach(), m, k)
    loss = losses.aggregate(terms.loss, norm, cfg.loss_agg, cfg.agg_constant, denom)
    if coef > 0:
        loss = loss - methods.entropy_bonus_term(ent, bonus_mask, coef, n_micro * n_proc)
    h_sum = h_n = 0.0
    if cfg.entropy_target is not None:  # the adaptive coefficient's measurement
        h_sum = float((ent.detach() * bonus_mask).sum())
        h_n = float(bonus_mask.sum())
    accelerator.backward(loss * n_proc)  # DDP averages over processes
    if account is not None:
        t_acc = time.perf_counter()
        w = loss_weights(norm, cfg.loss_agg, cfg.agg_constant, denom)
        account.add_update(rows, logits, roll.completion_ids[rows], adv, terms.ratio, terms.zero_grad, m * k,
                           w if terms.weights is None else w * terms.weights,
                           lr, cfg.temperature)
        timings.accounting_s += time.perf_counter() - t_acc
    n = int(m.sum())
    policy = losses.aggregate(torch.where(k.bool(), terms.surrogate.detach(), 0.0), norm, cfg.loss_agg,
                              cfg.agg_constant, denom).item()
    return _Micro(loss.item(), policy, float((terms.kl.detach() * m).sum()), n, _token_metrics(terms.stats, n), h_sum, h_n)


def _account_update(session: Session, learner: Learner, batch: Batch, plan: Plan, account: StepAccount) -> None:
    """The per-update accounting, right after the optimizer step: the step it took, then Hbar and its
    gradient at the new parameters over the whole batch (the first epoch's micro-batches)."""
    params = trainable(session.model)
    account.update_taken(params, [p.grad for p in params])  # the loss gradient it used
    learner.opt.zero_grad(set_to_none=True)
    # Not alive beside the pass's own: the previous record's logits.
    account.last_logits = None
    with record_function("accounting"):
        h_new, new_logits = entropy_grad(session, batch, [m for mb in plan[0] for m in mb],
                                         keep_logits=account.logits is not None)
    account.record(h_new, [p.grad if p.grad is not None else torch.zeros_like(p) for p in params],
                   params, new_logits)


def _token_metrics(stats: dict[str, float], n: int) -> dict[str, Metric]:
    return {k: (Min(v) if k.endswith("_min") else Max(v) if k.endswith("_max") else Mean(v, n)) for k, v in stats.items()}

