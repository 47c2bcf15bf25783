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
from entclip.training.batch import Batch, FirstForward, Plan, Prepared, Stats, derive_seed
from entclip.contracts.metrics import Mean, Metric, Tally, reduce
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
class _Step:
    """What every update of one step reads (and `upd_keep`, the micro-scope selections it writes)."""

    session: Session
    learner: Learner
    state: TrainState
    batch: Batch
    stats: Stats
    keep: torch.Tensor                 # (B, T) the rollout-scope keep-mask
    is_weight: torch.Tensor | None     # (B, T) the rollout correction's weights on the policy term (None: none)
    norm: torch.Tensor                 # (B, T) the normalizer's tokens under it (objective.loss_masks)
    upd_keep: torch.Tensor             # (B, T) micro scope: the current update's selections, row by row
    plan: Plan
    account: StepAccount | None
    timings: Timings


@dataclass(frozen=True)
class _Update:
    """One update's constants: where it is in the plan and what its micro-batches share."""

    epoch: int
    index: int                         # the minibatch within the epoch
    n_micro: int
    denom: float                       # the aggregate's denominator over the whole minibatch, all processes
    coef: float                        # the entropy bonus's coefficient for this update (0: none)
    lr: float                          # this update's learning rate (the accounting's)


@dataclass
class _Micro:
    """What one micro-batch's loss hands its update."""

    loss: float
    policy: float
    kl_sum: float
    n_tok: int
    metrics: dict[str, Metric]
    h_sum: float                       # the bonus tokens' entropy, for the adaptive coefficient
    h_n: float


def update(session: Session, learner: Learner, state: TrainState, prepared: Prepared, timings: Timings
           ) -> dict[str, float]:
    """One optimizer update per minibatch of the plan; the update metrics averaged over the updates taken.

    `prepared.keep` (B, T): the rollout-scope filter's keep-mask (every valid token when the method
    selects per micro-batch, objective.micro_filter). `prepared.first`, the statistics pass's forward of
    plan[0][0][0], is the first update's first micro-batch forward.
    """
    p = prepared
    step = _Step(session, learner, state, p.batch, p.stats, p.keep, p.is_weight,
                 objective.loss_masks(session.cfg, p.batch.mask, p.keep)[0], p.keep.clone(), p.plan, p.account,
                 timings)
    first = p.first
    means = Tally()  # every update's figures, each weighing 1: their mean over the updates
    n_updates = skipped = 0
    session.model.train()
    for e, minibatches in enumerate(p.plan):
        for i, micro in enumerate(minibatches):
            row = _one_update(step, e, i, micro, first)
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


def _one_update(step: _Step, epoch: int, index: int, micro: list[torch.Tensor],
                first: FirstForward | None) -> dict[str, float] | None:
    """One optimizer update on the micro-batches `micro`; its metrics over all processes, or None when
    it was skipped (a non-finite loss or gradient)."""
    session, learner, state = step.session, step.learner, step.state
    cfg, accelerator = session.cfg, session.accelerator
    n_proc = accelerator.num_processes
    local = sum(float(step.norm[m].sum()) if cfg.loss_agg == "token-mean" else float(len(m)) for m in micro)
    upd = _Update(epoch, index, len(micro), denom=max(parallel.global_sum(accelerator, local), 1.0),
                  coef=methods.bonus_coef(state.entropy_coef, state.last_entropy, cfg.entropy_target),
                  lr=learner.sched.get_last_lr()[0])
    tally = Tally()
    n_tok = 0  # valid tokens (the fractions, kl/ref)
    loss_sum = policy_sum = kl_sum = 0.0
    h_sum = h_n = 0.0
    saved = step.account.snapshot() if step.account is not None else None  # undone if skipped
    for j, rows in enumerate(micro):
        # Non-final micro-batches accumulate locally: DDP syncs once per update, on the last.
        sync = j == len(micro) - 1 or n_proc == 1
        with contextlib.nullcontext() if sync else accelerator.no_sync(session.model):
            part = _micro_loss(step, upd, j, rows, first if j == 0 else None)
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
        figures.update({k: Mean(v, n_tok) for k, v in objective.filter_stats(
            step.upd_keep[rows], step.batch.mask[rows], step.batch.adv_tok[rows]).items()})
    figures.update({"loss/total": Mean(loss_sum * n_proc), "loss/policy": Mean(policy_sum * n_proc),
                    "kl/ref": Mean(kl_sum / max(n_tok, 1), n_tok), "grad/norm": Mean(float(grad_norm))})
    row = reduce(accelerator, figures)
    if not (math.isfinite(row["loss/total"]) and math.isfinite(float(grad_norm))):
        # Skip the update (parameters and optimizer state untouched), count it.
        learner.opt.zero_grad(set_to_none=True)
        if saved is not None:  # and it predicts no entropy change
            step.account.restore(saved)
        state.nonfinite_total += 1
        state.nonfinite_streak += 1
        if state.nonfinite_streak >= cfg.max_nonfinite:
            raise NonFiniteStop(step.batch.step)
        return None
    state.nonfinite_streak = 0
    learner.opt.step()
    learner.sched.step()
    if step.account is not None and step.account.per_update:  # this update accounted on its own
        t_acc = time.perf_counter()
        _account_update(session, learner, step.batch, step.plan, step.account)
        step.timings.accounting_s += time.perf_counter() - t_acc
    learner.opt.zero_grad(set_to_none=True)
    if cfg.entropy_target is not None:  # adaptive bonus: once per optimizer update, as TRL
        h = parallel.global_sum(accelerator, h_sum) / max(parallel.global_sum(accelerator, h_n), 1.0)
        state.entropy_coef = methods.adapt_entropy_coef(
            state.entropy_coef, h, cfg.entropy_target, cfg.entropy_coef_delta, cfg.entropy_coef_min,
            cfg.entropy_coef_max)
        state.last_entropy = h
    return row


def _micro_loss(step: _Step, upd: _Update, j: int, rows: torch.Tensor, first: FirstForward | None) -> _Micro:
    """Micro-batch j of an update: its loss backpropagated, its share of the update's figures returned."""
    session, batch, stats = step.session, step.batch, step.stats
    cfg, accelerator = session.cfg, session.accelerator
    roll = batch.rollout
    T = roll.completion_ids.shape[1]
    n_proc, rank = accelerator.num_processes, accelerator.process_index
    if first is not None:
        logits = first.take()  # the statistics pass's forward, graph kept, same parameters
    else:
        with session.autocast():
            logits = completion_logits(session.model, roll.input_ids[rows], roll.attention_mask[rows], T)  # (b, T, V)
    logp = theory.token_logp(logits, roll.completion_ids[rows], cfg.temperature)
    m, adv, old = batch.mask[rows], batch.adv_tok[rows], stats.old_logp[rows]
    ent = None
    if upd.coef > 0:  # the bonus differentiates H
        ent = theory.token_entropy(logits, cfg.temperature)
    elif objective.update_reads_entropy(cfg):
        with torch.no_grad():  # read only: no (b, T, V) graph kept alive
            ent = theory.token_entropy(logits, cfg.temperature)
    k = step.keep[rows]
    if cfg.scope == "micro":
        gen = torch.Generator().manual_seed(  # on the CPU: the same draw on any device
            derive_seed(cfg.seed, cfg.entropy_control, batch.step, upd.epoch, upd.index, j, rank))
        k = objective.micro_filter(cfg, accelerator, logp, ent, old, adv, m, gen)
        step.upd_keep[rows] = k
    norm, bonus_mask = objective.loss_masks(cfg, m, k)
    terms = objective.token_terms(cfg, logp, old, adv, None if stats.ref_logp is None else stats.ref_logp[rows],
                                  None if ent is None else ent.detach(), m, k,
                                  None if step.is_weight is None else step.is_weight[rows])
    loss = losses.aggregate(terms.loss, norm, cfg.loss_agg, cfg.agg_constant, upd.denom)
    if upd.coef > 0:
        loss = loss - methods.entropy_bonus_term(ent, bonus_mask, upd.coef, upd.n_micro * n_proc)
    h_sum = h_n = 0.0
    if cfg.entropy_target is not None:  # the adaptive coefficient's measurement
        h_sum = float((ent.detach() * bonus_mask).sum())
        h_n = float(bonus_mask.sum())
    accelerator.backward(loss * n_proc)  # DDP averages over processes
    if step.account is not None:
        t_acc = time.perf_counter()
        w = loss_weights(norm, cfg.loss_agg, cfg.agg_constant, upd.denom)
        step.account.add_update(rows, logits, roll.completion_ids[rows], adv, terms.ratio, terms.zero_grad, m * k,
                                w if terms.weights is None else w * terms.weights, upd.lr, cfg.temperature)
        step.timings.accounting_s += time.perf_counter() - t_acc
    policy = losses.aggregate(torch.where(k.bool(), terms.surrogate.detach(), 0.0), norm, cfg.loss_agg,
                              cfg.agg_constant, upd.denom).item()
    return _Micro(loss.item(), policy, float((terms.kl.detach() * m).sum()), int(m.sum()), terms.stats, h_sum, h_n)


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


