"""Sampling G completions per prompt (Hugging Face generate with the KV cache) into a typed record.

The sampler is behind one function, `sample`, so a faster backend can replace it without touching
the loop. Sampling draws from the full distribution at the given temperature (top_k=0, top_p=1):
the token statistics the filters use describe exactly that distribution.
"""

from __future__ import annotations

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


def completion_mask(completion_ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """(B, T) mask that is 1 up to and including the first EOS, 0 after it."""
    is_eos = (completion_ids == eos_id).long()
    after_eos = (is_eos.cumsum(dim=1) - is_eos) > 0  # strictly after the first EOS
    return (~after_eos).long()


@torch.no_grad()  # not inference_mode: the sequences feed an autograd forward later (FACTS.md)
def sample(model, tokenizer, prompts: list[str], n: int, temperature: float, max_new_tokens: int,
           greedy: bool = False) -> Rollout:
    """Sample `n` completions for each prompt (rows ordered prompt-major)."""
    rows = [p for p in prompts for _ in range(n)]
    enc = tokenizer(rows, return_tensors="pt", padding=True)
    device = next(model.parameters()).device
    prompt_ids = enc["input_ids"].to(device)        # (B, P)
    prompt_mask = enc["attention_mask"].to(device)  # (B, P)
    gen_kwargs = dict(do_sample=False) if greedy else dict(
        do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
    out = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask,
                         max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, use_cache=True, **gen_kwargs)
    completion_ids = out[:, prompt_ids.shape[1]:]   # (B, T)
    mask = completion_mask(completion_ids, tokenizer.eos_token_id)
    texts = tokenizer.batch_decode(completion_ids * mask + tokenizer.pad_token_id * (1 - mask),
                                   skip_special_tokens=True)
    return Rollout(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
                   completion_mask=mask, prompts=rows, completions=[t.strip() for t in texts])


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
