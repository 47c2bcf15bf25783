"""GRPO loss pieces and token filters: advantages, clipped surrogate, aggregation, Clip_B / Clip_V.

Pure functions over tensors (THEORY.md). Shapes: B sequences, T completion tokens, G group size.
`mask` (B, T) is 1/True on valid response tokens and 0/False on padding. `advantages` may be (B,)
(one per sequence, spread over its tokens) or (B, T). Batch statistics are over whatever batch is
passed in: the engine gathers the whole training batch across processes before calling the filters
(training/objective.py `batch_filter`). `baseline` is E_p[S] throughout (theory.token_stats).
"""

import math
from dataclasses import dataclass

import torch

# Below this batch std the standardized deviation is meaningless: the filters keep every token.
_SIGMA_MIN = 1e-12
_RULES = ("released", "paper")


def _per_token(advantages: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) or (B, T) advantages -> (B, T) shaped like `like`."""
    if advantages.dim() == 1 and advantages.shape[0] == like.shape[0]:
        return advantages.unsqueeze(-1).expand_as(like)
    if advantages.shape == like.shape:
        return advantages
    raise ValueError(
        f"advantages {tuple(advantages.shape)} do not fit tokens {tuple(like.shape)}: "
        "pass (B,) (one per sequence) or (B, T)"
    )


def group_advantages(
    rewards: torch.Tensor, group_size: int, scale_std: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """GRPO advantages: each reward minus its group's mean, optionally over the group's std.

    rewards: (B,), consecutive blocks of `group_size` answer one prompt (B = prompts * G).
    Returns (B,) float32: A = r - mean_group(r), divided by (std_group(r) + eps) when scale_std,
    with the unbiased std (Bessel's correction, as TRL and verl do). A group whose rewards are all
    equal gets exactly A = 0 (it carries no learning signal).
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards {tuple(rewards.shape)}: expected one reward per sequence, shape (B,)")
    if group_size < 1 or rewards.shape[0] % group_size != 0:
        raise ValueError(
            f"{rewards.shape[0]} rewards cannot be split into groups of group_size={group_size}: "
            "B must be a multiple of group_size (prompts * group_size)"
        )
    r = rewards.to(torch.float32).view(-1, group_size)  # (B/G, G)
    adv = r - r.mean(dim=1, keepdim=True)  # (B/G, G)
    if scale_std:
        adv = adv / (r.std(dim=1, keepdim=True) + eps)
    # Exact zero for constant groups: float rounding of the mean would otherwise leave ~1e-17 / eps.
    constant = (r.amax(dim=1, keepdim=True) == r.amin(dim=1, keepdim=True))  # (B/G, 1)
    return torch.where(constant, torch.zeros_like(adv), adv).view(-1)


@dataclass
class SurrogateOut:
    """Per-token PPO/GRPO clipped surrogate. All (B, T); the flags carry no gradient.

    loss: -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A). ratio: r = exp(logp - old_logp).
    clipped_low: A < 0 and r < 1 - eps_low. clipped_high: A > 0 and r > 1 + eps_high. On exactly
    these tokens the clipped branch is the minimum, so the loss has zero gradient there.
    """

    loss: torch.Tensor
    ratio: torch.Tensor
    clipped_low: torch.Tensor
    clipped_high: torch.Tensor


def clipped_surrogate(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    eps_low: float,
    eps_high: float,
) -> SurrogateOut:
    """Clipped importance-weighted surrogate per token (PPO; eps_high > eps_low is DAPO clip-higher).

    logp: (B, T) differentiable log p_k of the current policy; old_logp: (B, T) of the sampling
    policy (treated as constant); advantages: (B,) or (B, T). No masking: apply `aggregate`.
    """
    adv = _per_token(advantages, logp)  # (B, T)
    ratio = torch.exp(logp - old_logp.detach())  # (B, T)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * adv
    loss = -torch.minimum(unclipped, clipped)  # (B, T)
    r = ratio.detach()
    return SurrogateOut(
        loss=loss,
        ratio=ratio,
        clipped_low=(adv < 0) & (r < 1.0 - eps_low),
        clipped_high=(adv > 0) & (r > 1.0 + eps_high),
    )


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k3 estimator of KL(pi || ref) per token, from samples of pi: exp(d) - d - 1, d = ref - logp.

    logp, ref_logp: (B, T) -> (B, T), >= 0, unbiased, zero where the two agree.
    """
    d = ref_logp - logp
    return torch.exp(d) - d - 1.0


def aggregate(
    per_token: torch.Tensor, mask: torch.Tensor, mode: str, constant: float | None = None,
    denominator: float | None = None,
) -> torch.Tensor:
    """Reduce a (B, T) per-token quantity to a scalar.

    mode:
      "token-mean":          sum(l m) / max(sum(m), 1) (every valid token weighs the same).
      "seq-mean-token-mean": mean over all B sequences of sum_t(l m) / max(sum_t(m), 1); a sequence
                             without a valid token contributes 0 and still counts in the mean.
      "constant":            sum(l m) / (B * constant) (Dr. GRPO; `constant` is typically the max
                             completion length and is required).
    `mask` (B, T) is used as given (bool or float weights); it need not be the loss's own validity
    mask (e.g. filtered tokens zeroed in `per_token` but still counted in the denominator).
    `denominator`: when this call sees only part of the batch being aggregated (a micro-batch, one
    process's rows), the whole batch's count - valid tokens for "token-mean", sequences for the
    other modes - so that the parts' results add up to the whole batch's aggregate.
    """
    m = mask.to(per_token.dtype)  # (B, T)
    total = per_token * m  # (B, T)
    if mode == "token-mean":
        return total.sum() / (m.sum().clamp(min=1.0) if denominator is None else max(denominator, 1.0))
    if mode == "seq-mean-token-mean":
        per_seq = total.sum(-1) / m.sum(-1).clamp(min=1.0)
        return per_seq.mean() if denominator is None else per_seq.sum() / max(denominator, 1.0)
    if mode == "constant":
        if constant is None or not constant > 0:
            raise ValueError(
                f"aggregate mode 'constant' needs constant > 0 (got {constant}); "
                "pass the max completion length"
            )
        n_seq = per_token.shape[0] if denominator is None else max(denominator, 1.0)
        return total.sum() / (n_seq * constant)
    raise ValueError(
        f"unknown aggregation mode {mode!r}: use 'token-mean', 'seq-mean-token-mean' or 'constant'"
    )


def _deviation(
    disc: torch.Tensor, baseline: torch.Tensor | None, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Deviation x and its scale sigma for the entropy-discriminator filters (THEORY.md Section 5).

    baseline None (Clip_B): x = S* - mean_valid(S*). Otherwise (Clip_V): x = S* - E_p[S].
    Either way sigma = population std of x over valid tokens (for Clip_B that is std(S*)).
    Returns x (B, T) float32 (0 on padding), sigma () float32, valid (B, T) bool. No gradient.
    """
    valid = mask.bool()
    d = disc.detach().to(torch.float32)
    n = valid.sum().clamp(min=1).to(torch.float32)
    if baseline is None:
        d = torch.where(valid, d, 0.0)  # padding may hold anything, even nan
        x = d - d.sum() / n
    else:
        x = d - baseline.detach().to(torch.float32)
    x = torch.where(valid, x, 0.0)  # (B, T)
    mean_x = x.sum() / n
    sigma = (torch.where(valid, x - mean_x, 0.0).square().sum() / n).sqrt()
    return x, sigma, valid


def _z(x: torch.Tensor, sigma: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    if sigma.item() < _SIGMA_MIN:
        return torch.zeros_like(x)
    return torch.where(valid, x / sigma, 0.0)


def _keep(
    x: torch.Tensor,
    sigma: torch.Tensor,
    valid: torch.Tensor,
    penalized: torch.Tensor,
    mu: float,
    rule: str,
    mu_low: float | None,
    mu_high: float | None,
    max_frac: float | None,
    adv_neg: torch.Tensor | None = None,
) -> torch.Tensor:
    """The keep-mask both filters share (THEORY.md, "Two readings"). penalized: (B, T) bool.

    adv_neg (B, T) bool, A < 0: only Clip_V's cap (`max_frac`) needs it."""
    if rule not in _RULES:
        raise ValueError(f"unknown clip rule {rule!r}: use 'released' or 'paper'")
    if rule == "released" and (mu_low is not None or mu_high is not None):
        raise ValueError("mu_low / mu_high apply only to rule='paper'; the released rule uses mu")
    if sigma.item() < _SIGMA_MIN:
        return valid.clone()
    if rule == "paper":
        # Reading 1: two-sided band, whatever the advantage's sign.
        lo = mu if mu_low is None else mu_low
        hi = mu if mu_high is None else mu_high
        return valid & (x >= -lo * sigma) & (x <= hi * sigma)
    # Reading 2: drop penalized tokens far below the centre; they lower entropy the most.
    drop = valid & penalized & (x < -mu * sigma)  # (B, T)
    if max_frac is not None:
        drop = _cap(drop, x, adv_neg, max_frac, int(valid.sum()))
    return valid & ~drop


def _cap(drop: torch.Tensor, x: torch.Tensor, adv_neg: torch.Tensor, max_frac: float, n_valid: int) -> torch.Tensor:
    """Clip_V's cap on the released rule's drop set, exactly as Trinity-RFT `clipv_advantage.py`.

    K = max(floor(max_frac * n_valid), 1). The K slots go to the violators with A < 0 only, the most
    negative x first; a violator with A = 0 is always dropped (it never competes for a slot), and when
    at most K violators have A < 0 every violator is dropped. (The released code first checks
    dropped / n_valid <= max_frac; that case never has more than K A < 0 violators, so it is the same.)
    Ties at the K-th slot are broken as the released code breaks them: torch.topk over -x.
    """
    k = max(math.floor(max_frac * n_valid), 1)
    neg = drop & adv_neg  # (B, T) the violators that compete for the K slots
    if int(neg.sum()) <= k:
        return drop
    scores = (-x).masked_fill(~neg, -math.inf).flatten()
    chosen = torch.zeros_like(neg).flatten()
    chosen[torch.topk(scores, k, largest=True).indices] = True
    return (drop & ~neg) | chosen.view_as(neg)


def clip_b_mask(
    disc: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    mu: float = 2.5,
    rule: str = "released",
    mu_low: float | None = None,
    mu_high: float | None = None,
) -> torch.Tensor:
    """Clip_B keep-mask (batch-normalized entropy-discriminator clipping, THEORY.md Section 5).

    disc: (B, T) S*; advantages: (B,) or (B, T); mask: (B, T). Returns (B, T) bool, never True on
    padding. x = S* - mean(S*), sigma = std(S*), both over valid tokens (population std, float32).
    rule="released": keep tokens with A >= 0; drop a token with A < 0 iff x < -mu sigma.
    rule="paper": keep iff -mu_low sigma <= x <= mu_high sigma (each defaults to mu), any A.
    sigma < 1e-12: keep every valid token.
    """
    adv = _per_token(advantages, disc)
    x, sigma, valid = _deviation(disc, None, mask)
    return _keep(x, sigma, valid, adv < 0, mu, rule, mu_low, mu_high, max_frac=None)


def clip_v_mask(
    disc: torch.Tensor,
    baseline: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    mu: float = 8.5,
    max_frac: float | None = 1e-4,
    rule: str = "released",
    mu_low: float | None = None,
    mu_high: float | None = None,
) -> torch.Tensor:
    """Clip_V keep-mask (vocabulary-centred entropy-discriminator clipping, THEORY.md Section 5).

    disc, baseline: (B, T) S* and E_p[S]; advantages: (B,) or (B, T); mask: (B, T). Returns (B, T)
    bool, never True on padding. x = S* - E_p[S]; sigma = population std of x over valid tokens; the
    threshold compares x itself, not x - mean(x) (Corollary 3.5: on-policy mean(x) ~ 0).
    rule="released": keep tokens with A > 0; drop a token with A <= 0 iff x < -mu sigma (a violator),
    with the released cap (max_frac=None: no cap): when more than K = max(floor(max_frac * n_valid),
    1) violators have A < 0, only the K of them with the most negative x are dropped; violators with
    A = 0 are always dropped (Trinity-RFT `clipv_advantage.py`, `_cap`). rule="paper": keep iff
    -mu_low sigma <= x <= mu_high sigma (each defaults to mu), any A, no cap. sigma < 1e-12: keep every valid token.
    """
    adv = _per_token(advantages, disc)
    x, sigma, valid = _deviation(disc, baseline, mask)
    return _keep(x, sigma, valid, adv <= 0, mu, rule, mu_low, mu_high, max_frac=max_frac, adv_neg=adv < 0)


def clip_b_z(disc: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(S* - mean(S*)) / std(S*) per token, with Clip_B's statistics: (B, T) float32.

    0 on padding and everywhere when sigma < 1e-12. The released rule drops a token iff
    A < 0 and z < -mu, so the batch's min z shows how far the filter is from acting.
    """
    return _z(*_deviation(disc, None, mask))


def clip_v_z(disc: torch.Tensor, baseline: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(S* - E_p[S]) / sigma per token, with Clip_V's statistics: (B, T) float32.

    0 on padding and everywhere when sigma < 1e-12. Without the cap the released rule drops a
    token iff A <= 0 and z < -mu.
    """
    return _z(*_deviation(disc, baseline, mask))


def filter_shares(keep: torch.Tensor, mask: torch.Tensor, advantages: torch.Tensor) -> dict[str, float]:
    """Share of valid tokens a filter dropped, overall and split by the advantage's sign.

    keep, mask: (B, T); advantages: (B,) or (B, T). Returns {"frac": dropped / valid,
    "frac_pos": dropped among valid A > 0 / valid A > 0, "frac_neg": same for A < 0}, each 0.0
    when its denominator is 0.
    """
    valid = mask.bool()
    adv = _per_token(advantages, valid)
    dropped = valid & ~keep.bool()

    def share(sel: torch.Tensor) -> float:
        n = int(sel.sum())
        return int((dropped & sel).sum()) / n if n else 0.0

    return {"frac": share(valid), "frac_pos": share(valid & (adv > 0)), "frac_neg": share(valid & (adv < 0))}


SIGN_STATISTICS = ("s_star", "deviation")


def sign_mask(
    disc: torch.Tensor,
    baseline: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    deviation: str = "pos",
    samples: str = "all",
    statistic: str = "s_star",
) -> torch.Tensor:
    """The sign intervention of the paper's entropy-dynamics check: a (B, T) bool keep-mask.

    statistic="s_star": the sign of S* itself (Theorem 3.2; how the paper's sources describe the test:
    on positive samples keeping only S* > 0 lowers entropy); "deviation": the sign of S* - E_p[S]
    (Theorem 3.3, the per-token first-order entropy change). Keep valid tokens whose statistic is > 0
    (deviation="pos") or < 0 ("neg"); samples="pos" / "neg" also keeps only tokens with A > 0 / A < 0
    ("all": any advantage). Predicted: A > 0 with statistic > 0 lowers entropy, < 0 raises it; A < 0
    mirrors both.
    """
    if deviation not in ("pos", "neg") or samples not in ("all", "pos", "neg") or statistic not in SIGN_STATISTICS:
        raise ValueError(f"sign_mask: deviation must be pos|neg, samples all|pos|neg and statistic "
                         f"s_star|deviation, got {deviation!r}, {samples!r}, {statistic!r}")
    adv = _per_token(advantages, disc)
    x = disc.detach().float()  # (B, T)
    if statistic == "deviation":
        x = x - baseline.detach().float()
    keep = mask.bool() & ((x > 0) if deviation == "pos" else (x < 0))
    if samples == "pos":
        keep &= adv > 0
    elif samples == "neg":
        keep &= adv < 0
    return keep
