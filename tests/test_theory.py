"""entclip.theory against hand-computed values, a float64 reference and finite differences."""

import math

import pytest
import torch

from entclip.theory import (
    TokenStats,
    grpo_logit_delta,
    single_logit_delta,
    token_entropy,
    token_logp,
    token_stats,
)


def reference_stats(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0):
    """Straight from the definitions in THEORY.md, in float64: (logp, H, S*, E_p[S])."""
    z = logits.double() / temperature
    p = torch.softmax(z, -1)
    logp = torch.log(p)
    h = -(p * logp).sum(-1)
    s = p * (h.unsqueeze(-1) + logp)  # S_i for every i
    disc = s.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    baseline = (p * s).sum(-1)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1), h, disc, baseline


def entropy64(z: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    logp = torch.log_softmax(z.double() / temperature, -1)
    return -(logp.exp() * logp).sum(-1)


def random_case(shape, vocab, seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    logits = scale * torch.randn(*shape, vocab, generator=g)
    tokens = torch.randint(0, vocab, shape, generator=g)
    return logits, tokens


def test_hand_computed_three_token_example():
    # p = (1/2, 1/4, 1/4): H = 1.5 ln2; S_0 = 1/2 (H - ln2) = ln2/4; S_1 = 1/4 (H - 2 ln2) = -ln2/8;
    # E_p[S] = 1/2 * ln2/4 + 2 * 1/4 * (-ln2/8) = ln2/16.
    ln2 = math.log(2.0)
    logits = torch.tensor([[ln2, 0.0, 0.0], [ln2, 0.0, 0.0]])
    stats = token_stats(logits, torch.tensor([0, 1]))
    expected = {
        "logp": [-ln2, -2 * ln2],
        "entropy": [1.5 * ln2, 1.5 * ln2],
        "disc": [ln2 / 4, -ln2 / 8],
        "baseline": [ln2 / 16, ln2 / 16],
    }
    for field, values in expected.items():
        torch.testing.assert_close(getattr(stats, field), torch.tensor(values), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "shape,vocab,chunk", [((7,), 50, 3), ((3, 4), 11, 5), ((2, 3, 5), 13, 4), ((1,), 5, None)]
)
def test_token_stats_matches_float64_reference(shape, vocab, chunk):
    logits, tokens = random_case(shape, vocab, seed=sum(shape) + vocab)
    stats = token_stats(logits, tokens, chunk_size=chunk)
    assert isinstance(stats, TokenStats)
    fields = (stats.logp, stats.entropy, stats.disc, stats.baseline)
    for got, want in zip(fields, reference_stats(logits, tokens)):
        assert got.dtype == torch.float32 and got.shape == tokens.shape
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_chunk_size_does_not_change_results():
    logits, tokens = random_case((4, 6), 37, seed=1)
    full = token_stats(logits, tokens, chunk_size=10**6)
    for chunk in (1, 5, 23):
        part = token_stats(logits, tokens, chunk_size=chunk)
        for field in ("logp", "entropy", "disc", "baseline"):
            torch.testing.assert_close(getattr(part, field), getattr(full, field), rtol=0, atol=1e-6)


def test_non_contiguous_logits_give_same_stats_as_contiguous():
    logits, tokens = random_case((3, 9), 21, seed=2)
    sliced = logits[:, 1:-1]  # like the engine's shift by one: cannot be viewed as (N, V)
    assert not sliced.is_contiguous()
    got = token_stats(sliced, tokens[:, 1:-1], chunk_size=4)
    want = token_stats(sliced.contiguous(), tokens[:, 1:-1], chunk_size=4)
    for field in ("logp", "entropy", "disc", "baseline"):
        torch.testing.assert_close(getattr(got, field), getattr(want, field), rtol=0, atol=0)


def test_bf16_logits_give_float32_stats_close_to_fp32():
    logits, tokens = random_case((5, 4), 64, seed=3)
    low = token_stats(logits.bfloat16(), tokens, chunk_size=3)
    exact = token_stats(logits.bfloat16().float(), tokens, chunk_size=3)  # same values, fp32 storage
    full = token_stats(logits, tokens)
    for field in ("logp", "entropy", "disc", "baseline"):
        assert getattr(low, field).dtype == torch.float32
        # Upcasting bf16 is exact, so the only difference from fp32 input is the input's rounding.
        torch.testing.assert_close(getattr(low, field), getattr(exact, field), rtol=0, atol=1e-6)
        torch.testing.assert_close(getattr(low, field), getattr(full, field), rtol=0, atol=0.1)


def test_temperature_scales_logits_before_softmax():
    logits, tokens = random_case((6,), 30, seed=4)
    stats = token_stats(logits, tokens, temperature=0.7, chunk_size=4)
    fields = (stats.logp, stats.entropy, stats.disc, stats.baseline)
    for got, want in zip(fields, reference_stats(logits, tokens, 0.7)):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    plain = token_stats(logits, tokens)
    assert not torch.allclose(stats.entropy, plain.entropy)


def test_masked_minus_inf_logits_give_finite_stats():
    logits, tokens = random_case((4,), 10, seed=5)
    logits[:, 7:] = -math.inf
    tokens = tokens % 7
    stats = token_stats(logits, tokens)
    want = reference_stats(logits[:, :7], tokens)
    for got, ref in zip((stats.logp, stats.entropy, stats.disc, stats.baseline), want):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(token_entropy(logits)).all()


def test_disc_sign_is_sign_of_p_minus_exp_minus_entropy():
    # S* = p_k (H + log p_k) > 0  <=>  p_k > exp(-H)  (Theorem 3.2).
    logits, _ = random_case((8,), 40, seed=6)
    tokens = torch.arange(40).expand(8, 40)  # every token of every row
    stats = token_stats(logits.unsqueeze(1).expand(8, 40, 40), tokens)
    p = torch.softmax(logits, -1)
    gap = p - torch.exp(-stats.entropy[:, :1])
    clear = gap.abs() > 1e-6
    assert clear.sum() > 200 and (gap[clear] > 0).any() and (gap[clear] < 0).any()
    assert torch.equal(torch.sign(stats.disc[clear]), torch.sign(gap[clear]))


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_single_logit_delta_matches_finite_difference(temperature):
    # Theorem 3.2: raising z_k by eps changes H by eps * dH/deps + O(eps^2).
    eps = 1e-4
    logits, _ = random_case((), 50, seed=7, scale=2.0)
    logits = logits.double()
    h0 = entropy64(logits, temperature)
    ks = torch.arange(50)
    pred = single_logit_delta(logits.expand(50, 50), ks, temperature=temperature).double()
    checked = 0
    for k in range(50):
        if pred[k].abs() < 1e-2:  # tiny derivatives: the O(eps^2) term is then not negligible
            continue
        bumped = logits.clone()
        bumped[k] += eps
        measured = entropy64(bumped, temperature) - h0
        rel = abs(eps * pred[k] - measured) / abs(measured)
        assert rel < 2e-3, (k, rel)
        checked += 1
    assert checked >= 5


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_grpo_logit_delta_matches_finite_difference(temperature):
    # Theorem 3.3: one gradient-ascent step of r*A*log p_k on the logits gives
    # dH = -eta r A (S* - E_p[S]) (/ T^2 through the tempered softmax).
    lr, ratio, adv = 1e-3, 1.2, -0.8
    logits, _ = random_case((), 50, seed=8, scale=2.0)
    logits = logits.double()
    stats = token_stats(logits.expand(50, 50), torch.arange(50), temperature=temperature)
    pred = grpo_logit_delta(stats.disc, stats.baseline, adv, ratio, lr, temperature)
    h0 = entropy64(logits, temperature)
    checked = 0
    for k in range(50):
        if abs(stats.disc[k] - stats.baseline[k]) < 0.05:  # first order ~ 0: O(alpha^2) dominates
            continue
        z = logits.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(ratio * adv * token_logp(z, torch.tensor(k), temperature), z)
        measured = entropy64(logits + lr * grad, temperature) - h0
        rel = abs(pred[k].double() - measured) / abs(measured)
        assert rel < 1e-2, (k, rel)
        checked += 1
    assert checked >= 40


def test_grpo_logit_delta_spreads_per_sequence_advantages_and_broadcasts():
    disc = torch.tensor([[0.3, -0.1, 0.2], [0.0, 0.5, -0.4]])
    baseline = torch.tensor([[0.1, 0.1, 0.1], [0.2, 0.2, 0.2]])
    ratio = torch.tensor([[1.0, 2.0, 1.0], [0.5, 1.0, 1.0]])
    adv = torch.tensor([1.0, -2.0])
    got = grpo_logit_delta(disc, baseline, adv, ratio, lr=0.1)
    expected = torch.tensor([[-0.02, 0.04, -0.01], [-0.02, 0.06, -0.12]])
    torch.testing.assert_close(got, expected)
    per_token = grpo_logit_delta(disc, baseline, adv[:, None].expand(2, 3), ratio, 0.1)
    torch.testing.assert_close(per_token, expected)


def test_token_logp_matches_stats_and_has_the_softmax_gradient():
    logits, tokens = random_case((3, 5), 17, seed=9)
    for t in (1.0, 1.5):
        z = logits.clone().requires_grad_(True)
        logp = token_logp(z.bfloat16(), tokens, temperature=t)
        assert logp.dtype == torch.float32
        torch.testing.assert_close(logp.detach(), token_stats(logits.bfloat16(), tokens, temperature=t).logp)
        z2 = logits.clone().requires_grad_(True)
        token_logp(z2, tokens, temperature=t).sum().backward()
        p = torch.softmax(logits / t, -1)
        expected = (torch.nn.functional.one_hot(tokens, 17) - p) / t  # d log p_k / dz
        torch.testing.assert_close(z2.grad, expected, rtol=1e-5, atol=1e-6)


def test_token_entropy_matches_stats_and_its_gradient_is_minus_s():
    logits, tokens = random_case((4, 3), 23, seed=10)
    torch.testing.assert_close(token_entropy(logits, 0.8), token_stats(logits, tokens, 0.8).entropy)
    z = logits.clone().requires_grad_(True)
    token_entropy(z).sum().backward()
    p = torch.softmax(logits, -1)
    h = -(p * p.log()).sum(-1, keepdim=True)
    torch.testing.assert_close(z.grad, -p * (h + p.log()), rtol=1e-5, atol=1e-6)  # dH/dz_i = -S_i


def test_on_policy_deviation_averages_to_zero():
    # Corollary 3.5: for k ~ p, E[S_k - E_p[S]] = 0. With n samples the mean deviates by about
    # sd / sqrt(n), sd^2 = Var_{k~p}(S_k) computed exactly; 5 standard errors is a ~1e-6 false alarm.
    n, rows, vocab = 20_000, 6, 40
    g = torch.Generator().manual_seed(11)
    logits = 2.5 * torch.randn(rows, vocab, generator=g)
    p = torch.softmax(logits.double(), -1)
    s = p * (-(p * p.log()).sum(-1, keepdim=True) + p.log())  # S_i, (rows, V)
    sd = ((p * s.square()).sum(-1) - (p * s).sum(-1).square()).sqrt()
    bound = 5 * sd / math.sqrt(n)

    def mean_deviation(weights):
        ks = torch.multinomial(weights.float(), n, replacement=True, generator=g)  # (rows, n)
        stats = token_stats(logits.unsqueeze(1).expand(rows, n, vocab), ks)
        return (stats.disc - stats.baseline).double().mean(-1)

    assert (mean_deviation(p).abs() < bound).all()
    # Off-policy (uniform) sampling does not average out: the bound above can fail.
    assert (mean_deviation(torch.ones_like(p)).abs() > bound).any()


def test_rejects_bad_temperature_and_shapes():
    logits, tokens = random_case((2,), 5, seed=12)
    with pytest.raises(ValueError):
        token_stats(logits, tokens, temperature=0.0)
    with pytest.raises(ValueError):
        token_stats(logits, tokens[:1])
