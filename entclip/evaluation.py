"""Held-out evaluation: greedy accuracy, avg@k and unbiased pass@k."""

from __future__ import annotations

from math import comb
from typing import Callable, Sequence

import torch

from entclip.rollout import sample


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al. 2021): 1 - C(n-c, k) / C(n, k)."""
    if not 1 <= k <= n:
        raise ValueError(f"k={k} must be in 1..n={n}")
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def report_ks(n: int) -> list[int]:
    """The k values reported for n samples: powers of two below n, and n."""
    ks = [k for k in (1, 2, 4, 8, 16, 32, 64, 128) if k < n]
    return ks + [n]


@torch.no_grad()
def evaluate(model, tokenizer, problems: Sequence, verify: Callable[[str, str], bool], k: int,
             temperature: float, max_new_tokens: int, batch_prompts: int = 64) -> dict[str, float]:
    """Greedy accuracy plus avg@k / pass@k (k samples per problem) on `problems`.

    Keys: greedy_acc, avg@k, pass@j for j in report_ks(k).
    """
    greedy_ok = 0
    correct_counts: list[int] = []
    for start in range(0, len(problems), batch_prompts):
        chunk = problems[start:start + batch_prompts]
        prompts = [p.prompt for p in chunk]
        greedy = sample(model, tokenizer, prompts, 1, 1.0, max_new_tokens, greedy=True)
        greedy_ok += sum(verify(c, p.answer) for c, p in zip(greedy.completions, chunk))
        sampled = sample(model, tokenizer, prompts, k, temperature, max_new_tokens)
        for i, p in enumerate(chunk):
            correct_counts.append(sum(verify(c, p.answer) for c in sampled.completions[i * k:(i + 1) * k]))
    n = len(problems)
    out = {"greedy_acc": greedy_ok / n, f"avg@{k}": sum(correct_counts) / (n * k)}
    for j in report_ks(k):
        out[f"pass@{j}"] = sum(pass_at_k(k, c, j) for c in correct_counts) / n
    return out
