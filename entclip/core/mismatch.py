"""The rollout/trainer mismatch: how far the sampler's log-probs are from the trainer's, and the
importance weights that correct for it (docs/vllm.md).

A sampler with its own copy of the weights (vLLM) draws token k from pi_rollout, which differs from
the trainer's pi_train by kernels, dtype and batching. The per-token ratio rho_t = pi_train(k_t) /
pi_rollout(k_t) = exp(old_logp_t - rollout_logp_t) reweighs a sample of pi_rollout into one of
pi_train. Two corrections, as their references define them:

- token_truncate (verl's rollout_is, level token, mode truncate; TRL's token_truncate): each token's
  policy-gradient term is weighed by w_t = min(rho_t, C), C = 2.0 by default (verl's rollout_is_threshold).
- sequence_mask (TRL's vllm_importance_sampling_mode default): one ratio per sequence, rho_seq =
  exp(sum_t (old_logp_t - rollout_logp_t)) over its valid tokens, weighs all its tokens; a sequence
  with rho_seq > C (C = 3.0 by default, TRL's vllm_importance_sampling_clip_max) or rho_seq < C_min
  (none by default) gets weight 0: it stays in the normalizer, as in TRL, but adds no gradient.

The weights are constants of the rollout batch (no gradient), computed once before the first update.
"""

from __future__ import annotations

import math

import torch

MODES = ("none", "token_truncate", "sequence_mask")


def importance_weights(old_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor, mode: str,
                       threshold: float, threshold_lower: float | None = None
                       ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(weights, corrected), both (B, T): the weight on each token's policy term (0 on padding) and
    where the bound acted (a truncated token, a masked sequence's tokens); (None, None) for "none".

    old_logp, rollout_logp: (B, T) the trainer's and the sampler's log p of the sampled tokens;
    mask: (B, T) valid tokens. The ratios are formed in log space, in float32, without gradient.
    """
    if mode == "none":
        return None, None
    m = mask.float()
    diff = (old_logp.detach().float() - rollout_logp.float()) * m  # (B, T) log rho_t, 0 on padding
    if mode == "token_truncate":
        ratio = torch.exp(diff)  # (B, T)
        return ratio.clamp(max=threshold) * m, (ratio > threshold) & mask.bool()
    if mode == "sequence_mask":
        seq = diff.sum(dim=1, keepdim=True)  # (B, 1) log rho_seq
        low = -math.inf if threshold_lower is None or threshold_lower <= 0 else math.log(threshold_lower)
        inside = (seq <= math.log(threshold)) & (seq >= low)  # (B, 1)
        weights = torch.where(inside, torch.exp(seq), torch.zeros_like(seq)).expand_as(m) * m
        return weights, ~inside & mask.bool()
    raise ValueError(f"unknown rollout_is mode {mode!r}; choose one of {', '.join(MODES)}")


def mismatch_stats(old_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor,
                   corrected: torch.Tensor | None) -> dict[str, float]:
    """Figures over the valid tokens (their count under "n"): |log p_train - log p_rollout| (mean,
    max), the per-token ratio rho_t before any bound (min, mean, max), and the share of tokens the
    bound acted on (`corrected` from importance_weights; 0 without a correction)."""
    valid = mask.bool()
    n = int(valid.sum())
    if n == 0:
        return {"n": 0, "logp_diff_mean": 0.0, "logp_diff_max": 0.0, "is_ratio_min": 1.0, "is_ratio_mean": 1.0,
                "is_ratio_max": 1.0, "is_corrected_frac": 0.0}
    diff = (old_logp.detach().float() - rollout_logp.float())[valid]  # (n,)
    ratio = torch.exp(diff)
    return {"n": n, "logp_diff_mean": float(diff.abs().mean()), "logp_diff_max": float(diff.abs().max()),
            "is_ratio_min": float(ratio.min()), "is_ratio_mean": float(ratio.mean()),
            "is_ratio_max": float(ratio.max()),
            "is_corrected_frac": 0.0 if corrected is None else float(corrected[valid].float().mean())}
