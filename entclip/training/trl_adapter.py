"""entclip's rollout-scope token filters inside TRL's GRPOTrainer (the `entclip[trl]` extra, trl 1.16).

`EntclipGRPOTrainer` is TRL's `GRPOTrainer` with `_generate_and_score_completions` overridden (and
`_get_per_token_logps_and_entropies`, for the shared forward below): TRL generates and scores the
generation batch as usual; then, once per generation batch and before any update on it, one no-grad forward of the policy per
micro-batch (`rollout.completion_logits`, (b, T, V) in the model's dtype) gives entclip's token
statistics (`theory.token_stats`, chunked: no float32 copy of the logits). Where TRL runs a no-grad
forward of the policy of its own there (its old log-probs: more than one update per generation
batch, or vLLM's importance-sampling correction), that forward is entclip's statistics pass: the
adapter's `_get_per_token_logps_and_entropies` computes the statistics in it and hands TRL their
log p as the old log-probs, so the filter adds no forward (`perf/stats_shared` 1). Then
`objective.batch_filter` - the very function entclip's own engine calls, gathering over all
processes - decides the keep-mask. The mask reaches TRL's loss as follows (TRL 1.16's
`_compute_loss` reads `mask = completion_mask * tool_mask`; `completion_mask` also builds the
attention mask of every forward, so it is left alone):

- filter_normalizer kept (Clip_B, Clip_V, sign: their references'): the keep-mask is folded into
  `tool_mask`, so a dropped token leaves the policy term, the normalizer, the KL and the entropy
  bonus, as in entclip's engine. `num_items_in_batch` (the normalizer of TRL's dapo, cispo and
  vespo losses) is recounted from the kept tokens of all processes; grpo/sapo divide by each
  sequence's kept tokens, bnpo by the micro-batch's, dr_grpo by a constant, luspo sums per sequence.
- filter_normalizer all (80/20, Clip-Cov: their references'): the advantage of a dropped token is
  set to 0 (TRL accepts (B, T) advantages), so only its policy term goes; the normalizer, the KL and
  (as Clip-Cov's references detach the tokens) the entropy bonus keep every valid token.

This module is imported only by whoever uses it (trl is an optional dependency).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import time
import warnings

import torch
from trl import GRPOTrainer

# TRL 1.16 reads transformers' deprecated is_gradient_checkpointing on every generation: not the user's to fix.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

from entclip.contracts.config import FIELDS, Config
from entclip.contracts.errors import EntclipError
from entclip.core import registry, theory
from entclip.training import objective
from entclip.training.accounting import quadrants
from entclip.training.batch import Stats, derive_seed
from entclip.training.parallel import filter_rows, gather_rows, token_figures
from entclip.training.rollout import completion_logits

# TRL 1.16's loss types whose aggregate this adapter was checked against (grpo_trainer._compute_loss).
SUPPORTED_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo")
# Loss types that divide by `num_items_in_batch` (recounted from the kept tokens under "kept").
NUM_ITEMS_LOSS_TYPES = ("dapo", "cispo", "vespo")


def check_supported(cfg: Config, args: Any) -> None:
    """Refuse, with a one-line EntclipError naming the key, what the TRL path cannot do as entclip does.

    `args` is TRL's GRPOConfig (None: only the entclip side is checked)."""
    method = cfg.method
    if method.place not in (None, registry.FILTER):
        raise EntclipError(
            f"entropy_control={method.name}: a {method.place} acts inside TRL's loss, which the TRL path "
            "does not change; choose a token filter (clip_b, clip_v, sign, high_entropy, clip_cov) or "
            "train it with entclip's own engine")
    if method.place == registry.FILTER and cfg.scope != registry.ROLLOUT:
        raise EntclipError(
            f"filter_scope={cfg.scope} ({method.name}): the TRL path selects once per generation batch; "
            "set filter_scope=rollout, or use TRL's own top_entropy_quantile for 80/20 per micro-batch")
    # entclip keys TRL honours only through its own fields: fine when `args` carries the same value.
    carried = {"entropy_coef": lambda a: a.entropy_coef == cfg.entropy_coef,
               "entropy_target": lambda a: a.use_adaptive_entropy and a.entropy_target == cfg.entropy_target,
               "kl_coef": lambda a: a.beta == cfg.kl_coef}
    own_only = {"dual_clip_c": "TRL has no dual clip (its `delta` is another clamp)",
                "entropy_coef": "set TRL's GRPOConfig entropy_coef instead",
                "entropy_target": "set TRL's GRPOConfig use_adaptive_entropy and entropy_target instead",
                "kl_coef": "set TRL's GRPOConfig beta instead"}
    for key, fix in own_only.items():
        if getattr(cfg, key) == FIELDS[key].default or (args is not None and key in carried and carried[key](args)):
            continue
        raise EntclipError(f"{key}={getattr(cfg, key)}: entclip's own engine applies it, the TRL path "
                           f"does not; {fix} and drop {key}")
    if args is None:
        return
    if args.temperature != cfg.temperature:
        raise EntclipError(f"temperature={cfg.temperature} but TRL's temperature={args.temperature}: the "
                           "statistics must use the sampling temperature; set both to the same value")
    if method.place != registry.FILTER:
        return
    if args.loss_type not in SUPPORTED_LOSS_TYPES:
        why = ("its sequence weight sums log-ratios over the loss mask, so a dropped token would move the "
               "kept tokens' weights" if args.loss_type == "vespo" else "not checked with a token filter")
        raise EntclipError(f"loss_type={args.loss_type} ({why}); use one of {', '.join(SUPPORTED_LOSS_TYPES)}")
    if args.importance_sampling_level != "token":
        raise EntclipError(
            f"importance_sampling_level={args.importance_sampling_level}: the sequence ratio averages over the "
            "loss mask, so a dropped token would change the kept tokens' ratio; set importance_sampling_level=token")
    if args.top_entropy_quantile < 1.0:
        raise EntclipError(
            f"top_entropy_quantile={args.top_entropy_quantile} with entropy_control={method.name}: two token "
            "filters, TRL's over the kept tokens of each micro-batch; set top_entropy_quantile=1.0 (or use "
            "entropy_control=high_entropy alone)")
    if args.off_policy_mask_threshold is not None:
        raise EntclipError(
            f"off_policy_mask_threshold={args.off_policy_mask_threshold} with entropy_control={method.name}: "
            "its sequence KL would average over the kept tokens only; drop off_policy_mask_threshold")
    bonus_on = args.entropy_coef != 0.0 or args.use_adaptive_entropy  # as TRL: _entropy_bonus_enabled
    if cfg.normalizer == registry.ALL and bonus_on and not method.detach_only:
        raise EntclipError(
            f"filter_normalizer=all ({method.name}) with TRL's entropy bonus: TRL's bonus would still count the "
            "dropped tokens, entclip's does not; set filter_normalizer=kept or TRL's entropy_coef=0")


@dataclass
class FilteredBatch:
    """What the adapter decided on one generation batch (this process's rows), before TRL shuffles it."""

    step: int                 # TRL's global step when the batch was generated
    input_ids: torch.Tensor   # (B, P + T) prompt and completion
    attention_mask: torch.Tensor
    completion_ids: torch.Tensor  # (B, T)
    mask: torch.Tensor        # (B, T) TRL's loss mask before the filter (completion_mask * tool_mask)
    advantages: torch.Tensor  # (B,) TRL's advantages
    stats: Stats
    keep: torch.Tensor        # (B, T) bool: objective.batch_filter's keep-mask
    figures: dict[str, float]


class EntclipGRPOTrainer(GRPOTrainer):
    """TRL's GRPOTrainer with an entclip token filter at rollout scope.

    `EntclipGRPOTrainer(model, reward_funcs, args=GRPOConfig(...), ..., config=entclip_config)`: every
    argument but `config` is TRL's. Unsupported settings raise EntclipError before TRL loads anything.
    """

    _shared_pass: list | None = None  # armed by _generate_and_score_completions while TRL's forward may serve

    def __init__(self, *args: Any, config: Config, add_special_tokens: bool = True, **kwargs: Any):
        trl_args = kwargs.get("args", args[2] if len(args) > 2 else None)
        check_supported(config, trl_args)
        super().__init__(*args, **kwargs)
        check_supported(config, self.args)  # TRL's defaults, when no GRPOConfig was given
        self.entclip_config = config
        self.add_special_tokens = add_special_tokens
        self.last_filtered: FilteredBatch | None = None
        self.filter_rows: list[dict] = []  # log_filter: the last generation batch's filter.jsonl rows (all processes)

    def _tokenize_prompts(self, prompts: list):
        """Text prompts that already carry a chat template (add_special_tokens False, as entclip's dataset
        prompts): tokenized without the tokenizer's special tokens, as the own engine feeds them (TRL's
        default would add a BOS token before the template's own)."""
        from trl.data_utils import is_conversational

        if self.add_special_tokens or is_conversational({"prompt": prompts[0]}):
            return super()._tokenize_prompts(prompts)
        return self.processing_class(text=prompts, add_special_tokens=False)["input_ids"], None, {}

    @torch.no_grad()
    def _token_stats(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     completion_ids: torch.Tensor, size: int | None = None) -> Stats:
        """log p, H, S* and E_p[S] of every completion token under the current policy, one forward per
        micro-batch of `size` rows (default per_device_train_batch_size; the logits of one micro-batch
        at a time)."""
        from trl.models.utils import disable_gradient_checkpointing

        B, T = completion_ids.shape
        out = {k: torch.empty(B, T, device=completion_ids.device) for k in ("logp", "entropy", "disc", "baseline")}
        size = size or self.args.per_device_train_batch_size
        with disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            for s in range(0, B, size):
                rows = slice(s, s + size)
                with self.accelerator.autocast():
                    logits = completion_logits(self.model, input_ids[rows], attention_mask[rows], T)
                st = theory.token_stats(logits, completion_ids[rows], self.entclip_config.temperature)
                del logits
                for k in out:
                    out[k][rows] = getattr(st, k)
        return Stats(out["logp"], out["entropy"], out["disc"], out["baseline"], None)

    def computes_old_logps(self) -> bool:
        """Whether TRL 1.16 runs a no-grad forward of the policy for its old log-probs on each generation
        batch (its own condition in `_generate_and_score_completions`)."""
        generate_every = self.args.steps_per_generation * self.num_iterations
        return (self.args.gradient_accumulation_steps % generate_every != 0
                or bool(self.use_vllm and self.vllm_importance_sampling_correction))

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep,
                                           batch_size=None, compute_entropy=False, compute_aux_loss=False,
                                           **extra):
        """TRL's log-prob forward; its old-log-prob forward of a generation batch (the first no-grad call
        on the policy while `_generate_and_score_completions` waits for it, text only) is entclip's
        statistics pass instead: the same micro-batches, one forward, TRL gets their log p."""
        if (self._shared_pass is not None and model is self.model and not torch.is_grad_enabled()
                and not compute_aux_loss and all(v is None for v in extra.values())):
            t0 = time.perf_counter()
            stats = self._token_stats(input_ids, attention_mask, input_ids[:, -logits_to_keep:], batch_size)
            self._shared_pass.append((stats, time.perf_counter() - t0))
            self._shared_pass = None  # one pass: TRL's later calls (the reference model's) are its own
            return stats.old_logp, (stats.entropy if compute_entropy else None), None
        return super()._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, logits_to_keep, batch_size=batch_size,
            compute_entropy=compute_entropy, compute_aux_loss=compute_aux_loss, **extra)

    def _generate_and_score_completions(self, inputs):
        shared: list = []
        self._shared_pass = shared if self.model.training and self.computes_old_logps() else None
        try:
            out = super()._generate_and_score_completions(inputs)
        finally:
            self._shared_pass = None
        if not self.model.training:  # evaluation: TRL's own loss, unfiltered
            return out
        cfg = self.entclip_config
        completion_ids, completion_mask = out["completion_ids"], out["completion_mask"]
        input_ids = torch.cat([out["prompt_ids"], completion_ids], dim=1)
        attention_mask = torch.cat([out["prompt_mask"], completion_mask], dim=1)
        tool_mask = out.get("tool_mask")
        mask = completion_mask if tool_mask is None else completion_mask * tool_mask
        if shared:  # TRL's old-log-prob forward was the statistics pass
            (stats, stats_s), = shared
        else:
            t0 = time.perf_counter()
            stats = self._token_stats(input_ids, attention_mask, completion_ids)
            stats_s = time.perf_counter() - t0
        adv = out["advantages"]
        adv_tok = (adv[:, None] if adv.dim() == 1 else adv).expand_as(mask).float()
        step = self.state.global_step
        keep, figures = objective.batch_filter(
            cfg, self.accelerator, stats, adv_tok, mask,
            torch.Generator().manual_seed(derive_seed(cfg.seed, "filter", step)))
        keep = keep.bool() & mask.bool()
        if cfg.method.place == registry.FILTER:
            if cfg.normalizer == registry.KEPT:  # a dropped token leaves everything
                ones = torch.ones_like(completion_mask) if tool_mask is None else tool_mask
                out["tool_mask"] = ones * keep.to(ones.dtype)
                loss_mask = completion_mask * out["tool_mask"]
                out["num_items_in_batch"] = self.accelerator.gather(loss_mask.sum()).sum()
            else:  # only its policy term: advantage 0 on a dropped token
                out["advantages"] = torch.where(keep, adv_tok.to(adv.dtype), torch.zeros_like(adv_tok, dtype=adv.dtype))
        # entropy/mean and disc/* over every valid token, as the own engine logs them (TRL's `entropy` is
        # the mean over its loss mask: the kept tokens once a filter drops some).
        g = lambda x: gather_rows(self.accelerator, x)  # noqa: E731
        batch = token_figures(g(stats.entropy), g(stats.disc), g(stats.baseline), g(mask))
        # The quadrants' shares (A > 0 / < 0 x S* - E_p[S] > 0 / < 0) over every valid token; their predicted
        # entropy changes (quad/*_pred) need the own engine's accounting passes and are not logged here.
        deviation = g(stats.disc - stats.baseline)
        quads = quadrants(deviation, g(adv_tok), g(mask), torch.zeros_like(deviation))
        batch.update({f"quad/{name}_share": share for name, (share, _) in quads.items()})
        perf = {"perf/stats_pass_s": stats_s, "perf/stats_shared": float(bool(shared))}
        for name, value in {**batch, **figures, **perf}.items():
            self._metrics["train"][name].append(float(value))
        self.last_filtered = FilteredBatch(step, input_ids, attention_mask, completion_ids, mask, adv, stats,
                                           keep, figures)
        if cfg.log_filter:  # rows keyed by the row's place in the generation batch: (group, sample)
            n, G = completion_ids.shape[0], self.num_generations
            first = self.accelerator.process_index * n
            self.filter_rows = filter_rows(self.accelerator, step // self.updates_per_generation() + 1,
                                           completion_ids, keep, mask,
                                           [divmod(first + b, G) for b in range(n)])
        return out

    def updates_per_generation(self) -> int:
        """Optimizer steps per generation batch: entclip's epochs x minibatches."""
        a = self.args
        return max(a.steps_per_generation * a.num_iterations // a.gradient_accumulation_steps, 1)
