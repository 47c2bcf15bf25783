"""One training step of GRPO: rollout -> reward -> advantages -> token filter -> updates -> log.

`Trainer.step(i)` = one rollout batch (prompts_per_step x group_size sequences, split over the
processes) and its `epochs x minibatches` optimizer updates; it appends the step's row to
metrics.jsonl (and samples.jsonl, filter.jsonl) and returns it. Everything computed once per rollout
batch - old log-probs, token statistics, a rollout-scope filter's keep-mask - is taken before the
first update; micro-batch-scope filters (high_entropy, clip_cov) select inside each update.
accelerate owns the device, the wrapped model/optimizer and the backward pass; figures over all
processes come from parallel.py; the run around the steps is loop.train.

Deliberate simplifications (stated, not hidden): no gradient accumulation (one backward per
optimizer update); the learning-rate schedule is stepped by us per optimizer update, per process.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import random
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from entclip.core import losses, methods, theory
from entclip.training import objective, parallel
from entclip.training.accounting import ACCOUNT_LOGITS_MAX, StepAccount, loss_weights
from entclip.contracts.config import Config
from entclip.contracts.errors import EntclipError
from entclip.data.libraries import quiet_libraries
from entclip.data.models import add_lora, is_adapter, load_adapter, load_folder, load_policy
from entclip.training.rollout import HFSampler, Rollout, Sampler, completion_logits
from entclip.contracts.rundir import RunDir

Log = Callable[[str], None]
OnStep = Callable[[int, dict[str, float]], None]
# Receives the run's default sampler (HFSampler over the live policy) and returns the one the run uses:
# a wrapper that post-processes rollouts (tests build batches with guaranteed properties), or a backend.
WrapSampler = Callable[[Sampler], Sampler]


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
    """Holds the objects of one run and takes its steps; loop.train runs them, saves and resumes."""

    def __init__(self, cfg: Config, run: RunDir | None, log: Log, on_step: OnStep = lambda s, m: None,
                 model_path: str | None = None, resume: bool = False, wrap_sampler: WrapSampler | None = None):
        """`model_path`: a model to start from instead of cfg.model (a checkpoint, a folder or an id);
        with `resume` it is the run's checkpoint and the KL reference stays the run's own start.
        `wrap_sampler(sampler) -> Sampler`: given the default HFSampler, returns the sampler every
        rollout and evaluation of the run uses (its `sync_weights` is called after each step)."""
        from accelerate import Accelerator

        from entclip.training.plan import resolve_precision
        from entclip.data.rewards import RewardRunner

        self.cfg, self.run_dir, self.log, self.on_step = cfg, run, log, on_step
        quiet_libraries()
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        if cfg.device == "cuda" and not torch.cuda.is_available():
            raise EntclipError("device=cuda but no CUDA device is visible; use --set device=cpu or auto")
        self.precision = resolve_precision(cfg)
        # cpu=True also when no GPU is visible: it is what makes accelerate use gloo across CPU processes.
        self.accelerator = Accelerator(cpu=cfg.device == "cpu" or not torch.cuda.is_available())
        # bf16-mixed: our own autocast around forwards. accelerate's would convert the outputs - the
        # full (b, T, V) logits - back to float32; under ours they stay bf16 and are read in chunks.
        device_type = self.accelerator.device.type
        self.autocast = ((lambda: torch.autocast(device_type, dtype=torch.bfloat16))
                         if self.precision == "bf16-mixed" else contextlib.nullcontext)
        n_proc = self.accelerator.num_processes
        if cfg.prompts_per_step % n_proc or (cfg.batch_size // n_proc) % cfg.minibatches:
            raise EntclipError(f"prompts_per_step={cfg.prompts_per_step} x group_size={cfg.group_size} does not "
                               f"split into {n_proc} processes x {cfg.minibatches} minibatches; use a multiple "
                               f"of {n_proc} prompts and a minibatches that divides each process's rows")
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)

        def load_start(lg):  # the run's starting model
            if cfg.model == "tiny":
                return load_policy(cfg, lg)
            return load_folder(cfg.model, self.precision, cfg.trust_remote_code)

        load = (lambda lg: load_folder(model_path, self.precision, cfg.trust_remote_code)) if model_path else load_start
        if model_path and is_adapter(model_path):  # a LoRA checkpoint: the run's base and its adapter
            model, self.tokenizer, self.warm_start = load_start(log)
            model = load_adapter(_for_lora(model, cfg), model_path, trainable=True)
        else:
            model, self.tokenizer, self.warm_start = load(log)
            if cfg.lora_r > 0:
                model = add_lora(_for_lora(model, cfg), cfg)
        # LoRA: the KL reference is the same model with its adapter disabled (ref_logits), no second copy.
        self.lora = is_peft(model)
        self.ref = None
        if cfg.kl_coef > 0 and not self.lora:
            ref = (load_start if resume else load)(lambda s: None)[0]
            if self.precision != "fp32":  # inference only: bf16 weights suffice
                ref = ref.to(torch.bfloat16)
            self.ref = ref.to(self.accelerator.device).eval()
            self.ref.requires_grad_(False)
        self._load_task()
        from entclip.data.tasks import builtin_reward

        verifier = "math" if cfg.dataset else builtin_reward(cfg)
        self.rewards = RewardRunner(cfg.reward, default=verifier, verifier=verifier, timeout=cfg.reward_timeout)
        _disable_dropout(model)
        if cfg.gradient_checkpointing:
            base = model.get_base_model() if self.lora else model
            if hasattr(base, "activation_checkpointing_enable"):  # the name since transformers 5.x
                base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            base.config.use_cache = False  # generate passes use_cache itself
        # Fused AdamW on CUDA: one kernel, no parameter-sized temporaries (memory.py counts on it).
        fused = self.accelerator.device.type == "cuda"
        if fused:
            model.to(self.accelerator.device)
        # Only what is trained (with LoRA: the adapters) gets AdamW moments.
        opt = torch.optim.AdamW(trainable(model), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                **({"fused": True} if fused else {}))
        self.model, self.opt = self.accelerator.prepare(model, opt)
        sampler = HFSampler(lambda: self.policy, self.tokenizer, self.add_special_tokens, self.autocast,
                            cfg.generation_batch_size)
        self.sampler = sampler if wrap_sampler is None else wrap_sampler(sampler)
        total = cfg.steps * cfg.epochs * cfg.minibatches
        self.accounting_s = 0.0  # time the current step spent on entropy accounting
        self.nonfinite_total = 0  # updates skipped for a non-finite loss or gradient, whole run
        self.nonfinite_streak = 0  # ... in a row, up to now
        self.stop_requested = False  # set by Ctrl-C: stop after the current step
        self.entropy_coef = cfg.entropy_coef  # adapted per optimizer update when entropy_target is set
        self.last_entropy = math.inf  # the adaptive bonus's last measured entropy (none yet: not applied)
        self._first = None  # (rows, logits with graph) of the stats pass's first micro-batch
        self.reward_metrics: dict[str, float] = {}
        self._reward_error_logged = False
        self.row_ids: list[tuple[int, int]] = []
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda i: _lr_factor(cfg, i, total))

    def _load_task(self) -> None:
        """Training problems, evaluation sets and how prompts are tokenized, for either task kind."""
        cfg = self.cfg
        if cfg.dataset:
            from entclip.data.tasks.dataset import load_dataset_task

            task = load_dataset_task(cfg, self.tokenizer)
            self.train_problems, self.eval_sets = task.train, task.eval_sets
            self.add_special_tokens = task.add_special_tokens
            dropped = {k: v for k, v in task.skipped.items() if v}
            self.log(f"dataset {cfg.dataset}: {len(task.train)} training prompts"
                     + (f", skipped {dropped}" if dropped else "")
                     + "".join(f"; eval {name}: {len(p)}" for name, p in task.eval_sets.items()))
        else:
            from entclip.data.tasks import builtin_task

            task = builtin_task(cfg)
            self.train_problems, self.eval_sets = task.train, {"test": task.test[:cfg.eval_n]}
            self.add_special_tokens = True
        if len(self.train_problems) < self.cfg.prompts_per_step:
            raise EntclipError(f"{len(self.train_problems)} training prompts, fewer than prompts_per_step="
                               f"{cfg.prompts_per_step}; lower prompts_per_step or give more data")

    @property
    def policy(self):
        return self.accelerator.unwrap_model(self.model)

    # ---- one step ----------------------------------------------------------------------
    def rollout(self, step: int) -> tuple[Rollout, torch.Tensor, list[bool]]:
        """This process's share of the step's prompts, G samples each, scored.

        The step's prompts are drawn from (seed, step) and split evenly over the processes; each
        sample's noise comes from (seed, step, prompt, sample), so one process and N processes
        draw the same completions for the same prompts.
        """
        cfg = self.cfg
        n_proc, rank = self.accelerator.num_processes, self.accelerator.process_index
        rng = random.Random(derive_seed(cfg.seed, "prompts", step))
        chosen = rng.sample(range(len(self.train_problems)), cfg.prompts_per_step)
        per = cfg.prompts_per_step // n_proc
        mine = chosen[rank * per:(rank + 1) * per]
        seeds = [derive_seed(cfg.seed, "sample", step, i, j) for i in mine for j in range(cfg.group_size)]
        self.row_ids = [(i, j) for i in mine for j in range(cfg.group_size)]  # (problem, sample) per row
        return self.rollout_problems([self.train_problems[i] for i in mine], seeds)

    def rollout_problems(self, problems: list, seeds: list[int] | None = None
                         ) -> tuple[Rollout, torch.Tensor, list[bool]]:
        """G samples for each problem (objects with .prompt and .answer), scored by the rewards."""
        cfg = self.cfg
        self.policy.eval()
        roll = self.sampler.sample([p.prompt for p in problems], cfg.group_size, cfg.temperature,
                                   cfg.max_new_tokens, seeds)
        answers = [p.answer for p in problems for _ in range(cfg.group_size)]
        scored = self.rewards.score(roll.completions, answers, roll.prompts)
        self.reward_metrics = scored.metrics()
        if scored.first_error and not self._reward_error_logged:  # counted every step, shown once
            self._reward_error_logged = True
            self.log(f"a reward call failed and scored 0 (reward/errors counts them): {scored.first_error}")
        return roll, torch.tensor(scored.total, dtype=torch.float32), scored.correct

    def batch_stats(self, roll: Rollout, minibatches: list[list[torch.Tensor]],
                    account: bool = False) -> tuple[BatchStats, StepAccount | None]:
        """Old log-probs and entropy statistics, one forward per micro-batch, before any update.

        `minibatches` are the first epoch's row indices, so the first micro-batch's forward - taken
        with its graph - is the first update's forward too: no duplicated pass. With `account`, the
        same forwards also give grad_theta Hbar (one backward each) and keep the old logits and
        parameters. Hbar is the mean over the valid tokens of all processes.
        """
        cfg, T = self.cfg, roll.completion_ids.shape[1]
        ids, am, mask = roll.input_ids, roll.attention_mask, roll.completion_mask
        B = ids.shape[0]
        n_proc = self.accelerator.num_processes
        n_valid = max(parallel.global_sum(self.accelerator, mask.sum()), 1.0)
        out = {k: torch.empty(B, T, device=ids.device) for k in ("logp", "entropy", "disc", "baseline", "ref")}
        old_logits = None
        keep_logits = None  # decided on the first logits: their width is the model's vocabulary
        self._first = None
        # Reusing the first forward for the first update needs a second backward through the same
        # DDP forward when accounting: not allowed, so with N > 1 processes accounting forgoes it.
        reuse = not (account and n_proc > 1)
        micro = [m for minibatch in minibatches for m in minibatch]
        # Training mode: activation checkpointing only works there (dropout is off, so the function
        # is the same as in eval mode), and the first forward's graph serves the first update.
        self.model.train()
        for i, rows in enumerate(micro):
            with torch.set_grad_enabled(account or (i == 0 and reuse)):
                with self.autocast():
                    logits = completion_logits(self.model, ids[rows], am[rows], T)  # (b, T, V)
            st = theory.token_stats(logits.detach(), roll.completion_ids[rows], cfg.temperature)
            for k in ("logp", "entropy", "disc", "baseline"):
                out[k][rows] = getattr(st, k)
            if account:  # grad of Hbar = mean entropy over the batch's valid tokens (DDP averages: x N)
                h_part = (theory.token_entropy(logits, cfg.temperature) * mask[rows]).sum() * n_proc / n_valid
                self.accelerator.backward(h_part, retain_graph=i == 0 and reuse)
                if keep_logits is None:  # the same decision on every process (their T differ)
                    keep_logits = parallel.global_max(self.accelerator, B * T * logits.shape[-1]) <= ACCOUNT_LOGITS_MAX
                if keep_logits:
                    if old_logits is None:
                        old_logits = torch.empty(B, T, logits.shape[-1], dtype=logits.dtype, device=ids.device)
                    old_logits[rows] = logits.detach()
            if i == 0 and reuse:
                self._first = (rows, logits)
            if cfg.kl_coef > 0:
                ref_logits = self.ref_logits(ids[rows], am[rows], T)
                out["ref"][rows] = theory.token_logp(ref_logits, roll.completion_ids[rows], cfg.temperature)
        stats = BatchStats(out["logp"], out["entropy"], out["disc"], out["baseline"],
                           out["ref"] if cfg.kl_coef > 0 else None)
        if not account:
            return stats, None
        params = trainable(self.model)  # with LoRA: the adapters only (the rest never moves)
        grad_h = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in params]
        self.opt.zero_grad(set_to_none=True)
        h_sum = parallel.global_sum(self.accelerator, float((stats.entropy * mask).sum()))
        acct = StepAccount(params=[p.detach().clone() for p in params], grad_h=grad_h,
                           logits=old_logits, h_old=h_sum / n_valid, n_valid=n_valid, shape=(B, T),
                           per_update=cfg.accounting_unit == "update")
        return stats, acct

    def entropy_grad(self, roll: Rollout, micro: list[torch.Tensor], keep_logits: bool
                     ) -> tuple[float, torch.Tensor | None]:
        """Hbar (all processes) at the current parameters, with grad_theta Hbar left in .grad: one forward
        and backward per micro-batch of `micro` (this process's rows). Also the logits (B, T, V) if asked.
        The per-update accounting's pass: it measures Hbar(theta_u+1) and gives g_u+1 at once."""
        cfg, T = self.cfg, roll.completion_ids.shape[1]
        ids, am, mask = roll.input_ids, roll.attention_mask, roll.completion_mask
        n_proc = self.accelerator.num_processes
        n_valid = max(parallel.global_sum(self.accelerator, mask.sum()), 1.0)
        self.model.train()  # as the stats pass: the same function, checkpointing allowed
        h_sum, kept = 0.0, None
        for rows in micro:
            with self.autocast():
                logits = completion_logits(self.model, ids[rows], am[rows], T)  # (b, T, V)
            # token_stats, as for Hbar before the step: "measured" is a difference of one computation
            ent = theory.token_stats(logits.detach(), roll.completion_ids[rows], cfg.temperature).entropy
            h_sum += float((ent * mask[rows]).sum())
            h_part = (theory.token_entropy(logits, cfg.temperature) * mask[rows]).sum() * n_proc / n_valid
            self.accelerator.backward(h_part)  # DDP averages: x N
            if keep_logits:
                if kept is None:
                    kept = torch.empty(ids.shape[0], T, logits.shape[-1], dtype=logits.dtype, device=ids.device)
                kept[rows] = logits.detach()
        return parallel.global_sum(self.accelerator, h_sum) / n_valid, kept

    def account_end(self, roll: Rollout, account: StepAccount) -> tuple[torch.Tensor | None, float]:
        """Logits (or None) and Hbar after the step's updates: per update, those of the last record;
        per step, one forward over the batch (entropy_after)."""
        if account.per_update:
            return account.last_logits, account.h_u
        return self.entropy_after(roll, keep_logits=account.logits is not None)

    @torch.no_grad()
    def ref_logits(self, ids: torch.Tensor, am: torch.Tensor, T: int) -> torch.Tensor:
        """(b, T, V) logits of the KL reference: the frozen start model, or with LoRA the policy with its
        adapter disabled (the base weights never train, so it is the start model too)."""
        with self.policy.disable_adapter() if self.lora else contextlib.nullcontext():
            with self.autocast():
                return completion_logits(self.policy if self.lora else self.ref, ids, am, T)

    @torch.no_grad()
    def entropy_after(self, roll: Rollout, keep_logits: bool = True) -> tuple[torch.Tensor | None, float]:
        """Logits (B, T, V) (None without `keep_logits`) and Hbar (all processes) after the step's
        updates, on the same tokens."""
        cfg, T = self.cfg, roll.completion_ids.shape[1]
        ids, am, mask = roll.input_ids, roll.attention_mask, roll.completion_mask
        size = cfg.micro_batch_size or max(ids.shape[0] // cfg.minibatches, 1)  # as in the updates
        parts, h_sum = [], 0.0
        for s in range(0, ids.shape[0], size):
            with self.autocast():
                logits = completion_logits(self.model, ids[s:s + size], am[s:s + size], T)
            # token_stats, as for Hbar before the step: "measured" is a difference of one computation
            ent = theory.token_stats(logits, roll.completion_ids[s:s + size], cfg.temperature).entropy
            h_sum += float((ent * mask[s:s + size]).sum())
            if keep_logits:
                parts.append(logits)
        n_valid = max(parallel.global_sum(self.accelerator, mask.sum()), 1.0)
        return (torch.cat(parts) if keep_logits else None), parallel.global_sum(self.accelerator, h_sum) / n_valid

    def update(self, step: int, roll: Rollout, stats: BatchStats, adv_tok: torch.Tensor,
               keep: torch.Tensor, epochs: list[list[torch.Tensor]],
               account: StepAccount | None = None) -> dict[str, float]:
        """One optimizer update per minibatch of `epochs`; returns update metrics averaged over them.

        `keep` (B, T): the rollout-scope filter's keep-mask (every valid token when the method selects
        per micro-batch, objective.micro_filter). A minibatch is this process's rows of it on every
        process; its loss is aggregated over all of them (micro-batches and processes), so gradients
        equal one process's on the whole batch.
        """
        cfg, T = self.cfg, roll.completion_ids.shape[1]
        ids, am, mask = roll.input_ids, roll.attention_mask, roll.completion_mask
        n_proc, rank = self.accelerator.num_processes, self.accelerator.process_index
        norm_all = objective.loss_masks(cfg, mask, keep)[0]  # (B, T) the normalizer's tokens
        acc: dict[str, float] = {}
        n_updates = skipped = 0
        self.model.train()
        micro_scope = cfg.scope == "micro"
        upd_keep = keep.clone()  # micro scope: the current update's selections, row by row
        for e, minibatches in enumerate(epochs):
            for i, micro in enumerate(minibatches):
                # The aggregate's denominator over the whole minibatch (all micro-batches, processes).
                local = sum(float(norm_all[m].sum()) if cfg.loss_agg == "token-mean" else float(len(m))
                            for m in micro)
                denom = max(parallel.global_sum(self.accelerator, local), 1.0)
                coef = methods.bonus_coef(self.entropy_coef, self.last_entropy, cfg.entropy_target)
                row: dict[str, float] = {}
                n_tok = 0  # valid tokens (the fractions, kl/ref)
                loss_sum = policy_sum = kl_sum = 0.0
                h_sum = h_n = 0.0  # the bonus tokens' entropy, for the adaptive coefficient
                saved = account.snapshot() if account is not None else None  # undone if skipped
                for j, mrows in enumerate(micro):
                    # Non-final micro-batches accumulate locally: DDP syncs once per update, on the last.
                    sync = j == len(micro) - 1 or n_proc == 1
                    with contextlib.nullcontext() if sync else self.accelerator.no_sync(self.model):
                        if self._first is not None and self._first[0] is mrows:
                            logits = self._first[1]  # the stats pass's forward, graph kept, same parameters
                        else:
                            with self.autocast():
                                logits = completion_logits(self.model, ids[mrows], am[mrows], T)  # (b, T, V)
                        self._first = None
                        logp = theory.token_logp(logits, roll.completion_ids[mrows], cfg.temperature)
                        m, adv, old = mask[mrows], adv_tok[mrows], stats.old_logp[mrows]
                        ent = None
                        if coef > 0:  # the bonus differentiates H
                            ent = theory.token_entropy(logits, cfg.temperature)
                        elif (cfg.entropy_target is not None or cfg.entropy_control == "steer"
                              or (micro_scope and cfg.entropy_control == "high_entropy")):
                            with torch.no_grad():  # read only: no (b, T, V) graph kept alive
                                ent = theory.token_entropy(logits, cfg.temperature)
                        k = keep[mrows]
                        if micro_scope:
                            gen = torch.Generator().manual_seed(  # on the CPU: the same draw on any device
                                derive_seed(cfg.seed, cfg.entropy_control, step, e, i, j, rank))
                            k = objective.micro_filter(cfg, self.accelerator, logp, ent, old, adv, m, gen)
                            upd_keep[mrows] = k
                        norm, bonus_mask = objective.loss_masks(cfg, m, k)
                        terms = objective.token_terms(cfg, logp, old, adv,
                                                      None if stats.ref_logp is None else stats.ref_logp[mrows],
                                                      None if ent is None else ent.detach(), m, k)
                        loss = losses.aggregate(terms.loss, norm, cfg.loss_agg, cfg.agg_constant, denom)
                        if coef > 0:
                            loss = loss - methods.entropy_bonus_term(ent, bonus_mask, coef, len(micro) * n_proc)
                        if cfg.entropy_target is not None:  # the adaptive coefficient's measurement
                            h_sum += float((ent.detach() * bonus_mask).sum())
                            h_n += float(bonus_mask.sum())
                        self.accelerator.backward(loss * n_proc)  # DDP averages over processes
                    if account is not None:
                        t_acc = time.perf_counter()
                        w = loss_weights(norm, cfg.loss_agg, cfg.agg_constant, denom)
                        account.add_update(mrows, logits, roll.completion_ids[mrows], adv,
                                           terms.ratio, terms.zero_grad, m * k,
                                           w if terms.weights is None else w * terms.weights,
                                           self.sched.get_last_lr()[0], cfg.temperature)
                        self.accounting_s += time.perf_counter() - t_acc
                    n = int(m.sum())
                    loss_sum += loss.item()
                    policy_sum += losses.aggregate(torch.where(k.bool(), terms.surrogate.detach(), 0.0), norm,
                                                   cfg.loss_agg, cfg.agg_constant, denom).item()
                    kl_sum += float((terms.kl.detach() * m).sum())
                    for key, v in terms.stats.items():  # fractions of the micro-batch's valid tokens
                        row[key] = (min(row.get(key, v), v) if key.endswith("_min") else max(row.get(key, v), v)
                                    if key.endswith("_max") else row.get(key, 0.0) + v * n)
                    n_tok += n
                clip_to = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
                grad_norm = self.accelerator.clip_grad_norm_(self.model.parameters(), clip_to)
                row = {k: v if k.endswith(("_min", "_max")) else v / max(n_tok, 1) for k, v in row.items()}
                if micro_scope:  # this update's selections, over its rows
                    rows = torch.cat(micro)
                    row.update(objective.filter_stats(upd_keep[rows], mask[rows], adv_tok[rows]))
                row.update({"loss/total": loss_sum * n_proc, "loss/policy": policy_sum * n_proc,
                            "kl/ref": kl_sum / max(n_tok, 1), "grad/norm": float(grad_norm)})
                row = parallel.reduce_update(self.accelerator, row, n_tok)
                if not (math.isfinite(row["loss/total"]) and math.isfinite(float(grad_norm))):
                    # Skip the update (parameters and optimizer state untouched), count it.
                    self.opt.zero_grad(set_to_none=True)
                    if saved is not None:  # and it predicts no entropy change
                        account.restore(saved)
                    self.nonfinite_total += 1
                    self.nonfinite_streak += 1
                    skipped += 1
                    if self.nonfinite_streak >= cfg.max_nonfinite:
                        raise NonFiniteStop(step)
                    continue
                self.nonfinite_streak = 0
                self.opt.step()
                self.sched.step()
                if account is not None and account.per_update:  # this update accounted on its own
                    t_acc = time.perf_counter()
                    params = trainable(self.model)
                    account.update_taken(params, [p.grad for p in params])  # the loss gradient it used
                    self.opt.zero_grad(set_to_none=True)
                    # Not alive beside the pass's own: the last micro-batch's logits, the previous record's.
                    logits = account.last_logits = None
                    h_new, new_logits = self.entropy_grad(roll, [m for mb in epochs[0] for m in mb],
                                                          keep_logits=account.logits is not None)
                    account.record(h_new, [p.grad if p.grad is not None else torch.zeros_like(p) for p in params],
                                   params, new_logits)
                    new_logits = None
                    self.accounting_s += time.perf_counter() - t_acc
                self.opt.zero_grad(set_to_none=True)
                if cfg.entropy_target is not None:  # adaptive bonus: once per optimizer update, as TRL
                    h = parallel.global_sum(self.accelerator, h_sum) / max(parallel.global_sum(self.accelerator, h_n), 1.0)
                    self.entropy_coef = methods.adapt_entropy_coef(
                        self.entropy_coef, h, cfg.entropy_target, cfg.entropy_coef_delta, cfg.entropy_coef_min,
                        cfg.entropy_coef_max)
                    self.last_entropy = h
                for k, v in row.items():
                    acc[k] = acc.get(k, 0.0) + v
                n_updates += 1
        out = {k: v / max(n_updates, 1) for k, v in acc.items()}  # over the updates taken
        out["train/updates"] = n_updates
        out["train/skipped_updates"] = skipped
        out["train/nonfinite_total"] = self.nonfinite_total
        out["lr"] = self.sched.get_last_lr()[0]
        return out

    def minibatch_plan(self, step: int, n_rows: int, device) -> list[list[list[torch.Tensor]]]:
        """Row indices per epoch, minibatch and micro-batch, shuffled per epoch from (seed, step).

        `n_rows` are this process's rows; each minibatch takes 1/minibatches of them (the same
        minibatch index on every process forms one update) in micro-batches of at most
        micro_batch_size rows. The first epoch's tensors are the stats pass's too, so its first
        micro-batch forward is recognized and reused by the first update.
        """
        gen = torch.Generator().manual_seed(derive_seed(self.cfg.seed, "minibatch", step))
        size = max(n_rows // self.cfg.minibatches, 1)
        micro = self.cfg.micro_batch_size or size
        return [[list(rows.split(micro)) for rows in torch.randperm(n_rows, generator=gen).to(device).split(size)]
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
        if cfg.log_filter:  # every sequence of the step, its tokens and dropped positions
            rows = parallel.filter_rows(self.accelerator, step, roll.completion_ids, keep, mask, self.row_ids)
            if self.accelerator.is_main_process and self.run_dir is not None:
                for row in rows:
                    self.run_dir.append("filter.jsonl", row)
        upd = self.update(step, roll, stats, adv_tok, keep, epochs, account)
        self.sampler.sync_weights(self.policy)
        acct: dict[str, float] = {}
        if account is not None:
            t_acc = time.perf_counter()
            new_logits, h_new = self.account_end(roll, account)
            acct = account.finish(new_logits, h_new, [p.detach() for p in trainable(self.model)],
                                  stats, adv_tok, mask, cfg.temperature)
            acct = parallel.reduce_account(self.accelerator, acct, int(mask.sum()))
            self.accounting_s += time.perf_counter() - t_acc
            acct["perf/stats_pass_s"] = t_stats
            acct["perf/accounting_s"] = self.accounting_s
        rollout_metrics = parallel.rollout_metrics(self.accelerator, cfg.group_size, rewards, correct, stats, mask,
                                                   self.reward_metrics)
        if self.entropy_coef > 0 or cfg.entropy_target is not None:
            acct["entropy/bonus_coef"] = self.entropy_coef  # after the step's updates
        elapsed = time.perf_counter() - t0
        n_tokens = parallel.global_sum(self.accelerator, roll.n_tokens)
        metrics = {"step": step, **rollout_metrics, **filt, **upd, **acct,
                   "perf/rollout_s": t_roll, "perf/update_s": elapsed - t_roll, "perf/step_s": elapsed,
                   "perf/tokens_per_s": n_tokens / max(elapsed, 1e-9)}
        if self.accelerator.is_main_process and self.run_dir is not None:
            self.run_dir.append("metrics.jsonl", metrics)
            for i in range(min(cfg.samples_per_step, len(roll.prompts))):
                self.run_dir.append("samples.jsonl", {
                    "step": step, "prompt": roll.prompts[i], "completion": roll.completions[i],
                    "reward": float(rewards[i]), "advantage": float(adv[i])})
        return metrics

    # ---- evaluation --------------------------------------------------------------------
    def evaluate(self, step: int) -> dict[str, float]:
        """Every eval set: greedy accuracy, avg@k, pass@k; problems split over the processes.

        Keys are `<set>/<figure>` (the built-in task's set is `test`).
        """
        from accelerate.utils import gather_object

        from entclip.training.evaluation import eval_counts, summarize

        cfg = self.cfg
        n_proc, rank = self.accelerator.num_processes, self.accelerator.process_index
        self.policy.eval()
        verify = self.rewards.verify
        row: dict[str, float] = {"step": step}
        for name, problems in self.eval_sets.items():
            mine = list(range(rank, len(problems), n_proc))
            greedy, counts = eval_counts(
                self.sampler, [problems[i] for i in mine], verify, cfg.eval_k, cfg.eval_temperature,
                cfg.max_new_tokens, lambda i, j: derive_seed(cfg.seed, "eval", step, name, mine[i], j))
            results = list(zip(mine, greedy, counts))
            if n_proc > 1:
                results = sorted(gather_object(results))
            res = summarize([g for _, g, _ in results], [c for _, _, c in results], cfg.eval_k)
            row.update({f"{name}/{k}": v for k, v in res.items()})
        if self.accelerator.is_main_process and self.run_dir is not None:
            self.run_dir.append("eval.jsonl", row)
        return row


def trainable(model) -> list[torch.nn.Parameter]:
    """The parameters the optimizer updates: all of them, or with LoRA the adapters'."""
    return [p for p in model.parameters() if p.requires_grad]


def is_peft(model) -> bool:
    """A peft PeftModel (LoRA), told by its class's module so that peft need not be importable."""
    return type(model).__module__.split(".")[0] == "peft"


def _for_lora(model, cfg: Config):
    """A base model ready for adapters: under gradient checkpointing the frozen embedding's output must
    require grad, else no checkpointed layer would carry a gradient back to the adapters."""
    if cfg.gradient_checkpointing:
        model.enable_input_require_grads()
    return model


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


def _lr_factor(cfg: Config, i: int, total: int) -> float:
    if i < cfg.lr_warmup_steps:
        return (i + 1) / cfg.lr_warmup_steps
    frac = (i - cfg.lr_warmup_steps) / max(total - cfg.lr_warmup_steps, 1)
    if cfg.lr_schedule == "linear":
        return max(0.0, 1.0 - frac)
    if cfg.lr_schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(frac, 1.0)))
    return 1.0

