"""entclip.core.methods on hand-computed tensors."""

import math

import pytest
import torch

from entclip.core.methods import (
    adapt_entropy_coef,
    adaptive_mu_for_entropy,
    adaptive_mu_for_share,
    bonus_coef,
    clip_cov_mask,
    dual_clip,
    entropy_bonus_term,
    high_entropy_mask,
    kl_cov_loss,
    steer_omega,
    steer_weights,
    token_covariance,
)
from entclip.core.losses import clip_b_mask, clip_b_z, clip_v_mask, clip_v_z, clipped_surrogate, filter_shares
from entclip.core.theory import token_entropy

T_, F_ = True, False


# ---------------------------------------------------------------- dual clip


def test_dual_clip_caps_only_negative_advantages_with_ratio_above_c():
    ratio = torch.tensor([0.5, 2.0, 5.0])
    logp = torch.log(ratio).repeat(2, 1).requires_grad_(True)  # (2, 3)
    adv = torch.tensor([1.0, -1.0])
    surr = clipped_surrogate(logp, torch.zeros(2, 3), adv, eps_low=0.2, eps_high=0.28)
    loss, active = dual_clip(surr.loss, adv, c=3.0)
    # A = +1: -min(r, clip(r, 0.8, 1.28)) untouched, even at r = 5.
    # A = -1: max(r, clip(r)) = (0.8, 2, 5), capped at c |A| = 3 -> (0.8, 2, 3).
    torch.testing.assert_close(loss, torch.tensor([[-0.5, -1.28, -1.28], [0.8, 2.0, 3.0]]))
    assert torch.equal(active, torch.tensor([[F_, F_, F_], [F_, F_, T_]]))
    # The capped token has zero gradient; r = 2 with A = -1 keeps d loss / d logp = -r A = 2.
    loss.sum().backward()
    assert logp.grad[1, 2] == 0.0
    torch.testing.assert_close(logp.grad[1, 1], torch.tensor(2.0))


def test_dual_clip_rejects_c_not_above_one():
    with pytest.raises(ValueError, match="must be > 1"):
        dual_clip(torch.zeros(1, 2), torch.tensor([-1.0]), c=1.0)


# ---------------------------------------------------------------- entropy bonus


def test_entropy_bonus_is_coef_times_mean_valid_entropy_with_gradient_through_h():
    h = torch.tensor([[1.0, 2.0, 9.0], [3.0, 7.0, 7.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    term = entropy_bonus_term(h, mask, coef=0.1)
    torch.testing.assert_close(term, torch.tensor(0.1 * (1 + 2 + 3) / 3))
    term.backward()
    torch.testing.assert_close(h.grad, 0.1 / 3 * mask.float())


def test_subtracting_the_entropy_bonus_raises_entropy():
    logits = torch.tensor([[3.0, 1.0, 0.0, -1.0], [0.5, 2.5, 0.0, 0.0]], requires_grad=True)
    h0 = token_entropy(logits).detach()
    loss = -entropy_bonus_term(token_entropy(logits), torch.ones(2), coef=0.5)
    loss.backward()
    h1 = token_entropy(logits.detach() - 0.05 * logits.grad)
    assert torch.all(h1 > h0)


def test_entropy_bonus_divides_by_the_micro_batches_of_the_update():
    h = torch.tensor([[1.0, 3.0]])
    torch.testing.assert_close(entropy_bonus_term(h, torch.ones(1, 2), coef=0.5, parts=4), torch.tensor(0.5 * 2 / 4))


def test_adapt_entropy_coef_rises_at_or_below_target_as_trl():
    assert adapt_entropy_coef(0.01, entropy_now=0.1, target=0.2, delta=0.005) == pytest.approx(0.015)
    assert adapt_entropy_coef(0.01, entropy_now=0.3, target=0.2, delta=0.005) == pytest.approx(0.005)
    assert adapt_entropy_coef(0.01, entropy_now=0.2, target=0.2, delta=0.005) == pytest.approx(0.015)  # at: rises
    assert adapt_entropy_coef(0.002, entropy_now=0.9, target=0.2, delta=0.005) == 0.0  # c_min
    assert adapt_entropy_coef(0.004, entropy_now=0.9, target=0.2, delta=0.005, c_min=0.001) == 0.001
    assert adapt_entropy_coef(0.098, entropy_now=0.1, target=0.2, delta=0.005, c_max=0.1) == 0.1


def test_adaptive_bonus_applies_only_at_or_below_target_and_not_before_a_measurement():
    assert bonus_coef(0.02, last_entropy=math.inf, target=0.5) == 0.0  # TRL: nothing measured yet
    assert bonus_coef(0.02, last_entropy=0.7, target=0.5) == 0.0
    assert bonus_coef(0.02, last_entropy=0.5, target=0.5) == 0.02
    assert bonus_coef(0.02, last_entropy=math.inf, target=None) == 0.02  # static bonus: always


# ---------------------------------------------------------------- high-entropy tokens


def test_high_entropy_mask_keeps_ties_at_the_threshold():
    h = torch.tensor([[1.0, 2.0, 2.0, 2.0, 3.0]])
    ones = torch.ones(1, 5)
    # rho = 0.4: tau = the 0.6 quantile = sorted[2.4] = 2 (lerp of 2 and 2): all three 2s are kept.
    assert torch.equal(high_entropy_mask(h, ones, rho=0.4), torch.tensor([[F_, T_, T_, T_, T_]]))
    # rho = 0.2: tau = sorted[3.2] = 2 + 0.2 * (3 - 2) = 2.2: only the 3.
    assert torch.equal(high_entropy_mask(h, ones, rho=0.2), torch.tensor([[F_, F_, F_, F_, T_]]))
    assert torch.equal(high_entropy_mask(torch.full((1, 5), 0.7), ones), ones.bool())


def test_high_entropy_threshold_interpolates_linearly_as_torch_quantile():
    # 0..9: rho = 0.25 -> tau = 0.75 * 9 = 6.75 keeps 7, 8, 9; rho = 0.45 -> tau = 4.95 keeps 5..9, where
    # the order statistic k = ceil(0.45 * 10) = 5 agrees; rho = 0.05 -> tau = 8.55 keeps only 9.
    h = torch.arange(10.0).unsqueeze(0)
    assert int(high_entropy_mask(h, torch.ones(1, 10), rho=0.25).sum()) == 3
    assert int(high_entropy_mask(h, torch.ones(1, 10), rho=0.45).sum()) == 5
    assert torch.equal(high_entropy_mask(h, torch.ones(1, 10), rho=0.05)[0].nonzero().flatten(), torch.tensor([9]))
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        vals = torch.rand(1, 37, generator=g)
        tau = torch.quantile(vals[0], 0.8)
        assert torch.equal(high_entropy_mask(vals, torch.ones(1, 37), rho=0.2), vals >= tau)


def test_high_entropy_mask_never_keeps_padding():
    h = torch.tensor([[1.0, 2.0, 100.0], [3.0, 4.0, float("nan")], [5.0, 100.0, 100.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0], [1, 0, 0]])
    # tau comes from the 5 valid values only: top 20% = {5}.
    assert torch.equal(high_entropy_mask(h, mask, rho=0.2), torch.tensor([[F_] * 3, [F_] * 3, [T_, F_, F_]]))
    assert not high_entropy_mask(h, torch.zeros(3, 3)).any()
    with pytest.raises(ValueError, match="not a percent"):
        high_entropy_mask(h, mask, rho=20)


# ---------------------------------------------------------------- Clip-Cov and KL-Cov

# Advantages (+1, -1); valid log p (-1, -2, -3, -6) in both rows -> mean A = 0, mean log p = -3, so
# Cov = A (log p + 3) = (2, 1, 0, -3) and (-2, -1, 0, 3). Column 4 is padding with junk values.
ADV = torch.tensor([1.0, -1.0])
LOGP = torch.tensor([[-1.0, -2.0, -3.0, -6.0, float("nan")], [-1.0, -2.0, -3.0, -6.0, -6.0]])
MASK = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 0]])
BAND = torch.tensor([[T_, F_, F_, F_, F_], [F_, F_, F_, T_, F_]])  # 1 < Cov < 5: 2 and 3


def test_token_covariance_by_hand_ignores_padding():
    expected = torch.tensor([[2.0, 1.0, 0.0, -3.0, 0.0], [-2.0, -1.0, 0.0, 3.0, 0.0]])
    torch.testing.assert_close(token_covariance(LOGP, ADV, MASK), expected)


def test_token_covariance_weighs_advantages_per_token():
    # Sequence advantages (1, 0) over 3 and 1 valid tokens: mean A = 3/4 (not 1/2); mean log p = -2.
    logp = torch.tensor([[-1.0, -2.0, -3.0, 9.0], [-2.0, 9.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    expected = torch.tensor([[0.25, 0.0, -0.25, 0.0], [0.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(token_covariance(logp, torch.tensor([1.0, 0.0]), mask), expected)


def _dropped(keep):
    return MASK.bool() & ~keep


def test_clip_cov_drops_max_1_floor_r_n_tokens_only_from_the_band():
    gen = torch.Generator().manual_seed(0)
    for frac, n_drop in ((2e-4, 1), (0.25, 2), (1.0, 2)):  # floor(r * 8) = 0 -> 1; 2; 8 -> band size 2
        dropped = _dropped(clip_cov_mask(LOGP, ADV, MASK, gen, frac=frac))
        assert int(dropped.sum()) == n_drop
        assert not (dropped & ~BAND).any()
    assert not (clip_cov_mask(LOGP, ADV, MASK, gen, frac=1.0) & ~MASK.bool()).any()  # padding never kept


def test_clip_cov_is_reproducible_with_a_seeded_generator():
    picks = [_dropped(clip_cov_mask(LOGP, ADV, MASK, torch.Generator().manual_seed(s))) for s in range(16)]
    again = [_dropped(clip_cov_mask(LOGP, ADV, MASK, torch.Generator().manual_seed(s))) for s in range(16)]
    assert all(torch.equal(a, b) for a, b in zip(picks, again))
    # Random, not fixed: over 16 seeds both band tokens get picked.
    assert torch.equal(torch.stack(picks).any(0), BAND)


def test_clip_cov_drops_nothing_when_the_band_is_empty_or_excluded():
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(clip_cov_mask(LOGP, ADV, MASK, gen, lb=10.0, ub=20.0), MASK.bool())
    only = clip_cov_mask(LOGP, ADV, MASK, gen, frac=1.0, exclude=torch.tensor([[T_] + [F_] * 4, [F_] * 5]))
    assert torch.equal(_dropped(only), torch.tensor([[F_] * 5, [F_, F_, F_, T_, F_]]))


def test_kl_cov_selects_top_k_by_cov_and_its_gradient_matches_the_formula():
    logp = LOGP.nan_to_num(-6.0).requires_grad_(True)
    d = torch.tensor([[0.1, math.log(5.0), -0.2, 0.1, 0.0], [-0.3, 0.1, 0.2, 0.4, 0.0]])  # log p - log p_old
    loss, selected = kl_cov_loss(logp, logp.detach() - d, ADV, MASK, frac=0.25, beta=0.5)
    assert torch.equal(selected, BAND)  # K = floor(0.25 * 8) = 2: Cov 3 and 2
    a = torch.tensor([[1.0], [-1.0]])
    r = d.exp()
    torch.testing.assert_close(loss, torch.where(BAND, -a * r + 0.5 * d.abs(), -a * r))
    (loss * MASK).sum().backward()
    # No ratio clip on the rest: r = 5 with A = +1 still has gradient -A r = -5.
    expected = torch.where(BAND, -a * r + 0.5 * d.sign(), -a * r) * MASK
    torch.testing.assert_close(logp.grad, expected)
    assert logp.grad[0, 1] == pytest.approx(-5.0)


def test_kl_cov_selects_at_least_one_token_and_breaks_ties_by_position():
    _, selected = kl_cov_loss(LOGP.nan_to_num(0.0), LOGP.nan_to_num(0.0), ADV, MASK, frac=2e-3)
    assert torch.equal(selected, torch.tensor([[F_] * 5, [F_, F_, F_, T_, F_]]))
    flat = torch.zeros(2, 5)  # A = 0: every Cov is 0, a five-way tie
    mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
    _, tie = kl_cov_loss(flat, flat, torch.zeros(2), mask, frac=0.25)
    assert torch.equal(tie, torch.tensor([[F_, T_, T_, F_, F_], [F_] * 5]))
    with pytest.raises(ValueError, match="frac=0.002"):
        kl_cov_loss(flat, flat, torch.zeros(2), mask, frac=2.0)


# ---------------------------------------------------------------- STEER


def test_steer_omega_matches_the_formula_by_hand():
    # p = 0.5, p_old = 0.25, H = 1, A = 2: (2 / 0.25) * 0.5 * 0.5 * (log 0.5 + 1).
    omega = steer_omega(torch.log(torch.tensor([[0.5]])), torch.log(torch.tensor([[0.25]])),
                        torch.tensor([[1.0]]), torch.tensor([2.0]))
    assert float(omega) == pytest.approx(8 * 0.25 * (math.log(0.5) + 1.0), rel=1e-6)


def test_steer_weights_map_the_abs_omega_range_linearly_onto_w_max_to_w_min():
    # p = p_old = 1/2, A = 1: Omega = 0.5 (H - log 2); H = log 2 + (0, 1, 2, 4) -> |Omega| = 0, .5, 1, 2.
    logp = torch.full((1, 5), math.log(0.5))
    h = math.log(2.0) + torch.tensor([[0.0, 1.0, 2.0, 4.0, 50.0]])  # the last is padding
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    w = steer_weights(logp, logp, h, torch.tensor([1.0]), mask)
    torch.testing.assert_close(w, torch.tensor([[1.2, 1.1, 1.0, 0.8, 0.0]]))


def test_steer_weights_decrease_monotonically_in_abs_omega():
    g = torch.Generator().manual_seed(3)
    logp = -torch.rand(4, 6, generator=g) * 3
    old = logp - 0.1 * torch.randn(4, 6, generator=g)
    h, adv, mask = torch.rand(4, 6, generator=g) * 2, torch.randn(4, generator=g), torch.ones(4, 6)
    w = steer_weights(logp, old, h, adv, mask).flatten()
    order = torch.argsort(steer_omega(logp, old, h, adv).abs().flatten())
    assert torch.all(w[order][1:] <= w[order][:-1])
    assert w.max() == pytest.approx(1.2) and w.min() == pytest.approx(0.8)


def test_steer_weights_give_the_midpoint_when_every_abs_omega_is_equal():
    logp = torch.full((2, 3), math.log(0.5))
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    w = steer_weights(logp, logp, torch.ones(2, 3), torch.ones(2), mask)
    torch.testing.assert_close(w, mask.float())  # (1.2 + 0.8) / 2 = 1; padding 0
    w2 = steer_weights(logp, logp, torch.ones(2, 3), torch.ones(2), mask, w_max=1.2, w_min=1.0)
    torch.testing.assert_close(w2, 1.1 * mask.float())


# ---------------------------------------------------------------- adaptive Clip_B / Clip_V threshold

# Row 0: A < 0, row 1: A > 0, row 2: A = 0. Padding (row 0, col 4) holds a very low z.
Z = torch.tensor([[-3.0, -2.0, -1.0, 0.0, -50.0], [-2.5, -1.5, 0.5, 9.0, 0.0], [-4.0, -0.5, 1.0, 2.0, 3.0]])
ZADV = torch.tensor([-1.0, 1.0, 0.0])
ZMASK = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1]])  # 14 valid


def _drop(z, mu, rows):
    """Tokens the released rule drops at mu when only `rows` are eligible."""
    elig = torch.zeros_like(z, dtype=torch.bool)
    elig[rows] = True
    return elig & ZMASK.bool() & (z < -mu)


def test_adaptive_mu_hits_the_target_share_and_drops_only_eligible_tokens():
    res = adaptive_mu_for_share(Z, ZADV, ZMASK, target_share=2 / 14)
    # Clip_B: eligible z (A < 0) sorted -3, -2, -1, 0; drop 2 -> mu = -(-2 + -1) / 2.
    assert res.mu == pytest.approx(1.5) and res.dropped == 2 and res.share == pytest.approx(2 / 14)
    assert torch.equal(_drop(Z, res.mu, [0]), torch.tensor([[T_, T_, F_, F_, F_], [F_] * 5, [F_] * 5]))
    # Clip_V also drops A = 0: eligible -4, -3, -2, -1, -0.5, 0, 1, 2, 3; drop 4 -> mu = 0.75.
    res_v = adaptive_mu_for_share(Z, ZADV, ZMASK, target_share=4 / 14, include_zero_adv=True)
    assert res_v.mu == pytest.approx(0.75) and res_v.dropped == 4


def test_adaptive_mu_is_clamped_and_reports_the_realized_share():
    none = adaptive_mu_for_share(Z, ZADV, ZMASK, target_share=0.0)
    assert none.mu == 20.0 and none.dropped == 0  # padding's -50 is never eligible
    # Half the tokens would need every eligible one dropped (mu -> -inf); mu_min = 0 drops z < 0 only.
    capped = adaptive_mu_for_share(Z, ZADV, ZMASK, target_share=0.5)
    assert capped.mu == 0.0 and capped.dropped == 3 and capped.share == pytest.approx(3 / 14)


def test_adaptive_mu_does_not_split_ties():
    z = torch.tensor([[-2.0, -2.0, -1.0, 0.0]])
    res = adaptive_mu_for_share(z, torch.tensor([-1.0]), torch.ones(1, 4), target_share=0.25)
    # One drop is wanted; the two -2s go together or not at all: 0 and 2 are equally near, take 0.
    assert res.dropped == 0
    # Two of five wanted, three tie at -2: 3 is the nearest count a threshold can drop.
    z5 = torch.tensor([[-2.0, -2.0, -2.0, -1.0, 0.0]])
    assert adaptive_mu_for_share(z5, torch.tensor([-1.0]), torch.ones(1, 5), target_share=0.4).dropped == 3
    # Entropy variant: dropping one -2 would give dH = 0.3, but no threshold drops just one.
    dh = torch.tensor([[-0.5, 0.4, -0.1, 0.0]])  # achievable k = 0, 2, 3, 4: dH = -0.2, -0.1, 0, 0
    res_h = adaptive_mu_for_entropy(z, dh, torch.tensor([-1.0]), torch.ones(1, 4), target=0.1)
    assert res_h.dropped == 3 and res_h.predicted_dh == pytest.approx(0.0)


def test_adaptive_mu_agrees_with_the_clip_b_and_clip_v_masks():
    g = torch.Generator().manual_seed(7)
    disc, base = torch.randn(8, 16, generator=g), 0.1 * torch.randn(8, 16, generator=g)
    adv = torch.tensor([1.0, -1.0, 0.0, -0.5, 2.0, -2.0, 0.0, -1.0])
    mask = torch.ones(8, 16)
    mask[:, 12:] = 0
    n = int(mask.sum())
    res = adaptive_mu_for_share(clip_b_z(disc, mask), adv, mask, 0.05, mu_min=-10.0)
    keep = clip_b_mask(disc, adv, mask, mu=res.mu)
    assert res.dropped == round(0.05 * n) == int((mask.bool() & ~keep).sum())
    assert filter_shares(keep, mask, adv)["frac_pos"] == 0.0
    z_v = clip_v_z(disc, base, mask)
    res_v = adaptive_mu_for_share(z_v, adv, mask, 0.1, include_zero_adv=True, mu_min=-10.0)
    keep_v = clip_v_mask(disc, base, adv, mask, mu=res_v.mu, max_frac=None)
    assert res_v.dropped == round(0.1 * n) == int((mask.bool() & ~keep_v).sum())


def test_adaptive_mu_for_entropy_drops_the_fewest_tokens_that_reach_the_target():
    # Eligible (row 0) dH: -0.5, -0.3, -0.1, 0.2 in z order; rows 1-2 add 0.1; padding's 100 is ignored.
    dh = torch.tensor([[-0.5, -0.3, -0.1, 0.2, 100.0], [0.05, 0.05, 0.0, 0.0, 0.0], [0.0] * 5])
    # Predicted dH after dropping k = 0..4 lowest: -0.6, -0.1, 0.2, 0.3, 0.1.
    for target, mu, pred in ((0.0, 1.5, 0.2), (0.25, 0.5, 0.3), (1.0, 0.5, 0.3), (-1.0, 20.0, -0.6)):
        res = adaptive_mu_for_entropy(Z, dh, ZADV, ZMASK, target)
        assert res.mu == pytest.approx(mu) and res.predicted_dh == pytest.approx(pred)
    # Unreachable target: the best k (3), never a row-1 token although -2.5 < -mu there.
    assert adaptive_mu_for_entropy(Z, dh, ZADV, ZMASK, 1.0).dropped == 3
