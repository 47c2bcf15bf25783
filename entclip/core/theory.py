"""Per-token entropy statistics and first-order entropy-change predictions (THEORY.md).

Notation (one decoding position): logits z in R^V, p = softmax(z / T), H = -sum_i p_i log p_i (nats),
k the sampled token, S_i = p_i (H + log p_i) the entropy discriminator, S* = S_k, and the
policy-weighted baseline E_p[S] = sum_i p_i S_i.

Pure functions over tensors; nothing here holds state, reads a config or prints. Shapes: `...` is any
number of leading dims (e.g. (B, T)), V the vocabulary.

Everything over the vocabulary is computed a chunk of rows at a time, in the same few steps (see
`_shifted` and `_softmax`): a = (z - max z) / T in float32 (or float64), p = softmax(a), and sums
of products of a and p. With a_max = 0, log p_i = a_i - log Z and H + log p_i = a_i - E_p[a], so
H = log Z - E_p[a] and E_p[S] = sum_i p_i^2 (a_i - E_p[a]): no log and a single exp per element.
"""

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

# Float values that one chunk's buffers hold together (two (rows, V) buffers: `_BUFFERS`), by device
# type. On CPU the chunk must stay in the last-level cache, where its ~10 passes cost a fraction of
# DRAM traffic: 8 MiB ran 2-3x faster than 64 MiB on a 32 MiB L3 (BENCHMARKS.md section 1). On
# accelerators small chunks pay a kernel launch per pass instead: the earlier 64 MiB, unmeasured there.
_CHUNK_ELEMENTS = {"cpu": 2**21}
_CHUNK_ELEMENTS_OTHER = 2**24
_BUFFERS = 2


def default_chunk_rows(vocab: int, device: torch.device | str = "cpu", buffers: int = _BUFFERS) -> int:
    """Rows per chunk such that `buffers` (rows, V) float32 buffers fill one chunk budget; >= 1."""
    budget = _CHUNK_ELEMENTS.get(torch.device(device).type, _CHUNK_ELEMENTS_OTHER)
    return max(1, budget // (buffers * max(vocab, 1)))


@dataclass
class TokenStats:
    """Per-token statistics, each float32 and shaped like the `tokens` they were computed for.

    logp: log p_k. entropy: H of the position. disc: S* = p_k (H + log p_k).
    baseline: E_p[S] = H sum_i p_i^2 + sum_i p_i^2 log p_i.
    """

    logp: torch.Tensor
    entropy: torch.Tensor
    disc: torch.Tensor
    baseline: torch.Tensor


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature={temperature}: must be > 0 (the sampling temperature)")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # At least float32: bf16/fp16 logits are upcast, float64 stays float64.
    return torch.promote_types(dtype, torch.float32)


def _split(tensors: list[torch.Tensor], chunk: int,
           start: int = 0) -> Iterator[tuple[int, list[torch.Tensor]]]:
    """(first row, [views]) for pieces of at most `chunk` rows of same-shaped (..., V) tensors, in order.

    Never copies. A layout that cannot be viewed as (N, V) (e.g. logits[:, :-1]) is split along its
    first dim: whole slabs x[i:j] when one x[i] holds at most `chunk` rows, else each x[i] in turn.
    """
    lead = tensors[0].shape[:-1]
    n_rows = math.prod(lead)
    if n_rows <= chunk:
        yield start, tensors
        return
    try:
        flat = [x.view(n_rows, x.shape[-1]) for x in tensors]  # (N, V) views
    except RuntimeError:
        inner = n_rows // lead[0]  # rows under one index of the first dim
        if inner <= chunk:
            step = chunk // inner
            for i in range(0, lead[0], step):
                yield start + i * inner, [x[i:i + step] for x in tensors]
        else:
            for i in range(lead[0]):
                yield from _split([x[i] for x in tensors], chunk, start + i * inner)
        return
    for s in range(0, n_rows, chunk):
        yield start + s, [x[s:s + chunk] for x in flat]


def _chunks(tensors: list[torch.Tensor], chunk: int, dtype: torch.dtype):
    """(rows, views, a, p) per chunk: `rows` the chunk's slice of the N flattened positions, `views`
    the tensors' chunk (shaped (..., V)), a and p two work buffers of `dtype` shaped like the views,
    the same memory for every chunk: the only (chunk, V)-sized allocation."""
    x = tensors[0]
    vocab = x.shape[-1]
    buffers = torch.empty(2, min(chunk, math.prod(x.shape[:-1])) * vocab, dtype=dtype, device=x.device)
    for start, views in _split(tensors, chunk):
        shape = views[0].shape
        n = math.prod(shape[:-1])
        a, p = (b[: n * vocab].view(shape) for b in buffers)
        yield slice(start, start + n), views, a, p


def _shifted(rows: torch.Tensor, temperature: float, a: torch.Tensor) -> torch.Tensor:
    """a <- (rows - max) / T in a's dtype, -inf clamped to the lowest finite value; returns a.

    rows (..., V) any float dtype, a a buffer of the same shape. Each row's max is then 0 (z - max z
    is exact near the max), which keeps sum p a accurate where p is large. The clamp makes p a = 0 * a
    vanish for masked (-inf) logits instead of giving nan.
    """
    if rows.dtype == a.dtype:
        torch.sub(rows, rows.amax(-1, keepdim=True), out=a)
    else:
        a.copy_(rows)  # the only upcast of bf16/fp16 logits: one chunk at a time
        a.sub_(a.amax(-1, keepdim=True))
    if temperature != 1.0:
        a.div_(temperature)
    return a.clamp_(min=torch.finfo(a.dtype).min)


def _softmax(a: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """p <- softmax(a) up to a factor s; returns s = sum p, (..., 1).

    The softmax kernel exponentiates once per element (faster than torch.exp here), but its
    vectorized normalizer over ~10^5 terms is off by ~1e-5: p is used as it is and every sum over it
    is divided by the accurate (cascade) s.
    """
    torch.softmax(a, -1, out=p)
    return p.sum(-1, keepdim=True)


def _log_z(p: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    # log Z = log sum_i exp(a_i), (..., 1): the kernel's own normalizer is 1 / p at the max (a = 0).
    return s.log() - p.amax(-1, keepdim=True).log()


def _chunk_stats(rows: torch.Tensor, tok: torch.Tensor, temperature: float, a: torch.Tensor, p: torch.Tensor):
    """Statistics of one chunk. rows (..., V) any float dtype, tok (...) long, a and p float32 buffers
    shaped like rows (overwritten) -> four (...) float32: log p_k, H, S*, E_p[S]."""
    a = _shifted(rows, temperature, a)
    a_k = a.gather(-1, tok.unsqueeze(-1))  # (..., 1)
    s = _softmax(a, p)
    log_z = _log_z(p, s)
    mean_a = a.mul_(p).sum(-1, keepdim=True).div_(s)  # E_p[a]; a now holds p a
    # E_p[S] = sum_i p_i^2 (a_i - E_p[a]): centred before multiplying by p again, so the terms near
    # the mean, which cancel, are small rather than the difference of two large sums.
    baseline = a.addcmul_(mean_a, p, value=-1.0).mul_(p).sum(-1, keepdim=True).div_(s.square())
    entropy = log_z - mean_a
    logp = a_k - log_z
    disc = logp.exp() * (entropy + logp)  # S* = p_k (H + log p_k)
    return (x.squeeze(-1) for x in (logp, entropy, disc, baseline))


@torch.no_grad()
def token_stats(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int | None = None,
) -> TokenStats:
    """log p_k, H, S* and E_p[S] for every position, in one pass over the vocabulary per chunk.

    logits: (..., V) bf16/fp16/fp32/fp64; tokens: (...) long, the sampled tokens k.
    p = softmax(logits / temperature). Returns TokenStats whose fields are float32 tensors shaped
    like `tokens`, on the logits' device. No gradient.

    The positions are processed `chunk_size` at a time (default `default_chunk_rows(V, device)`).
    The extra memory is two (chunk_size, V) float32 buffers, reused for every chunk, plus the four
    (...) outputs, whatever the number of positions and the logits' dtype: only the current chunk is
    cast to float32, and logits that cannot be viewed as (N, V) (e.g. a slice over the sequence dim)
    are read in place, never copied.
    """
    _check_temperature(temperature)
    if logits.shape[:-1] != tokens.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} and tokens {tuple(tokens.shape)}: "
            "logits must be tokens.shape + (V,)"
        )
    if chunk_size is None:
        chunk_size = default_chunk_rows(logits.shape[-1], logits.device)
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size}: must be >= 1 (or None for the default)")
    flat_tokens = tokens.reshape(-1).to(device=logits.device, dtype=torch.long)  # (N,)
    # (4, N): log p_k, H, S*, E_p[S]
    outs = torch.empty(4, flat_tokens.numel(), dtype=torch.float32, device=logits.device)
    for rows, (z,), a, p in _chunks([logits], chunk_size, torch.float32):
        tok = flat_tokens[rows].view(z.shape[:-1])
        for out, value in zip(outs, _chunk_stats(z, tok, temperature, a, p)):
            out[rows] = value.reshape(-1)
    logp, entropy, disc, baseline = (o.view(tokens.shape) for o in outs)
    return TokenStats(logp=logp, entropy=entropy, disc=disc, baseline=baseline)


def _per_row(flat: torch.Tensor, rows: slice, like: torch.Tensor) -> torch.Tensor:
    # The chunk `rows` of an (N, 1) per-position tensor, shaped to broadcast against `like` (..., V).
    return flat[rows].view(like.shape[:-1] + (1,))


class _TokenLogp(torch.autograd.Function):
    """log p_k, with a backward that recomputes p chunk by chunk instead of keeping a (..., V) copy."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
        dtype = _compute_dtype(logits.dtype)
        out = torch.empty(tokens.numel(), 1, dtype=dtype, device=logits.device)  # (N, 1)
        flat_tok = tokens.reshape(-1, 1)  # (N, 1)
        chunk = default_chunk_rows(logits.shape[-1], logits.device)
        for rows, (z,), a, p in _chunks([logits], chunk, dtype):
            a = _shifted(z, temperature, a)
            log_z = _log_z(p, _softmax(a, p))
            torch.sub(a.gather(-1, _per_row(flat_tok, rows, a)), log_z, out=_per_row(out, rows, a))
        ctx.save_for_backward(logits, flat_tok)
        ctx.temperature = temperature
        return out.view(tokens.shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        # d log p_k / dz_i = (1[i = k] - p_i) / T, written into a gradient in the logits' dtype.
        logits, flat_tok = ctx.saved_tensors
        t = ctx.temperature
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)  # (..., V)
        g = (grad_out / t).reshape(-1, 1)  # (N, 1)
        chunk = default_chunk_rows(logits.shape[-1], logits.device)
        for rows, (z, out), a, p in _chunks([logits, grad], chunk, grad_out.dtype):
            s = _softmax(_shifted(z, t, a), p)
            gs = _per_row(g, rows, p)
            p.mul_(gs.neg().div_(s)).scatter_add_(-1, _per_row(flat_tok, rows, p), gs)
            out.copy_(p)
        return grad, None, None


class _TokenEntropy(torch.autograd.Function):
    """H per row, with a backward that recomputes p chunk by chunk instead of keeping (..., V) copies."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, temperature: float) -> torch.Tensor:
        dtype = _compute_dtype(logits.dtype)
        n_rows = math.prod(logits.shape[:-1])
        out = torch.empty(n_rows, 1, dtype=dtype, device=logits.device)  # (N, 1) H
        mean_a = torch.empty(n_rows, 1, dtype=dtype, device=logits.device)  # (N, 1) E_p[a]
        chunk = default_chunk_rows(logits.shape[-1], logits.device)
        for rows, (z,), a, p in _chunks([logits], chunk, dtype):
            a = _shifted(z, temperature, a)
            s = _softmax(a, p)
            log_z = _log_z(p, s)
            m = torch.div(a.mul_(p).sum(-1, keepdim=True), s, out=_per_row(mean_a, rows, a))
            torch.sub(log_z, m, out=_per_row(out, rows, a))
        ctx.save_for_backward(logits, mean_a)
        ctx.temperature = temperature
        return out.view(logits.shape[:-1])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        # dH/dz_i = -S_i / T = -p_i (H + log p_i) / T = -p_i (a_i - E_p[a]) / T (Lemma 3.1).
        logits, mean_a = ctx.saved_tensors
        t = ctx.temperature
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)  # (..., V)
        g = (grad_out / -t).reshape(-1, 1)  # (N, 1)
        chunk = default_chunk_rows(logits.shape[-1], logits.device)
        for rows, (z, out), a, p in _chunks([logits, grad], chunk, grad_out.dtype):
            a = _shifted(z, t, a)
            s = _softmax(a, p)
            a.sub_(_per_row(mean_a, rows, a)).mul_(p).mul_(_per_row(g, rows, a) / s)
            out.copy_(a)
        return grad, None


def token_logp(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Differentiable log p_k = z_k/T - logsumexp(z/T), computed in (at least) float32.

    logits: (..., V); tokens: (...) long -> (...) float32 (float64 for float64 logits).
    Gradient w.r.t. the logits: (e_k - p) / T, in the logits' dtype. Chunked like token_stats:
    autograd keeps the logits themselves and no (..., V) float32 copy; the backward recomputes p a
    chunk at a time. First derivatives only.
    """
    _check_temperature(temperature)
    if logits.shape[:-1] != tokens.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and tokens {tuple(tokens.shape)}: "
                         "logits must be tokens.shape + (V,)")
    return _TokenLogp.apply(logits, tokens.to(device=logits.device, dtype=torch.long), temperature)


def token_entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Differentiable entropy H = -sum_i p_i log p_i of p = softmax(logits / T), per row.

    logits: (..., V) -> (...) float32 (float64 for float64 logits). For T = 1 the gradient is
    dH/dz_i = -S_i (Lemma 3.1 summed over i), which is what Theorem 3.2 reads off for one logit.
    Chunked like token_logp (autograd keeps the logits and one value per row); masked (-inf) logits
    count as 0 log 0 = 0. First derivatives only.
    """
    _check_temperature(temperature)
    return _TokenEntropy.apply(logits, temperature)


def single_logit_delta(logits: torch.Tensor, k: torch.Tensor | int, temperature: float = 1.0) -> torch.Tensor:
    """First-order dH/d(eps) when raw logit k of each row is raised by eps (Theorem 3.2).

    logits: (..., V); k: (...) long, shaped like logits[..., 0], or one index (a Python int or a
    0-d tensor) for every row -> (...) float32.
    Theorem 3.2: dH = -eps S*_k + O(eps^2) for a move of the tempered logit z_k / T. Raising the raw
    logit by eps moves z_k / T by eps / T, so the value is -S*_k / T (= -S*_k at T = 1).
    """
    if isinstance(k, bool) or not isinstance(k, (int, torch.Tensor)):
        raise TypeError(f"k must be an int or an integer tensor, not {type(k).__name__}")
    k = torch.as_tensor(k, device=logits.device)
    if k.is_floating_point() or k.is_complex() or k.dtype == torch.bool:
        raise TypeError(f"k must hold integer token indices, not {k.dtype}")
    if k.dim() == 0:  # one index for every row
        k = k.expand(logits.shape[:-1])
    stats = token_stats(logits, k.long(), temperature=temperature)
    return -stats.disc / temperature


def _per_sequence(x: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor | float:
    # A tensor with one dim fewer than `like` holds one value per sequence: spread it over tokens.
    if isinstance(x, torch.Tensor) and x.dim() == like.dim() - 1:
        return x.unsqueeze(-1)
    return x


def grpo_logit_delta(
    disc: torch.Tensor,
    baseline: torch.Tensor,
    advantages: torch.Tensor | float,
    ratio: torch.Tensor | float,
    lr: float,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Per-token predicted dH of one plain-gradient-ascent GRPO step on the logits (Theorem 3.3).

    disc, baseline: (...) S* and E_p[S] (e.g. (B, T) from token_stats). advantages and ratio: shaped
    like disc, or like disc without its last dim (one per sequence, e.g. (B,)), or scalars; other
    shapes broadcast as usual. lr: eta. Returns (...) = -lr * ratio * A * (disc - baseline) / T^2.

    Theorem 3.3: dz = alpha (e_k - p), alpha = eta r A, gives dH = -alpha (S* - E_p[S]). With a
    temperature the surrogate's gradient w.r.t. the raw logits is r A (e_k - p) / T and a raw move
    dz changes p through dz / T, hence the extra 1 / T^2 (1 at T = 1). Clipped tokens have zero
    gradient: pass ratio = 0 (or mask the result) for them.
    """
    _check_temperature(temperature)
    adv = _per_sequence(advantages, disc)
    r = _per_sequence(ratio, disc)
    return -lr * r * adv * (disc - baseline) / temperature**2


@torch.no_grad()
def _entropy_delta(logits: torch.Tensor, other: torch.Tensor, temperature: float, chunk_size: int | None,
                   other_is_new: bool) -> torch.Tensor:
    # Per chunk: a, p; then -(1/T) sum_j S_j dz_j with s S = p (a - E_p[a]) in a and dz in p's buffer.
    _check_temperature(temperature)
    if logits.shape != other.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and {'new_logits' if other_is_new else 'dz'} "
                         f"{tuple(other.shape)} must have the same shape")
    dtype = _compute_dtype(logits.dtype)
    if chunk_size is None:
        # new - old with bf16/fp16 `logits`: torch upcasts the chunk of old logits into a temporary
        # (mixed-dtype arithmetic on CPU does), a third (chunk, V) buffer.
        buffers = _BUFFERS + (other_is_new and logits.dtype != dtype)
        chunk_size = default_chunk_rows(logits.shape[-1], logits.device, buffers)
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size}: must be >= 1 (or None for the default)")
    out = torch.empty(math.prod(logits.shape[:-1]), dtype=dtype, device=logits.device)  # (N,)
    for rows, (z, o), a, p in _chunks([logits, other], chunk_size, dtype):
        a = _shifted(z, temperature, a)
        s = _softmax(a, p)
        mean_a = a.mul_(p).sum(-1, keepdim=True).div_(s)
        a.addcmul_(mean_a, p, value=-1.0)  # p (a - E_p[a]) = s S
        dz = p.copy_(o)
        if other_is_new:
            dz.sub_(z)  # new - old in the compute dtype: exact for bf16 logits
        out[rows] = a.mul_(dz).sum(-1).div_(s.squeeze(-1) * -temperature).reshape(-1)
    return out.view(logits.shape[:-1])


def entropy_delta_from_logit_change(
    logits: torch.Tensor, dz: torch.Tensor, temperature: float = 1.0, chunk_size: int | None = None
) -> torch.Tensor:
    """First-order dH of each position for a given change dz of its raw logits.

    logits, dz: (..., V) -> (...) float32: dH = -(1/T) sum_j S_j dz_j with S_j = p_j (H + log p_j)
    at `logits` (the directional derivative behind Lemma 3.1 / Theorem 3.3, fed with any dz instead
    of the independent-position dz = alpha (e_k - p)). Since sum_j S_j = 0, a shift of all logits by
    a constant changes nothing. No gradient; computed in float32 (at least), chunked like token_stats
    (two (chunk_size, V) buffers of extra memory).
    """
    return _entropy_delta(logits, dz, temperature, chunk_size, other_is_new=False)


def entropy_delta_between(
    logits: torch.Tensor, new_logits: torch.Tensor, temperature: float = 1.0, chunk_size: int | None = None
) -> torch.Tensor:
    """entropy_delta_from_logit_change(logits, new_logits - logits), without a (..., V) dz.

    The difference is formed a chunk at a time in the compute dtype (exact for bf16 inputs), so the
    extra memory stays within one chunk budget (`default_chunk_rows`; for bf16/fp16 logits the
    default chunk is sized for a third buffer, torch's upcast of the old logits' chunk).
    """
    return _entropy_delta(logits, new_logits, temperature, chunk_size, other_is_new=True)
