"""The objects a run is made of, each built by one named function, and the state that carries from step
to step.

- `Session` (`open_session`): what samples and scores. The accelerator, the policy and its tokenizer,
  the task's problems, the sampler and the rewards. Evaluation and predict-entropy need only this.
- `Learner` (`open_learner`): what trains. The optimizer, the learning-rate schedule and the frozen
  KL reference.
- `TrainState`: what one step hands the next (and a checkpoint keeps): the adaptive bonus's coefficient
  and last entropy, the non-finite update counters, a requested stop.

Which weights a run starts from (`start_weights`): the config's model (`cfg.model`: the built-in tiny
model with its warm start, a folder or an id), or a given `model_path` (a checkpoint to resume or to
evaluate, a LoRA adapter over the run's base). When resuming, the KL reference is the run's own start.
"""

from __future__ import annotations

import contextlib
import math
import random
from dataclasses import dataclass
from typing import Any, Callable

import torch

from entclip.contracts.config import Config
from entclip.contracts.errors import EntclipError
from entclip.contracts.rundir import RunDir
from entclip.data.libraries import quiet_libraries
from entclip.data.models import add_lora, is_adapter, load_adapter, load_folder, load_policy
from entclip.data.rewards import RewardRunner
from entclip.data.tasks import builtin_reward
from entclip.training.rollout import HFSampler, Sampler, completion_logits

Log = Callable[[str], None]
# Receives the run's default sampler (HFSampler over the live policy) and returns the one the run uses:
# a wrapper that post-processes rollouts (tests build batches with guaranteed properties), or a backend.
WrapSampler = Callable[[Sampler], Sampler]
# The sampling backends the config's `sampler` names: (policy_fn, tokenizer, add_special_tokens, autocast,
# generation_batch_size) -> Sampler.
SAMPLERS: dict[str, Callable[..., Sampler]] = {"hf": HFSampler}


@dataclass
class Tasks:
    """The problems a run trains and evaluates on (objects with .prompt and .answer)."""

    train: list
    eval_sets: dict[str, list]
    add_special_tokens: bool  # how prompts are tokenized (a chat template adds its own)


@dataclass
class Session:
    """What samples and scores: everything but the optimizer."""

    cfg: Config
    accelerator: Any
    model: torch.nn.Module        # wrapped by accelerate (DDP under several processes)
    tokenizer: Any
    warm_start: dict | None       # the tiny model's warm-start record (None for other models)
    precision: str                # fp32, bf16-mixed or bf16 (plan.resolve_precision)
    autocast: Callable[[], Any]   # context manager around forwards (bf16 autocast, or nothing)
    lora: bool                    # the policy is a peft model: the reference is its disabled adapter
    tasks: Tasks
    sampler: Sampler
    rewards: Any                  # rewards.RewardRunner
    run_dir: RunDir | None
    log: Log
    reward_error_shown: bool = False  # a failed reward call is logged once (counted every step)

    @property
    def policy(self) -> torch.nn.Module:
        """The model itself, unwrapped."""
        return self.accelerator.unwrap_model(self.model)


@dataclass
class Learner:
    """What trains: AdamW over the trainable parameters, its schedule, the frozen KL reference."""

    opt: Any                      # prepared by accelerate
    sched: torch.optim.lr_scheduler.LambdaLR
    ref: torch.nn.Module | None   # None without kl_coef, or with LoRA (the disabled adapter is the reference)


@dataclass
class TrainState:
    """What a step hands the next; a checkpoint saves it (checkpoints.save) and resume restores it
    (checkpoints.restore)."""

    entropy_coef: float           # the bonus coefficient (adapted per update when entropy_target is set)
    last_entropy: float = math.inf  # the adaptive bonus's last measured entropy (inf: none yet, not applied)
    nonfinite_total: int = 0      # updates skipped for a non-finite loss or gradient, whole run
    nonfinite_streak: int = 0     # ... in a row, up to now
    stop_requested: bool = False  # set by Ctrl-C: stop after the current step


def open_session(cfg: Config, run: RunDir | None, log: Log, model_path: str | None = None,
                 wrap_sampler: WrapSampler | None = None, for_training: bool = True) -> Session:
    """The accelerator, the policy (`start_weights`), the task, the sampler and the rewards.

    `for_training`: the policy goes to training form (no dropout, gradient checkpointing as configured);
    evaluation and prediction without a step skip nothing else. Seeds torch and random with cfg.seed first.
    """
    from accelerate import Accelerator

    from entclip.training.plan import resolve_precision

    quiet_libraries()
    if cfg.sampler == "vllm":  # before any model loads: a missing vLLM is one line naming the fix
        from entclip.training.vllm_sampler import require_vllm

        require_vllm()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise EntclipError("device=cuda but no CUDA device is visible; use --set device=cpu or auto")
    precision = resolve_precision(cfg)
    # cpu=True also when no GPU is visible: it is what makes accelerate use gloo across CPU processes.
    accelerator = Accelerator(cpu=cfg.device == "cpu" or not torch.cuda.is_available())
    # bf16-mixed: our own autocast around forwards. accelerate's would convert the outputs - the
    # full (b, T, V) logits - back to float32; under ours they stay bf16 and are read in chunks.
    device_type = accelerator.device.type
    autocast = ((lambda: torch.autocast(device_type, dtype=torch.bfloat16))
                if precision == "bf16-mixed" else contextlib.nullcontext)
    n_proc = accelerator.num_processes
    if cfg.prompts_per_step % n_proc or (cfg.batch_size // n_proc) % cfg.minibatches:
        raise EntclipError(f"prompts_per_step={cfg.prompts_per_step} x group_size={cfg.group_size} does not "
                           f"split into {n_proc} processes x {cfg.minibatches} minibatches; use a multiple "
                           f"of {n_proc} prompts and a minibatches that divides each process's rows")
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    model, tokenizer, warm_start = start_weights(cfg, precision, model_path, log)
    tasks = load_tasks(cfg, tokenizer, log)
    verifier = "math" if cfg.dataset else builtin_reward(cfg)
    rewards = RewardRunner(cfg.reward, default=verifier, verifier=verifier, timeout=cfg.reward_timeout)
    lora = is_peft(model)
    if for_training:
        _disable_dropout(model)
        if cfg.gradient_checkpointing:
            _enable_checkpointing(model.get_base_model() if lora else model)
    session = Session(cfg, accelerator, model, tokenizer, warm_start, precision, autocast, lora, tasks,
                      sampler=None, rewards=rewards, run_dir=run, log=log)  # type: ignore[arg-type]
    if cfg.sampler == "vllm":  # a colocated engine over a copy of the policy; vLLM is imported only here
        from entclip.training.vllm_sampler import VLLMSampler

        default = VLLMSampler(cfg, session.policy, tokenizer, tasks.add_special_tokens, precision)
    else:
        default = SAMPLERS[cfg.sampler](lambda: session.policy, tokenizer, tasks.add_special_tokens, autocast,
                                        cfg.generation_batch_size)
    session.sampler = default if wrap_sampler is None else wrap_sampler(default)
    return session


def open_learner(session: Session, model_path: str | None = None, resume: bool = False) -> Learner:
    """AdamW over the trainable parameters (with LoRA: the adapters), the schedule, the KL reference;
    the policy and optimizer prepared by accelerate (the session's model becomes the wrapped one)."""
    cfg, accelerator = session.cfg, session.accelerator
    ref = None
    if cfg.kl_coef > 0 and not session.lora:
        # The reference is the run's start: the config's model when resuming, else the given start.
        ref = start_weights(cfg, session.precision, None if resume else model_path, lambda s: None)[0]
        if session.precision != "fp32":  # inference only: bf16 weights suffice
            ref = ref.to(torch.bfloat16)
        ref = ref.to(accelerator.device).eval()
        ref.requires_grad_(False)
    model = session.model
    # Fused AdamW on CUDA: one kernel, no parameter-sized temporaries (memory.py counts on it).
    fused = accelerator.device.type == "cuda"
    if fused:
        model.to(accelerator.device)
    opt = torch.optim.AdamW(trainable(model), lr=cfg.lr, weight_decay=cfg.weight_decay,
                            **({"fused": True} if fused else {}))
    session.model, opt = accelerator.prepare(model, opt)
    total = cfg.steps * cfg.epochs * cfg.minibatches
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: lr_factor(cfg, i, total))
    return Learner(opt, sched, ref)


def start_weights(cfg: Config, precision: str, model_path: str | None, log: Log):
    """(model, tokenizer, warm_start): `model_path` if given (a LoRA adapter goes over the run's own
    base), else the config's model; LoRA adapters added when configured."""
    if model_path and is_adapter(model_path):  # a LoRA checkpoint: the run's base and its adapter
        model, tokenizer, warm_start = _config_model(cfg, precision, log)
        return load_adapter(_for_lora(model, cfg), model_path, trainable=True), tokenizer, warm_start
    if model_path:
        model, tokenizer, warm_start = load_folder(model_path, precision, cfg.trust_remote_code)
    else:
        model, tokenizer, warm_start = _config_model(cfg, precision, log)
    if cfg.lora_r > 0:
        model = add_lora(_for_lora(model, cfg), cfg)
    return model, tokenizer, warm_start


def _config_model(cfg: Config, precision: str, log: Log):
    if cfg.model == "tiny":
        return load_policy(cfg, log)
    return load_folder(cfg.model, precision, cfg.trust_remote_code)


def load_tasks(cfg: Config, tokenizer, log: Log) -> Tasks:
    """Training problems, evaluation sets and how prompts are tokenized: a dataset's, or the built-in task's."""
    if cfg.dataset:
        from entclip.data.tasks.dataset import load_dataset_task

        task = load_dataset_task(cfg, tokenizer)
        tasks = Tasks(task.train, task.eval_sets, task.add_special_tokens)
        dropped = {k: v for k, v in task.skipped.items() if v}
        log(f"dataset {cfg.dataset}: {len(task.train)} training prompts"
            + (f", skipped {dropped}" if dropped else "")
            + "".join(f"; eval {name}: {len(p)}" for name, p in task.eval_sets.items()))
    else:
        from entclip.data.tasks import builtin_task

        task = builtin_task(cfg)
        tasks = Tasks(task.train, {"test": task.test[:cfg.eval_n]}, True)
    if len(tasks.train) < cfg.prompts_per_step:
        raise EntclipError(f"{len(tasks.train)} training prompts, fewer than prompts_per_step="
                           f"{cfg.prompts_per_step}; lower prompts_per_step or give more data")
    return tasks


@torch.no_grad()
def ref_logits(session: Session, learner: Learner, ids: torch.Tensor, am: torch.Tensor, T: int) -> torch.Tensor:
    """(b, T, V) logits of the KL reference: the frozen start model, or with LoRA the policy with its
    adapter disabled (the base weights never train, so it is the start model too)."""
    policy = session.policy
    with policy.disable_adapter() if session.lora else contextlib.nullcontext():
        with session.autocast():
            return completion_logits(policy if session.lora else learner.ref, ids, am, T)


def trainable(model) -> list[torch.nn.Parameter]:
    """The parameters the optimizer updates: all of them, or with LoRA the adapters'."""
    return [p for p in model.parameters() if p.requires_grad]


def is_peft(model) -> bool:
    """A peft PeftModel (LoRA), told by its class's module so that peft need not be importable."""
    return type(model).__module__.split(".")[0] == "peft"


def lr_factor(cfg: Config, i: int, total: int) -> float:
    """The schedule's factor at optimizer update i of `total`: linear warm-up, then constant/linear/cosine."""
    if i < cfg.lr_warmup_steps:
        return (i + 1) / cfg.lr_warmup_steps
    frac = (i - cfg.lr_warmup_steps) / max(total - cfg.lr_warmup_steps, 1)
    if cfg.lr_schedule == "linear":
        return max(0.0, 1.0 - frac)
    if cfg.lr_schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(frac, 1.0)))
    return 1.0


def _for_lora(model, cfg: Config):
    """A base model ready for adapters: under gradient checkpointing the frozen embedding's output must
    require grad, else no checkpointed layer would carry a gradient back to the adapters."""
    if cfg.gradient_checkpointing:
        model.enable_input_require_grads()
    return model


def _enable_checkpointing(base) -> None:
    if hasattr(base, "activation_checkpointing_enable"):  # the name since transformers 5.x
        base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    base.config.use_cache = False  # generate passes use_cache itself


def _disable_dropout(model) -> None:
    """No dropout in RL: old and new log-probs must come from the same function (as TRL does)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0
