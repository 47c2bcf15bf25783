"""Per-token entropy statistics and first-order entropy-change predictions (THEORY.md).

Notation (one decoding position): logits z in R^V, p = softmax(z / T), H = -sum_i p_i log p_i (nats),
k the sampled token, S_i = p_i (H + log p_i) the entropy discriminator, S* = S_k, and the
policy-weighted baseline E_p[S] = sum_i p_i S_i.

Pure functions over tensors; nothing here holds state, reads a config or prints. Shapes: `...` is any
number of leading dims (e.g. (B, T)), V the vocabulary.
"""

import math
from dataclasses import dataclass

import torch

# Rows per chunk in token_stats default to 2**24 // V: one chunk buffer of float32 is then 64 MiB.
_CHUNK_ELEMENTS = 2**24


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


def _chunk_stats(rows: torch.Tensor, tok: torch.Tensor, temperature: float):
    """Statistics of one chunk. rows (n, V) any float dtype, tok (n,) long -> four (n,) float32.

    Holds at most three (n, V) float32 buffers at once (logp, p, p log p); all reductions share them.
    """
    logp_all = rows.to(torch.float32, copy=True)  # (n, V), a fresh buffer we may modify in place
    if temperature != 1.0:
        logp_all.div_(temperature)
    # Stable log-softmax: log p = z/T - logsumexp(z/T).
    logp_all.sub_(torch.logsumexp(logp_all, dim=-1, keepdim=True))
    logp = logp_all.gather(-1, tok.unsqueeze(-1)).squeeze(-1)  # (n,)
    # Masked (-inf) logits have p = 0; clamping log p to a finite value makes 0 * log 0 = 0.
    logp_all.clamp_(min=torch.finfo(torch.float32).min)
    p = logp_all.exp()  # (n, V)
    plogp = p * logp_all  # (n, V)
    entropy = -plogp.sum(-1)  # H = -sum p log p
    sum_p2_logp = plogp.mul_(p).sum(-1)  # sum p^2 log p
    sum_p2 = p.square_().sum(-1)  # sum p^2
    baseline = entropy * sum_p2 + sum_p2_logp  # E_p[S] (THEORY.md, Notation)
    disc = logp.exp() * (entropy + logp)  # S* = p_k (H + log p_k)
    return logp, entropy, disc, baseline


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

    The leading dims are flattened to N rows and processed `chunk_size` rows at a time (default
    max(1, 2**24 // V)); only the current chunk is cast to float32, so peak extra memory is a few
    (chunk_size, V) float32 buffers, whatever N. Non-contiguous logits (e.g. a slice over the
    sequence dim) are read chunk by chunk, never copied whole.
    """
    _check_temperature(temperature)
    if logits.shape[:-1] != tokens.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} and tokens {tuple(tokens.shape)}: "
            "logits must be tokens.shape + (V,)"
        )
    lead, vocab = logits.shape[:-1], logits.shape[-1]
    n_rows = math.prod(lead)
    if chunk_size is None:
        chunk_size = max(1, _CHUNK_ELEMENTS // max(vocab, 1))
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size}: must be >= 1 (or None for the default)")

    try:
        flat = logits.view(n_rows, vocab)  # (N, V) without a copy when the layout allows it
    except RuntimeError:
        flat = None
    flat_tokens = tokens.reshape(n_rows).to(device=logits.device, dtype=torch.long)  # (N,)

    outs = [torch.empty(n_rows, dtype=torch.float32, device=logits.device) for _ in range(4)]
    for start in range(0, n_rows, chunk_size):
        end = min(start + chunk_size, n_rows)
        if flat is not None:
            rows = flat[start:end]
        else:
            # Gather just this chunk's rows from the strided tensor.
            idx = torch.unravel_index(torch.arange(start, end, device=logits.device), lead)
            rows = logits[idx]
        for out, value in zip(outs, _chunk_stats(rows, flat_tokens[start:end], temperature)):
            out[start:end] = value
    logp, entropy, disc, baseline = (o.view(lead) for o in outs)
    return TokenStats(logp=logp, entropy=entropy, disc=disc, baseline=baseline)


def token_logp(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Differentiable log p_k = z_k/T - logsumexp(z/T), computed in (at least) float32.

    logits: (..., V); tokens: (...) long -> (...) float32 (float64 for float64 logits).
    Gradient w.r.t. the logits: (e_k - p) / T. Autograd keeps a float32 copy of the logits.
    """
    _check_temperature(temperature)
    z = logits.to(_compute_dtype(logits.dtype))  # (..., V)
    if temperature != 1.0:
        z = z / temperature
    z_k = z.gather(-1, tokens.unsqueeze(-1).long()).squeeze(-1)  # (...)
    return z_k - torch.logsumexp(z, dim=-1)


def token_entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Differentiable entropy H = -sum_i p_i log p_i of p = softmax(logits / T), per row.

    logits: (..., V) -> (...) float32 (float64 for float64 logits). For T = 1 the gradient is
    dH/dz_i = -S_i (Lemma 3.1 summed over i), which is what Theorem 3.2 reads off for one logit.
    """
    _check_temperature(temperature)
    z = logits.to(_compute_dtype(logits.dtype))  # (..., V)
    if temperature != 1.0:
        z = z / temperature
    logp = torch.log_softmax(z, dim=-1)  # (..., V)
    # Same 0 * log 0 = 0 convention as token_stats for masked (-inf) logits.
    logp = logp.clamp(min=torch.finfo(logp.dtype).min)
    return -(logp.exp() * logp).sum(-1)


def single_logit_delta(logits: torch.Tensor, k: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """First-order dH/d(eps) when raw logit k of each row is raised by eps (Theorem 3.2).

    logits: (..., V); k: (...) long, shaped like logits[..., 0] -> (...) float32.
    Theorem 3.2: dH = -eps S*_k + O(eps^2) for a move of the tempered logit z_k / T. Raising the raw
    logit by eps moves z_k / T by eps / T, so the value is -S*_k / T (= -S*_k at T = 1).
    """
    stats = token_stats(logits, k, temperature=temperature)
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


def entropy_delta_from_logit_change(
    logits: torch.Tensor, dz: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """First-order dH of each position for a given change dz of its raw logits.

    logits, dz: (..., V) -> (...) float32: dH = -(1/T) sum_j S_j dz_j with S_j = p_j (H + log p_j)
    at `logits` (the directional derivative behind Lemma 3.1 / Theorem 3.3, fed with any dz instead
    of the independent-position dz = alpha (e_k - p)). Since sum_j S_j = 0, a shift of all logits by
    a constant changes nothing. No gradient; computed in float32 (at least).
    """
    _check_temperature(temperature)
    with torch.no_grad():
        logp = torch.log_softmax(logits.to(_compute_dtype(logits.dtype)) / temperature, dim=-1)
        p = logp.exp()
        h = -(p * logp).sum(-1, keepdim=True)
        s = p * (h + logp)  # (..., V) S_j
        return -(s * dz.to(s.dtype)).sum(-1) / temperature
