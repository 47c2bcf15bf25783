"""The one objective's configurable parts: which tokens train, how each is weighted, what is added.

Each method follows a reference implementation (README, "Entropy control") and is declared once in
entclip/core/registry.py: its function, the statistics it reads, its place and its keys. This module
names no method: it calls the declared function at the declared place, with the declared statistics
as positional arguments and each declared key as the keyword the declaration names (`_call`):
- `batch_filter`, once before the first update, over the whole training batch (gathered across
  processes): the keep-mask of a token filter at rollout scope (Clip_B / Clip_V with fixed or
  adaptive mu and the sign intervention, as Trinity-RFT selects in its advantage function; 80/20
  and Clip-Cov with filter_scope=rollout).
- `micro_filter`, in every micro-batch of every update from the current forward: a filter at micro
  scope (80/20 as TRL, Clip-Cov as verl: their references' scope).
- `token_terms`, every micro-batch: the clipped surrogate (eps_low / eps_high) or a loss-term
  method's loss (KL-Cov), the optional dual clip, a weight method's weights (STEER), the keep-mask
  and the k3 KL to the reference.
- `loss_masks`: which tokens the normalizer, the KL and the entropy bonus count (filter_normalizer).
- `rollout_correction`, once before the first update when the sampler reported its own log-probs
  (vLLM): the mismatch figures and the importance weights (rollout_is) token_terms puts on the
  policy term. The filters never read the sampler's log-probs: only the trainer's (Stats).
- `update_reads_entropy`: whether the update needs the current forward's entropy.
Metric names: `clip/filter_frac*` for any keep-mask, `clip/<method>_frac` for per-update selections,
`clip/<method>_w_min/max` for weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch

from entclip.core import losses, mismatch, registry, theory
from entclip.contracts.config import Config
from entclip.training.parallel import gather_rows, own_rows
from entclip.contracts.metrics import Max, Mean, Metric, Min, reduce


def _kwargs(cfg: Config, part: registry.Method) -> dict[str, Any]:
    """The declared keys of a method or option that set its function's keywords, from the config."""
    return {k.arg: getattr(cfg, k.name) for k in part.all_keys() if k.arg is not None}


def _call(part: registry.Method, source: Mapping[str, Callable[[], Any]], kwargs: dict[str, Any]) -> Any:
    """part.fn on the statistics it declares (each taken from `source` only when needed) and `kwargs`."""
    args = [source[s]() for s in part.inputs]
    return part.fn(*args, **{p: source[s]() for p, s in part.extra.items()}, **kwargs)


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
    method = cfg.method
    if method.place == registry.FILTER and cfg.scope == registry.ROLLOUT:
        # The whole batch's statistics, gathered across processes; log p is the sampling policy's,
        # which the policy being updated equals on the first update (no token is ratio-clipped yet).
        source = {"disc": lambda: disc, "baseline": lambda: base, "adv": lambda: adv, "mask": lambda: gmask,
                  "entropy": lambda: g(stats.entropy), "logp": lambda: g(stats.old_logp),
                  "old_logp": lambda: g(stats.old_logp), "generator": lambda: generator,
                  "ratio_clipped": lambda: torch.zeros_like(valid)}
        kwargs = _kwargs(cfg, method)
        if method.adaptive is not None:
            if _is_on(cfg, registry.ADAPTIVE_MU):  # mu chosen for this batch; the target sets the share
                kwargs["mu"] = _adaptive_mu(cfg, method.adaptive, source)
                if "max_frac" in kwargs:  # so Clip_V's cap does not apply
                    kwargs["max_frac"] = None
            out["clip/mu"] = kwargs["mu"]
        keep = _call(method, source, kwargs)
    else:  # no filter, or one that selects in every micro-batch of every update (micro_filter)
        keep = valid
    if cfg.scope == registry.ROLLOUT:  # micro-batch selections log their shares per update
        out.update(filter_stats(keep, gmask, adv))
    return own_rows(accelerator, keep, mask), out


def _is_on(cfg: Config, option: registry.Method) -> bool:
    return option.is_on({k: getattr(cfg, k) for k in option.switch})


def _adaptive_mu(cfg: Config, how: registry.Adaptive, source) -> float:
    """The adaptive option's threshold for this batch (filter_target_share or filter_target_dh)."""
    z = how.z(*(source[s]() for s in how.inputs))
    disc, base, adv, gmask = source["disc"](), source["baseline"](), source["adv"](), source["mask"]()
    kw = dict(include_zero_adv=how.include_zero_adv, **_kwargs(cfg, registry.ADAPTIVE_MU))
    key = next(k for k in registry.ADAPTIVE_MU.switch if getattr(cfg, k) is not None)
    choose = registry.ADAPTIVE_MU_FNS[key]
    if key == "filter_target_share":
        chosen = choose(z, adv, gmask, cfg.filter_target_share, **kw)
    else:  # filter_target_dh: the kept tokens' lr-free Theorem 3.3 prediction, mean over valid tokens
        valid = gmask.bool()
        n = max(int(valid.sum()), 1)
        delta = theory.grpo_logit_delta(disc, base, adv, 1.0, 1.0, cfg.temperature) * valid / n
        chosen = choose(z, delta, adv, gmask, cfg.filter_target_dh, **kw)
    return chosen.mu


def filter_stats(keep: torch.Tensor, mask: torch.Tensor, adv: torch.Tensor) -> dict[str, float]:
    shares = losses.filter_shares(keep, mask, adv)
    return {"clip/filter_frac": shares["frac"], "clip/filter_frac_pos": shares["frac_pos"],
            "clip/filter_frac_neg": shares["frac_neg"]}


def micro_filter(cfg: Config, accelerator, logp: torch.Tensor, entropy: torch.Tensor, old_logp: torch.Tensor,
                 adv: torch.Tensor, mask: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Keep-mask (b, T) of a micro-batch-scope filter, from the current forward (filter_scope=micro).

    high_entropy as TRL: the (1 - rho) entropy quantile over this micro-batch of every process
    (gathered, `gather_micro`). clip_cov as verl: covariance over this process's micro-batch with the
    current log p, ratio-clipped tokens excluded, the draw on `generator`.
    """
    method = cfg.method

    def ratio_clipped() -> torch.Tensor:
        # The ratio-clipped tokens exactly as verl marks them: where the clipped branch's loss exceeds the
        # unclipped one (comparing the ratio with the bound instead can differ one float step from it).
        ratio = torch.exp(logp.detach() - old_logp)  # (b, T)
        return -adv * ratio.clamp(1.0 - cfg.eps_low, 1.0 + cfg.eps_high) > -adv * ratio

    source = {"entropy": lambda: entropy.detach(), "logp": lambda: logp.detach(), "old_logp": lambda: old_logp,
              "adv": lambda: adv, "mask": lambda: mask, "generator": lambda: generator,
              "ratio_clipped": ratio_clipped}
    if not method.gather_micro:
        return _call(method, source, _kwargs(cfg, method))
    g = lambda t: gather_rows(accelerator, t)  # noqa: E731
    gathered = {s: (f if s == "generator" else (lambda f=f: g(f()))) for s, f in source.items()}
    return own_rows(accelerator, _call(method, gathered, _kwargs(cfg, method)), mask)


def loss_masks(cfg: Config, mask: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(normalizer mask, entropy-bonus mask), both (b, T) float, for valid `mask` and a keep-mask.

    normalizer: the tokens the aggregate divides by and the KL covers: valid & keep when dropped tokens
    leave everything (filter_normalizer kept, Trinity-RFT), every valid token otherwise (TRL, verl).
    bonus: the tokens the entropy bonus averages over: valid & keep (as TRL's effective mask and
    Trinity's response mask), except for a filter that detaches its tokens from the policy term
    only (`detach_only`: Clip-Cov, as its references).
    """
    m = mask.float()
    kept = m * keep.float()
    return (kept if cfg.normalizer == "kept" else m), (m if cfg.method.detach_only else kept)


def rollout_correction(cfg: Config, accelerator, old_logp: torch.Tensor, rollout_logp: torch.Tensor | None,
                       mask: torch.Tensor) -> tuple[torch.Tensor | None, dict[str, float]]:
    """The rollout correction's weights (B, T) (None: no correction) and the mismatch figures over all
    processes, `sampling/*`; nothing at all when the sampler reported no log-probs (HFSampler: the
    trainer's own weights sampled, there is no mismatch)."""
    if rollout_logp is None:
        return None, {}
    weights, corrected = mismatch.importance_weights(old_logp, rollout_logp, mask, cfg.rollout_is,
                                                     cfg.is_threshold, cfg.rollout_is_threshold_lower)
    st = mismatch.mismatch_stats(old_logp, rollout_logp, mask, corrected)
    n = st["n"]
    figures: dict[str, Metric] = {
        "sampling/logp_diff_mean": Mean(st["logp_diff_mean"], n), "sampling/logp_diff_max": Max(st["logp_diff_max"]),
        "sampling/is_ratio_min": Min(st["is_ratio_min"]), "sampling/is_ratio_mean": Mean(st["is_ratio_mean"], n),
        "sampling/is_ratio_max": Max(st["is_ratio_max"]), "sampling/is_corrected_frac": Mean(st["is_corrected_frac"], n)}
    return weights, reduce(accelerator, figures)


@dataclass
class TokenTerms:
    """One update's per-token loss and what the entropy accounting needs to know about it."""

    loss: torch.Tensor        # (b, T) per-token loss to aggregate: keep * weight * policy + kl_coef * kl
    surrogate: torch.Tensor   # (b, T) the policy term alone, before keep and weights (for loss/policy)
    ratio: torch.Tensor       # (b, T)
    zero_grad: torch.Tensor   # (b, T) bool: tokens whose policy gradient is zero (clipped)
    weights: torch.Tensor | None  # (b, T) per-token weights (STEER, the rollout correction), already in `loss`
    kl: torch.Tensor          # (b, T) k3 KL to the reference (0 without one)
    stats: dict[str, Metric]  # shares of the valid tokens (Mean weighted by them), weight extremes (Min/Max)


def token_terms(cfg: Config, logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor,
                ref_logp: torch.Tensor | None, entropy: torch.Tensor | None,
                mask: torch.Tensor, keep: torch.Tensor | None = None,
                is_weight: torch.Tensor | None = None) -> TokenTerms:
    """Per-token loss of one micro-batch, tensors (b, T): `mask` the valid tokens (the scope of
    KL-Cov's top-k and STEER's range), `keep` the filter's keep-mask (None: every token), entropy
    (detached) when the method reads it (`update_reads_entropy`: STEER). A loss-term method (KL-Cov)
    replaces the clipped surrogate, then the dual clip caps it, then a weight method (STEER) scales it,
    then the rollout correction's importance weight `is_weight` (rollout_correction; not the KL term).
    Fractions in `stats` are over the valid tokens and weigh by them when micro-batches and processes combine."""
    valid = mask.bool()
    n_valid = int(valid.sum())
    n = max(n_valid, 1)
    frac = lambda sel: Mean(float((sel & valid).sum()) / n, n_valid)  # noqa: E731
    stats: dict[str, Metric] = {}
    surr = losses.clipped_surrogate(logp, old_logp, adv, cfg.eps_low, cfg.eps_high)
    stats["clip/ratio_low_frac"], stats["clip/ratio_high_frac"] = frac(surr.clipped_low), frac(surr.clipped_high)
    policy, zero_grad = surr.loss, surr.clipped_low | surr.clipped_high
    method = cfg.method
    # The gradient flows through what the declaration differentiates (KL-Cov's log p), nothing else.
    source = {"logp": lambda: logp if "logp" in method.differentiates else logp.detach(),
              "old_logp": lambda: old_logp, "entropy": lambda: entropy, "adv": lambda: adv, "mask": lambda: mask,
              "policy_loss": lambda: policy}
    if method.place == registry.LOSS:  # in place of the clipped surrogate: no ratio clip
        policy, selected = _call(method, source, _kwargs(cfg, method))
        zero_grad = torch.zeros_like(valid)
        stats[f"clip/{method.name}_frac"] = frac(selected)
    if _is_on(cfg, registry.DUAL_CLIP):
        policy, active = _call(registry.DUAL_CLIP, source, _kwargs(cfg, registry.DUAL_CLIP))
        zero_grad = zero_grad | active
        stats["clip/dual_frac"] = frac(active)
    weights = None
    if method.place == registry.WEIGHT:
        weights = _call(method, source, _kwargs(cfg, method))
        stats[f"clip/{method.name}_w_min"] = Min(float(weights[valid].min()) if valid.any() else 1.0)
        stats[f"clip/{method.name}_w_max"] = Max(float(weights[valid].max()) if valid.any() else 1.0)
    if is_weight is not None:  # counted with the weights: the accounting weighs each token's term by them
        weights = is_weight if weights is None else weights * is_weight
    loss = policy if weights is None else policy * weights
    if keep is not None:  # a dropped token's policy term is exactly zero, and so is its gradient
        loss = torch.where(keep.bool(), loss, torch.zeros_like(loss))
    kl = torch.zeros_like(logp)
    if ref_logp is not None:
        kl = losses.kl_k3(logp, ref_logp)
        loss = loss + cfg.kl_coef * kl
    return TokenTerms(loss, policy, surr.ratio, zero_grad, weights, kl, stats)


def update_reads_entropy(cfg: Config) -> bool:
    """Whether a part of the objective reads the current forward's entropy, detached, inside the
    update: the method, if it acts there (a weight, a loss term, a micro-batch filter) and declares
    `entropy` among its statistics without differentiating it (STEER, 80/20 at micro scope), or an
    option that is on and does (the adaptive bonus measures every update's entropy). The static
    bonus differentiates H: the engine computes it with its graph while a coefficient applies."""
    parts = [cfg.method, *(o for o in registry.OPTIONS if o.switch and _is_on(cfg, o))]
    return any("entropy" in p.reads_detached(cfg.scope) for p in parts)
