"""Held-out evaluation: greedy accuracy, avg@k and unbiased pass@k, on every eval set of a session.

`evaluate(session, step)` needs only what samples and scores (session.Session), not an optimizer:
`entclip evaluate` opens a session for a checkpoint and calls it, as the run did at that step.
"""

from __future__ import annotations

from math import comb
from typing import Callable, Sequence

import torch


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


VerifyBatch = Callable[[list[str], list[str], list[str]], list[bool]]  # (completions, answers, prompts)


@torch.no_grad()
def eval_counts(sampler, problems: Sequence, verify: VerifyBatch, k: int, temperature: float,
                max_new_tokens: int, seed_of: Callable[[int, int], int], batch_prompts: int = 64,
                greedy: bool = True) -> tuple[list[int], list[int]]:
    """Per problem: greedy correct (0/1; empty without `greedy`) and correct samples out of k.

    `seed_of(i, j)` seeds sample j of problem i (its index in `problems`), so a problem's samples
    do not depend on the batch or process that drew them.
    """
    greedy_ok: list[int] = []
    counts: list[int] = []
    for start in range(0, len(problems), batch_prompts):
        chunk = problems[start:start + batch_prompts]
        prompts = [p.prompt for p in chunk]
        if greedy:
            g = sampler.sample(prompts, 1, 1.0, max_new_tokens, greedy=True)
            greedy_ok += [int(ok) for ok in verify(g.completions, [p.answer for p in chunk], prompts)]
        seeds = [seed_of(start + i, j) for i in range(len(chunk)) for j in range(k)]
        s = sampler.sample(prompts, k, temperature, max_new_tokens, seeds=seeds)
        ok = verify(s.completions, [p.answer for p in chunk for _ in range(k)], s.prompts)
        counts += [sum(ok[i * k:(i + 1) * k]) for i in range(len(chunk))]
    return greedy_ok, counts


def summarize(greedy_ok: Sequence[int], counts: Sequence[int], k: int) -> dict[str, float]:
    """greedy_acc (when greedy results exist), avg@k, pass@j for j in report_ks(k), and the pass-rate
    distribution in three bins: shares of problems with none, some (1..k-1) and all of k samples right
    (solved_none@k, solved_some@k, solved_all@k; the paper's "toward the middle" is solved_some rising)."""
    n = max(len(counts), 1)
    out = {"greedy_acc": sum(greedy_ok) / n} if len(greedy_ok) else {}
    out[f"avg@{k}"] = sum(counts) / (n * k)
    for j in report_ks(k):
        out[f"pass@{j}"] = sum(pass_at_k(k, c, j) for c in counts) / n
    none, every = sum(c == 0 for c in counts), sum(c == k for c in counts)
    out.update({f"solved_none@{k}": none / n, f"solved_some@{k}": (len(counts) - none - every) / n,
                f"solved_all@{k}": every / n})
    return out


def evaluate(session, step: int) -> dict[str, float]:
    """Every eval set: greedy accuracy, avg@k, pass@k; problems split over the processes. Keys are
    `<set>/<figure>` (the built-in task's set is `test`); the main process appends the row to eval.jsonl.
    Sample j of problem i is seeded by (seed, "eval", step, set, i, j): a step's evaluation can be redrawn."""
    from accelerate.utils import gather_object

    from entclip.training.batch import derive_seed

    cfg, accelerator = session.cfg, session.accelerator
    n_proc, rank = accelerator.num_processes, accelerator.process_index
    session.policy.eval()
    row: dict[str, float] = {"step": step}
    for name, problems in session.tasks.eval_sets.items():
        mine = list(range(rank, len(problems), n_proc))
        greedy, counts = eval_counts(
            session.sampler, [problems[i] for i in mine], session.rewards.verify, cfg.eval_k, cfg.eval_temperature,
            cfg.max_new_tokens, lambda i, j: derive_seed(cfg.seed, "eval", step, name, mine[i], j))
        results = list(zip(mine, greedy, counts))
        if n_proc > 1:
            results = sorted(gather_object(results))
        res = summarize([g for _, g, _ in results], [c for _, _, c in results], cfg.eval_k)
        row.update({f"{name}/{k}": v for k, v in res.items()})
    if accelerator.is_main_process and session.run_dir is not None:
        session.run_dir.append("eval.jsonl", row)
    return row


def evaluate_model(cfg, model_path: str | None, step: int = 0) -> tuple[dict[str, float], dict[str, list]]:
    """`entclip evaluate`: a session on `model_path` (no optimizer, no reference), its evaluation drawn as
    the run's own at `step`; (the eval.jsonl-style row, the eval sets)."""
    from entclip.training.session import open_session

    session = open_session(cfg, None, lambda s: None, model_path=model_path, for_training=False)
    try:
        return evaluate(session, step), session.tasks.eval_sets
    finally:
        session.rewards.close()
        session.sampler.close()
