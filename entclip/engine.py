"""The only stateful loop: rollout -> reward -> advantages -> token filter -> updates -> log.

One training step = one rollout batch (prompts_per_step x group_size sequences per process) and its
`epochs x minibatches` optimizer updates. Everything computed once per rollout batch - old
log-probs, token statistics, the filter's keep-mask - is taken before the first update.
accelerate owns the device, the wrapped model/optimizer and the backward pass.

Deliberate simplifications (stated, not hidden): no gradient accumulation (one backward per
optimizer update); the learning-rate schedule is stepped by us per optimizer update, per process.
"""

from __future__ import annotations

import hashlib
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from entclip import baselines, losses, objective, theory
from entclip.accounting import StepAccount, loss_weights
from entclip.config import Config
from entclip.errors import FAILED, INTERRUPTED, EntclipError
from entclip.models import load_folder, load_policy, quiet_libraries
from entclip.rollout import Rollout, completion_logits, sample
from entclip.rundir import RunDir, load_trainer_state, save_checkpoint

Log = Callable[[str], None]
OnStep = Callable[[int, dict[str, float]], None]


def derive_seed(*parts: Any) -> int:
    """A stable 62-bit seed from (seed, step, purpose...): per-step randomness that resume can redo."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 2


@dataclass
class BatchStats:
    """Per-token quantities of one rollout batch, taken before the first update. All (B, T)."""

    old_logp: torch.Tensor
    entropy: torch.Tensor
    disc: torch.Tensor
    baseline: torch.Tensor
    ref_logp: torch.Tensor | None


class Trainer:
    """Holds the objects of one run; `run()` is the loop. Built by `train()`."""

    def __init__(self, cfg: Config, run: RunDir | None, log: Log, on_step: OnStep = lambda s, m: None,
                 model_path: str | None = None, resume: bool = False):
        """`model_path`: a save_pretrained folder to start from instead of the warm-started tiny model;
        with `resume` it is the run's checkpoint and the KL reference stays the run's own start."""
        from accelerate import Accelerator

        from entclip.tasks.arithmetic import ArithmeticTask

        self.cfg, self.run_dir, self.log, self.on_step = cfg, run, log, on_step
        quiet_libraries()
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        if cfg.device == "cuda" and not torch.cuda.is_available():
            raise EntclipError("device=cuda but no CUDA device is visible; use --set device=cpu or auto")
        self.accelerator = Accelerator(cpu=cfg.device == "cpu")
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        self.task = ArithmeticTask(max_operand=cfg.max_operand, n_test=cfg.n_test)
        load = (lambda lg: load_folder(model_path)) if model_path else (lambda lg: load_policy(cfg, lg))
        model, self.tokenizer, self.warm_start = load(log)
        self.ref = None
        if cfg.kl_coef > 0:
            ref_load = (lambda lg: load_policy(cfg, lg)) if resume else load
            self.ref = ref_load(lambda s: None)[0].to(self.accelerator.device).eval()
            self.ref.requires_grad_(False)
        _disable_dropout(model)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.model, self.opt = self.accelerator.prepare(model, opt)
        total = cfg.steps * cfg.epochs * cfg.minibatches
        self.accounting_s = 0.0  # time the current step spent on entropy accounting
        self.nonfinite_total = 0  # updates skipped for a non-finite loss or gradient, whole run
        self.nonfinite_streak = 0  # ... in a row, up to now
        self.stop_requested = False  # set by Ctrl-C: stop after the current step
        self.entropy_coef = cfg.entropy_coef  # adapted per step when entropy_target is set
        self._first = None  # (rows, logits with graph) of the stats pass's first minibatch
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda i: _lr_factor(cfg, i, total))

    @property
    def policy(self):
        return self.accelerator.unwrap_model(self.model)

    # ---- one step ----------------------------------------------------------------------
    def rollout(self, step: int) -> tuple[Rollout, torch.Tensor, list[bool]]:
        cfg = self.cfg
        rank = self.accelerator.process_index
        rng = random.Random(derive_seed(cfg.seed, "prompts", step, rank))
        problems = rng.sample(self.task.train, cfg.prompts_per_step)
        torch.manual_seed(derive_seed(cfg.seed, "sample", step, rank))
        return self.rollout_problems(problems)

    def rollout_problems(self, problems: list) -> tuple[Rollout, torch.Tensor, list[bool]]:
        """G samples for each problem (objects with .prompt and .answer), scored by the task."""
        cfg = self.cfg
        self.policy.eval()
        roll = sample(self.policy, self.tokenizer, [p.prompt for p in problems], cfg.group_size,
                      cfg.temperature, cfg.max_new_tokens)
        answers = [p.answer for p in problems for _ in range(cfg.group_size)]
        correct = [self.task.verify(c, a) for c, a in zip(roll.completions, answers)]
        rewards = torch.tensor([self.task.reward(c, a) for c, a in zip(roll.completions, answers)])
        return roll, rewards, correct

    def batch_stats(self, roll: Rollout, minibatches: list[torch.Tensor],
                    account: bool = False) -> tuple[BatchStats, StepAccount | None]:
        """Old log-probs and entropy statistics, one forward per minibatch, before any update.

        `minibatches` are the first epoch's row indices, so the first one's forward - taken with its
        graph - is the first update's forward too: no duplicated pass. With `account`, the same
        forwards also give grad_theta Hbar (one backward) and keep the old logits and parameters.
        """
        cfg, T = self.cfg, roll.completion_ids.shape[1]
        ids, am, mask = roll.input_ids, roll.attention_mask, roll.completion_mask
        B, n_valid = ids.shape[0], max(int(mask.sum()), 1)
        out = {k: torch.empty(B, T, device=ids.device) for k in ("logp", "entropy", "disc", "baseline", "ref")}
        old_logits = None
        self._first = None
        for i, rows in enumerate(minibatches):
            with torch.set_grad_enabled(account or i == 0):
                logits = completion_logits(self.model, ids[rows], am[rows], T)  # (b, T, V)
            st = theory.token_stats(logits.detach(), roll.completion_ids[rows], cfg.temperature)
            for k in ("logp", "entropy", "disc", "baseline"):
                out[k][rows] = getattr(st, k)
            if account:  # grad of Hbar = mean entropy over the batch's valid tokens
                h_part = (theory.token_entropy(logits, cfg.temperature) * mask[rows]).sum() / n_valid
                self.accelerator.backward(h_part, retain_graph=i == 0)
                if old_logits is None:
                    old_logits = torch.empty(B, T, logits.shape[-1], device=ids.device)
                old_logits[rows] = logits.detach().float()
            if i == 0:
                self._first = (rows, logits)
            if self.ref is not None:
                with torch.no_grad():
                    ref_logits = completion_logits(self.ref, ids[rows], am[rows], T)
                out["ref"][rows] = theory.token_logp(ref_logits, roll.completion_ids[rows], cfg.temperature)
        stats = BatchStats(out["logp"], out["entropy"], out["disc"], out["baseline"],
                           out["ref"] if self.ref is not None else None)
        if not account:
            return stats, None
        params = list(self.model.parameters())
        grad_h = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in params]
        self.opt.zero_grad(set_to_none=True)
        acct = StepAccount(params=[p.detach().clone() for p in params], grad_h=grad_h,
                           logits=old_logits, h_old=float(stats.entropy[mask.bool()].mean()),
                           n_valid=n_valid)
        return stats, acct

    @torch.no_grad()
    def entropy_after(self, roll: Rollout) -> tuple[torch.Tensor, float]:
        """Logits (B, T, V) and Hbar after the step's updates, on the same tokens."""
        cfg, T = self.cfg, roll.completion_ids.shape[1]
        ids, am, mask = roll.input_ids, roll.attention_mask, roll.completion_mask
        logits = torch.cat([completion_logits(self.model, ids[s:s + cfg.minibatch_size],
                                              am[s:s + cfg.minibatch_size], T)
                            for s in range(0, ids.shape[0], cfg.minibatch_size)])
        ent = theory.token_stats(logits, roll.completion_ids, cfg.temperature).entropy
        return logits, float(ent[mask.bool()].mean())

    def update(self, step: int, roll: Rollout, stats: BatchStats, adv_tok: torch.Tensor,
               loss_mask: torch.Tensor, epochs: list[list[torch.Tensor]],
               account: StepAccount | None = None) -> dict[str, float]:
        """One optimizer update per minibatch of `epochs`; returns update metrics averaged over them."""
        cfg, T = self.cfg, roll.completion_ids.shape[1]
        ids, am, mask = roll.input_ids, roll.attention_mask, roll.completion_mask
        acc: dict[str, float] = {}
        n_updates = skipped = 0
        self.model.train()
        for minibatches in epochs:
            for rows in minibatches:
                if self._first is not None and self._first[0] is rows:
                    logits = self._first[1]  # the stats pass's forward, graph kept, same parameters
                else:
                    logits = completion_logits(self.model, ids[rows], am[rows], T)  # (b, T, V)
                self._first = None
                logp = theory.token_logp(logits, roll.completion_ids[rows], cfg.temperature)
                m = loss_mask[rows]
                bonus = self.entropy_coef > 0 or cfg.entropy_target is not None
                ent = theory.token_entropy(logits, cfg.temperature) if bonus or cfg.entropy_control == "steer" else None
                terms = objective.token_terms(cfg, logp, stats.old_logp[rows], adv_tok[rows],
                                              None if stats.ref_logp is None else stats.ref_logp[rows],
                                              None if ent is None else ent.detach(), m)
                loss = losses.aggregate(terms.loss, m, cfg.loss_agg, cfg.agg_constant)
                if self.entropy_coef > 0:
                    loss = loss - baselines.entropy_bonus_term(ent, m, self.entropy_coef, cfg.loss_agg,
                                                               cfg.agg_constant)
                self.accelerator.backward(loss)
                clip_to = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
                grad_norm = self.accelerator.clip_grad_norm_(self.model.parameters(), clip_to)
                if not (math.isfinite(loss.item()) and math.isfinite(float(grad_norm))):
                    # Skip the update (parameters and optimizer state untouched), count it.
                    self.opt.zero_grad(set_to_none=True)
                    self.nonfinite_total += 1
                    self.nonfinite_streak += 1
                    skipped += 1
                    if self.nonfinite_streak >= cfg.max_nonfinite:
                        raise NonFiniteStop(step)
                    continue
                self.nonfinite_streak = 0
                if account is not None:
                    t_acc = time.perf_counter()
                    w = loss_weights(m, cfg.loss_agg, cfg.agg_constant)
                    account.add_update(rows, logits, roll.completion_ids[rows], adv_tok[rows], terms.ratio,
                                       terms.zero_grad, m, w if terms.weights is None else w * terms.weights,
                                       self.sched.get_last_lr()[0], cfg.temperature)
                    self.accounting_s += time.perf_counter() - t_acc
                self.opt.step()
                self.sched.step()
                self.opt.zero_grad(set_to_none=True)
                valid = mask[rows].bool()
                n_valid = max(int(valid.sum()), 1)
                row = {"loss/total": loss.item(),
                       "loss/policy": losses.aggregate(terms.surrogate.detach(), m, cfg.loss_agg,
                                                       cfg.agg_constant).item(),
                       "kl/ref": float((terms.kl.detach() * valid).sum()) / n_valid,
                       "grad/norm": float(grad_norm), **terms.stats}
                for k, v in row.items():
                    acc[k] = acc.get(k, 0.0) + v
                n_updates += 1
        out = {k: v / max(n_updates, 1) for k, v in acc.items()}  # over the updates taken
        out["train/updates"] = n_updates
        out["train/skipped_updates"] = skipped
        out["train/nonfinite_total"] = self.nonfinite_total
        out["lr"] = self.sched.get_last_lr()[0]
        return out

    def minibatch_plan(self, step: int, n_rows: int, device) -> list[list[torch.Tensor]]:
        """Row indices of every minibatch of every epoch, shuffled per epoch from (seed, step)."""
        gen = torch.Generator().manual_seed(derive_seed(self.cfg.seed, "minibatch", step))
        return [list(torch.randperm(n_rows, generator=gen).to(device).split(self.cfg.minibatch_size))
                for _ in range(self.cfg.epochs)]

    def step(self, step: int) -> dict[str, float]:
        cfg = self.cfg
        t0 = time.perf_counter()
        roll, rewards, correct = self.rollout(step)
        t_roll = time.perf_counter() - t0
        device = roll.completion_ids.device
        adv = losses.group_advantages(rewards, cfg.group_size, cfg.scale_std).to(device)  # (B,)
        mask = roll.completion_mask  # (B, T)
        adv_tok = adv[:, None].expand_as(mask).float()  # (B, T)
        account_now = cfg.entropy_accounting and step % cfg.accounting_every == 0
        self.accounting_s = 0.0
        t_stats = time.perf_counter()
        epochs = self.minibatch_plan(step, roll.completion_ids.shape[0], device)
        stats, account = self.batch_stats(roll, epochs[0], account=account_now)
        t_stats = time.perf_counter() - t_stats
        gen = torch.Generator().manual_seed(derive_seed(cfg.seed, "filter", step))
        keep, filt = objective.batch_filter(cfg, self.accelerator, stats, adv_tok, mask, gen)
        # A filtered token leaves the loss entirely: its term and its share of the normalizer.
        loss_mask = mask * keep
        upd = self.update(step, roll, stats, adv_tok, loss_mask, epochs, account)
        acct: dict[str, float] = {}
        if account is not None:
            t_acc = time.perf_counter()
            new_logits, h_new = self.entropy_after(roll)
            acct = account.finish(new_logits, h_new, [p.detach() for p in self.model.parameters()],
                                  stats, adv_tok, mask, cfg.temperature)
            self.accounting_s += time.perf_counter() - t_acc
            acct["perf/stats_pass_s"] = t_stats
            acct["perf/accounting_s"] = self.accounting_s
        if cfg.entropy_target is not None:  # adaptive bonus: move toward the target entropy
            h = float(stats.entropy[mask.bool()].mean())
            self.entropy_coef = baselines.adapt_entropy_coef(self.entropy_coef, h, cfg.entropy_target,
                                                             cfg.entropy_coef_delta, 0.0, cfg.entropy_coef_max)
        if self.entropy_coef > 0 or cfg.entropy_target is not None:
            acct["entropy/bonus_coef"] = self.entropy_coef
        elapsed = time.perf_counter() - t0
        metrics = {"step": step, **_rollout_metrics(cfg, rewards, correct, stats, mask), **filt, **upd, **acct,
                   "perf/rollout_s": t_roll, "perf/update_s": elapsed - t_roll, "perf/step_s": elapsed,
                   "perf/tokens_per_s": roll.n_tokens / max(elapsed, 1e-9)}
        if self.accelerator.is_main_process and self.run_dir is not None:
            self.run_dir.append("metrics.jsonl", metrics)
            for i in range(min(cfg.samples_per_step, len(roll.prompts))):
                self.run_dir.append("samples.jsonl", {
                    "step": step, "prompt": roll.prompts[i], "completion": roll.completions[i],
                    "reward": float(rewards[i]), "advantage": float(adv[i])})
        return metrics

    # ---- evaluation and checkpoints ----------------------------------------------------------
    def evaluate(self, step: int) -> dict[str, float]:
        from entclip.evaluation import evaluate

        cfg = self.cfg
        torch.manual_seed(derive_seed(cfg.seed, "eval", step))
        self.policy.eval()
        res = evaluate(self.policy, self.tokenizer, self.task.test[:cfg.eval_n], self.task.verify,
                       cfg.eval_k, cfg.eval_temperature, cfg.max_new_tokens)
        row = {"step": step, **{f"test/{k}": v for k, v in res.items()}}
        if self.accelerator.is_main_process:
            self.run_dir.append("eval.jsonl", row)
        return row

    def save(self, step: int, wall_s: float) -> Path:
        """A complete checkpoint: weights, tokenizer and everything an exact resume needs."""
        final = self.run_dir.checkpoint_dir(step)
        if self.accelerator.is_main_process:
            state = {"format": 1, "step": step, "wall_s": wall_s, "optimizer": self.opt.state_dict(),
                     "scheduler": self.sched.state_dict(), "rng": _rng_state(),
                     "nonfinite_total": self.nonfinite_total, "warm_start": self.warm_start,
                     "entropy_coef": self.entropy_coef}
            save_checkpoint(final, self.policy, self.tokenizer, state, self.cfg.keep_checkpoints)
        self.accelerator.wait_for_everyone()
        return final

    def restore(self, ckpt: Path) -> dict[str, Any]:
        """Optimizer, scheduler, RNG and counters from a checkpoint (weights were loaded already).

        The data position needs no state: each step's prompts and samples derive from (seed, step).
        """
        state = load_trainer_state(ckpt)
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        self.nonfinite_total = state["nonfinite_total"]
        self.entropy_coef = state["entropy_coef"]
        self.warm_start = state["warm_start"]
        return state


def _disable_dropout(model) -> None:
    """No dropout in RL: old and new log-probs must come from the same function (as TRL does)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


class NonFiniteStop(Exception):
    """Too many non-finite updates in a row; carries the step it happened in."""

    def __init__(self, step: int):
        super().__init__(step)
        self.step = step


def _rng_state() -> dict[str, Any]:
    """Every RNG a user's code might draw from; stored in weights_only-loadable types."""
    import numpy as np

    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate(),
                             "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _lr_factor(cfg: Config, i: int, total: int) -> float:
    if i < cfg.lr_warmup_steps:
        return (i + 1) / cfg.lr_warmup_steps
    frac = (i - cfg.lr_warmup_steps) / max(total - cfg.lr_warmup_steps, 1)
    if cfg.lr_schedule == "linear":
        return max(0.0, 1.0 - frac)
    if cfg.lr_schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(frac, 1.0)))
    return 1.0


def _rollout_metrics(cfg: Config, rewards: torch.Tensor, correct: list[bool], stats: BatchStats,
                     mask: torch.Tensor) -> dict[str, float]:
    valid = mask.bool()
    dev = (stats.disc - stats.baseline)[valid]
    groups = rewards.view(-1, cfg.group_size)
    lengths = mask.sum(dim=1).float()
    return {"reward/mean": float(rewards.mean()), "reward/std": float(rewards.std()),
            "reward/accuracy": sum(correct) / len(correct),
            "reward/zero_var_frac": float((groups.std(dim=1) < 1e-8).float().mean()),
            "entropy/mean": float(stats.entropy[valid].mean()),
            "disc/mean": float(stats.disc[valid].mean()), "disc/std": float(stats.disc[valid].std(correction=0)),
            "disc/baseline_mean": float(stats.baseline[valid].mean()),
            "disc/dev_mean": float(dev.mean()), "disc/dev_std": float(dev.std(correction=0)),
            "length/mean": float(lengths.mean()), "length/max": float(lengths.max())}


def train(cfg: Config, run: RunDir, log: Log = print, on_step: OnStep = lambda s, m: None,
          resume_from: Path | None = None) -> dict[str, Any]:
    """Run GRPO per `cfg` into `run` (or continue it from checkpoint `resume_from`); return the summary.

    Ctrl-C stops after the current step with a checkpoint (EntclipError, exit 130); too many
    non-finite updates in a row stop with a checkpoint of the last good parameters (exit 1).
    """
    import signal

    trainer = Trainer(cfg, run, log, on_step, model_path=str(resume_from) if resume_from else None,
                      resume=resume_from is not None)
    t_start, wall_before, start = time.perf_counter(), 0.0, 1
    if resume_from is not None:
        state = trainer.restore(resume_from)
        start, wall_before = state["step"] + 1, state["wall_s"]
        log(f"resuming {run.path} after step {state['step']}")
    else:
        trainer.evaluate(0)
    elapsed = lambda: wall_before + time.perf_counter() - t_start  # noqa: E731

    def request_stop(signum, frame):
        if trainer.stop_requested:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        trainer.stop_requested = True
        log("Ctrl-C: stopping after this step (press again to abort at once)")

    previous = signal.signal(signal.SIGINT, request_stop) if _main_thread() else None
    step = start - 1
    try:
        for step in range(start, cfg.steps + 1):
            metrics = trainer.step(step)
            if cfg.eval_every and step % cfg.eval_every == 0 and step != cfg.steps:
                trainer.evaluate(step)
            if cfg.save_every and step % cfg.save_every == 0 and step != cfg.steps:
                trainer.save(step, elapsed())
            on_step(step, metrics)
            if trainer.stop_requested and step != cfg.steps:
                ckpt = trainer.save(step, elapsed())
                _finish(trainer, run, "interrupted", step, elapsed(), ckpt)
                raise EntclipError(f"interrupted after step {step}; checkpoint {ckpt} written; continue with: "
                                   f"entclip train --resume {run.path}", INTERRUPTED)
    except NonFiniteStop as stop:
        ckpt = trainer.save(stop.step - 1, elapsed()) if stop.step > 1 else None
        _finish(trainer, run, "failed", stop.step - 1, elapsed(), ckpt)
        raise EntclipError(f"stopped at step {stop.step}: {cfg.max_nonfinite} non-finite updates in a row "
                           f"(loss or gradient); last good parameters in {ckpt or 'the warm start'}; "
                           "lower lr or raise max_grad_norm clipping", FAILED) from None
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    trainer.evaluate(cfg.steps)
    ckpt = trainer.save(cfg.steps, elapsed())
    return _finish(trainer, run, "completed", cfg.steps, elapsed(), ckpt)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _finish(trainer: Trainer, run: RunDir, status: str, step: int, wall_s: float,
            ckpt: Path | None) -> dict[str, Any]:
    """summary.json from the run directory's own files, so a resumed run summarizes all its steps."""
    import accelerate
    import transformers

    from entclip import __version__
    from entclip.rundir import load_run

    run.close()
    loaded = load_run(run.path)
    rows, evals = loaded.metrics, loaded.evals
    entropies = [r["entropy/mean"] for r in rows if r.get("entropy/mean") is not None]
    keys = ["reward/mean", "reward/accuracy", "entropy/mean", "clip/filter_frac", "disc/min_z_b",
            "disc/min_z_v", "train/nonfinite_total"]
    last = rows[-1] if rows else {}
    summary = {
        "status": status, "steps": step, "steps_planned": trainer.cfg.steps, "wall_s": wall_s,
        "method": trainer.cfg.entropy_control, "warm_start": trainer.warm_start,
        "final": {k: last.get(k) for k in keys},
        "entropy": {"first": entropies[0], "last": entropies[-1], "min": min(entropies)} if entropies else None,
        "eval_first": evals[0] if evals else None, "eval_last": evals[-1] if evals else None,
        "checkpoint": str(ckpt.relative_to(run.path)) if ckpt else None,
        "versions": {"entclip": __version__, "torch": torch.__version__,
                     "transformers": transformers.__version__, "accelerate": accelerate.__version__},
    }
    if trainer.accelerator.is_main_process:
        run.write_summary(summary)
    return summary
