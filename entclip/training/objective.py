"""The one objective's configurable parts: which tokens train, how each is weighted, what is added.

Each method follows a reference implementation (README, "Entropy control"):
- `batch_filter`, once before the first update, over the whole training batch (gathered across
  processes): the keep-mask of Clip_B / Clip_V (fixed or adaptive mu) and the sign intervention
  (Trinity-RFT selects in its advantage function), and of high-entropy tokens / Clip-Cov with
  filter_scope=rollout.
- `micro_filter`, in every micro-batch of every update from the current forward: high-entropy
  tokens (TRL) and Clip-Cov (verl) with filter_scope=micro, their references' scope.
- `token_terms`, every micro-batch: the clipped surrogate (eps_low / eps_high, optional dual clip)
  or KL-Cov's loss, STEER weights, the keep-mask and the k3 KL to the reference.
- `loss_masks`: which tokens the normalizer, the KL and the entropy bonus count (filter_normalizer).
Metric names: `clip/filter_frac*` for any keep-mask, `clip/<method>_frac` for per-update selections.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from entclip.core import losses, methods, theory
from entclip.contracts.config import Config
from entclip.training.parallel import gather_rows, own_rows


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
                chosen = methods.adaptive_mu_for_share(z, adv, gmask, cfg.filter_target_share, **kw)
            else:  # the kept tokens' lr-free Theorem 3.3 prediction, mean over valid tokens
                n = max(int(valid.sum()), 1)
                delta = theory.grpo_logit_delta(disc, base, adv, 1.0, 1.0, cfg.temperature) * valid / n
                chosen = methods.adaptive_mu_for_entropy(z, delta, adv, gmask, cfg.filter_target_dh, **kw)
            mu, max_frac = chosen.mu, None
        out["clip/mu"] = mu
        kw = dict(rule=cfg.filter_rule, mu_low=cfg.filter_mu_low, mu_high=cfg.filter_mu_high)
        if method == "clip_b":
            keep = losses.clip_b_mask(disc, adv, gmask, mu=mu, **kw)
        else:
            keep = losses.clip_v_mask(disc, base, adv, gmask, mu=mu, max_frac=max_frac, **kw)
    elif method == "sign":
        keep = losses.sign_mask(disc, base, adv, gmask, cfg.sign_deviation, cfg.sign_samples, cfg.sign_statistic)
    elif cfg.scope == "micro":  # selected in every micro-batch of every update instead (micro_filter)
        keep = valid
    elif method == "high_entropy":
        keep = methods.high_entropy_mask(g(stats.entropy), gmask, cfg.high_entropy_rho)
    elif method == "clip_cov":
        # On the first update log p = old log p: the covariance is the rollout batch's own.
        keep = methods.clip_cov_mask(g(stats.old_logp), adv, gmask, generator, frac=cfg.cov_frac,
                                       lb=cfg.cov_lb, ub=cfg.cov_ub)
    else:
        keep = valid
    if cfg.scope == "rollout":  # micro-batch selections log their shares per update
        out.update(filter_stats(keep, gmask, adv))
    return own_rows(accelerator, keep, mask), out


def filter_stats(keep: torch.Tensor, mask: torch.Tensor, adv: torch.Tensor) -> dict[str, float]:
    shares = losses.filter_shares(keep, mask, adv)
    return {"clip/filter_frac": shares["frac"], "clip/filter_frac_pos": shares["frac_pos"],
            "clip/filter_frac_neg": shares["frac_neg"]}


def micro_filter(cfg: Config, accelerator, logp: torch.Tensor, entropy: torch.Tensor, old_logp: torch.Tensor,
                 adv: torch.Tensor, mask: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Keep-mask (b, T) of a micro-batch-scope filter, from the current forward (filter_scope=micro).

    high_entropy as TRL: the (1 - rho) entropy quantile over this micro-batch of every process
    (gathered). clip_cov as verl: covariance over this process's micro-batch with the current log p,
    ratio-clipped tokens excluded, the draw on `generator`.
    """
    if cfg.entropy_control == "high_entropy":
        g = lambda t: gather_rows(accelerator, t)  # noqa: E731
        return own_rows(accelerator, methods.high_entropy_mask(g(entropy.detach()), g(mask), cfg.high_entropy_rho),
                        mask)
    # The ratio-clipped tokens exactly as verl marks them: where the clipped branch's loss exceeds the
    # unclipped one (comparing the ratio with the bound instead can differ one float step from it).
    ratio = torch.exp(logp.detach() - old_logp)  # (b, T)
    clipped = -adv * ratio.clamp(1.0 - cfg.eps_low, 1.0 + cfg.eps_high) > -adv * ratio
    return methods.clip_cov_mask(logp.detach(), adv, mask, generator, frac=cfg.cov_frac, lb=cfg.cov_lb,
                                   ub=cfg.cov_ub, exclude=clipped)


def loss_masks(cfg: Config, mask: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(normalizer mask, entropy-bonus mask), both (b, T) float, for valid `mask` and a keep-mask.

    normalizer: the tokens the aggregate divides by and the KL covers: valid & keep when dropped tokens
    leave everything (filter_normalizer kept, Trinity-RFT), every valid token otherwise (TRL, verl).
    bonus: the tokens the entropy bonus averages over: valid & keep (as TRL's effective mask and
    Trinity's response mask), except Clip-Cov, whose references detach a drawn token from the
    policy term only.
    """
    m = mask.float()
    kept = m * keep.float()
    return (kept if cfg.normalizer == "kept" else m), (m if cfg.entropy_control == "clip_cov" else kept)


@dataclass
class TokenTerms:
    """One update's per-token loss and what the entropy accounting needs to know about it."""

    loss: torch.Tensor        # (b, T) per-token loss to aggregate: keep * weight * policy + kl_coef * kl
    surrogate: torch.Tensor   # (b, T) the policy term alone, before keep and weights (for loss/policy)
    ratio: torch.Tensor       # (b, T)
    zero_grad: torch.Tensor   # (b, T) bool: tokens whose policy gradient is zero (clipped)
    weights: torch.Tensor | None  # (b, T) per-token weights (STEER), already in `loss`
    kl: torch.Tensor          # (b, T) k3 KL to the reference (0 without one)
    stats: dict[str, float]


def token_terms(cfg: Config, logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor,
                ref_logp: torch.Tensor | None, entropy: torch.Tensor | None,
                mask: torch.Tensor, keep: torch.Tensor | None = None) -> TokenTerms:
    """Per-token loss of one micro-batch, tensors (b, T): `mask` the valid tokens (the scope of
    KL-Cov's top-k and STEER's range), `keep` the filter's keep-mask (None: every token), entropy
    (detached) only for STEER. Fractions in `stats` are over the valid tokens."""
    valid = mask.bool()
    n = max(int(valid.sum()), 1)
    frac = lambda sel: float((sel & valid).sum()) / n  # noqa: E731
    stats: dict[str, float] = {}
    surr = losses.clipped_surrogate(logp, old_logp, adv, cfg.eps_low, cfg.eps_high)
    stats["clip/ratio_low_frac"], stats["clip/ratio_high_frac"] = frac(surr.clipped_low), frac(surr.clipped_high)
    policy, zero_grad = surr.loss, surr.clipped_low | surr.clipped_high
    if cfg.entropy_control == "kl_cov":
        policy, selected = methods.kl_cov_loss(logp, old_logp, adv, mask, frac=cfg.kl_cov_frac,
                                                 beta=cfg.kl_cov_beta)
        zero_grad = torch.zeros_like(valid)  # KL-Cov has no ratio clip
        stats["clip/kl_cov_frac"] = frac(selected)
    if cfg.dual_clip_c is not None:
        policy, active = methods.dual_clip(policy, adv, cfg.dual_clip_c)
        zero_grad = zero_grad | active
        stats["clip/dual_frac"] = frac(active)
    weights = None
    if cfg.entropy_control == "steer":
        weights = methods.steer_weights(logp.detach(), old_logp, entropy, adv, mask,
                                          cfg.steer_w_max, cfg.steer_w_min)
        stats["clip/steer_w_min"] = float(weights[valid].min()) if valid.any() else 1.0
        stats["clip/steer_w_max"] = float(weights[valid].max()) if valid.any() else 1.0
    loss = policy if weights is None else policy * weights
    if keep is not None:  # a dropped token's policy term is exactly zero, and so is its gradient
        loss = torch.where(keep.bool(), loss, torch.zeros_like(loss))
    kl = torch.zeros_like(logp)
    if ref_logp is not None:
        kl = losses.kl_k3(logp, ref_logp)
        loss = loss + cfg.kl_coef * kl
    return TokenTerms(loss, policy, surr.ratio, zero_grad, weights, kl, stats)
