"""The one objective's configurable parts: which tokens train, how each is weighted, what is added.

Two moments per rollout batch (the engine calls both):
- `batch_filter`, once before the first update, over the whole training batch (gathered across
  processes): a keep-mask from Clip_B / Clip_V (fixed or adaptive mu), the sign intervention,
  high-entropy tokens (80/20) or Clip-Cov. Dropped tokens leave the loss.
- `token_terms`, every update: the clipped surrogate (eps_low / eps_high, optional dual clip) or
  KL-Cov's loss, STEER weights, the k3 KL to the reference and the entropy bonus.
Metric names: `clip/filter_frac*` for any keep-mask, `clip/<method>_frac` for per-update selections.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from entclip import baselines, losses, theory
from entclip.config import Config
from entclip.parallel import gather_rows

FILTERS = ("clip_b", "clip_v", "sign", "high_entropy", "clip_cov")


def batch_filter(cfg: Config, accelerator, stats, adv_tok: torch.Tensor, mask: torch.Tensor,
                 generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
    """Keep-mask (B, T) of the configured filter over the whole training batch, and its stats."""
    g = lambda t: gather_rows(accelerator, t)  # noqa: E731
    disc, base, adv, gmask = g(stats.disc), g(stats.baseline), g(adv_tok), g(mask)
    z_b = losses.clip_b_z(disc, gmask)
    z_v = losses.clip_v_z(disc, base, gmask)
    valid = gmask.bool()
    out = {"disc/min_z_b": float(z_b[valid].min()) if valid.any() else 0.0,
           "disc/min_z_v": float(z_v[valid].min()) if valid.any() else 0.0}
    method = cfg.entropy_control
    if method in ("clip_b", "clip_v"):
        mu, max_frac = cfg.filter_mu, cfg.clip_v_max_frac if method == "clip_v" else None
        if cfg.filter_target_share is not None or cfg.filter_target_dh is not None:
            z = z_v if method == "clip_v" else z_b
            kw = dict(include_zero_adv=method == "clip_v", mu_min=cfg.adaptive_mu_min, mu_max=cfg.adaptive_mu_max)
            if cfg.filter_target_share is not None:
                chosen = baselines.adaptive_mu_for_share(z, adv, gmask, cfg.filter_target_share, **kw)
            else:  # the kept tokens' lr-free Theorem 3.3 prediction, mean over valid tokens
                n = max(int(valid.sum()), 1)
                delta = theory.grpo_logit_delta(disc, base, adv, 1.0, 1.0, cfg.temperature) * valid / n
                chosen = baselines.adaptive_mu_for_entropy(z, delta, adv, gmask, cfg.filter_target_dh, **kw)
            mu, max_frac = chosen.mu, None
        out["clip/mu"] = mu
        kw = dict(rule=cfg.filter_rule, mu_low=cfg.filter_mu_low, mu_high=cfg.filter_mu_high)
        if method == "clip_b":
            keep = losses.clip_b_mask(disc, adv, gmask, mu=mu, **kw)
        else:
            keep = losses.clip_v_mask(disc, base, adv, gmask, mu=mu, max_frac=max_frac, **kw)
    elif method == "sign":
        keep = losses.sign_mask(disc, base, adv, gmask, cfg.sign_deviation, cfg.sign_samples)
    elif method == "high_entropy":
        keep = baselines.high_entropy_mask(g(stats.entropy), gmask, cfg.high_entropy_rho)
    elif method == "clip_cov":
        # On the first update log p = old log p: the covariance is the rollout batch's own.
        keep = baselines.clip_cov_mask(g(stats.old_logp), adv, gmask, generator, frac=cfg.cov_frac,
                                       lb=cfg.cov_lb, ub=cfg.cov_ub)
    else:
        keep = valid
    shares = losses.filter_shares(keep, gmask, adv)
    out.update({"clip/filter_frac": shares["frac"], "clip/filter_frac_pos": shares["frac_pos"],
                "clip/filter_frac_neg": shares["frac_neg"]})
    rank, B = accelerator.process_index, mask.shape[0]
    return keep[rank * B:(rank + 1) * B, :mask.shape[1]], out


@dataclass
class TokenTerms:
    """One update's per-token loss and what the entropy accounting needs to know about it."""

    loss: torch.Tensor        # (b, T) per-token loss to aggregate
    surrogate: torch.Tensor   # (b, T) the policy term alone (for loss/policy)
    ratio: torch.Tensor       # (b, T)
    zero_grad: torch.Tensor   # (b, T) bool: tokens whose policy gradient is zero (clipped)
    weights: torch.Tensor | None  # (b, T) per-token weights (STEER), already in `loss`
    kl: torch.Tensor          # (b, T) k3 KL to the reference (0 without one)
    stats: dict[str, float]


def token_terms(cfg: Config, logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor,
                ref_logp: torch.Tensor | None, entropy: torch.Tensor | None,
                mask: torch.Tensor) -> TokenTerms:
    """Per-token loss of one update for minibatch tensors (b, T); entropy only for STEER."""
    valid = mask.bool()
    n = max(int(valid.sum()), 1)
    frac = lambda sel: float((sel & valid).sum()) / n  # noqa: E731
    stats: dict[str, float] = {}
    surr = losses.clipped_surrogate(logp, old_logp, adv, cfg.eps_low, cfg.eps_high)
    stats["clip/ratio_low_frac"], stats["clip/ratio_high_frac"] = frac(surr.clipped_low), frac(surr.clipped_high)
    policy, zero_grad = surr.loss, surr.clipped_low | surr.clipped_high
    if cfg.entropy_control == "kl_cov":
        policy, selected = baselines.kl_cov_loss(logp, old_logp, adv, mask, frac=cfg.kl_cov_frac,
                                                 beta=cfg.kl_cov_beta)
        zero_grad = torch.zeros_like(valid)  # KL-Cov has no ratio clip
        stats["clip/kl_cov_frac"] = frac(selected)
    if cfg.dual_clip_c is not None:
        policy, active = baselines.dual_clip(policy, adv, cfg.dual_clip_c)
        zero_grad = zero_grad | active
        stats["clip/dual_frac"] = frac(active)
    weights = None
    if cfg.entropy_control == "steer":
        weights = baselines.steer_weights(logp.detach(), old_logp, entropy, adv, mask,
                                          cfg.steer_w_max, cfg.steer_w_min)
        stats["clip/steer_w_min"] = float(weights[valid].min()) if valid.any() else 1.0
        stats["clip/steer_w_max"] = float(weights[valid].max()) if valid.any() else 1.0
    loss = policy if weights is None else policy * weights
    kl = torch.zeros_like(logp)
    if ref_logp is not None:
        kl = losses.kl_k3(logp, ref_logp)
        loss = loss + cfg.kl_coef * kl
    return TokenTerms(loss, policy, surr.ratio, zero_grad, weights, kl, stats)
