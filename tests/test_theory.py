"""entclip.core.theory against hand-computed values, a float64 reference and finite differences."""

import json
import math

import pytest
import torch

from entclip.core import theory
from entclip.training.accounting import StepAccount
from entclip.core.theory import (
    TokenStats,
    entropy_delta_between,
    entropy_delta_from_logit_change,
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
def test_single_logit_delta_takes_an_int_a_0d_tensor_or_one_index_per_row(temperature):
    """k as a Python int or a 0-d tensor is one index for every row; each form equals -S*_k / T from
    the float64 definitions, and the batched form with k repeated gives the same values."""
    logits, tokens = random_case((2, 3), 9, seed=23)
    _, _, disc, _ = reference_stats(logits, tokens, temperature)
    expected = (-disc / temperature).float()  # (2, 3)
    torch.testing.assert_close(single_logit_delta(logits, tokens, temperature), expected, rtol=1e-5, atol=1e-6)
    row = logits[1, 2]  # (V,): one distribution
    k = int(tokens[1, 2])
    for index in (k, torch.tensor(k)):
        out = single_logit_delta(row, index, temperature)
        assert out.shape == ()
        torch.testing.assert_close(out, expected[1, 2], rtol=1e-5, atol=1e-6)
    _, _, disc_k, _ = reference_stats(logits, torch.full((2, 3), 4), temperature)
    for index in (4, torch.tensor(4)):  # one index, every row of a batch
        out = single_logit_delta(logits, index, temperature)
        assert out.shape == (2, 3)
        torch.testing.assert_close(out, (-disc_k / temperature).float(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out, single_logit_delta(logits, torch.full((2, 3), 4), temperature))
    with pytest.raises(TypeError, match="integer"):
        single_logit_delta(row, torch.tensor(1.5), temperature)


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


def peak_extra_bytes(fn, tmp_path) -> int:
    """Most bytes the CPU allocator held at once during fn() beyond what was allocated before.

    torch's profiler reports every CPU allocation and free with the running total ("[memory]" events).
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    trace = tmp_path / "trace.json"
    prof.export_chrome_trace(str(trace))
    events = [e["args"] for e in json.loads(trace.read_text())["traceEvents"] if e.get("name") == "[memory]"]
    assert events, "the profiler reported no allocations"
    before = events[0]["Total Allocated"] - events[0]["Bytes"]
    return max(e["Total Allocated"] for e in events) - before


def sliced_case(b, t, vocab, seed, dtype=torch.float32):
    # Like the engine's logits[:, :-1]: (b, t, V) that cannot be viewed as (b * t, V).
    logits, tokens = random_case((b, t + 1), vocab, seed)
    return logits.to(dtype)[:, :-1], tokens[:, :-1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_odd_chunks_give_the_unchunked_stats_for_bf16_and_temperature(dtype, temperature):
    logits, tokens = sliced_case(3, 7, 29, seed=13, dtype=dtype)
    whole = token_stats(logits, tokens, temperature, chunk_size=10**6)
    want = reference_stats(logits.double(), tokens, temperature)  # bf16 -> float64 is exact
    for chunk in (1, 3, 5, 8, 20):  # within one sequence, across sequences, several sequences
        part = token_stats(logits, tokens, temperature, chunk_size=chunk)
        for field, ref in zip(("logp", "entropy", "disc", "baseline"), want):
            torch.testing.assert_close(getattr(part, field), getattr(whole, field), rtol=0, atol=1e-6)
            torch.testing.assert_close(getattr(part, field).double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_stats_extra_memory_is_two_chunk_buffers_whatever_the_rows(dtype, tmp_path):
    vocab, chunk = 4096, 5
    buffers = 2 * chunk * vocab * 4  # two (chunk, V) float32 buffers
    for b in (4, 16):
        logits, tokens = sliced_case(b, 6, vocab, seed=14, dtype=dtype)
        peak = peak_extra_bytes(lambda: token_stats(logits, tokens, chunk_size=chunk), tmp_path)
        outputs = 4 * tokens.numel() * 4
        # At least the buffers (the measurement sees them); nothing (N, V)-sized beyond them.
        assert buffers <= peak <= buffers + outputs + 4096, (b, peak, buffers)


def test_default_chunk_fills_one_budget_of_float32_values(tmp_path):
    vocab = 2**15
    rows = theory.default_chunk_rows(vocab)
    assert 1 <= rows and 2 * rows * vocab <= theory._CHUNK_ELEMENTS["cpu"] < 2 * (rows + 1) * vocab
    logits, tokens = random_case((3 * rows + 1,), vocab, seed=15)
    peak = peak_extra_bytes(lambda: token_stats(logits, tokens), tmp_path)
    assert peak <= theory._CHUNK_ELEMENTS["cpu"] * 4 + 4096
    assert theory.default_chunk_rows(10**9) == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logp_and_entropy_backward_keep_no_float32_copy_of_the_logits(dtype, tmp_path):
    vocab = 2**15
    logits, tokens = random_case((8, 16), vocab, seed=16)
    leaf = logits.to(dtype).requires_grad_(True)  # (8, 16, V): 4 default chunks
    # (Not a slice here: slicing's own backward would add a full-size gradient of its own.)

    def step():
        (token_logp(leaf, tokens, 0.8) + token_entropy(leaf, 0.8)).sum().backward()

    peak = peak_extra_bytes(step, tmp_path)
    grad = leaf.numel() * leaf.element_size()  # autograd's own: the gradient, in the logits' dtype
    # Two gradients (one per function, then summed) plus one chunk budget: a float32 copy of the
    # logits (twice the budget here) would not fit; the unchunked formulas held five or six.
    assert peak <= 2 * grad + theory._CHUNK_ELEMENTS["cpu"] * 4 + 2**16, (peak, grad)
    assert leaf.grad.dtype == dtype and torch.isfinite(leaf.grad).all()


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_logp_and_entropy_gradients_match_float64_autograd(temperature):
    logits, tokens = sliced_case(2, 5, 31, seed=17)
    logits[0, 0, :4] = -math.inf  # masked logits: zero gradient, no nan
    z = logits.clone().requires_grad_(True)
    (token_logp(z, tokens, temperature) + 0.5 * token_entropy(z, temperature)).sum().backward()
    z64 = logits.double().requires_grad_(True)
    logp64 = torch.log_softmax(z64 / temperature, -1)
    h64 = -(logp64.exp() * logp64.clamp(min=-1e300)).sum(-1)
    (logp64.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) + 0.5 * h64).sum().backward()
    assert torch.isfinite(z.grad).all() and (z.grad[0, 0, :4] == 0).all()
    torch.testing.assert_close(z.grad.double(), z64.grad, rtol=1e-5, atol=1e-6)


def test_entropy_delta_between_is_the_dz_form_chunked(tmp_path):
    z, _ = sliced_case(3, 6, 40, seed=18)
    new = z + 0.05 * torch.randn(z.shape, generator=torch.Generator().manual_seed(19))
    want = entropy_delta_from_logit_change(z.double(), new.double() - z.double(), 0.9)
    for chunk in (1, 4, 7, None):
        got = entropy_delta_between(z, new, 0.9, chunk_size=chunk)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(entropy_delta_from_logit_change(z, new - z, 0.9, chunk_size=chunk), got,
                                   rtol=1e-5, atol=1e-7)
    # bf16 logits: the difference is taken in float32, where it is exact.
    zb, nb = z.bfloat16(), new.bfloat16()
    want = entropy_delta_from_logit_change(zb.double(), nb.double() - zb.double())
    got = entropy_delta_between(zb, nb, chunk_size=5)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)
    vocab = 2**15
    zb, _ = random_case((8, 17), vocab, seed=20)  # a float32 copy is twice the budget
    zb, nb = zb.bfloat16(), (zb + 0.01).bfloat16()
    peak = peak_extra_bytes(lambda: entropy_delta_between(zb, nb), tmp_path)
    assert peak <= theory._CHUNK_ELEMENTS["cpu"] * 4 + 4096


def test_step_account_pred_dz_is_the_unchunked_formula_within_one_chunk(tmp_path):
    vocab = 2**16
    old, tokens = random_case((6, 9), vocab, seed=21)
    new = old + 0.02 * torch.randn(old.shape, generator=torch.Generator().manual_seed(22))
    mask = torch.ones(6, 9)
    mask[:, 7:] = 0
    acct = StepAccount(params=[], grad_h=[], logits=old, h_old=1.0, n_valid=int(mask.sum()), shape=tuple(old.shape[:2]))
    stats = token_stats(old, tokens)
    out = {}
    adv = torch.ones(6, 9)
    peak = peak_extra_bytes(lambda: out.update(acct.finish(new, 1.1, [], stats, adv, mask, 0.8)), tmp_path)
    logp = torch.log_softmax(old.double() / 0.8, -1)
    p = logp.exp()
    s = p * (-(p * logp).sum(-1, keepdim=True) + logp)
    want = (-(s * (new.double() - old.double())).sum(-1) / 0.8)[mask.bool()].sum() / mask.sum()
    assert out["entropy/pred_dz"].value == pytest.approx(float(want), rel=1e-5)
    assert peak <= theory._CHUNK_ELEMENTS["cpu"] * 4 + 2**16  # (6, 9, V) float32: 1.7 budgets
