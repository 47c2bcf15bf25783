"""entclip.core.losses on hand-computed tensors."""

import math

import pytest
import torch

from entclip.core.losses import (
    aggregate,
    clip_b_mask,
    clip_b_z,
    clip_v_mask,
    clip_v_z,
    clipped_surrogate,
    filter_shares,
    group_advantages,
    kl_k3,
)

T_, F_ = True, False


# ---------------------------------------------------------------- advantages, surrogate, KL


def test_group_advantages_scale_by_unbiased_std():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 0.0, 1.0, 1.0])
    # Group 1: mean 1/2, unbiased std sqrt(4 * 1/4 / 3) = 1/sqrt(3) -> A = +-sqrt(3)/2.
    # Group 2: mean 1, deviations (1, -1, 0, 0), unbiased std sqrt(2/3) -> A = (+-sqrt(3/2), 0, 0).
    a, b = math.sqrt(3) / 2, math.sqrt(1.5)
    expected = torch.tensor([a, -a, -a, a, b, -b, 0.0, 0.0])
    torch.testing.assert_close(group_advantages(rewards, 4, eps=0.0), expected)
    torch.testing.assert_close(group_advantages(rewards, 4), expected, rtol=1e-5, atol=1e-5)


def test_group_advantages_without_std_scaling_only_centre():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 0.0, 1.0, 1.0])
    expected = torch.tensor([0.5, -0.5, -0.5, 0.5, 1.0, -1.0, 0.0, 0.0])
    torch.testing.assert_close(group_advantages(rewards, 4, scale_std=False), expected)


def test_zero_variance_group_gets_exactly_zero_advantage():
    # In float32 mean(0.9, 0.9, 0.9) - 0.9 = 6e-8; over std + eps = 1e-6 that would be A = 0.06.
    rewards = torch.tensor([0.9, 0.9, 0.9, 1.0, 0.0, 0.0])
    for scale in (True, False):
        adv = group_advantages(rewards, 3, scale_std=scale)
        assert torch.equal(adv[:3], torch.zeros(3))
        assert adv[3] > 0 and adv[4] < 0


def test_group_advantages_rejects_incomplete_groups():
    with pytest.raises(ValueError, match="multiple of group_size"):
        group_advantages(torch.zeros(7), 4)


def test_clipped_surrogate_values_and_clip_flags_by_hand():
    ratio = torch.tensor([0.5, 1.0, 1.5, 0.9])
    logp = torch.log(ratio).repeat(2, 1).requires_grad_(True)  # (2, 4)
    old = torch.zeros(2, 4)
    out = clipped_surrogate(logp, old, torch.tensor([1.0, -1.0]), eps_low=0.2, eps_high=0.28)
    # A = +1: -min(r, clip(r, 0.8, 1.28)) = (-0.5, -1, -1.28, -0.9); only r = 1.5 is clipped (high).
    # A = -1: -min(-r, -clip(r)) = max(r, clip(r)) = (0.8, 1, 1.5, 0.9); only r = 0.5 clipped (low).
    expected = torch.tensor([[-0.5, -1.0, -1.28, -0.9], [0.8, 1.0, 1.5, 0.9]])
    torch.testing.assert_close(out.loss, expected)
    torch.testing.assert_close(out.ratio, ratio.repeat(2, 1))
    assert torch.equal(out.clipped_high, torch.tensor([[F_, F_, T_, F_], [F_, F_, F_, F_]]))
    assert torch.equal(out.clipped_low, torch.tensor([[F_, F_, F_, F_], [T_, F_, F_, F_]]))
    # A clipped token has zero gradient; every other token has d loss / d logp = -r A.
    out.loss.sum().backward()
    clipped = out.clipped_low | out.clipped_high
    assert torch.equal(logp.grad[clipped], torch.zeros(2))
    minus_r_a = -ratio.repeat(2, 1) * torch.tensor([[1.0], [-1.0]])
    torch.testing.assert_close(logp.grad[~clipped], minus_r_a[~clipped])


def test_clipped_surrogate_accepts_per_token_advantages():
    logp = torch.log(torch.tensor([[0.5, 1.5]]))
    per_seq = clipped_surrogate(logp, torch.zeros(1, 2), torch.tensor([2.0]), 0.2, 0.2)
    per_tok = clipped_surrogate(logp, torch.zeros(1, 2), torch.tensor([[2.0, 2.0]]), 0.2, 0.2)
    torch.testing.assert_close(per_seq.loss, per_tok.loss)
    torch.testing.assert_close(per_seq.loss, torch.tensor([[-1.0, -2.4]]))


def test_kl_k3_by_hand():
    logp = torch.tensor([[0.0, math.log(0.5), -1.0]])
    ref = torch.tensor([[math.log(2.0), math.log(0.5), -2.0]])
    # d = ref - logp = (ln2, 0, -1): e^d - d - 1 = (1 - ln2, 0, e^-1).
    torch.testing.assert_close(kl_k3(logp, ref), torch.tensor([[1 - math.log(2.0), 0.0, math.exp(-1.0)]]))


# ---------------------------------------------------------------- aggregation

LOSS = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])
MASK = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]])


def test_aggregate_token_mean_weighs_every_valid_token_equally():
    torch.testing.assert_close(aggregate(LOSS, MASK, "token-mean"), torch.tensor((1 + 2 + 5 + 6 + 7) / 5))


def test_aggregate_seq_mean_token_mean_averages_sequence_means():
    got = aggregate(LOSS, MASK.bool(), "seq-mean-token-mean")
    torch.testing.assert_close(got, torch.tensor((1.5 + 6.0) / 2))


def test_aggregate_seq_mean_counts_empty_sequences_as_zero():
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0]])
    torch.testing.assert_close(aggregate(LOSS, mask, "seq-mean-token-mean"), torch.tensor(1.5 / 2))
    torch.testing.assert_close(aggregate(LOSS, torch.zeros(2, 4), "token-mean"), torch.tensor(0.0))


def test_aggregate_constant_divides_by_batch_times_constant():
    torch.testing.assert_close(aggregate(LOSS, MASK, "constant", constant=4), torch.tensor(21 / (2 * 4)))


def test_aggregate_keeps_denominator_of_a_different_mask():
    # Filtered tokens zeroed in the loss but still counted in the denominator.
    filtered = LOSS * torch.tensor([[1, 0, 1, 1], [1, 1, 1, 1]])
    torch.testing.assert_close(aggregate(filtered, MASK, "token-mean"), torch.tensor((1 + 5 + 6 + 7) / 5))


def test_aggregate_rejects_unknown_mode_and_missing_constant():
    with pytest.raises(ValueError, match="constant"):
        aggregate(LOSS, MASK, "constant")
    with pytest.raises(ValueError, match="unknown aggregation mode"):
        aggregate(LOSS, MASK, "sum")


# ---------------------------------------------------------------- Clip_B / Clip_V

# Clip_B case. Valid S* = (-2, 0, 0, 0 | -2, 0, 2, 2): mean 0, population std sqrt(16/8) = sqrt(2).
# Column 4 is padding holding a value that would pass every test.
B_DISC = torch.tensor([[-2.0, 0.0, 0.0, 0.0, 0.0], [-2.0, 0.0, 2.0, 2.0, 0.0]])
B_MASK = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 0]])
B_ADV = torch.tensor([-1.0, 1.0])  # row 0 penalized, row 1 rewarded


def test_clip_b_released_drops_only_penalized_tokens_below_threshold():
    # mu = 1.2: threshold -1.2 * sqrt(2) = -1.70; both -2 violate but only row 0's has A < 0.
    keep = clip_b_mask(B_DISC, B_ADV, B_MASK, mu=1.2)
    assert torch.equal(keep, torch.tensor([[F_, T_, T_, T_, F_], [T_, T_, T_, T_, F_]]))
    # mu = 1.5: threshold -2.12, nothing violates.
    assert torch.equal(clip_b_mask(B_DISC, B_ADV, B_MASK, mu=1.5), B_MASK.bool())


def test_clip_b_zero_advantage_is_kept():
    adv = torch.tensor([0.0, 1.0])
    assert torch.equal(clip_b_mask(B_DISC, adv, B_MASK, mu=1.2), B_MASK.bool())


def test_clip_b_paper_rule_is_a_two_sided_band_for_any_advantage():
    # |x| <= 1.70: both -2 and both +2 leave, whatever the advantage.
    keep = clip_b_mask(B_DISC, B_ADV, B_MASK, mu=1.2, rule="paper")
    assert torch.equal(keep, torch.tensor([[F_, T_, T_, T_, F_], [F_, T_, F_, F_, F_]]))
    # Asymmetric band [-1.70, 2.12]: only the -2 leave.
    keep = clip_b_mask(B_DISC, B_ADV, B_MASK, rule="paper", mu_low=1.2, mu_high=1.5)
    assert torch.equal(keep, torch.tensor([[F_, T_, T_, T_, F_], [F_, T_, T_, T_, F_]]))


def test_clip_b_statistics_ignore_padding_values():
    garbage = B_DISC.clone()
    garbage[:, 4] = torch.tensor([1e6, math.nan])
    for rule in ("released", "paper"):
        clean = clip_b_mask(B_DISC, B_ADV, B_MASK, 1.2, rule)
        assert torch.equal(clip_b_mask(garbage, B_ADV, B_MASK, 1.2, rule), clean)


# Clip_V case. Valid x = S* - E_p[S] = (-3, 1, 1, 1 | 1, 1, 1, 1): mean 0.5, population std
# sqrt((3.5^2 + 7 * 0.5^2) / 8) = sqrt(1.75) = 1.3229. x itself is compared: -3 / 1.3229 = -2.27
# (x - mean(x) would give -2.65).
V_BASE = torch.tensor([[0.3, -0.2, 0.1, 0.0, 0.0], [0.5, 0.5, -0.4, 0.2, 0.0]])
V_X = torch.tensor([[-3.0, 1.0, 1.0, 1.0, -50.0], [1.0, 1.0, 1.0, 1.0, 0.0]])
V_DISC = V_X + V_BASE
V_MASK = B_MASK


def test_clip_v_compares_x_itself_not_its_centred_value():
    adv = torch.tensor([-1.0, -1.0])
    # mu = 2.5: threshold -3.31 < -3, kept (the centred -3.5 would have been dropped).
    assert torch.equal(clip_v_mask(V_DISC, V_BASE, adv, V_MASK, mu=2.5, max_frac=None), V_MASK.bool())
    # mu = 2.0: threshold -2.65 > -3, dropped.
    keep = clip_v_mask(V_DISC, V_BASE, adv, V_MASK, mu=2.0, max_frac=None)
    assert torch.equal(keep, torch.tensor([[F_, T_, T_, T_, F_], [T_, T_, T_, T_, F_]]))


def test_clip_v_released_keeps_positive_and_drops_zero_advantage():
    keep_pos = clip_v_mask(V_DISC, V_BASE, torch.tensor([1.0, -1.0]), V_MASK, mu=2.0, max_frac=None)
    assert torch.equal(keep_pos, V_MASK.bool())
    keep_zero = clip_v_mask(V_DISC, V_BASE, torch.tensor([0.0, 1.0]), V_MASK, mu=2.0, max_frac=None)
    assert keep_zero[0, 0].item() is False  # A = 0 counts as non-positive for Clip_V


def test_clip_v_paper_rule_is_a_two_sided_band():
    adv = torch.tensor([1.0, 1.0])
    # Band [-2 sigma, 0.7 sigma] = [-2.65, 0.93]: -3 and every 1 leave.
    keep = clip_v_mask(V_DISC, V_BASE, adv, V_MASK, rule="paper", mu_low=2.0, mu_high=0.7)
    assert torch.equal(keep, torch.zeros(2, 5, dtype=torch.bool))
    keep = clip_v_mask(V_DISC, V_BASE, adv, V_MASK, rule="paper", mu=2.0)  # [-2.65, 2.65]
    assert torch.equal(keep, torch.tensor([[F_, T_, T_, T_, F_], [T_, T_, T_, T_, F_]]))


# Cap case. Valid x = (-5, 0, -3, 0 | 0, -4, 0, 0): mean -1.5, population std sqrt(32/8) = 2.
# mu = 1: threshold -2, so -5, -4 and -3 violate.
CAP_X = torch.tensor([[-5.0, 0.0, -3.0, 0.0], [0.0, -4.0, 0.0, 0.0]])
CAP_BASE = torch.full((2, 4), 0.25)
CAP_MASK = torch.ones(2, 4)


@pytest.mark.parametrize(
    "max_frac,dropped",
    [(None, [(0, 0), (1, 1), (0, 2)]), (0.25, [(0, 0), (1, 1)]), (0.3, [(0, 0), (1, 1)]), (1e-4, [(0, 0)])],
)
def test_clip_v_cap_drops_only_the_k_most_negative_violators(max_frac, dropped):
    # K = max(floor(max_frac * 8), 1): None -> no cap, 0.25 and 0.3 -> 2, 1e-4 -> 1.
    adv = torch.tensor([-1.0, -1.0])
    keep = clip_v_mask(CAP_X + CAP_BASE, CAP_BASE, adv, CAP_MASK, mu=1.0, max_frac=max_frac)
    expected = torch.ones(2, 4, dtype=torch.bool)
    for pos in dropped:
        expected[pos] = False
    assert torch.equal(keep, expected)


def test_clip_v_cap_counts_only_penalized_violators():
    # The -5 token is rewarded: it stays, and the single slot goes to -4.
    adv = torch.tensor([[1.0, -1.0, -1.0, -1.0], [-1.0, -1.0, -1.0, -1.0]])
    keep = clip_v_mask(CAP_X + CAP_BASE, CAP_BASE, adv, CAP_MASK, mu=1.0, max_frac=1e-4)
    assert torch.equal(keep, torch.tensor([[T_, T_, T_, T_], [T_, F_, T_, T_]]))


def test_clip_v_cap_never_spends_a_slot_on_zero_advantage_violators():
    # Row 0 has A = 0 (violators -5, -3), row 1 A = -1 (violator -4). K = 1 slot for A < 0 violators:
    # one A < 0 violator fits, so every violator is dropped, the A = 0 ones included (Trinity-RFT).
    adv = torch.tensor([0.0, -1.0])
    keep = clip_v_mask(CAP_X + CAP_BASE, CAP_BASE, adv, CAP_MASK, mu=1.0, max_frac=1e-4)
    assert torch.equal(keep, torch.tensor([[F_, T_, F_, T_], [T_, F_, T_, T_]]))
    # Two A < 0 violators for one slot: the more negative (-5) is dropped; the A = 0 one (-4) always is.
    adv = torch.tensor([[-1.0, -1.0, -1.0, -1.0], [0.0, 0.0, 0.0, 0.0]])
    keep = clip_v_mask(CAP_X + CAP_BASE, CAP_BASE, adv, CAP_MASK, mu=1.0, max_frac=1e-4)
    assert torch.equal(keep, torch.tensor([[F_, T_, T_, T_], [T_, F_, T_, T_]]))


def test_paper_rule_has_no_cap():
    adv = torch.tensor([-1.0, -1.0])
    keep = clip_v_mask(CAP_X + CAP_BASE, CAP_BASE, adv, CAP_MASK, mu=1.0, max_frac=1e-4, rule="paper")
    # Band [-2, 2] on x itself: -5, -4, -3 all leave.
    assert int((~keep).sum()) == 3


@pytest.mark.parametrize("rule", ["released", "paper"])
def test_zero_sigma_keeps_every_valid_token(rule):
    disc = torch.full((2, 3), 0.7)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    adv = torch.tensor([-1.0, -1.0])
    assert torch.equal(clip_b_mask(disc, adv, mask, mu=0.01, rule=rule), mask.bool())
    assert torch.equal(clip_v_mask(disc, disc - 0.2, adv, mask, mu=0.01, rule=rule), mask.bool())


@pytest.mark.parametrize("rule", ["released", "paper"])
def test_clip_b_and_clip_v_never_keep_padding(rule):
    g = torch.Generator().manual_seed(0)
    disc = torch.randn(4, 6, generator=g)
    mask = torch.rand(4, 6, generator=g) > 0.4
    adv = torch.tensor([1.0, -1.0, 1.0, 0.0])
    disc[~mask] = 0.0  # values that pass every threshold
    for keep in (
        clip_b_mask(disc, adv, mask, mu=100.0, rule=rule),
        clip_v_mask(disc, torch.zeros(4, 6), adv, mask, mu=100.0, rule=rule),
        clip_b_mask(torch.zeros(4, 6), adv, mask, rule=rule),  # sigma = 0 branch
    ):
        assert torch.equal(keep, mask)


def test_masks_reject_unknown_rule_and_band_widths_for_released():
    with pytest.raises(ValueError, match="unknown clip rule"):
        clip_b_mask(B_DISC, B_ADV, B_MASK, rule="both")
    with pytest.raises(ValueError, match="unknown clip rule"):
        clip_v_mask(V_DISC, V_BASE, B_ADV, V_MASK, rule="Paper")
    with pytest.raises(ValueError, match="mu_low"):
        clip_b_mask(B_DISC, B_ADV, B_MASK, mu_low=2.0)


def test_masks_accept_per_sequence_or_per_token_advantages():
    per_tok = B_ADV[:, None].expand(2, 5)
    assert torch.equal(clip_b_mask(B_DISC, B_ADV, B_MASK, 1.2), clip_b_mask(B_DISC, per_tok, B_MASK, 1.2))
    assert torch.equal(
        clip_v_mask(V_DISC, V_BASE, B_ADV, V_MASK, 2.0), clip_v_mask(V_DISC, V_BASE, per_tok, V_MASK, 2.0)
    )


# ---------------------------------------------------------------- z helpers and shares


def test_z_helpers_by_hand():
    z_b = clip_b_z(B_DISC, B_MASK)
    r2 = math.sqrt(2.0)
    torch.testing.assert_close(z_b, torch.tensor([[-r2, 0, 0, 0, 0], [-r2, 0, r2, r2, 0]]))
    z_v = clip_v_z(V_DISC, V_BASE, V_MASK)
    s = math.sqrt(1.75)
    torch.testing.assert_close(z_v, torch.tensor([[-3 / s, 1 / s, 1 / s, 1 / s, 0], [1 / s] * 4 + [0.0]]))
    assert torch.equal(clip_v_z(torch.ones(2, 2), torch.zeros(2, 2), torch.ones(2, 2)), torch.zeros(2, 2))


@pytest.mark.parametrize("mu", [0.5, 1.0, 2.0])
def test_released_rule_drops_iff_penalized_and_z_below_minus_mu(mu):
    g = torch.Generator().manual_seed(3)
    disc = torch.randn(6, 20, generator=g) ** 3  # heavy tails: some tokens violate
    base = 0.3 * torch.randn(6, 20, generator=g)
    mask = torch.rand(6, 20, generator=g) > 0.2
    adv = torch.tensor([-1.0, 0.0, 1.0, -0.5, 0.0, 2.0])
    adv_tok = adv[:, None].expand(6, 20)

    keep_b = clip_b_mask(disc, adv, mask, mu=mu)
    expected_b = mask & ~((adv_tok < 0) & (clip_b_z(disc, mask) < -mu))
    assert torch.equal(keep_b, expected_b)
    keep_v = clip_v_mask(disc, base, adv, mask, mu=mu, max_frac=None)
    expected_v = mask & ~((adv_tok <= 0) & (clip_v_z(disc, base, mask) < -mu))
    assert torch.equal(keep_v, expected_v)
    assert (~keep_b & mask).any() and (~keep_v & mask).any()


def test_filter_shares_by_hand():
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    adv = torch.tensor([[1.0, 1.0, 0.0, 1.0], [-1.0, -1.0, -1.0, -1.0]])
    keep = torch.tensor([[T_, F_, F_, F_], [F_, F_, T_, T_]])
    # Valid: 7; dropped valid: (0,1), (0,2), (1,0), (1,1) = 4. A > 0 valid: 2, one dropped.
    # A < 0 valid: 4, two dropped. The dropped A = 0 token counts only in "frac".
    expected = {"frac": 4 / 7, "frac_pos": 1 / 2, "frac_neg": 2 / 4}
    assert filter_shares(keep, mask, adv) == pytest.approx(expected)


def test_filter_shares_zero_denominators_give_zero():
    mask = torch.tensor([[1, 1], [0, 0]])
    shares = filter_shares(torch.tensor([[F_, T_], [F_, F_]]), mask, torch.tensor([1.0, -1.0]))
    assert shares == {"frac": 0.5, "frac_pos": 0.5, "frac_neg": 0.0}
    assert filter_shares(torch.zeros(1, 2, dtype=torch.bool), torch.zeros(1, 2), torch.tensor([1.0])) == {
        "frac": 0.0,
        "frac_pos": 0.0,
        "frac_neg": 0.0,
    }
