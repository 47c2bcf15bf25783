"""An entclip run directory from a TRL run: `RunDirCallback(run, cfg)`, a transformers TrainerCallback.

`trainer.add_callback(RunDirCallback(RunDir.create(path), cfg))` (or `callbacks=[...]`) makes a TRL
GRPOTrainer - entclip's `EntclipGRPOTrainer` (trl_adapter.py) or TRL's own - write the run directory
that `entclip analyze` and `entclip compare` read (contracts/rundir.py), from the main process only
(`state.is_world_process_zero`):

- config.yaml at on_train_begin, before the first step: `cfg.to_yaml()` with `steps` set to TRL's
  `max_steps` (the run's length is TRL's); `resolve(config_file=...)` reads it back. TRL's own
  arguments go beside it, as trl_args.json (`args.to_dict()`).
- metrics.jsonl: one row per TRL log (`logging_steps=1`: one per optimizer step; more: TRL's average
  over the window), `step` = TRL's global step / `updates_per_step` (engine trl: epochs x minibatches,
  with logging_steps the same, so one row per entclip step), TRL's keys under entclip's names where
  the meaning is the same (the table below), every other key under `trl/` (never dropped).
- eval.jsonl: one row per TRL evaluation (on_evaluate), TRL's `eval_X` as `trl/X` (TRL's eval reward
  is a mean reward of sampled completions, not entclip's per-set greedy_acc / avg@k / pass@k; engine
  trl runs entclip's own evaluation instead, which writes its rows itself).
- samples.jsonl and filter.jsonl, when given `samples` / `filter_rows` (engine trl: trl_engine.py and
  the adapter's log_filter rows), after each metrics row.
- summary.json at on_train_end: loop._finish's fields where they make sense, plus "engine": "trl".

TRL 1.16 (grpo_trainer.py, transformers' Trainer) key -> entclip key, where the meaning is the same:

| TRL                     | entclip              | the meaning both share                                 |
|-------------------------|----------------------|--------------------------------------------------------|
| reward                  | reward/mean          | mean reward (weighted sum of the reward functions), all processes |
| reward_std              | reward/std           | their std, Bessel-corrected (as torch.std)             |
| frac_reward_zero_std    | reward/zero_var_frac | share of groups whose rewards do not vary (1)          |
| completions/mean_length | length/mean          | tokens per completion, up to and including the first EOS |
| completions/max_length  | length/max           | the longest                                            |
| loss                    | loss/total           | the step's objective (KL and entropy bonus included)   |
| grad_norm               | grad/norm            | total gradient norm before clipping                    |
| (lr_scheduler)          | lr                   | the rate after the step's scheduler step (2)           |
| entropy_coef            | entropy/bonus_coef   | the entropy bonus's coefficient after the step         |
| entropy                 | entropy/mean         | mean token entropy of the valid tokens (3)             |
| kl                      | kl/ref               | k3 KL to the reference, mean over the valid tokens (4) |
| clip_ratio/low_mean     | clip/ratio_low_frac  | share of valid tokens with A < 0 and r < 1 - eps_low (4) |
| clip_ratio/high_mean    | clip/ratio_high_frac | share of valid tokens with A > 0 and r > 1 + eps_high (4) |
| (callback's own clock)  | perf/step_s          | the optimizer step's wall time, generation included (5) |
| the adapter's figures   | the same names       | entropy/mean, disc/*, quad/*_share, clip/filter_frac*, clip/mu, perf/stats_pass_s, perf/stats_shared (6) |

(1) Only with scale_rewards group or none and multi_objective_aggregation sum_then_normalize (TRL's
    is_std_zero is then per group); else trl/frac_reward_zero_std.
(2) transformers logs `learning_rate` before the scheduler steps (the rate the step used); entclip's
    lr is `get_last_lr()` after it, read here from the callback's lr_scheduler. TRL's: trl/learning_rate.
(3) TRL's `entropy` averages over its loss mask, which a token filter narrows to the kept tokens; the
    adapter's entropy/mean (its statistics pass, every valid token, before any update) is entclip's.
    TRL's `entropy` fills entropy/mean only without a filter and when the adapter gave none (TRL's
    plain GRPOTrainer); it is always also trl/entropy.
(4) Over TRL's loss mask: the valid tokens only when no token filter drops any (cfg.method not a
    filter); under a filter trl/kl, trl/clip_ratio/*. (entclip counts a dropped token's clipping
    with its own advantage, TRL not at all.)
(5) on_step_begin to on_step_end; TRL's `step_time` leaves out the optimizer step: trl/step_time.
(6) EntclipGRPOTrainer appends its figures to TRL's metrics, so TRL's logs (and its trackers) carry
    them under entclip's names; they pass through unchanged.

TRL averages each of its figures over the micro-batches of a log window (not weighted by tokens), so
with several micro-batches per step the shares and means above are near, not equal, to a
token-weighted mean. The adapter's figures come once per generation batch: with
steps_per_generation > 1 and logging_steps = 1 only the rows of the steps that generated carry them.
reward/accuracy and reward/*_mean come from entclip's reward function (trl_engine.EntclipReward, TRL's
log_metric); a TRL reward of one's own has none. Not written on this path: the entropy accounting and
the quadrants' predicted changes (their shares are the adapter's), entclip checkpoints (TRL's own
checkpoints stay in its output_dir).
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from typing import Any, Callable

from transformers import TrainerCallback

from entclip.contracts.config import Config
from entclip.contracts.rundir import CONFIG, EVAL, METRICS, SAMPLES, RunDir, write_atomic
from entclip.core import registry
from entclip.training.loop import library_versions, run_figures

TRL_ARGS = "trl_args.json"
FILTER = "filter.jsonl"
PREFIX = "trl/"
# TRL's key -> entclip's, where the meaning is the same whatever the run's method.
SAME = {"reward": "reward/mean", "reward_std": "reward/std", "completions/mean_length": "length/mean",
        "completions/max_length": "length/max", "loss": "loss/total", "grad_norm": "grad/norm",
        "entropy_coef": "entropy/bonus_coef"}
# Means over TRL's loss mask: entclip's meaning (all valid tokens) only when no token filter drops any.
LOSS_MASK = {"kl": "kl/ref", "clip_ratio/low_mean": "clip/ratio_low_frac",
             "clip_ratio/high_mean": "clip/ratio_high_frac"}
# The end-of-training log of transformers' Trainer (train_runtime, ...): the summary's, not a step's row.
TRAIN_END = "train_runtime"


def entclip_row(logs: dict[str, Any], *, filtered: bool, group_zero_std: bool) -> dict[str, Any]:
    """One TRL log as entclip's metric names (the table of the module docstring), step not included.

    filtered: a token filter drops tokens from TRL's loss mask (entclip's cfg.method is a filter);
    group_zero_std: TRL's frac_reward_zero_std is the share of zero-variance groups (scale_rewards
    group or none, multi_objective_aggregation sum_then_normalize)."""
    out: dict[str, Any] = {}
    trl: dict[str, Any] = {}
    for key, value in logs.items():
        if key in SAME:
            out[SAME[key]] = value
        elif key in LOSS_MASK and not filtered:
            out[LOSS_MASK[key]] = value
        elif key == "frac_reward_zero_std" and group_zero_std:
            out["reward/zero_var_frac"] = value
        elif "/" in key and key.split("/", 1)[0] in ("disc", "clip", "entropy", "quad", "reward", "perf"):
            out[key] = value  # entclip's own names (the adapter's), TRL has none of these prefixes
        else:
            trl[PREFIX + key] = value
    if "entropy" in logs and "entropy/mean" not in out and not filtered:
        out["entropy/mean"] = logs["entropy"]  # TRL's plain trainer: its loss mask is the valid tokens
    return {**out, **trl}


class RunDirCallback(TrainerCallback):
    """Writes `run` (an empty RunDir) from a TRL GRPOTrainer trained per `cfg`.

    Only the main process writes; under several processes make the directory on the main one
    (`RunDir.create(path)`) and hand the others `RunDir(path)`, as cli/runs.start_run does for train."""

    def __init__(self, run: RunDir, cfg: Config, updates_per_step: int = 1,
                 on_row: Callable[[int, dict], None] | None = None,
                 samples: Callable[[], list[dict]] | None = None,
                 filter_rows: Callable[[], list[dict]] | None = None):
        self.run, self.cfg = run, cfg
        self.filter_rows = filter_rows  # log_filter: the last generation batch's filter.jsonl rows
        self.samples = samples  # the last generation batch's rows (prompt, completion, reward, advantage)
        self.updates = updates_per_step  # TRL's optimizer steps per entclip step (engine trl: epochs x minibatches)
        self.on_row = on_row  # called with (step, row) after each metrics.jsonl row (the console's progress)
        self._t_step: float | None = None
        self._step_s: list[float] = []  # the steps since the last log
        self._t_start = time.perf_counter()
        self._end_log: dict[str, Any] = {}
        self._model_name: str | None = None

    # ---- what the run is --------------------------------------------------------------------
    def _filtered(self) -> bool:
        return self.cfg.method.place == registry.FILTER

    @staticmethod
    def _group_zero_std(args) -> bool:
        return (getattr(args, "scale_rewards", "group") in ("group", "none")
                and getattr(args, "multi_objective_aggregation", "sum_then_normalize") == "sum_then_normalize")

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._t_start = time.perf_counter()
        self._model_name = getattr(model, "name_or_path", None) if model is not None else None
        if not state.is_world_process_zero:
            return
        cfg = self.cfg
        planned = state.max_steps // self.updates
        if state.max_steps > 0 and planned != cfg.steps:
            cfg = self.cfg = replace(cfg, steps=planned)
        if not (self.run.path / CONFIG).exists() or (self.run.path / CONFIG).read_text() != cfg.to_yaml():
            self.run.write_config(cfg.to_yaml())
        write_atomic(self.run.path / TRL_ARGS, json.dumps(args.to_dict(), indent=2, default=str) + "\n")

    # ---- rows -------------------------------------------------------------------------------
    def on_step_begin(self, args, state, control, **kwargs):
        self._t_step = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self._t_step is not None:
            self._step_s.append(time.perf_counter() - self._t_step)
            self._t_step = None

    def on_log(self, args, state, control, logs=None, lr_scheduler=None, **kwargs):
        if not logs or not state.is_world_process_zero:
            return
        if TRAIN_END in logs:
            self._end_log = dict(logs)
            return
        if any(k.startswith("eval_") for k in logs):  # an evaluation's log: on_evaluate writes it
            return
        row: dict[str, Any] = {"step": state.global_step // self.updates}
        row.update(entclip_row(logs, filtered=self._filtered(), group_zero_std=self._group_zero_std(args)))
        if lr_scheduler is not None:
            row["lr"] = float(lr_scheduler.get_last_lr()[0])
        if self._step_s:
            row["perf/step_s"] = sum(self._step_s) / len(self._step_s)
            self._step_s.clear()
        self.run.append(METRICS, row)
        if self.samples is not None:
            for sample in self.samples()[:self.cfg.samples_per_step]:
                self.run.append(SAMPLES, {"step": row["step"], **sample})
        if self.filter_rows is not None:
            for line in self.filter_rows():
                self.run.append(FILTER, line)
        if self.on_row is not None:
            self.on_row(row["step"], row)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if not metrics or not state.is_world_process_zero:
            return
        row: dict[str, Any] = {"step": state.global_step // self.updates}
        row.update({PREFIX + k.removeprefix("eval_"): v for k, v in metrics.items()})
        self.run.append(EVAL, row)

    # ---- summary.json -----------------------------------------------------------------------
    def on_train_end(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        self.run.write_summary(self.summary(state))
        self.run.close()

    def summary(self, state) -> dict[str, Any]:
        """loop._finish's fields from the run directory's own files, with TRL's where entclip has none."""
        self.run.close()
        planned = state.max_steps // self.updates if state.max_steps > 0 else self.cfg.steps
        steps = state.global_step // self.updates
        return {
            "status": "completed" if steps >= planned else "stopped",
            "steps": steps, "steps_planned": planned,
            "wall_s": self._end_log.get(TRAIN_END, time.perf_counter() - self._t_start),
            "method": self.cfg.entropy_control, "engine": "trl", "model": self._model_name,
            "warm_start": None,
            **run_figures(self.run.path),
            "checkpoint": None,  # TRL's checkpoints: trl_args.json's output_dir
            "trl": dict(self._end_log),  # transformers' end-of-training figures (train_runtime, train_loss, ...)
            "versions": library_versions(),
        }
