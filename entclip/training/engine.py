"""One training step of GRPO, told in order: collect -> score -> statistics -> filter -> update -> account -> log.

`train_step` is the story; each stage is a function of the run's objects (session.Session: what
samples and scores; session.Learner: what trains; session.TrainState: what carries to the next step)
and of the typed records the earlier stages returned (batch.Batch, batch.Stats, batch.Prepared): no
stage reads what another left on an object's attributes. The mutable records (the StepAccount of an
accounted step, the step's Timings, the TrainState) are passed explicitly.

- collect: the step's prompts, drawn from (seed, step) and split over the processes; G samples each,
  each sample's noise from (seed, step, prompt, sample), so 1 and N processes draw the same completions.
- score: rewards and group-normalized advantages.
- statistics (passes.py): old log-probs, H, S*, E_p[S] (and grad Hbar when accounting), one forward
  per micro-batch before any update; the first micro-batch's forward is the first update's too.
- filter (objective.batch_filter): a rollout-scope method's keep-mask over the whole batch (gathered
  across processes); micro-batch-scope methods select inside each update instead.
- correct (objective.rollout_correction): with a sampler that has its own weights (vLLM), its log-probs
  against the trainer's (sampling/*) and the importance weights of rollout_is on the policy term.
- update (update.py): epochs x minibatches optimizer updates; micro-batches accumulate gradients.
- account (accounting.py): predicted vs measured entropy change, on the accounted steps.
- log: metrics.jsonl (and samples.jsonl, filter.jsonl), from the main process.
accelerate owns the device, the wrapped model and optimizer and the backward pass; figures over all
processes come from parallel.py and metrics.reduce; the run around the steps is loop.train. The
learning-rate schedule is stepped by us per optimizer update, on every process.

The profiler sees the phases: `torch.profiler.record_function` marks "stats pass", "update" and
"accounting" (memory.py's estimate of each phase is checked against them).
"""

from __future__ import annotations

import random
import time

import torch
from torch.profiler import record_function

from entclip.core import losses
from entclip.training import objective, parallel
from entclip.training.accounting import StepAccount
from entclip.training.batch import Batch, Prepared, Stats, derive_seed, minibatch_plan
from entclip.contracts.metrics import reduce
from entclip.training.passes import entropy_after, statistics
from entclip.training.rollout import Rollout
from entclip.training.session import (Learner, Log, Session, TrainState, WrapSampler, open_learner, open_session,
                                      trainable)
from entclip.training.update import NonFiniteStop, Timings, update

__all__ = ["Trainer", "train_step", "collect", "sample_problems", "score", "NonFiniteStop", "derive_seed"]


def train_step(session: Session, learner: Learner, state: TrainState, step: int,
               batch: Batch | None = None) -> dict[str, float]:
    """One GRPO step; appends its row to metrics.jsonl and returns it. `batch`: a scored batch to train
    on instead of collecting one (tests and profiles fix the rollout)."""
    cfg = session.cfg
    t0 = time.perf_counter()
    if batch is None:
        batch = score(session, collect(session, step))
    t_roll = time.perf_counter() - t0
    timings = Timings()
    account_now = cfg.entropy_accounting and step % cfg.accounting_every == 0
    t_stats = time.perf_counter()
    plan = minibatch_plan(cfg, step, batch.rollout.completion_ids.shape[0], batch.mask.device)
    with record_function("stats pass"):
        stats, account, first = statistics(session, learner, batch, [m for mb in plan[0] for m in mb], account_now)
    timings.stats_pass_s = time.perf_counter() - t_stats
    t_filter = time.perf_counter()
    keep, filt = objective.batch_filter(cfg, session.accelerator, stats, batch.adv_tok, batch.mask,
                                        torch.Generator().manual_seed(derive_seed(cfg.seed, "filter", step)))
    timings.filter_s = time.perf_counter() - t_filter
    if cfg.log_filter:
        log_filter(session, batch, keep)
    # A sampler with its own weights (vLLM): how far its log p is from the trainer's, and the weights
    # that correct for it (rollout_is). The filter above read only the trainer's statistics.
    is_weight, mismatch = objective.rollout_correction(cfg, session.accelerator, stats.old_logp,
                                                       batch.rollout.logp, batch.mask)
    with record_function("update"):
        upd = update(session, learner, state, Prepared(batch, stats, keep, plan, account, first, is_weight), timings)
    if upd["train/updates"]:  # the policy changed: the sampler follows (no copy to refresh for HFSampler)
        session.sampler.sync_weights(session.policy)
    acct = account_step(session, batch, stats, account, timings)
    return log_step(session, state, batch, stats, {**filt, **mismatch, **upd, **acct}, timings, t0, t_roll,
                    account is not None)


def collect(session: Session, step: int) -> Batch:
    """This process's share of the step's prompts, G samples each (not yet scored).

    The step's prompts are drawn from (seed, step) and split evenly over the processes; each sample's
    noise comes from (seed, step, prompt, sample), so one process and N processes draw the same
    completions for the same prompts.
    """
    cfg, accelerator = session.cfg, session.accelerator
    n_proc, rank = accelerator.num_processes, accelerator.process_index
    rng = random.Random(derive_seed(cfg.seed, "prompts", step))
    chosen = rng.sample(range(len(session.tasks.train)), cfg.prompts_per_step)
    per = cfg.prompts_per_step // n_proc
    mine = chosen[rank * per:(rank + 1) * per]
    seeds = [derive_seed(cfg.seed, "sample", step, i, j) for i in mine for j in range(cfg.group_size)]
    roll = sample_problems(session, [session.tasks.train[i] for i in mine], seeds)
    return Batch(step, roll, [(i, j) for i in mine for j in range(cfg.group_size)])


def sample_problems(session: Session, problems: list, seeds: list[int] | None = None) -> Rollout:
    """G samples for each problem (objects with .prompt and .answer) from the session's sampler."""
    cfg = session.cfg
    session.policy.eval()
    return session.sampler.sample([p.prompt for p in problems], cfg.group_size, cfg.temperature,
                                  cfg.max_new_tokens, seeds)


def score(session: Session, batch: Batch, answers: list[str] | None = None) -> Batch:
    """Rewards of every row (against its problem's answer) and the group-normalized advantages."""
    cfg = session.cfg
    if answers is None:
        answers = [session.tasks.train[i].answer for i, _ in batch.row_ids]
    roll = batch.rollout
    scored = session.rewards.score(roll.completions, answers, roll.prompts)
    if scored.first_error and not session.reward_error_shown:  # counted every step, shown once
        session.reward_error_shown = True
        session.log(f"a reward call failed and scored 0 (reward/errors counts them): {scored.first_error}")
    rewards = torch.tensor(scored.total, dtype=torch.float32)
    adv = losses.group_advantages(rewards, cfg.group_size, cfg.scale_std).to(roll.completion_ids.device)  # (B,)
    return batch.with_scores(rewards, scored.correct, scored.metrics(), adv)


def account_step(session: Session, batch: Batch, stats: Stats, account: StepAccount | None,
                 timings: Timings) -> dict[str, float]:
    """The accounted step's figures over all processes (nothing on a step that is not accounted): per
    update, Hbar and logits after the last update are the last record's; per step, one forward now."""
    if account is None:
        return {}
    t_acc = time.perf_counter()
    if account.per_update:
        new_logits, h_new = account.last_logits, account.h_u
    else:
        with record_function("accounting"):
            new_logits, h_new = entropy_after(session, batch, keep_logits=account.logits is not None)
    figures = account.finish(new_logits, h_new, [p.detach() for p in trainable(session.model)], stats,
                             batch.adv_tok, batch.mask, session.cfg.temperature)
    out = reduce(session.accelerator, figures)
    timings.accounting_s += time.perf_counter() - t_acc
    return out


def log_filter(session: Session, batch: Batch, keep: torch.Tensor) -> None:
    """filter.jsonl: every sequence of the step (all processes), its tokens and dropped positions."""
    rows = parallel.filter_rows(session.accelerator, batch.step, batch.rollout.completion_ids, keep, batch.mask,
                                batch.row_ids)
    if session.accelerator.is_main_process and session.run_dir is not None:
        for row in rows:
            session.run_dir.append("filter.jsonl", row)


def log_step(session: Session, state: TrainState, batch: Batch, stats: Stats, figures: dict[str, float],
             timings: Timings, t0: float, t_roll: float, accounted: bool) -> dict[str, float]:
    """The step's row: the rollout batch's figures, the filter's, the updates', the accounting's and the
    timings; written to metrics.jsonl (and a few rollouts to samples.jsonl) by the main process."""
    cfg, accelerator, roll = session.cfg, session.accelerator, batch.rollout
    rollout_figures = parallel.rollout_metrics(accelerator, cfg.group_size, batch.rewards, batch.correct, stats,
                                               batch.mask, batch.reward_metrics)
    if state.entropy_coef > 0 or cfg.entropy_target is not None:
        figures["entropy/bonus_coef"] = state.entropy_coef  # after the step's updates
    elapsed = time.perf_counter() - t0
    n_tokens = parallel.global_sum(accelerator, roll.n_tokens)
    perf = {"perf/stats_pass_s": timings.stats_pass_s, "perf/filter_s": timings.filter_s,
            **({"perf/accounting_s": timings.accounting_s} if accounted else {})}
    metrics = {"step": batch.step, **rollout_figures, **figures, **perf,
               "perf/rollout_s": t_roll, "perf/update_s": elapsed - t_roll, "perf/step_s": elapsed,
               "perf/tokens_per_s": n_tokens / max(elapsed, 1e-9)}
    if accelerator.is_main_process and session.run_dir is not None:
        session.run_dir.append("metrics.jsonl", metrics)
        for i in range(min(cfg.samples_per_step, len(roll.prompts))):
            session.run_dir.append("samples.jsonl", {
                "step": batch.step, "prompt": roll.prompts[i], "completion": roll.completions[i],
                "reward": float(batch.rewards[i]), "advantage": float(batch.advantages[i])})
    return metrics


class Trainer:
    """The objects of one run - `session`, `learner`, `state` - and its steps (train_step) and
    evaluations (evaluation.evaluate). loop.train runs it, saves and resumes it."""

    def __init__(self, cfg, run, log: Log, model_path: str | None = None, resume: bool = False,
                 wrap_sampler: WrapSampler | None = None):
        """`model_path`: a model to start from instead of cfg.model (a checkpoint, a folder or an id);
        with `resume` it is the run's checkpoint and the KL reference stays the run's own start.
        `wrap_sampler(sampler) -> Sampler`: given the default HFSampler, returns the sampler every
        rollout and evaluation of the run uses (its `sync_weights` is called after each step)."""
        self.session = open_session(cfg, run, log, model_path, wrap_sampler)
        self.learner = open_learner(self.session, model_path, resume)
        self.state = TrainState(entropy_coef=cfg.entropy_coef)

    @property
    def cfg(self):
        return self.session.cfg

    def step(self, step: int, batch: Batch | None = None) -> dict[str, float]:
        return train_step(self.session, self.learner, self.state, step, batch)

    def evaluate(self, step: int) -> dict[str, float]:
        from entclip.training.evaluation import evaluate

        return evaluate(self.session, step)
