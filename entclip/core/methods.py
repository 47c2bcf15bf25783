"""The competing entropy-control methods as pure tensor functions (README, "Entropy control").

Names: these are "the methods". "baseline" means only E_p[S], the expectation of the token
statistic under the policy (TokenStats.baseline, the `baseline` argument of losses.clip_v_mask);
GRPO's reward baseline is "the group mean" (losses.group_advantages).

Each returns a keep-mask, a per-token weight or a per-token loss term, so the engine composes one
objective: aggregate(weight * keep * per_token_loss, mask) (+ scalar terms). Shapes as in losses.py.
Anything batch-global (a mean, a quantile, a top-k, a min/max) is computed over the tensors passed
in; the caller chooses them (training/objective.py): the whole training batch gathered across
processes (filter_scope=rollout), one micro-batch of every process gathered (high_entropy at
filter_scope=micro, as TRL), or this process's micro-batch alone (Clip-Cov at filter_scope=micro,
as verl; KL-Cov's top-k and STEER's range, every micro-batch). Selections carry no gradient.

Fractions, never percents: every share parameter here (`frac`, `rho`, `target_share`) is a fraction
of the valid tokens. The Clip-Cov / KL-Cov authors' code mixes both: Clip-Cov's `clip_ratio=0.0002`
is a fraction (and has nothing to do with PPO's clip ratio eps), KL-Cov's `k_percent=0.2` is a
percent (it takes int(n * k / 100)), i.e. frac = 0.002 (their 7B script; 0.02 -> 2e-4 for 32B).
verl's port renamed it `kl_cov_ratio`, made it a fraction and defaults it to 2e-4.
"""

import math
from dataclasses import dataclass

import torch

from entclip.core.losses import _per_token, aggregate


def _count(frac: float, n: int) -> int:
    """max(1, int(frac * n)), as verl and the Clip-Cov / KL-Cov authors count (so 0.29 * 100 =
    28.999999999999996 gives 28, exactly as there)."""
    return max(1, int(frac * n))


def _check_frac(name: str, value: float, hint: str = "") -> None:
    if not 0.0 < value <= 1.0:
        raise ValueError(f"{name}={value}: a fraction of the valid tokens in (0, 1], not a percent{hint}")


# ---------------------------------------------------------------- dual clip, entropy bonus


def dual_clip(
    loss: torch.Tensor, advantages: torch.Tensor, c: float = 3.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dual clip for negative advantages (Ye et al. 2020, arXiv 1912.09729; verl `clip_ratio_c`).

    loss: (B, T) per-token clipped-surrogate loss, max(-r A, -clip(r) A) (losses.clipped_surrogate);
    advantages: (B,) or (B, T). As verl's compute_policy_loss_vanilla: for A < 0 the loss is capped
    at -c A = c |A|, loss' = min(loss, -c A); A >= 0 is untouched. (Objective form: max(min(r A,
    clip(r) A), c A).) For A < 0 the loss is |A| max(r, clip(r)), so with c > 1 + eps_high the cap is
    active exactly where r > c; there loss' is constant: a penalized token whose ratio already grew
    past c pushes no further. Returns (loss' (B, T), active (B, T) bool: A < 0 and loss > -c A; not
    masked, so count it over the valid tokens for `clip/dual_frac`).
    """
    if not c > 1.0:
        raise ValueError(f"dual clip c={c}: must be > 1 (the ratio that caps A < 0 tokens; default 3)")
    adv = _per_token(advantages, loss)
    bound = (-c * adv).to(loss.dtype)  # (B, T), constant
    active = (adv < 0) & (loss.detach() > bound)
    return torch.where(active, bound, loss), active


def entropy_bonus_term(entropy: torch.Tensor, mask: torch.Tensor, coef: float, parts: int = 1) -> torch.Tensor:
    """coef * mean H over `mask`, / parts: the entropy bonus (THEORY.md), a scalar to SUBTRACT from the loss.

    entropy: (b, T) differentiable H per position (theory.token_entropy); mask: (b, T) the tokens it
    acts on. As TRL's GRPOTrainer: the mean per-token entropy of one micro-batch, whatever the policy
    loss's aggregation, divided by the micro-batches accumulated into one update (`parts`). The
    gradient flows through H, so minimizing loss - term raises entropy when coef > 0.
    """
    m = mask.to(entropy.dtype)
    return coef * (entropy * m).sum() / m.sum().clamp(min=1.0) / parts


def adapt_entropy_coef(coef: float, entropy_now: float, target: float, delta: float,
                       c_min: float = 0.0, c_max: float = 1.0) -> float:
    """One step of adaptive entropy control (Skywork-OR1, arXiv 2505.22312, as TRL): the new coefficient.

    entropy_now at or below the target: min(coef + delta, c_max); above: max(coef - delta, c_min).
    entropy_now: the mean token entropy of the update's training forward (nats). The engine applies
    the coefficient only while the last measured entropy is at or below the target (`bonus_coef`).
    """
    if delta < 0 or c_min > c_max:
        raise ValueError(f"adaptive entropy: need delta >= 0, c_min <= c_max (got {delta}, {c_min}, {c_max})")
    return min(coef + delta, c_max) if entropy_now <= target else max(coef - delta, c_min)


def bonus_coef(coef: float, last_entropy: float, target: float | None) -> float:
    """The coefficient an update applies: coef for a static bonus (target None); for the adaptive one,
    coef while the entropy measured at the previous update is at or below the target, else 0 (TRL:
    the first update, with no measurement yet, applies none)."""
    return coef if target is None or last_entropy <= target else 0.0


# ---------------------------------------------------------------- token selections


def quantile_linear(values: torch.Tensor, q: float) -> torch.Tensor:
    """torch.quantile(values, q) (linear interpolation) for a 1-D tensor, without its 2**24 size limit.

    Same arithmetic as torch's: rank = q * (n - 1) in the values' dtype, the order statistics below
    and above it, torch.lerp between them by the rank's fraction. Returns a 0-d tensor.
    """
    n = values.numel()
    rank = torch.tensor(q, dtype=values.dtype, device=values.device) * (n - 1)
    lo, hi = int(rank.floor()), int(rank.ceil())
    v_lo = torch.kthvalue(values, lo + 1).values
    v_hi = v_lo if hi == lo else torch.kthvalue(values, hi + 1).values
    return torch.lerp(v_lo, v_hi, rank - lo)


def high_entropy_mask(entropy: torch.Tensor, mask: torch.Tensor, rho: float = 0.2) -> torch.Tensor:
    """Keep-mask of the high-entropy minority (Wang et al. 2025, "Beyond the 80/20 Rule", arXiv 2506.01939).

    entropy, mask: (B, T). As TRL's `top_entropy_quantile` (GRPOTrainer.get_high_entropy_mask): tau =
    the (1 - rho) quantile of H over the valid tokens with linear interpolation (torch.quantile's),
    keep valid tokens with H >= tau; ties at tau are all kept. Padding never enters tau and is never
    kept. The engine calls it per micro-batch on the current forward's H (filter_scope=micro), with
    the micro-batches of all processes gathered, as TRL does. Returns (B, T) bool.
    """
    _check_frac("rho", rho, "; 0.2 keeps the top 20%")
    valid = mask.bool()
    h = entropy.detach().float()  # (B, T)
    vals = h[valid]  # (n,)
    if vals.numel() == 0:
        return valid.clone()
    return valid & (h >= quantile_linear(vals, 1.0 - rho))


def token_covariance(logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Cov_t = (A_t - mean A)(log p_t - mean log p), means over valid tokens (Cui et al. 2025, Sec. 4).

    logp: (B, T) log p of the sampled tokens under the policy being updated (the authors' choice; it
    equals old_logp on the first minibatch); advantages: (B,) or (B, T); mask: (B, T). mean A is
    token-weighted (a per-sequence A counts once per valid token), as in the authors' code.
    Returns (B, T) float32, 0 on padding, no gradient.
    """
    valid = mask.bool()
    n = valid.sum().clamp(min=1)
    a = torch.where(valid, _per_token(advantages, logp).detach().float(), 0.0)  # padding may be nan
    lp = torch.where(valid, logp.detach().float(), 0.0)
    cov = (a - a.sum() / n) * (lp - lp.sum() / n)  # (B, T)
    return torch.where(valid, cov, 0.0)


def clip_cov_mask(
    logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    generator: torch.Generator,
    frac: float = 2e-4,
    lb: float = 1.0,
    ub: float = 5.0,
    exclude: torch.Tensor | None = None,
) -> torch.Tensor:
    """Clip-Cov keep-mask (Cui et al. 2025, arXiv 2505.22617, Sec. 4 "Clip-Cov"; verl compute_policy_loss_clip_cov).

    Candidates: valid tokens with lb < Cov_t < ub (strict; `token_covariance` over the tensors passed
    in), minus `exclude` ((B, T) bool: pass the ratio-clipped tokens, clipped_low | clipped_high, as
    the references exclude them). K = min(max(1, int(frac * n_valid)), n_candidates) of them are
    drawn uniformly without replacement (torch.randperm over the candidates in row-major order, on
    `generator`) and dropped. frac is a fraction (the authors' clip_ratio=2e-4). The references call
    this per micro-batch of every update with the current log p (the engine's filter_scope=micro).
    Returns keep (B, T) bool = valid and not drawn; no candidates: every valid token. A drawn token
    is detached, not removed: the engine zeroes its policy term (training/objective.py `loss_masks`).
    With filter_normalizer=auto (the references' choice) the normalizer and the KL count every valid
    token, drawn ones included, and so does the entropy bonus; filter_normalizer=kept (which needs
    filter_scope=rollout) takes the drawn tokens out of the normalizer and the KL, not out of the bonus.
    """
    _check_frac("frac", frac, "; Clip-Cov's published 2e-4 is already a fraction")
    valid = mask.bool()
    cov = token_covariance(logp, advantages, valid)  # (B, T)
    band = valid & (cov > lb) & (cov < ub)
    if exclude is not None:
        band &= ~exclude.bool()
    idx = band.flatten().nonzero().squeeze(1)  # (n_candidates,) flat positions
    keep = valid.flatten().clone()
    if idx.numel() > 0:
        k = min(_count(frac, int(valid.sum())), idx.numel())
        perm = torch.randperm(idx.numel(), generator=generator, device=generator.device)[:k]
        keep[idx[perm.to(idx.device)]] = False
    return keep.view_as(valid)


def kl_cov_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    frac: float = 2e-3,
    beta: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """KL-Cov per-token loss (Cui et al. 2025, arXiv 2505.22617, Sec. 4 "KL-Cov").

    The K = max(1, floor(frac * n_valid)) valid tokens with the largest Cov_t (ties: lowest flat
    index first) get  -A r + beta |log p - log p_old|;  every other token gets the plain
    importance-weighted policy-gradient loss -A r, with NO ratio clip and no dual clip (the authors'
    compute_policy_loss_kl_cov and verl's port: pg_losses = -A * ratio for the rest). r = exp(log p -
    log p_old). d loss / d log p = -A r + beta sign(log p - log p_old) on selected tokens, -A r
    elsewhere. frac is a fraction: the authors' k_percent=0.2 (percent, 7B) is frac=0.002.
    Returns (loss (B, T), differentiable through logp, padding not masked: aggregate with the valid
    mask; selected (B, T) bool, the tokens that carry the KL term).
    """
    _check_frac("frac", frac, "; the authors' k_percent=0.2 is frac=0.002")
    valid = mask.bool()
    adv = _per_token(advantages, logp)
    ratio = torch.exp(logp - old_logp.detach())  # (B, T)
    cov = torch.where(valid, token_covariance(logp, adv, valid), -math.inf).flatten()
    selected = torch.zeros_like(cov, dtype=torch.bool)
    n = int(valid.sum())
    if n > 0:
        order = torch.sort(cov, descending=True, stable=True).indices
        selected[order[: _count(frac, n)]] = True
    selected = selected.view_as(valid)
    pg = -adv * ratio
    kl = beta * (logp - old_logp.detach()).abs()
    return torch.where(selected, pg + kl, pg), selected


# ---------------------------------------------------------------- STEER weights


def steer_omega(
    logp: torch.Tensor, old_logp: torch.Tensor, entropy: torch.Tensor, advantages: torch.Tensor
) -> torch.Tensor:
    """STEER's per-token entropy-change estimate (Hao et al. 2025, arXiv 2510.10150):

      Omega_t = (A_t / p_old_t) p_t (1 - p_t) (log p_t + H_t),  p = exp(logp) (policy being updated).
    As the authors' code: p clamped to [1e-8, 1 - 1e-8], p_old to >= 1e-8, non-finite Omega -> 0.
    All (B, T) (advantages may be (B,)); returns (B, T) float32, no gradient.
    """
    p = logp.detach().float().exp().clamp(1e-8, 1.0 - 1e-8)
    p_old = old_logp.detach().float().exp().clamp(min=1e-8)
    adv = _per_token(advantages, logp).detach().float()
    omega = adv / p_old * p * (1.0 - p) * (p.log() + entropy.detach().float())
    return torch.where(torch.isfinite(omega), omega, 0.0)


def steer_weights(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    entropy: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    w_max: float = 1.2,
    w_min: float = 0.8,
) -> torch.Tensor:
    """STEER per-token loss weights (arXiv 2510.10150, linear mapping): decreasing in |Omega_t|.

    w_t = w_max - (|Omega_t| - m) / (M - m) * (w_max - w_min), m and M the min and max of |Omega|
    over valid tokens: the smallest |Omega| gets w_max, the largest w_min, linear in between (the
    tokens predicted to move entropy most are damped). Degenerate range (M == m, e.g. one token):
    every valid token gets (w_max + w_min) / 2 (= 1 with the defaults), as the authors' code does.
    Padding gets 0. Multiply the per-token policy loss by w (the authors weight after the dual clip).
    Returns (B, T) float32, no gradient.
    """
    if w_min > w_max:
        raise ValueError(f"STEER weights: w_min={w_min} > w_max={w_max}; the largest |Omega| gets w_min")
    valid = mask.bool()
    a = steer_omega(logp, old_logp, entropy, advantages).abs()  # (B, T)
    vals = a[valid]
    if vals.numel() == 0:
        return torch.zeros_like(a)
    m, big = vals.min(), vals.max()
    if big > m:
        w = w_max - (a - m) / (big - m) * (w_max - w_min)
        w = w.clamp(w_min, w_max)
    else:
        w = torch.full_like(a, 0.5 * (w_max + w_min))
    return torch.where(valid, w, 0.0)


# ---------------------------------------------------------------- adaptive Clip_B / Clip_V threshold


@dataclass
class AdaptiveMu:
    """A threshold for the released Clip_B / Clip_V rule and what it does on this batch.

    mu: the threshold, within [mu_min, mu_max]; the rule drops an eligible token iff z < -mu.
    share: dropped / valid tokens at that mu. dropped: their count. predicted_dh: sum of the given
    per-token entropy contributions over the kept valid tokens (None from adaptive_mu_for_share).
    """

    mu: float
    share: float
    dropped: int
    predicted_dh: float | None = None


def _eligible(z, advantages, mask, include_zero_adv, mu_min, mu_max):
    """valid, eligible (B, T) bool, z float32, eligible z sorted ascending, and the sort order."""
    if mu_min > mu_max:
        raise ValueError(f"adaptive mu: mu_min={mu_min} > mu_max={mu_max}")
    valid = mask.bool()
    adv = _per_token(advantages, z)
    elig = valid & ((adv <= 0) if include_zero_adv else (adv < 0))
    zf = z.detach().float()
    zs, order = torch.sort(zf[elig], stable=True)
    return valid, elig, zf, zs, order


def _achievable(zs: torch.Tensor) -> torch.Tensor:
    """(E + 1,) bool: can a threshold drop exactly the k lowest of the sorted zs? Not inside a tie."""
    ok = torch.ones(zs.numel() + 1, dtype=torch.bool, device=zs.device)
    ok[1:-1] = zs[:-1] < zs[1:]
    return ok


def _choose(zs, k, valid, elig, zf, mu_min, mu_max, delta_h=None) -> AdaptiveMu:
    # Midpoint between the k-th and (k+1)-th lowest eligible z: robust to the rounding of x / sigma.
    mu = math.inf if k == 0 else -math.inf if k == zs.numel() else -0.5 * (float(zs[k - 1]) + float(zs[k]))
    mu = min(max(mu, mu_min), mu_max)
    drop = elig & (zf < -mu)
    dropped, n = int(drop.sum()), int(valid.sum())
    kept = valid & ~drop
    pred = None if delta_h is None else float(torch.where(kept, delta_h.detach().double(), 0.0).sum())
    return AdaptiveMu(mu=mu, share=dropped / n if n else 0.0, dropped=dropped, predicted_dh=pred)


def adaptive_mu_for_share(
    z: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    target_share: float,
    include_zero_adv: bool = False,
    mu_min: float = 0.0,
    mu_max: float = 20.0,
) -> AdaptiveMu:
    """mu for which the released rule drops `target_share` of the valid tokens (THEORY.md reading 2).

    z: (B, T) standardized deviations (losses.clip_b_z / clip_v_z); advantages: (B,) or (B, T);
    mask: (B, T). Eligible tokens (those the rule may drop): valid with A < 0 (Clip_B) or A <= 0
    (include_zero_adv=True, Clip_V). Target count k = round(target_share * n_valid), at most the E
    eligible. With z_(1) <= ... <= z_(E) the sorted eligible z, mu = -(z_(k) + z_(k+1)) / 2 (the
    empirical k/E quantile of eligible z, taken halfway between order statistics); k = 0 -> mu_max,
    k = E -> mu_min. A tie cannot be split: k moves to the nearest achievable count (the smaller on
    a draw). mu is clamped to [mu_min, mu_max]; share / dropped report what the clamped mu drops.
    Padding and tokens with A > 0 (A >= 0 for Clip_B) are never dropped. Use the mu with
    clip_b_mask / clip_v_mask(max_frac=None): Clip_V's cap would otherwise override the share.
    """
    if not 0.0 <= target_share <= 1.0:
        raise ValueError(f"target_share={target_share}: a fraction of the valid tokens in [0, 1]")
    valid, elig, zf, zs, _ = _eligible(z, advantages, mask, include_zero_adv, mu_min, mu_max)
    want = min(math.floor(round(target_share * int(valid.sum()), 6) + 0.5), zs.numel())
    ks = _achievable(zs).nonzero().squeeze(1)  # ascending
    k = int(ks[torch.argmin((ks - want).abs())])  # argmin takes the first: the smaller on a draw
    return _choose(zs, k, valid, elig, zf, mu_min, mu_max)


def adaptive_mu_for_entropy(
    z: torch.Tensor,
    delta_h: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    target: float,
    include_zero_adv: bool = False,
    mu_min: float = 0.0,
    mu_max: float = 20.0,
) -> AdaptiveMu:
    """mu for which the predicted entropy change of the kept tokens reaches `target` (Theorem 3.3).

    delta_h: (B, T) predicted per-token dH, e.g. theory.grpo_logit_delta(disc, baseline, A, ratio, lr)
    with ratio = 0 on ratio-clipped tokens. Predicted dH(mu) = sum of delta_h over the valid tokens
    the rule keeps at mu; `target` is that sum (nats; multiply a per-token mean target by n_valid).
    Candidates scanned: drop the k lowest-z eligible tokens (eligibility as adaptive_mu_for_share),
    k = 0..E where achievable, each at the midpoint mu. Chooses the smallest k (largest mu: least
    intervention) with dH >= target; when none reaches it, the k with the largest dH. Then clamps mu
    to [mu_min, mu_max]; share, dropped and predicted_dh report the clamped mu.
    """
    valid, elig, zf, zs, order = _eligible(z, advantages, mask, include_zero_adv, mu_min, mu_max)
    dh = delta_h.detach().double()
    total = torch.where(valid, dh, 0.0).sum()
    cum = torch.cat([dh.new_zeros(1), torch.cumsum(dh[elig][order], 0)])  # (E + 1,) removed by dropping k
    pred = torch.where(_achievable(zs), total - cum, -math.inf)  # (E + 1,)
    hits = (pred >= target).nonzero()
    k = int(hits[0, 0]) if hits.numel() else int(torch.argmax(pred))
    return _choose(zs, k, valid, elig, zf, mu_min, mu_max, delta_h=delta_h)
