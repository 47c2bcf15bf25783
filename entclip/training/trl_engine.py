"""`entclip train --engine trl`: the run's config on TRL's GRPOTrainer, writing the same run directory.

entclip does what TRL cannot know (the policy - the tiny model's warm start, a GGUF file, LoRA -, the
task's prompts and rewards, the held-out evaluation, the run directory), and hands TRL the rest as a
GRPOConfig built from the entclip keys (`grpo_fields`): every key of the config is placed in `KEYS`,
the table docs/trl.md prints (`mapping_table()`; tests/test_trl_engine.py holds the two equal). A key
TRL cannot honour is refused when it is set (`refusals`), TRL's own fields pass through with
`--set trl.NAME=VALUE` (`pass_through`), and the token filters run in `EntclipGRPOTrainer`
(trl_adapter.py). One entclip step (a rollout batch of prompts_per_step x group_size sequences and its
epochs x minibatches optimizer updates) is one TRL generation batch and its updates:

    per_device_train_batch_size = micro_batch_size (default: a process's minibatch rows)
    gradient_accumulation_steps = a process's minibatch rows / per_device_train_batch_size
    steps_per_generation        = minibatches x gradient_accumulation_steps
    num_iterations              = epochs
    max_steps                   = steps x epochs x minibatches   (TRL counts optimizer steps)
    logging_steps               = epochs x minibatches           (one metrics.jsonl row per entclip step)

This module is imported only when a run asks for engine trl (trl is an optional dependency).
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable

from entclip.contracts.config import FIELDS, Config
from entclip.contracts.errors import EntclipError, first_line
from entclip.contracts.rundir import RunDir

# Where each entclip key goes on engine trl (docs/trl.md's table).
GRPO = "GRPOConfig"      # a GRPOConfig field carries it
ENTCLIP = "entclip"      # entclip applies it around TRL (model, data, rewards, evaluation, run directory)
ADAPTER = "adapter"      # EntclipGRPOTrainer applies it (the token filters, trl_adapter.py)
REFUSED = "refused"      # TRL has no equivalent: any value but the default is refused
OFF = "off"              # an own-engine instrument TRL's loop has no place for: off on engine trl


@dataclass(frozen=True)
class Key:
    name: str   # the entclip key
    where: str  # GRPO, ENTCLIP, ADAPTER, REFUSED or OFF
    trl: str    # the GRPOConfig field(s) it sets ("" when none)
    note: str   # what the two share, or why not


def _keys(where: str, names: str, trl: str, note: str) -> list[Key]:
    return [Key(n, where, trl, note) for n in names.split()]


KEYS: tuple[Key, ...] = tuple([
    *_keys(ENTCLIP, "out_dir name", "", "the run directory (TRL's output_dir is its trl/ folder)"),
    Key("seed", GRPO, "seed, data_seed", "TRL's sampling and data order; entclip's warm start and evaluation "
        "seeds. The prompts each step draws differ from the own engine's (TRL shuffles the dataset)"),
    Key("threads", ENTCLIP, "", "torch.set_num_threads before TRL starts"),
    Key("device", GRPO, "use_cpu", "cpu (or no visible GPU): use_cpu=true"),
    Key("engine", ENTCLIP, "", "this table applies to engine trl"),
    Key("trl", GRPO, "any other field", "passed through as given (`--set trl.NAME=VALUE`)"),
    Key("steps", GRPO, "max_steps", "steps x epochs x minibatches: TRL counts optimizer steps"),
    Key("log_every", ENTCLIP, "", "the console line's cadence (metrics.jsonl has every step: logging_steps "
        "= epochs x minibatches)"),
    Key("eval_every", ENTCLIP, "", "entclip's held-out evaluation (greedy, avg@k, pass@k) at step 0, every "
        "eval_every steps and at the end, by a TRL callback: the own engine's eval.jsonl rows and seeds"),
    Key("save_every", GRPO, "save_strategy, save_steps", "TRL checkpoints every save_every x epochs x "
        "minibatches optimizer steps under trl/ (0: none); the final weights go to trl/final either way"),
    Key("keep_checkpoints", GRPO, "save_total_limit", "0 = keep all"),
    Key("max_nonfinite", REFUSED, "", "TRL does not skip non-finite updates (the default is not applied either)"),
    Key("samples_per_step", ENTCLIP, "", "samples.jsonl: the main process's first rows of each generation batch "
        "(prompt, completion, reward, advantage)"),
    Key("log_filter", ADAPTER, "", "filter.jsonl as on the own engine; `problem` is the group's place in the "
        "generation batch (TRL shuffles the dataset)"),
    Key("report_to", GRPO, "report_to", "the same tracker names (none = [])"),
    *_keys(ENTCLIP, "task dataset dataset_config dataset_split prompt_field answer_field prompt_template "
           "system_prompt chat_template max_prompt_tokens max_train_prompts max_operand n_test countdown_numbers "
           "countdown_max_number countdown_max_target", "",
           "entclip builds the prompts (train_dataset's prompt column, tokenized as the own engine does)"),
    Key("eval_sets", ENTCLIP, "", "entclip's evaluation sets (see eval_every)"),
    *_keys(ENTCLIP, "reward reward_timeout", "reward_funcs", "entclip's reward runner is TRL's one reward "
           "function; its accuracy and per-reward means are logged as reward/*"),
    *_keys(ENTCLIP, "model trust_remote_code tiny_hidden tiny_layers tiny_heads tiny_ffn warmup_lr "
           "warmup_max_steps warmup_target_acc cache_dir", "model",
           "entclip loads the policy and hands TRL the model"),
    Key("precision", GRPO, "bf16", "bf16-mixed: bf16=true (fp32 weights, autocast); bf16: entclip loads bf16 "
        "weights; fp32: bf16=false"),
    Key("gradient_checkpointing", GRPO, "gradient_checkpointing", "the same"),
    *_keys(ENTCLIP, "lora_r lora_alpha lora_target_modules", "model", "entclip wraps the policy in peft's LoRA "
           "adapters before TRL; TRL trains the adapters (its reference: the disabled adapter, as entclip's)"),
    Key("micro_batch_size", GRPO, "per_device_train_batch_size, gradient_accumulation_steps",
        "sequences per forward/backward; the rest of a process's minibatch accumulates"),
    Key("generation_batch_size", ENTCLIP, "", "entclip's seeded sampler (TRL's rollout_func) bounds each generate "
        "call by it; with vLLM it is inert; under DeepSpeed or FSDP TRL generates a process's share at once"),
    Key("sampler", GRPO, "use_vllm, vllm_mode", "vllm: use_vllm=true, vllm_mode=colocate (as --set trl.use_vllm=true); "
        "hf: entclip's seeded HF sampler as TRL's rollout_func (the same tokens on 1 and N processes)"),
    Key("vllm_gpu_memory_utilization", GRPO, "vllm_gpu_memory_utilization", "the colocated engine's memory share"),
    Key("vllm_max_model_len", GRPO, "vllm_max_model_length", "null: TRL's default (the model's own limit)"),
    *_keys(REFUSED, "vllm_dtype vllm_kv_cache_gb vllm_enforce_eager", "", "TRL's colocated vLLM chooses its own "
           "dtype, KV cache and compilation"),
    Key("rollout_is", GRPO, "vllm_importance_sampling_correction, vllm_importance_sampling_mode",
        "with vLLM: token_truncate and sequence_mask as TRL's modes of those names; none: correction off"),
    Key("rollout_is_threshold", GRPO, "vllm_importance_sampling_clip_max", "entclip's resolved bound (null: 2.0 "
        "for token_truncate, 3.0 for sequence_mask)"),
    Key("rollout_is_threshold_lower", GRPO, "vllm_importance_sampling_clip_min", "the same"),
    Key("prompts_per_step", GRPO, "steps_per_generation", "prompts_per_step x group_size sequences per generation "
        "batch: steps_per_generation = minibatches x gradient_accumulation_steps"),
    Key("group_size", GRPO, "num_generations", "G"),
    Key("max_new_tokens", GRPO, "max_completion_length", "the same"),
    Key("temperature", GRPO, "temperature, top_p=1, top_k=0, min_p, repetition_penalty=1",
        "the full distribution at T, as the statistics assume"),
    Key("lr", GRPO, "learning_rate", "the same (AdamW, betas 0.9/0.999, eps 1e-8 in both)"),
    Key("lr_schedule", GRPO, "lr_scheduler_type", "constant: constant_with_warmup; linear and cosine decay to 0 "
        "at the last update in both"),
    Key("lr_warmup_steps", GRPO, "warmup_steps", "optimizer steps in both; transformers' warm-up factor is "
        "i/warmup, entclip's (i+1)/warmup (one update later)"),
    Key("weight_decay", GRPO, "weight_decay", "the same"),
    Key("max_grad_norm", GRPO, "max_grad_norm", "the same (0 = off)"),
    Key("epochs", GRPO, "num_iterations", "passes over each generation batch"),
    Key("minibatches", GRPO, "steps_per_generation, gradient_accumulation_steps", "optimizer steps per pass"),
    Key("eps_low", GRPO, "epsilon", "the same"),
    Key("eps_high", GRPO, "epsilon_high", "the same"),
    Key("loss_agg", GRPO, "loss_type", "token-mean: dapo (its normalizer is the generation batch's valid "
        "tokens / minibatches: the same with one minibatch); seq-mean-token-mean: grpo; constant: dr_grpo; "
        "TRL's others (cispo, sapo, luspo) by --set trl.loss_type=NAME with loss_agg left at its default"),
    Key("loss_agg_constant", REFUSED, "", "dr_grpo divides by max_completion_length, so only null or "
        "max_new_tokens is honoured"),
    Key("scale_std", GRPO, "scale_rewards", "true: group; false: none"),
    Key("kl_coef", GRPO, "beta", "k3 KL to the initial policy, per token inside the loss mask, in both"),
    Key("entropy_control", ADAPTER, "", "the token filters (clip_b, clip_v, sign, high_entropy, clip_cov) at "
        "rollout scope; a loss change (clip_higher is eps_high; kl_cov, steer) is refused"),
    *_keys(ADAPTER, "filter_rule clip_b_mu clip_v_mu clip_v_max_frac filter_mu_low filter_mu_high "
           "filter_target_share filter_target_dh adaptive_mu_min adaptive_mu_max filter_normalizer filter_scope "
           "high_entropy_rho cov_frac cov_lb cov_ub sign_statistic sign_deviation sign_samples", "",
           "as on the own engine (filter_scope rollout only)"),
    *_keys(REFUSED, "kl_cov_frac kl_cov_beta steer_w_max steer_w_min", "", "kl_cov and steer change TRL's loss"),
    Key("dual_clip_c", REFUSED, "", "TRL has no dual clip, its delta is another clamp"),
    Key("entropy_coef", GRPO, "entropy_coef", "mean H over each micro-batch's loss mask, in both"),
    Key("entropy_target", GRPO, "use_adaptive_entropy, entropy_target", "Skywork-OR1's adaptive bonus, in both"),
    *_keys(GRPO, "entropy_coef_delta entropy_coef_min entropy_coef_max", "the same names",
           "entclip's values are passed (TRL's defaults differ)"),
    *_keys(OFF, "entropy_accounting accounting_every accounting_unit", "",
           "the accounting passes are the own engine's: engine trl logs none, and says so when entropy_accounting "
           "is on"),
    *_keys(ENTCLIP, "eval_n eval_k eval_temperature", "", "entclip's evaluation (see eval_every)"),
])
BY_NAME = {k.name: k for k in KEYS}

LOSS_TYPES = {"token-mean": "dapo", "seq-mean-token-mean": "grpo", "constant": "dr_grpo"}
SCHEDULES = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}
# GRPOConfig fields entclip fixes whatever the keys say, and why (a trl.NAME for one of them is refused).
FIXED = {
    "top_p": "the statistics describe the full distribution at the temperature",
    "top_k": "the statistics describe the full distribution at the temperature",
    "min_p": "the statistics describe the full distribution at the temperature",
    "repetition_penalty": "the statistics describe the full distribution at the temperature",
    "logging_steps": "metrics.jsonl has one row per entclip step",
    "eval_strategy": "entclip's own evaluation runs (eval_every)",
    "disable_dropout": "entclip trains without dropout",
}


def mapping_table() -> str:
    """docs/trl.md's table: every entclip key, where it goes on engine trl."""
    lines = ["| entclip key | on engine trl | GRPOConfig field | note |", "|---|---|---|---|"]
    for k in KEYS:
        lines.append(f"| `{k.name}` | {k.where} | {k.trl.replace('|', '/')} | {k.note} |")
    return "\n".join(lines) + "\n"


def layout(cfg: Config, n_proc: int) -> dict[str, int]:
    """The batch fields: one generation batch = one entclip step (module docstring)."""
    rows = cfg.batch_size // n_proc
    if cfg.batch_size % n_proc or rows % cfg.minibatches:
        raise EntclipError(f"prompts_per_step={cfg.prompts_per_step} x group_size={cfg.group_size} does not split "
                           f"into {n_proc} processes x {cfg.minibatches} minibatches; use a multiple of {n_proc} "
                           "prompts and a minibatches that divides each process's rows")
    mb = rows // cfg.minibatches
    micro = cfg.micro_batch_size or mb
    if mb % micro:
        raise EntclipError(f"micro_batch_size={micro} does not divide a process's minibatch of {mb} sequences; "
                           f"use a divisor of {mb}")
    accum = mb // micro
    return {"per_device_train_batch_size": micro, "gradient_accumulation_steps": accum,
            "steps_per_generation": cfg.minibatches * accum, "num_iterations": cfg.epochs}


def updates_per_step(cfg: Config) -> int:
    return cfg.epochs * cfg.minibatches


def refusals(cfg: Config, n_proc: int = 1) -> None:
    """Each REFUSED key set to what TRL cannot do: a one-line error naming it."""
    for k in KEYS:
        if k.where != REFUSED:
            continue
        value, default = getattr(cfg, k.name), FIELDS[k.name].default
        if value == default:
            continue
        if k.name == "loss_agg_constant" and value == cfg.max_new_tokens:
            continue
        if k.where == REFUSED and k.name.startswith(("kl_cov", "steer")) and cfg.entropy_control not in ("kl_cov",
                                                                                                         "steer"):
            continue  # a method's key while another method runs: inert, as on the own engine
        raise EntclipError(f"{k.name}={value}: engine trl cannot honour it: {k.note}; drop {k.name} or use "
                           "engine entclip")


def notices(cfg: Config) -> list[str]:
    """What engine trl leaves off that the config asks for (the own engine's instruments): a line each."""
    if cfg.entropy_accounting:
        return ["engine trl: no entropy accounting (its extra passes are the own engine's); "
                "set entropy_accounting=false to silence this"]
    return []


def grpo_fields(cfg: Config, n_proc: int, precision: str, output_dir: str, use_cpu: bool) -> dict[str, Any]:
    """The GRPOConfig fields the entclip keys set (KEYS' GRPO rows, and FIXED)."""
    updates = updates_per_step(cfg)
    fields = {
        "output_dir": output_dir, "seed": cfg.seed, "data_seed": cfg.seed, "use_cpu": use_cpu,
        "max_steps": cfg.steps * updates, "logging_steps": updates,
        **layout(cfg, n_proc),
        "num_generations": cfg.group_size, "max_completion_length": cfg.max_new_tokens,
        "temperature": cfg.temperature, "top_p": 1.0, "top_k": 0, "min_p": None, "repetition_penalty": 1.0,
        "learning_rate": cfg.lr, "lr_scheduler_type": SCHEDULES[cfg.lr_schedule], "warmup_steps": cfg.lr_warmup_steps,
        "weight_decay": cfg.weight_decay, "max_grad_norm": cfg.max_grad_norm,
        "epsilon": cfg.eps_low, "epsilon_high": cfg.eps_high, "loss_type": LOSS_TYPES[cfg.loss_agg],
        "scale_rewards": "group" if cfg.scale_std else "none", "beta": cfg.kl_coef,
        "entropy_coef": cfg.entropy_coef, "use_adaptive_entropy": cfg.entropy_target is not None,
        "entropy_coef_delta": cfg.entropy_coef_delta, "entropy_coef_min": cfg.entropy_coef_min,
        "entropy_coef_max": cfg.entropy_coef_max,
        "gradient_checkpointing": cfg.gradient_checkpointing, "bf16": precision == "bf16-mixed", "fp16": False,
        "report_to": list(cfg.report_to) or "none",
        "save_strategy": "steps" if cfg.save_every else "no", "save_steps": max(cfg.save_every, 1) * updates,
        "save_total_limit": cfg.keep_checkpoints or None,
        "eval_strategy": "no", "disable_dropout": True, "disable_tqdm": True, "dataloader_num_workers": 0,
        "use_vllm": cfg.sampler == "vllm", "vllm_gpu_memory_utilization": cfg.vllm_gpu_memory_utilization,
        "vllm_max_model_length": cfg.vllm_max_model_len,
        "vllm_importance_sampling_correction": cfg.rollout_is != "none",
        "vllm_importance_sampling_mode": cfg.rollout_is if cfg.rollout_is != "none" else "token_truncate",
        "vllm_importance_sampling_clip_max": cfg.is_threshold,
        "vllm_importance_sampling_clip_min": cfg.rollout_is_threshold_lower,
    }
    if cfg.entropy_target is not None:
        fields["entropy_target"] = cfg.entropy_target
    if cfg.sampler == "vllm":
        fields["vllm_mode"] = "colocate"
    return fields


# The entclip key behind each GRPOConfig field grpo_fields sets (a trl.NAME for it names this key).
SET_BY = {f.strip().split("=")[0]: k.name for k in KEYS if k.where == GRPO and k.name != "trl"
          for f in k.trl.split(",") if f.strip() and f.strip() != "the same names"}
SET_BY.update({n: n for n in ("entropy_coef_delta", "entropy_coef_min", "entropy_coef_max")})
SET_BY["activation_checkpointing"] = "gradient_checkpointing"
for _name in ("use_vllm", "vllm_mode"):  # sampler=vllm sets them, and so may trl.use_vllm (TRL's own vLLM)
    del SET_BY[_name]
# TRL's other loss types (cispo, sapo, luspo, ...) have no entclip key: trl.loss_type may replace the one
# loss_agg maps to, unless loss_agg was set too.
del SET_BY["loss_type"]


def pass_through(cfg: Config, fields: dict[str, Any], known: set[str]) -> dict[str, Any]:
    """`fields` with cfg.trl's GRPOConfig fields over them; a name TRL lacks, or one an entclip key (or
    FIXED) sets, is refused with the key to set instead."""
    out = dict(fields)
    for name, value in cfg.trl.items():
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=3)
            hint = f"; did you mean {' or '.join('trl.' + c for c in close)}?" if close else ""
            raise EntclipError(f"trl.{name}: not a field of TRL's GRPOConfig{hint}")
        if name in FIXED:
            raise EntclipError(f"trl.{name}: engine trl fixes it ({FIXED[name]}); drop trl.{name}")
        if name == "loss_type" and cfg.loss_agg != FIELDS["loss_agg"].default:
            raise EntclipError(f"trl.loss_type={value} and loss_agg={cfg.loss_agg} both set the loss; keep one")
        if name in SET_BY:
            key = SET_BY[name]
            raise EntclipError(f"trl.{name}: entclip's {key} sets it on engine trl; use --set {key}=... instead")
        out[name] = value
    return out


def grpo_config(cfg: Config, n_proc: int, precision: str, output_dir: str, use_cpu: bool):
    """TRL's GRPOConfig for cfg; TRL's own refusal of a combination as an EntclipError."""
    from trl import GRPOConfig

    refusals(cfg, n_proc)
    known = {f.name for f in dataclasses.fields(GRPOConfig)}
    fields = pass_through(cfg, grpo_fields(cfg, n_proc, precision, output_dir, use_cpu), known)
    if "activation_checkpointing" in known:  # transformers >= 5.2x renamed it (the old name warns)
        fields["activation_checkpointing"] = fields.pop("gradient_checkpointing")
    try:
        return GRPOConfig(**fields)
    except (ValueError, TypeError) as exc:
        raise EntclipError(refused_by_trl(exc, cfg, known)) from None


def refused_by_trl(exc: BaseException, cfg: Config, known: set[str]) -> str:
    """TRL's GRPOConfig error as one line that names what to change: the `trl.NAME` options given that
    TRL's message names, else the entclip keys that set the GRPOConfig fields it names."""
    text = str(exc)
    named = sorted((n for n in known if re.search(rf"(?<![\w.]){re.escape(n)}(?!\w)", text)), key=text.index)
    given = [f"trl.{n}" for n in named if n in cfg.trl]
    fixes = given or list(dict.fromkeys(SET_BY.get(n, f"trl.{n}") for n in named))
    fix = " / ".join(fixes) or "the trl.NAME options given"
    return (f"TRL refused the configuration: {first_line(exc).rstrip('.')}; change {fix} "
            "(docs/trl.md maps each entclip key to its GRPOConfig field)")


def need_trl() -> None:
    try:
        import trl  # noqa: F401
    except ImportError:
        raise EntclipError("engine trl needs TRL: pip install 'entclip[trl]'") from None


# ---- the run ------------------------------------------------------------------------------------

class EntclipReward:
    """entclip's reward runner as TRL's one reward function: scores against the dataset's answer column,
    and logs the verifier's accuracy and each reward's mean (TRL averages them over the processes)."""

    __name__ = "entclip"  # TRL names the reward's metrics after it: rewards/entclip/mean

    def __init__(self, rewards):
        self.rewards = rewards
        self.last: tuple[list[str], list[str], list[float]] = ([], [], [])  # this process's last batch

    def __call__(self, prompts, completions, answer, log_metric: Callable | None = None, **_: Any) -> list[float]:
        from entclip.contracts.metrics import Mean

        scored = self.rewards.score(list(completions), list(answer), list(prompts))
        self.last = (list(prompts), list(completions), list(scored.total))
        if log_metric is not None:
            log_metric("reward/accuracy", sum(scored.correct) / max(len(scored.correct), 1))
            for name, m in scored.metrics().items():
                if isinstance(m, Mean):
                    log_metric(name, m.value)
        return scored.total


class SeededRollouts:
    """TRL's `rollout_func`: the completions drawn by entclip's HFSampler (its KV-cache generate, with the
    counter-based Gumbel noise of rollout.py), row i of the generation batch seeded by (seed, TRL's global
    step, i) - so one process and N processes draw the same tokens for the same rows, as on the own
    engine, and generation_batch_size bounds each generate call. Used when TRL would generate with
    transformers on whole (unsharded) parameters; vLLM, DeepSpeed and FSDP keep TRL's own generation."""

    def __init__(self, session):
        self.session = session

    def __call__(self, prompts: list, trainer) -> dict[str, Any]:
        from entclip.training.batch import derive_seed
        from entclip.training.rollout import HFSampler

        s, cfg = self.session, self.session.cfg
        model = trainer.accelerator.unwrap_model(trainer.model)
        n, rank, step = len(prompts), trainer.accelerator.process_index, trainer.state.global_step
        seeds = [derive_seed(cfg.seed, "trl-sample", step, rank * n + i) for i in range(n)]
        sampler = HFSampler(lambda: model, s.tokenizer, s.tasks.add_special_tokens, s.autocast,
                            cfg.generation_batch_size)
        training = model.training
        model.eval()  # TRL's loss forward follows in this mode: restored below
        try:
            roll = sampler.sample(list(prompts), 1, cfg.temperature, cfg.max_new_tokens, seeds)
        finally:
            model.train(training)
        return {"prompt_ids": [ids[m.bool()].tolist() for ids, m in zip(roll.prompt_ids, roll.prompt_mask)],
                "completion_ids": [ids[m.bool()].tolist() for ids, m in zip(roll.completion_ids, roll.completion_mask)],
                "logprobs": None}


def seeded_rollouts(args) -> bool:
    """Whether entclip's sampler draws the completions (SeededRollouts): TRL's transformers generate on
    whole parameters (no vLLM, no DeepSpeed or FSDP sharding)."""
    from accelerate.utils import DistributedType

    # GRPOConfig (TrainingArguments) resets accelerate's shared state and builds its own: ask that one.
    return not args.use_vllm and distributed_type(args) in (
        DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU)


def distributed_type(args):
    from accelerate import PartialState

    state = getattr(args, "distributed_state", None) or PartialState()
    return state.distributed_type


def _callbacks(session, cfg: Config, updates: int, on_step):
    from transformers import TrainerCallback

    from entclip.training.evaluation import evaluate

    def held_out(step: int) -> None:
        """evaluate() puts the policy in eval mode; TRL's next log reads the mode (eval mode would log
        its eval metrics, none, and hold the step's train metrics back): training mode after it."""
        training = session.policy.training
        try:
            evaluate(session, step)
        finally:
            session.policy.train(training)

    class Evaluation(TrainerCallback):
        """entclip's held-out evaluation at step 0, every eval_every entclip steps and at the end."""

        def on_train_begin(self, args, state, control, **kw):
            held_out(0)

        def on_step_end(self, args, state, control, **kw):
            if state.global_step % updates:
                return
            step = state.global_step // updates
            if cfg.eval_every and step % cfg.eval_every == 0 and step != cfg.steps:
                held_out(step)

        def on_train_end(self, args, state, control, **kw):
            held_out(state.global_step // updates)

    return [Evaluation()]


def train_trl(cfg: Config, run: RunDir, log: Callable[[str], None] = print,
              on_step: Callable[[int, dict], None] = lambda s, m: None) -> dict[str, Any]:
    """Train cfg on TRL's GRPOTrainer into `run` (config.yaml already written); return the summary."""
    need_trl()
    import torch
    from datasets import Dataset
    from transformers import PrinterCallback, ProgressCallback

    from entclip.training.session import open_session
    from entclip.training.trl_adapter import EntclipGRPOTrainer
    from entclip.training.trl_rundir import RunDirCallback

    for line in notices(cfg):
        log(line)
    # The session's sampler serves entclip's evaluation only: HF generate, whatever `sampler` says (with
    # vllm, TRL builds its own colocated engine for the rollouts; a second engine per process would not fit).
    session = open_session(dataclasses.replace(cfg, sampler="hf"), run, log, for_training=True)
    n_proc = session.accelerator.num_processes
    use_cpu = cfg.device == "cpu" or not torch.cuda.is_available()
    args = grpo_config(cfg, n_proc, session.precision, str(run.path / "trl"), use_cpu)
    updates = updates_per_step(cfg)
    train_rows = Dataset.from_list([{"prompt": p.prompt, "answer": p.answer} for p in session.tasks.train])
    reward = EntclipReward(session.rewards)
    trainer = None

    def samples() -> list[dict]:
        """samples.jsonl's rows: this (the main) process's first rows of the last generation batch."""
        batch = trainer.last_filtered if trainer is not None else None
        prompts, completions, totals = reward.last
        if batch is None or len(totals) != len(batch.advantages):
            return []
        return [{"prompt": p, "completion": c, "reward": float(r), "advantage": float(a)}
                for p, c, r, a in zip(prompts, completions, totals, batch.advantages.tolist())]

    def filtered() -> list[dict]:
        rows, trainer.filter_rows = trainer.filter_rows, []
        return rows

    rundir = RunDirCallback(run, cfg, updates_per_step=updates, on_row=on_step,
                            samples=samples if cfg.samples_per_step else None,
                            filter_rows=filtered if cfg.log_filter else None)
    seeded = seeded_rollouts(args)
    if not seeded and cfg.generation_batch_size and not args.use_vllm:
        log(f"engine trl: generation_batch_size={cfg.generation_batch_size} is not applied under "
            f"{distributed_type(args).value} (TRL generates each process's share at once)")
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings():  # rollout_func is "experimental" in TRL 1.16 (pinned: <1.17)
            warnings.filterwarnings("ignore", message=".*rollout_func.*")
            trainer = EntclipGRPOTrainer(
                model=session.model, reward_funcs=[reward], args=args, train_dataset=train_rows,
                processing_class=session.tokenizer, config=cfg, add_special_tokens=session.tasks.add_special_tokens,
                rollout_func=SeededRollouts(session) if seeded else None,
                callbacks=[*_callbacks(session, cfg, updates, on_step), rundir])
        for cb in (PrinterCallback, ProgressCallback):
            trainer.remove_callback(cb)
        log(f"engine trl: TRL GRPOTrainer, {args.max_steps} optimizer steps ({cfg.steps} x {updates}), "
            f"{args.per_device_train_batch_size} sequences per micro-batch on {n_proc} process(es), "
            + ("entclip's seeded sampler" if seeded else "TRL's generation"))
        trainer.train()
        final = run.path / "trl" / "final"
        trainer.save_model(str(final))  # safetensors; with LoRA the adapters only
        if session.accelerator.is_main_process:
            session.tokenizer.save_pretrained(str(final))
            summary = rundir.summary(trainer.state)
            summary.update(checkpoint=str(final.relative_to(run.path)), warm_start=session.warm_start,
                           wall_s=time.perf_counter() - t0)
            run.write_summary(summary)
            return summary
        return {}
    finally:
        session.rewards.close()
        run.close()


def check(cfg: Config, n_proc: int, output_dir: str) -> Any:
    """Everything engine trl can refuse before a run directory exists: TRL installed, the refused keys,
    the pass-through fields, TRL's own checks of the GRPOConfig and the adapter's (check_supported).
    Returns the GRPOConfig."""
    need_trl()
    import torch

    from entclip.training.plan import resolve_precision
    from entclip.training.trl_adapter import check_supported

    use_cpu = cfg.device == "cpu" or not torch.cuda.is_available()
    args = grpo_config(cfg, n_proc, resolve_precision(cfg), output_dir, use_cpu)
    check_supported(cfg, args)
    return args


def describe(cfg: Config, args: Any) -> str:
    """The dry run's lines for engine trl: the GRPOConfig fields entclip and trl.NAME set."""
    known = {f.name for f in dataclasses.fields(type(args))}
    names = [n for n in grpo_fields(cfg, 1, "fp32", "", False) if n in known] + [n for n in cfg.trl if n not in
                                                                                 grpo_fields(cfg, 1, "fp32", "", False)]
    def shown(value: Any) -> str:
        return repr(getattr(value, "value", value))  # transformers' enums by their value

    return "\n".join(f"{n}: {shown(getattr(args, n))}" for n in names)
