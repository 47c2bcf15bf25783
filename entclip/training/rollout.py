"""Sampling G completions per prompt (Hugging Face generate with the KV cache) into a typed record.

The sampler is behind a small interface (`Sampler`: `sample`, `sync_weights`) so that a faster
backend (vLLM) can replace `HFSampler` without touching the loop. Sampling draws from the full
distribution at the given temperature: the token statistics the filters use describe exactly that
distribution. Each row's noise is a pure function of its seed (Gumbel-max with counter-based noise),
so one process and N processes, or any generation batch size, draw the same tokens.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch


@dataclass
class Rollout:
    """B = n_prompts * G sequences; the G samples of one prompt are consecutive rows."""

    prompt_ids: torch.Tensor       # (B, P) left-padded
    prompt_mask: torch.Tensor      # (B, P) 1 = real token
    completion_ids: torch.Tensor   # (B, T) pad after the first EOS
    completion_mask: torch.Tensor  # (B, T) 1 up to and including the first EOS
    prompts: list[str]             # (B,) prompt text per row
    completions: list[str]         # (B,) decoded completion per row, specials removed
    # (B, T) the sampler's own log p of each completion token at temperature T, 0 on padding: a backend
    # with its own copy of the weights (vLLM) reports it for the mismatch correction; None when the
    # trainer's own model sampled (HFSampler), whose log p the statistics pass recomputes exactly.
    logp: torch.Tensor | None = None

    @property
    def input_ids(self) -> torch.Tensor:  # (B, P + T)
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:  # (B, P + T)
        # Tokens after EOS are padding for the loss but harmless to attend to (causal: they only
        # influence later padding), so every completion position is visible, as it was in generate.
        return torch.cat([self.prompt_mask, torch.ones_like(self.completion_ids)], dim=1)

    @property
    def n_tokens(self) -> int:
        return int(self.completion_mask.sum())


def completion_mask(completion_ids: torch.Tensor, eos_ids: int | list[int]) -> torch.Tensor:
    """(B, T) mask that is 1 up to and including the first end-of-sequence token, 0 after it."""
    ids = torch.tensor([eos_ids] if isinstance(eos_ids, int) else list(eos_ids), device=completion_ids.device)
    is_eos = torch.isin(completion_ids, ids).long()
    after_eos = (is_eos.cumsum(dim=1) - is_eos) > 0  # strictly after the first EOS
    return (~after_eos).long()


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every id that ends a completion: the tokenizer's EOS and the model's generation config's.

    Instruct models end turns with a chat token (Qwen: <|im_end|>) that is not always the
    tokenizer's eos_token; stopping at only one of them would run past the answer.
    """
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    gen = getattr(model, "generation_config", None)
    extra = getattr(gen, "eos_token_id", None)
    for i in [extra] if isinstance(extra, int) else list(extra or []):
        if i not in ids:
            ids.append(int(i))
    if not ids:
        raise ValueError("the tokenizer and the model define no end-of-sequence token")
    return ids


# ---- counter-based sampling noise ---------------------------------------------------------
_MASK64 = (1 << 64) - 1


def _signed(x: int) -> int:
    x &= _MASK64
    return x - (1 << 64) if x >= 1 << 63 else x


_GOLDEN, _MIX1, _MIX2 = _signed(0x9E3779B97F4A7C15), _signed(0xBF58476D1CE4E5B9), _signed(0x94D049BB133111EB)


def _shr(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic for negative values)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def gumbel_noise(row_seeds: torch.Tensor, position: int, vocab: int) -> torch.Tensor:
    """(B, V) standard Gumbel noise that is a pure function of (row seed, position, token id).

    A splitmix64 finalizer over int64 counters (wrapping arithmetic), 24 bits per uniform. Adding it
    to logits / T and taking the argmax samples from softmax(logits / T) (the Gumbel-max trick) with
    no generator state, so a row's tokens do not depend on which batch or process sampled it. The
    24-bit uniforms cap the noise at about 16.6: tokens more than that below the best logit / T
    (probability < 6e-8 relative to it) are never drawn.
    """
    tok = torch.arange(vocab, device=row_seeds.device, dtype=torch.int64)
    x = row_seeds[:, None] * _GOLDEN + _signed((position + 1) * _MIX2) + tok[None, :] * _MIX1
    x = (x ^ _shr(x, 30)) * _MIX1
    x = (x ^ _shr(x, 27)) * _MIX2
    x = x ^ _shr(x, 31)
    return -torch.log(-torch.log(_uniform(x)))


def _uniform(x: torch.Tensor) -> torch.Tensor:
    """int64 hash values -> float32 uniforms strictly inside (0, 1) from their top 24 bits.

    In float32 the largest value, (2^24 - 0.5) / 2^24, rounds to 1.0 (noise +inf): it is clamped to
    the largest float below 1; every other value is as computed.
    """
    u = (_shr(x, 40).to(torch.float32) + 0.5) / float(1 << 24)
    return u.clamp_(max=1.0 - 2.0**-24)


class _GumbelSampling:
    """A logits processor for greedy generate that turns it into seeded sampling at temperature T."""

    def __init__(self, row_seeds: torch.Tensor, prompt_len: int, temperature: float):
        self.row_seeds, self.prompt_len, self.temperature = row_seeds, prompt_len, temperature

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        position = input_ids.shape[1] - self.prompt_len
        noise = gumbel_noise(self.row_seeds, position, scores.shape[-1])
        return scores.float() / self.temperature + noise


class Sampler:
    """The sampling backend's interface: the loop only calls `sample` and `sync_weights`.

    A backend returns G completions per prompt as a Rollout whose tokens are a pure function of
    (row seed, prompt): the same rows in any batch, on any number of processes. A backend with its
    own copy of the weights (vLLM) refreshes it in `sync_weights` after each training step.
    """

    def sample(self, prompts: list[str], n: int, temperature: float, max_new_tokens: int,
               seeds: list[int] | None = None, greedy: bool = False) -> "Rollout":
        raise NotImplementedError

    def sync_weights(self, model) -> None:
        """Called after the policy's parameters changed."""

    def close(self) -> None:
        """Called when the session's work is done (the end of a run, an evaluation, a prediction): a
        backend with an engine of its own shuts it down while the process group it uses still exists."""


class HFSampler(Sampler):
    """transformers' generate with the KV cache, over the live training model (nothing to sync).

    `generation_batch_size` bounds the sequences per generate call (the KV cache's memory).
    Sampling uses the full distribution at temperature T (no top-k, top-p or repetition penalty,
    whatever the model's generation_config says): the statistics the filters use describe exactly
    the distribution the tokens came from.
    """

    def __init__(self, model_fn, tokenizer, add_special_tokens: bool = True, autocast=None,
                 generation_batch_size: int | None = None):
        """`model_fn()` -> the current policy; `autocast()` -> a context for its forwards (bf16-mixed)."""
        self.model_fn, self.tokenizer = model_fn, tokenizer
        self.add_special_tokens, self.batch_size = add_special_tokens, generation_batch_size
        self.autocast = autocast or contextlib.nullcontext

    @torch.no_grad()  # not inference_mode: the sequences feed an autograd forward later (FACTS.md)
    def sample(self, prompts: list[str], n: int, temperature: float, max_new_tokens: int,
               seeds: list[int] | None = None, greedy: bool = False) -> "Rollout":
        rows = [p for p in prompts for _ in range(n)]
        if seeds is None:  # from torch's global generator: torch.manual_seed makes the call repeatable
            seeds = torch.randint(0, 2**62, (len(rows),)).tolist()
        if len(seeds) != len(rows):
            raise ValueError(f"{len(seeds)} seeds for {len(rows)} rows")
        step = self.batch_size or len(rows)
        parts = [self._generate(rows[i:i + step], seeds[i:i + step], temperature, max_new_tokens, greedy)
                 for i in range(0, len(rows), step)]
        return parts[0] if len(parts) == 1 else concat_rollouts(parts, self.tokenizer.pad_token_id)

    def _generate(self, rows: list[str], seeds: list[int], temperature: float, max_new_tokens: int,
                  greedy: bool) -> "Rollout":
        from transformers import GenerationConfig, LogitsProcessorList

        model, tok = self.model_fn(), self.tokenizer
        enc = tok(rows, return_tensors="pt", padding=True, add_special_tokens=self.add_special_tokens)
        device = next(model.parameters()).device
        prompt_ids = enc["input_ids"].to(device)        # (B, P)
        prompt_mask = enc["attention_mask"].to(device)  # (B, P)
        eos = eos_token_ids(model, tok)
        config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                  eos_token_id=eos, pad_token_id=tok.pad_token_id, use_cache=True)
        processors = LogitsProcessorList()
        if not greedy:
            row_seeds = torch.tensor(seeds, dtype=torch.int64, device=device)
            processors.append(_GumbelSampling(row_seeds, prompt_ids.shape[1], temperature))
        # generate fills every unset field of `config` from model.generation_config (repetition penalty,
        # suppressed tokens, ...): a blank one while sampling keeps the distribution softmax(z / T).
        saved, model.generation_config = model.generation_config, GenerationConfig()
        try:
            with self.autocast():
                out = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=config,
                                     logits_processor=processors)
        finally:
            model.generation_config = saved
        completion_ids = out[:, prompt_ids.shape[1]:]   # (B, T)
        mask = completion_mask(completion_ids, eos)
        texts = tok.batch_decode(completion_ids * mask + tok.pad_token_id * (1 - mask), skip_special_tokens=True)
        return Rollout(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
                       completion_mask=mask, prompts=rows, completions=[t.strip() for t in texts])


def concat_rollouts(parts: list["Rollout"], pad_id: int) -> "Rollout":
    """Rows of several rollouts in order: prompts re-padded on the left, completions on the right."""
    P = max(r.prompt_ids.shape[1] for r in parts)
    T = max(r.completion_ids.shape[1] for r in parts)
    left = lambda x, v: torch.nn.functional.pad(x, (P - x.shape[1], 0), value=v)  # noqa: E731
    right = lambda x, v: torch.nn.functional.pad(x, (0, T - x.shape[1]), value=v)  # noqa: E731
    return Rollout(prompt_ids=torch.cat([left(r.prompt_ids, pad_id) for r in parts]),
                   prompt_mask=torch.cat([left(r.prompt_mask, 0) for r in parts]),
                   completion_ids=torch.cat([right(r.completion_ids, pad_id) for r in parts]),
                   completion_mask=torch.cat([right(r.completion_mask, 0) for r in parts]),
                   prompts=[p for r in parts for p in r.prompts],
                   completions=[c for r in parts for c in r.completions],
                   logp=None if any(r.logp is None for r in parts) else torch.cat([right(r.logp, 0.0) for r in parts]))


def completion_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      n_completion: int) -> torch.Tensor:
    """Logits that predicted each completion token: (b, T, V), in the model's dtype.

    Positions follow the attention mask (left padding), as in generate, so recomputed log-probs
    match the sampler's.
    """
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                   use_cache=False, logits_to_keep=n_completion + 1).logits  # (b, T + 1, V)
    return logits[:, :-1]
