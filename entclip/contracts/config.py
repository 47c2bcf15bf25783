"""One typed, frozen config; presets; overrides; validation with messages that name the fix.

Precedence: defaults < preset (shipped name or YAML path) < --config FILE < flags and --set.
Every field is documented once, in its `help`; `entclip train --help-config` prints them.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from entclip.contracts.errors import NOT_FOUND, EntclipError
from entclip.core import registry


def _f(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


def _key(name: str) -> Any:
    """A method key's field: its default and help as the method registry declares them."""
    key = registry.KEYS[name]
    return _f(key.default, key.help)


@dataclass(frozen=True)
class Config:
    # ---- run (plumbing) -------------------------------------------------------------------
    out_dir: str = _f("runs", "parent folder of run directories")
    name: str | None = _f(None, "run directory name under out_dir (default: <method>-s<seed>-<time>)")
    seed: int = _f(0, "the one seed: sampling, data order and init all derive from it")
    threads: int = _f(1, "torch intra-op threads (0 = torch's default); 1 is fastest for tiny models")
    device: Literal["auto", "cpu", "cuda"] = _f("auto", "where to train; auto lets accelerate choose")
    engine: Literal["entclip", "trl"] = _f(
        "entclip", "training engine: entclip (its own GRPO loop) or trl (TRL's GRPOTrainer with entclip's token "
        "filters and instruments; pip install 'entclip[trl]'; docs/trl.md maps every key)")
    trl: dict = field(default_factory=dict, metadata={"help": (
        "engine trl: TRL GRPOConfig fields passed through as they are, e.g. --set trl.use_vllm=true "
        "(a field an entclip key sets is refused: set the entclip key)")})
    steps: int = _f(200, "training steps (one rollout batch and its optimizer updates each)")
    log_every: int = _f(10, "console line / progress refresh cadence in steps")
    eval_every: int = _f(100, "held-out evaluation cadence in steps (0 = only at the end)")
    save_every: int = _f(0, "checkpoint cadence in steps (0 = only the final checkpoint)")
    keep_checkpoints: int = _f(2, "keep only the newest K checkpoints (0 = keep all)")
    max_nonfinite: int = _f(3, "stop after this many non-finite updates in a row (each is skipped)")
    samples_per_step: int = _f(2, "rollouts per step written to samples.jsonl")
    log_filter: bool = _f(False, "write filter.jsonl: per step, each sequence's tokens and the positions "
                          "the token filter dropped (all processes gathered)")
    report_to: tuple = _f((), "experiment trackers that also get every metrics.jsonl and eval.jsonl row: "
                          "none, or a comma-separated list of tensorboard, trackio, wandb")
    # ---- task and model -------------------------------------------------------------------
    task: Literal["arithmetic", "countdown"] = _f(
        "arithmetic", "built-in offline task (used when no dataset is set): arithmetic (a+b=) or countdown "
        "(reach a target from 3-4 numbers with + - *, steps written out; several answers are right)")
    dataset: str | None = _f(None, "training prompts: a Hugging Face dataset id or a local "
                             ".jsonl/.json/.csv/.parquet file (null = the built-in task)")
    dataset_config: str | None = _f(None, "the dataset's configuration name, if it has several")
    dataset_split: str = _f("train", "the dataset split to train on")
    prompt_field: str = _f("prompt", "dataset column with the problem (dots reach nested fields; a list "
                           "of chat messages is used as the conversation)")
    answer_field: str = _f("answer", "dataset column with the reference answer (dots reach nested fields)")
    prompt_template: str = _f("{prompt}", "text around each problem; {prompt} is replaced by it")
    system_prompt: str | None = _f(None, "system message for chat templates (null = none)")
    chat_template: Literal["auto", "on", "off"] = _f(
        "auto", "wrap prompts in the tokenizer's chat template (auto = when the tokenizer has one)")
    max_prompt_tokens: int = _f(1024, "dataset prompts longer than this (after templating) are skipped")
    max_train_prompts: int | None = _f(None, "use only the first N training prompts after filtering")
    eval_sets: tuple = _f((), "held-out sets for a dataset run: a list of {name, source, split, config, "
                          "prompt_field, answer_field, n}; source defaults to the training dataset")
    reward: str = _f("auto", "comma-separated NAME[=WEIGHT]: exact, math (math-verify), format (a \\boxed "
                     "answer), countdown or module:function; auto = the built-in task's verifier (exact or countdown), "
                     "math for datasets")
    reward_timeout: float = _f(10.0, "seconds one completion's reward may take (math and custom rewards "
                               "run in a worker process; a timeout or error scores 0 and is counted)")
    max_operand: int = _f(99, "arithmetic: operands are drawn from 0..max_operand")
    n_test: int = _f(500, "built-in task: problems held out for evaluation")
    countdown_numbers: int = _f(3, "countdown: numbers per problem, 3 or 4 (an answer takes one step fewer)")
    countdown_max_number: int = _f(9, "countdown: numbers are drawn from 1..countdown_max_number (2..20)")
    countdown_max_target: int = _f(100, "countdown: targets are the reachable values in 1..countdown_max_target")
    model: str = _f("tiny", "policy: 'tiny' (built-in, warm-started), a local model folder, a .gguf file, "
                    "or a Hugging Face id")
    trust_remote_code: bool = _f(False, "let transformers run a model's own code (only for models you trust)")
    precision: Literal["auto", "fp32", "bf16-mixed", "bf16"] = _f(
        "auto", "fp32; bf16-mixed = fp32 weights, bf16 autocast; bf16 = bf16 weights (half the memory, "
        "updates below bf16 resolution are lost); auto = bf16-mixed on a bf16 GPU, else fp32")
    gradient_checkpointing: bool = _f(False, "recompute activations in the backward pass (less memory)")
    lora_r: int = _f(0, "LoRA rank (peft): train low-rank adapters on the frozen model (0 = full fine-tuning); "
                     "needs pip install 'entclip[lora]'")
    lora_alpha: int = _f(8, "LoRA alpha: the adapters' update is scaled by lora_alpha / lora_r (peft's default 8)")
    lora_target_modules: str = _f("all-linear", "modules that get LoRA adapters: all-linear (every linear layer "
                                  "but the output head) or a comma-separated list (or YAML list) of module "
                                  "names, e.g. q_proj,k_proj,v_proj,o_proj")
    micro_batch_size: int | None = _f(None, "sequences per forward/backward; gradients accumulate up to "
                                      "the minibatch (null = the whole minibatch)")
    generation_batch_size: int | None = _f(None, "sequences per generate call (null = the whole rollout batch)")
    sampler: Literal["hf", "vllm"] = _f(
        "hf", "sampling backend: hf = transformers generate with the KV cache; vllm = a colocated vLLM engine "
        "(pip install 'entclip[vllm]'; docs/vllm.md), synced after every step that updated the policy, its log-probs "
        "used only by rollout_is")
    vllm_dtype: Literal["auto", "float32", "bfloat16", "float16"] = _f(
        "auto", "sampler vllm: the engine's dtype (auto = the trainer's forward: float32 for fp32, bfloat16 for bf16)")
    vllm_gpu_memory_utilization: float = _f(
        0.3, "sampler vllm: share of the GPU's memory the engine may take beside the trainer (weights, activations, "
        "KV cache); on CPU the share of RAM it must find free at start-up")
    vllm_kv_cache_gb: float | None = _f(None, "sampler vllm: KV cache size in GiB (null = 1 on CPU; on a GPU, "
                                        "what vllm_gpu_memory_utilization leaves)")
    vllm_enforce_eager: bool = _f(True, "sampler vllm: no CUDA graphs or torch.compile (start-up ~5 s instead of "
                                  "~35 s on CPU); false is faster per token on a GPU")
    vllm_max_model_len: int | None = _f(None, "sampler vllm: longest prompt + completion the engine holds (null = "
                                        "max_prompt_tokens + max_new_tokens, at most the model's own limit)")
    rollout_is: Literal["none", "token_truncate", "sequence_mask"] = _f(
        "token_truncate", "rollout/trainer mismatch correction, when the sampler reports its log-probs (vllm): "
        "token_truncate weighs each token's policy term by min(pi_train / pi_rollout, rollout_is_threshold) "
        "(verl's TIS); sequence_mask weighs each sequence by its ratio and zeroes those outside "
        "[rollout_is_threshold_lower, rollout_is_threshold] (TRL's default mode); none = only measure it")
    rollout_is_threshold: float | None = _f(
        None, "rollout_is's upper bound C (null = the reference's: 2.0 for token_truncate, verl's rollout_is_threshold; "
        "3.0 for sequence_mask, TRL's vllm_importance_sampling_clip_max)")
    rollout_is_threshold_lower: float | None = _f(
        None, "sequence_mask: also zero sequences whose ratio is below this (null = no lower bound, as TRL)")
    tiny_hidden: int = _f(128, "tiny model: hidden size")
    tiny_layers: int = _f(4, "tiny model: transformer layers")
    tiny_heads: int = _f(4, "tiny model: attention heads")
    tiny_ffn: int = _f(512, "tiny model: MLP width")
    warmup_lr: float = _f(3e-3, "supervised warm start: AdamW learning rate")
    warmup_max_steps: int = _f(1500, "supervised warm start: step budget (it stops there even below the target)")
    warmup_target_acc: float = _f(0.5, "supervised warm start stops at this greedy train accuracy")
    cache_dir: str | None = _f(None, "warm-start cache (default: $ENTCLIP_CACHE or ~/.cache/entclip)")
    # ---- GRPO (algorithm) -----------------------------------------------------------------
    prompts_per_step: int = _f(8, "prompts per rollout batch (all processes together; each takes an equal share)")
    group_size: int = _f(8, "G: completions sampled per prompt")
    max_new_tokens: int = _f(6, "completion length limit in tokens")
    temperature: float = _f(1.0, "rollout temperature; all token statistics use the same T")
    lr: float = _f(1e-4, "AdamW learning rate")
    lr_schedule: Literal["constant", "linear", "cosine"] = _f("constant", "decay after warm-up")
    lr_warmup_steps: int = _f(0, "linear learning-rate warm-up in optimizer steps")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    max_grad_norm: float = _f(1.0, "gradient clipping by global norm (0 = off)")
    epochs: int = _f(1, "passes over each rollout batch")
    minibatches: int = _f(2, "optimizer updates per epoch (the rollout batch is split evenly)")
    eps_low: float = _f(0.2, "PPO ratio clip below: r >= 1 - eps_low")
    eps_high: float = _f(0.2, "PPO ratio clip above: r <= 1 + eps_high (0.28 = DAPO clip-higher)")
    loss_agg: Literal["token-mean", "seq-mean-token-mean", "constant"] = _f(
        "token-mean", "loss aggregation; 'constant' divides by (sequences x loss_agg_constant), Dr. GRPO"
    )
    loss_agg_constant: int | None = _f(None, "the 'constant' aggregation's length (default max_new_tokens)")
    scale_std: bool = _f(True, "divide group-centred rewards by the group std (False = Dr. GRPO)")
    kl_coef: float = _f(0.0, "k3 KL penalty to the frozen initial policy (0 = no reference model)")
    # ---- entropy control (each method key's default and help: entclip/core/registry.py) -------
    entropy_control: Literal["none", "clip_b", "clip_v", "sign", "high_entropy", "clip_cov", "kl_cov", "steer"] = _f(
        "none", "method: " + registry.method_choices_help())
    filter_rule: Literal["released", "paper"] = _key("filter_rule")
    clip_b_mu: float = _key("clip_b_mu")
    clip_v_mu: float = _key("clip_v_mu")
    clip_v_max_frac: float | None = _key("clip_v_max_frac")
    filter_mu_low: float | None = _key("filter_mu_low")
    filter_mu_high: float | None = _key("filter_mu_high")
    filter_target_share: float | None = _key("filter_target_share")
    filter_target_dh: float | None = _key("filter_target_dh")
    adaptive_mu_min: float = _key("adaptive_mu_min")
    adaptive_mu_max: float = _key("adaptive_mu_max")
    filter_normalizer: Literal["auto", "kept", "all"] = _key("filter_normalizer")
    filter_scope: Literal["auto", "rollout", "micro"] = _key("filter_scope")
    high_entropy_rho: float = _key("high_entropy_rho")
    cov_frac: float = _key("cov_frac")
    cov_lb: float = _key("cov_lb")
    cov_ub: float = _key("cov_ub")
    kl_cov_frac: float = _key("kl_cov_frac")
    kl_cov_beta: float = _key("kl_cov_beta")
    steer_w_max: float = _key("steer_w_max")
    steer_w_min: float = _key("steer_w_min")
    dual_clip_c: float | None = _key("dual_clip_c")
    entropy_coef: float = _key("entropy_coef")
    entropy_target: float | None = _key("entropy_target")
    entropy_coef_delta: float = _key("entropy_coef_delta")
    entropy_coef_min: float = _key("entropy_coef_min")
    entropy_coef_max: float = _key("entropy_coef_max")
    sign_statistic: Literal["s_star", "deviation"] = _key("sign_statistic")
    sign_deviation: Literal["pos", "neg"] = _key("sign_deviation")
    sign_samples: Literal["all", "pos", "neg"] = _key("sign_samples")
    entropy_accounting: bool = _f(True, "log predicted vs measured entropy change per step (extra passes)")
    accounting_every: int = _f(8, "entropy accounting cadence in steps: every 8th step (an accounted step costs about 2x a plain one on the tiny model; raise it for large models)")
    accounting_unit: Literal["update", "step"] = _f(
        "update", "update = account every optimizer update on its own, with the second-order (trapezoid) "
        "prediction (one forward+backward over the batch after each update); step = the step as a whole, "
        "first order only (one forward after the step)")
    # ---- evaluation -----------------------------------------------------------------------
    eval_n: int = _f(500, "held-out problems per evaluation (the built-in task holds out n_test=500)")
    eval_k: int = _f(8, "samples per problem for avg@k and pass@k")
    eval_temperature: float = _f(1.0, "sampling temperature for avg@k / pass@k")

    def __post_init__(self) -> None:
        _validate(self)

    # ---- derived values (properties, never fields) ----------------------------------------
    @property
    def batch_size(self) -> int:
        """Sequences per rollout batch (all processes together)."""
        return self.prompts_per_step * self.group_size

    @property
    def minibatch_size(self) -> int:
        return self.batch_size // self.minibatches

    @property
    def agg_constant(self) -> int:
        return self.loss_agg_constant or self.max_new_tokens

    @property
    def is_threshold(self) -> float:
        """rollout_is's upper bound: rollout_is_threshold, or its mode's reference default."""
        if self.rollout_is_threshold is not None:
            return self.rollout_is_threshold
        return 3.0 if self.rollout_is == "sequence_mask" else 2.0

    @property
    def method(self) -> registry.Method:
        """The chosen method's declaration (entclip/core/registry.py)."""
        return registry.METHODS[self.entropy_control]

    @property
    def normalizer(self) -> str:
        """What a filter's dropped tokens leave: "kept" (everything) or "all" (the policy term only);
        auto = the method's declared (its reference's)."""
        if self.filter_normalizer != "auto":
            return self.filter_normalizer
        return self.method.normalizer

    @property
    def scope(self) -> str:
        """When the filter selects: "rollout" (once per rollout batch) or "micro" (every micro-batch);
        auto = the method's declared default (its reference's)."""
        if self.filter_scope != "auto":
            return self.filter_scope
        return self.method.scope

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["eval_sets"] = [dict(e) for e in self.eval_sets]  # YAML-safe lists, not tuples
        data["report_to"] = list(self.report_to)
        return data

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


FIELDS = {f.name: f for f in dataclasses.fields(Config)}
TRACKERS = ("tensorboard", "trackio", "wandb")  # report_to's choices (entclip/training/trackers.py)
# Token filters (keep-masks) and those that may select per micro-batch of every update (registry).
FILTERS = registry.filters()
MICRO_FILTERS = registry.micro_filters()


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise EntclipError(message)


def _validate(c: Config) -> None:
    _need(c.entropy_control in registry.METHODS,
          f"entropy_control={c.entropy_control!r}: choose one of {', '.join(registry.METHODS)}")
    positive = ["steps", "log_every", "samples_per_step", "max_operand", "n_test", "tiny_hidden",
                "tiny_layers", "tiny_heads", "tiny_ffn", "warmup_max_steps", "prompts_per_step",
                "max_new_tokens", "epochs", "minibatches", "eval_n", "eval_k", "accounting_every",
                "max_nonfinite"]
    for name in positive:
        value = getattr(c, name)
        _need(value >= 1, f"{name}={value}: must be at least 1; set --set {name}={FIELDS[name].default}")
    for name in ["threads", "eval_every", "save_every", "keep_checkpoints", "lr_warmup_steps", "weight_decay",
                 "max_grad_norm", "kl_coef", "eps_high"]:
        value = getattr(c, name)
        _need(value >= 0, f"{name}={value}: must not be negative; set --set {name}={FIELDS[name].default}")
    for name in ["lr", "warmup_lr", "temperature", "eval_temperature", "clip_b_mu", "clip_v_mu"]:
        value = getattr(c, name)
        _need(value > 0, f"{name}={value}: must be positive; set --set {name}={FIELDS[name].default}")
    _need(c.group_size >= 2, f"group_size={c.group_size}: GRPO needs at least 2 samples per prompt; "
          "set --set group_size=8")
    _need(0 <= c.eps_low < 1, f"eps_low={c.eps_low}: must be in [0, 1); set --set eps_low=0.2")
    _need(0 < c.warmup_target_acc <= 1, f"warmup_target_acc={c.warmup_target_acc}: must be in (0, 1]; "
          "set --set warmup_target_acc=0.5")
    _need(c.batch_size % c.minibatches == 0,
          f"minibatches={c.minibatches} does not divide the rollout batch of "
          f"{c.prompts_per_step}x{c.group_size}={c.batch_size} sequences; pick a divisor, "
          "e.g. --set minibatches=1")
    _need(c.tiny_hidden % c.tiny_heads == 0,
          f"tiny_hidden={c.tiny_hidden} is not divisible by tiny_heads={c.tiny_heads}; "
          "set --set tiny_heads=4")
    _need(c.clip_v_max_frac is None or 0 < c.clip_v_max_frac <= 1,
          f"clip_v_max_frac={c.clip_v_max_frac}: must be in (0, 1] or null; set --set clip_v_max_frac=1e-4")
    for name in ["filter_mu_low", "filter_mu_high"]:
        value = getattr(c, name)
        _need(value is None or value > 0, f"{name}={value}: must be positive or null")
    _need(c.filter_rule == "paper" or (c.filter_mu_low is None and c.filter_mu_high is None),
          "filter_mu_low/filter_mu_high set a two-sided band, which only the paper rule has; "
          "add --set filter_rule=paper or drop them")
    _need(c.filter_target_share is None or c.filter_target_dh is None,
          "filter_target_share and filter_target_dh both set; choose one adaptive target")
    _need(c.filter_target_share is None or 0 <= c.filter_target_share <= 1,
          f"filter_target_share={c.filter_target_share}: a share of tokens must be in [0, 1]")
    for name in ["high_entropy_rho", "cov_frac", "kl_cov_frac"]:
        value = getattr(c, name)
        _need(0 < value <= 1, f"{name}={value}: a fraction in (0, 1] (not a percent); "
              f"set --set {name}={FIELDS[name].default}")
    _need(c.cov_lb < c.cov_ub, f"cov_lb={c.cov_lb} must be below cov_ub={c.cov_ub}")
    _need(c.steer_w_min <= c.steer_w_max, "steer_w_min must not exceed steer_w_max")
    _need(c.dual_clip_c is None or c.dual_clip_c > 1, f"dual_clip_c={c.dual_clip_c}: must be > 1 (e.g. 3.0)")
    _need(c.entropy_coef >= 0 and c.entropy_coef_delta >= 0 and c.entropy_coef_min >= 0,
          "entropy_coef, entropy_coef_delta and entropy_coef_min must not be negative")
    _need(c.entropy_coef_min <= c.entropy_coef_max,
          f"entropy_coef_min={c.entropy_coef_min} is above entropy_coef_max={c.entropy_coef_max}; lower the min")
    _need(c.filter_scope in ("auto", *c.method.scopes),
          f"filter_scope=micro: only {' and '.join(MICRO_FILTERS)} select per micro-batch; {c.entropy_control} "
          "selects once per rollout batch as its reference does; drop filter_scope or set it to auto")
    _need(c.scope != "micro" or c.normalizer == "all",
          "filter_scope=micro with filter_normalizer=kept: the minibatch's normalizer would depend on "
          "selections not made yet; use filter_normalizer=all (the references' choice) or filter_scope=rollout")
    _need(not (c.log_filter and c.scope == "micro"),
          f"log_filter records one keep-mask per step, but {c.entropy_control} selects in every micro-batch "
          "(filter_scope=micro); set --set filter_scope=rollout to log it, or drop log_filter")
    for name in ["micro_batch_size", "generation_batch_size", "max_train_prompts"]:
        value = getattr(c, name)
        _need(value is None or value >= 1, f"{name}={value}: must be at least 1 or null")
    _need(c.max_prompt_tokens >= 1, f"max_prompt_tokens={c.max_prompt_tokens}: must be at least 1")
    _need(c.reward_timeout >= 0, f"reward_timeout={c.reward_timeout}: seconds, not negative "
          "(0 = rewards run in-process without a timeout)")
    _need("{prompt}" in c.prompt_template, f"prompt_template {c.prompt_template!r} has no {{prompt}}; "
          "add {prompt} where the problem goes")
    _need(bool(c.model.strip()), "model is empty; use tiny, a model folder or a Hugging Face id")
    _need(c.model != "tiny" or c.precision in ("auto", "fp32"),
          f"precision={c.precision} is for GPU models; the built-in tiny model trains in fp32")
    _need(c.loss_agg_constant is None or c.loss_agg_constant >= 1,
          f"loss_agg_constant={c.loss_agg_constant}: must be at least 1 or null")
    _need(c.lora_r >= 0, f"lora_r={c.lora_r}: a LoRA rank must not be negative; set --set lora_r=8 (0 = full "
          "fine-tuning)")
    _need(c.lora_alpha > 0, f"lora_alpha={c.lora_alpha}: must be positive; set --set lora_alpha=8")
    _need(bool(c.lora_target_modules.strip(",").strip()),
          "lora_target_modules is empty; set --set lora_target_modules=all-linear")
    _need(0 < c.vllm_gpu_memory_utilization <= 1, f"vllm_gpu_memory_utilization={c.vllm_gpu_memory_utilization}: "
          "a share of the device's memory in (0, 1]; set --set vllm_gpu_memory_utilization=0.3")
    _need(c.vllm_kv_cache_gb is None or c.vllm_kv_cache_gb > 0,
          f"vllm_kv_cache_gb={c.vllm_kv_cache_gb}: GiB, must be positive or null; set --set vllm_kv_cache_gb=1")
    _need(c.vllm_max_model_len is None or c.vllm_max_model_len > c.max_new_tokens,
          f"vllm_max_model_len={c.vllm_max_model_len}: must exceed max_new_tokens={c.max_new_tokens} (prompt + "
          "completion); set it null")
    _need(c.rollout_is_threshold is None or c.rollout_is_threshold > 1,
          f"rollout_is_threshold={c.rollout_is_threshold}: an upper bound on pi_train / pi_rollout must be above 1; "
          "set --set rollout_is_threshold=2.0 (or null for the mode's default)")
    _need(c.rollout_is_threshold_lower is None or 0 <= c.rollout_is_threshold_lower < c.is_threshold,
          f"rollout_is_threshold_lower={c.rollout_is_threshold_lower}: must be in [0, {c.is_threshold}) (below "
          "rollout_is_threshold); e.g. --set rollout_is_threshold_lower=0.5")
    _need(isinstance(c.report_to, tuple) and all(t in TRACKERS for t in c.report_to),
          f"report_to={c.report_to!r}: choose none or from {', '.join(TRACKERS)} (a tuple of names)")


# Keys that only some methods read: key -> the entropy_control values that use it (registry), in
# the fields' order.
METHOD_KEYS: dict[str, tuple[str, ...]] = dict(sorted(registry.method_keys().items(),
                                                      key=lambda kv: list(FIELDS).index(kv[0])))


def inert_settings(c: Config) -> list[str]:
    """One line per setting that changes nothing in this config: a key the chosen method does not
    read, or one another key overrides. Not errors: presets layer, and a sweep may switch the method
    under a preset's keys. `entclip train`, sweeps and `predict-entropy` print them as warnings."""
    out = []

    def changed(name: str) -> bool:
        return getattr(c, name) != FIELDS[name].default

    method = c.entropy_control
    for name, users in METHOD_KEYS.items():
        if changed(name) and method not in users:
            out.append(f"{name}={getattr(c, name)} has no effect with entropy_control={method} "
                       f"(it is read by {', '.join(users)})")
    adaptive = registry.ADAPTIVE_MU
    target = next((k for k in adaptive.switch if getattr(c, k) is not None), None)
    if target and method in adaptive.of:
        mu, cap = c.method.key_for("mu"), c.method.key_for("max_frac")
        if changed(mu):
            out.append(f"{mu}={getattr(c, mu)} has no effect: {target} chooses mu each step")
        if cap is not None and getattr(c, cap) is not None:
            out.append(f"{cap}={getattr(c, cap)} is not applied: {target} sets the dropped share "
                       f"itself (set {cap}: null to say so)")
    elif any(changed(k.name) for k in adaptive.more_keys):
        out.append(f"{' / '.join(k.name for k in adaptive.more_keys)} have no effect without "
                   f"{' or '.join(adaptive.switch)} (and entropy_control {' or '.join(adaptive.of)})")
    if c.lora_r == 0:
        out += [f"{k}={getattr(c, k)} has no effect without lora_r > 0 (full fine-tuning)"
                for k in ("lora_alpha", "lora_target_modules") if changed(k)]
    for o in registry.OPTIONS:  # an any-method option's other keys, while its switch is off
        if not o.of and o.switch and not o.is_on({k: getattr(c, k) for k in o.switch}):
            out += [f"{k.name}={getattr(c, k.name)} has no effect without {' or '.join(o.switch)} ({o.label})"
                    for k in o.keys if k.name not in o.switch and changed(k.name)]
    out += [f"{k}={getattr(c, k)} has no effect with {method}: {c.method.ignores_why}"
            for k in c.method.ignores if changed(k)]
    out += [f"entropy_control={method} without {k}: {why}" for k, why in c.method.expects
            if getattr(c, k) is None]
    if c.sampler != "vllm":
        out += [f"{k}={getattr(c, k)} has no effect with sampler={c.sampler} (it sets the vLLM engine)"
                for k in FIELDS if k.startswith("vllm_") and changed(k)]
        out += [f"{k}={getattr(c, k)} has no effect with sampler={c.sampler}: its rollouts come from the trainer's "
                "own weights, so there is no mismatch to correct" for k in FIELDS if k.startswith("rollout_is")
                and changed(k)]
    elif c.rollout_is == "none":
        out += [f"{k}={getattr(c, k)} has no effect with rollout_is=none (the mismatch is only measured)"
                for k in ("rollout_is_threshold", "rollout_is_threshold_lower") if changed(k)]
    elif c.rollout_is != "sequence_mask" and changed("rollout_is_threshold_lower"):
        out.append(f"rollout_is_threshold_lower={c.rollout_is_threshold_lower} has no effect with "
                   f"rollout_is={c.rollout_is} (only sequence_mask has a lower bound)")
    if changed("loss_agg_constant") and c.loss_agg != "constant":
        out.append(f"loss_agg_constant={c.loss_agg_constant} has no effect with loss_agg={c.loss_agg}")
    for k in ("accounting_every", "accounting_unit"):
        if changed(k) and not c.entropy_accounting:
            out.append(f"{k}={getattr(c, k)} has no effect with entropy_accounting=false")
    if c.model != "tiny":
        out += [f"{k}={getattr(c, k)} has no effect: it sets the built-in tiny model, and model={c.model}"
                for k in ("tiny_hidden", "tiny_layers", "tiny_heads", "tiny_ffn", "warmup_lr",
                          "warmup_max_steps", "warmup_target_acc") if changed(k)]
    countdown_keys = ("countdown_numbers", "countdown_max_number", "countdown_max_target")
    if c.dataset:
        out += [f"{k}={getattr(c, k)} has no effect: it sets the built-in task, and dataset={c.dataset}"
                for k in ("max_operand", "n_test", *countdown_keys) if changed(k)]
    else:
        other = countdown_keys if c.task == "arithmetic" else ("max_operand",)
        out += [f"{k}={getattr(c, k)} has no effect with task={c.task}" for k in other if changed(k)]
    return out


# ---- parsing values ----------------------------------------------------------------------

def _coerce(name: str, value: Any) -> Any:
    """Turn a YAML or command-line value into the field's type, or raise a message naming the fix."""
    if name == "eval_sets":
        return _coerce_eval_sets(value)
    if name == "report_to":
        return _coerce_report_to(value)
    if name == "trl":
        return _coerce_trl(value)
    if name == "lora_target_modules" and isinstance(value, (list, tuple)):  # a YAML list of names
        if not all(isinstance(t, str) for t in value):
            raise EntclipError(f"lora_target_modules={value!r}: expected module names, e.g. [q_proj, v_proj]")
        return ",".join(t.strip() for t in value)
    hint = typing.get_type_hints(Config)[name]
    default = FIELDS[name].default
    args = typing.get_args(hint)
    optional = (typing.get_origin(hint) in (typing.Union, types.UnionType)) and type(None) in args
    if optional:
        hint = next(a for a in args if a is not type(None))
        # "none" is a fine run name or dataset config: for text fields only null / empty mean unset.
        nulls = ("null", "") if hint is str else ("none", "null", "")
        if value is None or (isinstance(value, str) and value.lower() in nulls):
            return None
    bad = f"{name}={value!r}: expected {_type_name(hint)}; e.g. --set {name}={default}"
    if typing.get_origin(hint) is Literal:
        choices = typing.get_args(hint)
        if isinstance(value, bool) and ("on" if value else "off") in choices:
            value = "on" if value else "off"  # YAML 1.1 reads a bare on/off as a boolean
        if value not in choices:
            raise EntclipError(f"{name}={value!r}: choose one of {', '.join(map(str, choices))}")
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        raise EntclipError(bad)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise EntclipError(bad)
        try:
            return int(value)
        except ValueError:
            raise EntclipError(bad) from None
    if hint is float:
        if isinstance(value, bool):
            raise EntclipError(bad)
        try:
            return float(value)
        except (TypeError, ValueError):
            raise EntclipError(bad) from None
    if hint is str:
        if isinstance(value, (dict, list)):
            raise EntclipError(bad)
        return str(value)
    raise AssertionError(f"unhandled type {hint} for {name}")


EVAL_SET_KEYS = ("name", "source", "split", "config", "prompt_field", "answer_field", "n")


def _coerce_eval_sets(value: Any) -> tuple:
    """A list of mappings (YAML) -> tuple of dicts with known keys, each with a unique name."""
    example = "e.g. eval_sets: [{name: math500, source: HuggingFaceH4/MATH-500, split: test}]"
    if value is None or value == "" or value == []:
        return ()
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise EntclipError(f"eval_sets={value!r}: expected a list of mappings; {example}")
    out, names = [], set()
    for item in value:
        if not isinstance(item, dict) or "name" not in item:
            raise EntclipError(f"eval_sets item {item!r}: expected a mapping with a name; {example}")
        unknown = [k for k in item if k not in EVAL_SET_KEYS]
        if unknown:
            raise EntclipError(f"eval_sets item {item['name']!r}: unknown key {unknown[0]!r}; "
                               f"use {', '.join(EVAL_SET_KEYS)}")
        if item["name"] in names:
            raise EntclipError(f"eval_sets: two sets named {item['name']!r}; give each a unique name")
        names.add(item["name"])
        if item.get("n") is not None and (not isinstance(item["n"], int) or item["n"] < 1):
            raise EntclipError(f"eval_sets item {item['name']!r}: n={item['n']!r} must be a positive integer")
        out.append({k: (item[k] if k == "n" or item[k] is None else str(item[k])) for k in item})
    return tuple(out)


def _coerce_trl(value: Any, source: str = "") -> dict[str, Any]:
    """TRL GRPOConfig fields by name (checked against TRL's own fields when a TRL run starts)."""
    where = f" in {source}" if source else ""
    if value is None or value == "":
        return {}
    if not isinstance(value, dict):
        raise EntclipError(f"trl={value!r}{where}: expected a mapping of GRPOConfig fields, "
                           "e.g. trl: {use_vllm: true} or --set trl.use_vllm=true")
    for name in value:
        if not isinstance(name, str) or not name.isidentifier():
            raise EntclipError(f"trl.{name}{where}: not a GRPOConfig field name; e.g. --set trl.use_vllm=true")
    return dict(value)


def _coerce_report_to(value: Any) -> tuple[str, ...]:
    """none / one name / "a,b" / a YAML list -> a tuple of tracker names, in order, each once."""
    if value is None:
        return ()
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(t, str) for t in items):
        raise EntclipError(f"report_to={value!r}: expected none or names from {', '.join(TRACKERS)}; "
                           "e.g. --set report_to=tensorboard,wandb")
    names = [t.strip().lower() for t in items if t.strip()]
    if names == ["none"]:
        return ()
    if "none" in names:
        raise EntclipError(f"report_to={value!r}: none means no tracker; give it alone or drop it")
    for t in names:
        if t not in TRACKERS:
            raise EntclipError(f"report_to: unknown tracker {t!r}; choose none or from {', '.join(TRACKERS)} "
                               "(comma-separated), e.g. --set report_to=tensorboard")
    return tuple(dict.fromkeys(names))


def _type_name(hint: Any) -> str:
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(hint, str(hint))


def _check_keys(data: dict[str, Any], source: str) -> None:
    for key in data:
        if key not in FIELDS:
            close = difflib.get_close_matches(str(key), FIELDS, n=3)
            hint = f"; did you mean {' or '.join(close)}?" if close else "; see `entclip train --help-config`"
            raise EntclipError(f"unknown config key {key!r} in {source}{hint}")


def _merge(base: dict[str, Any], layer: dict[str, Any], source: str) -> dict[str, Any]:
    """`layer` over `base`; `trl.NAME` keys (and a `trl` mapping) add to the TRL fields below them."""
    passed = {k.split(".", 1)[1]: v for k, v in layer.items() if isinstance(k, str) and k.startswith("trl.")}
    layer = {k: v for k, v in layer.items() if not (isinstance(k, str) and k.startswith("trl."))}
    _check_keys(layer, source)
    out = {**base, **{k: _coerce(k, v) for k, v in layer.items()}}
    if "trl" in layer or passed:
        out["trl"] = {**base.get("trl", {}), **out.get("trl", {}), **_coerce_trl(passed, source)}
    return out


# ---- sources -----------------------------------------------------------------------------

def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("entclip.presets").iterdir()
                  if p.name.endswith(".yaml"))


def _read_yaml(path: Path, what: str) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise EntclipError(f"cannot read {what} {path}: {exc.strerror}; check the path", NOT_FOUND) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise EntclipError(f"{what} {path} is not valid YAML{where}; fix the syntax") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise EntclipError(f"{what} {path} must be a mapping of key: value lines")
    return data


def load_preset(preset: str) -> dict[str, Any]:
    """A shipped preset by name, or a YAML file by path."""
    if preset.endswith((".yaml", ".yml")) or "/" in preset:
        return _read_yaml(Path(preset), "preset")
    if preset not in preset_names():
        close = difflib.get_close_matches(preset, preset_names(), n=3)
        hint = f"did you mean {' or '.join(close)}? " if close else ""
        raise EntclipError(f"unknown preset {preset!r}: {hint}choose from {', '.join(preset_names())} "
                           "or give a YAML path")
    text = resources.files("entclip.presets").joinpath(f"{preset}.yaml").read_text()
    return yaml.safe_load(text) or {}


def parse_sets(sets: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in sets:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise EntclipError(f"--set {item!r}: expected key=value, e.g. --set group_size=8")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        out[key.strip()] = value
    return out


def resolve(preset: str | None = None, config_file: str | None = None,
            flags: dict[str, Any] | None = None, sets: list[str] | None = None) -> Config:
    """Build the config: defaults < preset < config file < flags < --set."""
    data: dict[str, Any] = {}
    if preset:
        data = _merge(data, load_preset(preset), f"preset {preset}")
    if config_file:
        data = _merge(data, _read_yaml(Path(config_file), "config file"), f"config file {config_file}")
    data = _merge(data, {k: v for k, v in (flags or {}).items() if v is not None}, "flags")
    data = _merge(data, parse_sets(sets or []), "--set")
    return Config(**data)


def describe_fields() -> list[tuple[str, str, str]]:
    """(name, default, help) for every field, in declaration order."""
    return [(f.name, repr(f.default), f.metadata["help"]) for f in dataclasses.fields(Config)]
