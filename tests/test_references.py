"""Each filter against a port of the reference implementation it follows (THEORY.md), token for token.

The ports below are written from what the references do, in their own structure and precision
(float32 tensor code, masks multiplied in, the same torch calls where the order of a draw or a tie
depends on them): Trinity-RFT `clipb_advantage.py` / `clipv_advantage.py`, TRL 1.16
`get_high_entropy_mask`, verl `compute_policy_loss_clip_cov`, and the paper's sign intervention.
Each test runs entclip and the port on many random batches (binary rewards in groups of 4, so many
groups have A = 0 exactly; random lengths with garbage on the padding) and asserts that not one token
differs. Every test also asserts that its batches reach the branch it is about (a cap that acts, a
tie at the quantile, a draw of more than one token): a comparison that never exercises a branch
cannot fail on it.
"""

import math
from dataclasses import dataclass

import pytest
import torch

from conftest import TEST_SEED
from entclip.core.methods import clip_cov_mask, high_entropy_mask
from entclip.core.losses import clip_b_mask, clip_v_mask, clipped_surrogate, sign_mask

G = 4  # group size


@dataclass
class Batch:
    """One random training batch; every (B, T) tensor holds garbage (finite) on padding."""

    mask: torch.Tensor  # (B, T) bool
    adv_seq: torch.Tensor  # (B,) GRPO advantages
    adv: torch.Tensor  # (B, T) float32, 0 on padding (as the references receive them)
    disc: torch.Tensor  # (B, T) S* of the sampled token
    baseline: torch.Tensor  # (B, T) E_p[S]
    entropy: torch.Tensor  # (B, T) H
    logp: torch.Tensor  # (B, T) log p of the sampled token


def _grpo_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """(r - group mean) / (unbiased group std + 1e-6); exactly 0 for a constant group. (B,) -> (B,)."""
    r = rewards.view(-1, G)  # (B/G, G)
    a = (r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-6)
    a[r.amax(1) == r.amin(1)] = 0.0
    return a.view(-1)


def _batch(g: torch.Generator, vocab: int = 16, t_max: int = 40) -> Batch:
    n_groups = int(torch.randint(1, 7, (1,), generator=g))
    B = n_groups * G
    T = int(torch.randint(1, t_max + 1, (1,), generator=g))
    lengths = torch.randint(0, T + 1, (B,), generator=g)
    mask = torch.arange(T) < lengths[:, None]  # (B, T)
    # Logit scales from flat to peaked, so S* and E_p[S] spread over both signs.
    logits = torch.randn(B, T, vocab, generator=g) * torch.rand(B, T, 1, generator=g) * 6  # (B, T, V)
    logp_all = torch.log_softmax(logits, -1)  # (B, T, V)
    p = logp_all.exp()
    h = -(p * logp_all).sum(-1)  # (B, T)
    k = torch.multinomial(p.view(-1, vocab), 1, generator=g).view(B, T, 1)
    s = p * (h[..., None] + logp_all)  # (B, T, V) S_i
    # Binary rewards with a per-group success rate: many groups constant (A = 0), some all-zero batches.
    rate = torch.rand(n_groups, 1, generator=g)
    if float(torch.rand(1, generator=g)) < 0.1:
        rate.fill_(0.0)
    rewards = (torch.rand(n_groups, G, generator=g) < rate).float().view(-1)  # (B,)
    adv_seq = _grpo_advantages(rewards)

    def pad(x: torch.Tensor) -> torch.Tensor:
        return torch.where(mask, x, torch.randn(B, T, generator=g) * 100)

    return Batch(
        mask=mask,
        adv_seq=adv_seq,
        adv=torch.where(mask, adv_seq[:, None].expand(B, T), 0.0),
        disc=pad(s.gather(-1, k).squeeze(-1)),
        baseline=pad((p * s).sum(-1)),
        entropy=pad(h),
        logp=pad(logp_all.gather(-1, k).squeeze(-1)),
    )


def _batches(n: int, salt: int):
    g = torch.Generator().manual_seed(1000 * TEST_SEED + salt)
    for i in range(n):
        yield i, g, _batch(g)


def _differing(a: torch.Tensor, b: torch.Tensor) -> int:
    return int((a.bool() != b.bool()).sum())


# ---------------------------------------------------------------- Clip_B (Trinity-RFT clipb_advantage.py)


def _ref_clip_b(S, A, M, mu):
    """Port of Trinity-RFT's Clip_B mask: returns M * keep (float)."""
    M = M.float()
    xS = S.float()
    n = M.sum().clamp(min=1)
    ES = (xS * M).sum() / n
    varS = ((xS - ES) ** 2 * M).sum() / n
    std = torch.sqrt(varS)
    z = xS - ES
    if std < 1e-12:
        return M * torch.ones_like(M)
    keep = torch.ones_like(M, dtype=torch.bool)
    keep_neg = z >= -(mu * std)
    keep = torch.where(A < 0, keep_neg, keep)  # A > 0 and A == 0: kept
    return M * keep.float()


def test_clip_b_matches_trinity_reference_on_every_token():
    acted = zero_adv_below = 0
    for i, g, b in _batches(200, salt=1):
        mu = float(torch.empty(1).uniform_(0.3, 2.5, generator=g))
        ref = _ref_clip_b(b.disc, b.adv, b.mask, mu)
        adv = b.adv_seq if i % 2 else b.adv
        keep = clip_b_mask(b.disc, adv, b.mask, mu=mu)
        assert not (keep & ~b.mask).any()
        assert _differing(keep & b.mask, ref) == 0, f"batch {i}, mu={mu}"
        acted += bool((b.mask & (ref == 0)).any())
        # A == 0 tokens below the threshold exist (both keep them).
        s = b.disc[b.mask]
        below = (b.disc - s.mean()) < -mu * s.std(unbiased=False)
        zero_adv_below += bool((b.mask & (b.adv == 0) & below).any())
    assert acted >= 50, f"Clip_B dropped tokens in only {acted}/200 batches"
    assert zero_adv_below >= 40, f"only {zero_adv_below}/200 batches had an A = 0 token below -mu sigma"


def test_clip_b_keeps_everything_when_sigma_is_zero_like_trinity():
    disc = torch.full((4, 3), 0.25)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [0, 0, 0]]).bool()
    adv = torch.tensor([-1.0, -1.0, 1.0, 0.0])
    ref = _ref_clip_b(disc, torch.where(mask, adv[:, None], 0.0), mask, mu=0.1)
    assert torch.equal(ref.bool(), mask)
    assert torch.equal(clip_b_mask(disc, adv, mask, mu=0.1), mask)


# ---------------------------------------------------------------- Clip_V (Trinity-RFT clipv_advantage.py)


def _ref_clip_v(S_star, N, A, M, mu, max_frac):
    """Port of Trinity-RFT's Clip_V mask. Returns (M * keep (float), branch reached)."""
    M = M.float()
    xD = (N - S_star).float()  # the negative of entclip's x = S* - E_p[S]
    n = M.sum().clamp(min=1)
    mean_d = (xD * M).sum() / n
    var_d = ((xD - mean_d) ** 2 * M).sum() / n
    std_d = torch.sqrt(var_d)
    if std_d < 1e-12:
        return M * torch.ones_like(M), "sigma"
    pos = A > 0
    neg = A < 0
    keep_neg = xD <= mu * std_d
    keep_bool = torch.where(pos, torch.ones_like(keep_neg), keep_neg)
    frac = ((M > 0) & ~keep_bool).sum() / n
    if frac <= max_frac:
        keep, branch = keep_bool, "under"
    else:
        K = max(int(max_frac * n), 1)
        neg_to_clip = neg & (M > 0) & ~keep_neg
        count = int(neg_to_clip.sum())
        if count <= K:
            keep, branch = keep_bool, "few_neg"
        else:
            scores = xD.masked_fill(~neg_to_clip, -math.inf).view(-1)
            idx = torch.topk(scores, min(K, count), largest=True).indices
            final = keep_bool.clone()
            final[neg_to_clip] = True
            final.view(-1)[idx] = False  # A == 0 violators stay dropped
            keep, branch = final, "topk"
    return M * keep.float(), branch


def test_clip_v_cap_drops_zero_advantage_violators_beside_k_negative_ones():
    # 2 x 50 valid tokens. x = S* - E_p[S] is +-0.1 except x[0, 0] = -3 (A = 0) and x[1, 0] = -2,
    # x[1, 1] = -1.5 (A = -1). sigma = sqrt(mean(x^2) - mean(x)^2) = sqrt(0.16225 - 0.0676^2) ~ 0.397,
    # so with mu = 1 exactly these three are violators: 3 / 100 > max_frac = 0.02, K = 2. Only the two
    # with A < 0 compete for the K slots and 2 <= K, so the reference drops all three.
    x = torch.tensor([0.1, -0.1]).repeat(2, 25)  # (2, 50): 50 of +0.1, 50 of -0.1
    x[0, 0], x[1, 0], x[1, 1] = -3.0, -2.0, -1.5
    baseline = torch.full((2, 50), 0.25)
    disc = baseline + x
    mask = torch.ones(2, 50, dtype=torch.bool)
    adv = torch.tensor([0.0, -1.0])
    expected = mask.clone()
    expected[0, 0] = expected[1, 0] = expected[1, 1] = False
    ref, branch = _ref_clip_v(disc, baseline, adv[:, None].expand(2, 50), mask, mu=1.0, max_frac=0.02)
    assert branch == "few_neg"
    assert torch.equal(ref.bool(), expected)
    assert torch.equal(clip_v_mask(disc, baseline, adv, mask, mu=1.0, max_frac=0.02), expected)


@pytest.mark.parametrize("max_frac", [0.01, 0.02, 0.05, 1e-4])
def test_clip_v_matches_trinity_reference_on_every_token(max_frac):
    branches = {"sigma": 0, "under": 0, "few_neg": 0, "topk": 0}
    zero_adv_in_topk = 0
    for i, g, b in _batches(120, salt=2):
        mu = float(torch.empty(1).uniform_(0.3, 2.0, generator=g))
        ref, branch = _ref_clip_v(b.disc, b.baseline, b.adv, b.mask, mu, max_frac)
        adv = b.adv_seq if i % 2 else b.adv
        keep = clip_v_mask(b.disc, b.baseline, adv, b.mask, mu=mu, max_frac=max_frac)
        assert not (keep & ~b.mask).any()
        assert _differing(keep & b.mask, ref) == 0, f"batch {i}, mu={mu}, branch {branch}"
        branches[branch] += 1
        zero_adv_in_topk += branch == "topk" and bool((b.mask & (ref == 0) & (b.adv == 0)).any())
    # The cap's top-K branch is the one entclip once got wrong: it must be reached often, and with
    # A = 0 violators in the batch (they stay dropped beside the K).
    assert branches["topk"] >= 15, branches
    assert zero_adv_in_topk >= 8, (zero_adv_in_topk, branches)


def test_clip_v_without_cap_matches_trinity_reference_with_cap_one():
    # max_frac=None is no cap; the reference's max_frac = 1 never caps (frac <= 1 always).
    for i, g, b in _batches(60, salt=3):
        mu = float(torch.empty(1).uniform_(0.3, 2.0, generator=g))
        ref, _ = _ref_clip_v(b.disc, b.baseline, b.adv, b.mask, mu, 1.0)
        keep = clip_v_mask(b.disc, b.baseline, b.adv, b.mask, mu=mu, max_frac=None)
        assert _differing(keep & b.mask, ref) == 0, f"batch {i}, mu={mu}"


# ---------------------------------------------------------------- 80/20 (TRL 1.16 get_high_entropy_mask)


def _ref_high_entropy(H, mask, threshold):
    """Port of TRL's get_high_entropy_mask(entropies, mask, threshold); threshold = 1 - rho."""
    vals = H[mask.bool()].float()
    if vals.numel() == 0:
        return torch.zeros_like(H, dtype=torch.bool)
    tau = torch.quantile(vals, threshold)
    return (H * mask.float() >= tau) & mask.bool()


# rho = 1 / m (0.2, 0.5, 0.05, 1) keeps the same tokens as the order statistic k = ceil(rho n); 0.3 and
# 0.7 are where linear interpolation keeps one token fewer (frac(rho n) in (0, rho)), so an order
# statistic in place of the quantile fails there.
@pytest.mark.parametrize("rho", [0.2, 0.5, 0.05, 1.0, 0.3, 0.7])
def test_high_entropy_mask_matches_trl_quantile_on_every_token(rho):
    ties_at_tau = interpolated = fewer_than_ceil = 0
    for i, g, b in _batches(120, salt=4):
        h = b.entropy
        if i % 2:  # coarse values: many ties, often at tau
            h = torch.where(b.mask, (h * 4).round() / 4, h)
        ref = _ref_high_entropy(h, b.mask, 1.0 - rho)
        keep = high_entropy_mask(h, b.mask, rho)
        assert _differing(keep, ref) == 0, f"batch {i}, rho={rho}"
        vals = h[b.mask]
        if vals.numel():
            tau = torch.quantile(vals, 1.0 - rho)
            ties_at_tau += int((vals == tau).sum()) >= 2
            interpolated += not bool((vals == tau).any())
            fewer_than_ceil += int(ref.sum()) < math.ceil(rho * vals.numel())
    assert ties_at_tau >= 20, ties_at_tau
    if rho < 1.0:  # rho = 1 puts tau on the minimum, a data value
        assert interpolated >= 15, interpolated
    if rho in (0.3, 0.7):
        assert fewer_than_ceil >= 3, fewer_than_ceil


def test_high_entropy_mask_keeps_nothing_without_valid_tokens_like_trl():
    h = torch.rand(2, 3)
    mask = torch.zeros(2, 3, dtype=torch.bool)
    assert not _ref_high_entropy(h, mask, 0.8).any()
    assert not high_entropy_mask(h, mask, 0.2).any()


# ---------------------------------------------------------------- Clip-Cov (verl compute_policy_loss_clip_cov)


def _masked_mean(values, mask):
    return (values * mask).sum() / (mask.sum() + 1e-8)


def _ref_clip_cov(log_prob, old_log_prob, A, M, clip_ratio, lb, ub, eps_low, eps_high, g):
    """Port of verl's Clip-Cov selection (one micro-batch). Returns (corr (B, T), K, n_candidates)."""
    M = M.float()
    ratio = torch.exp(log_prob - old_log_prob)
    pg1 = -A * ratio
    pg2 = -A * torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    clip_by_origin = (pg2 > pg1) & (M > 0)
    cov = (A - _masked_mean(A, M)) * (log_prob - _masked_mean(log_prob, M))
    cov[M == 0] = -torch.inf
    cov[clip_by_origin] = -torch.inf
    K = max(int(clip_ratio * M.sum().item()), 1)
    cand = (cov < ub) & (cov > lb) & (M > 0)
    idx = torch.nonzero(cand)
    n_cand = len(idx)
    if len(idx) > 0:
        perm = torch.randperm(len(idx), generator=g)
        idx = idx[perm[: min(K, len(idx))]]
    corr = torch.ones_like(A)
    corr[idx[:, 0], idx[:, 1]] = 0
    return corr, K, n_cand


def _cov_inputs(g: torch.Generator, b: Batch):
    """Scaled advantages and log-probs so that |Cov| spans ~0-8, ratios spread across both clips."""
    scale = float(torch.empty(1).uniform_(1.0, 2.5, generator=g))
    adv = b.adv * scale
    logp = torch.where(b.mask, b.logp * scale, b.logp)
    old = logp + 0.3 * torch.randn(logp.shape, generator=g)
    return adv, logp, old


@pytest.mark.parametrize("frac", [0.05, 0.1, 0.3, 0.29, 0.57, 2e-4])
def test_clip_cov_matches_verl_draw_on_every_token(frac):
    lb, ub, eps_low, eps_high = 1.0, 5.0, 0.2, 0.28
    drew_several = excluded_in_band = 0
    for i, g, b in _batches(60, salt=5):
        adv, logp, old = _cov_inputs(g, b)
        seed = 7 + i
        corr, K, n_cand = _ref_clip_cov(logp, old, adv, b.mask, frac, lb, ub, eps_low, eps_high,
                                        torch.Generator().manual_seed(seed))
        surr = clipped_surrogate(logp, old, adv, eps_low, eps_high)
        clipped = surr.clipped_low | surr.clipped_high
        keep = clip_cov_mask(logp, adv, b.mask, torch.Generator().manual_seed(seed),
                             frac=frac, lb=lb, ub=ub, exclude=clipped)
        assert not (keep & ~b.mask).any()
        assert _differing(b.mask & ~keep, corr == 0) == 0, f"batch {i}, frac={frac}, K={K}, candidates={n_cand}"
        drew_several += min(K, n_cand) > 1
        cov = (adv - _masked_mean(adv, b.mask)) * (logp - _masked_mean(logp, b.mask))
        excluded_in_band += bool((b.mask & clipped & (cov > lb) & (cov < ub)).any())
    if frac > 2e-4:
        assert drew_several >= 20, drew_several
    assert excluded_in_band >= 15, excluded_in_band


def test_clip_cov_count_truncates_like_verl():
    # 100 valid tokens, ratio 1 (nothing ratio-clipped), an unbounded band: all 100 are candidates and
    # verl draws int(0.29 * 100) = int(28.999999999999996) = 28 of them, not 29.
    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(1, 100, generator=g) * 4
    adv = torch.randn(1, 100, generator=g)
    mask = torch.ones(1, 100, dtype=torch.bool)
    corr, K, n_cand = _ref_clip_cov(logp, logp, adv, mask, 0.29, -math.inf, math.inf, 0.2, 0.28,
                                    torch.Generator().manual_seed(1))
    assert (K, n_cand) == (28, 100)
    keep = clip_cov_mask(logp, adv, mask, torch.Generator().manual_seed(1), frac=0.29, lb=-math.inf, ub=math.inf)
    assert int((mask & ~keep).sum()) == 28
    assert torch.equal(mask & ~keep, corr == 0)


# ---------------------------------------------------------------- the sign intervention


def _ref_sign(S_star, N, A, M, deviation, samples, statistic):
    x = S_star.float() if statistic == "s_star" else S_star.float() - N.float()
    keep = M.bool() & ((x > 0) if deviation == "pos" else (x < 0))
    if samples == "pos":
        keep = keep & (A > 0)
    elif samples == "neg":
        keep = keep & (A < 0)
    return keep


@pytest.mark.parametrize("statistic", ["s_star", "deviation"])
def test_sign_mask_matches_its_definition_on_every_token(statistic):
    for i, g, b in _batches(40, salt=6):
        for deviation in ("pos", "neg"):
            for samples in ("all", "pos", "neg"):
                ref = _ref_sign(b.disc, b.baseline, b.adv, b.mask, deviation, samples, statistic)
                keep = sign_mask(b.disc, b.baseline, b.adv_seq, b.mask, deviation=deviation,
                                 samples=samples, statistic=statistic)
                assert _differing(keep, ref) == 0, f"batch {i}, {deviation}, {samples}, {statistic}"


def test_sign_mask_statistics_disagree_where_s_star_and_deviation_differ_in_sign():
    # S* > 0 but S* < E_p[S]: "s_star" keeps it under deviation="pos", "deviation" does not.
    disc = torch.tensor([[0.2, -0.1]])
    baseline = torch.tensor([[0.3, -0.3]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    adv = torch.tensor([1.0])
    by_s_star = sign_mask(disc, baseline, adv, mask, "pos", statistic="s_star")
    by_deviation = sign_mask(disc, baseline, adv, mask, "pos", statistic="deviation")
    assert torch.equal(by_s_star, torch.tensor([[True, False]]))
    assert torch.equal(by_deviation, torch.tensor([[False, True]]))
