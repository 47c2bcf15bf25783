"""A sampler wrapper that makes every group of a rollout hold a right and a wrong completion.

What a tiny model samples depends on the machine (AVX-512 and AVX2 round differently, and one flipped
token changes the rest of a run), so a test that needs a property of the batch builds it here instead
of hoping for it. Use with the engine's seam: `train(cfg, run, wrap_sampler=mixed_groups)`.

For every sampled (non-greedy) call with n >= 2 the real sampler runs first (its rows, seeds and
timing stay as they were), then in each group of n rows:
- row 0 := the correct answer of the built-in task ("a+b=" -> str(a + b)), then EOS;
- row 1 := WRONG ("+=+", then EOS): characters the warm start never trains as an answer (its
  targets are digits and EOS after "="), so the exact reward scores it 0 and the policy gives these
  tokens a probability near 0.
Rows 2.. keep their samples. completion_ids are right-padded with the pad id, the mask is 1 up to and
including the first EOS, completions are the decoded texts, as HFSampler returns them. Greedy calls
(evaluation's greedy accuracy) and n = 1 pass through untouched; evaluation's sampled calls (avg@k,
pass@k) are mixed too, so those figures describe the built rows there.

What this guarantees, whatever the machine or seed:
- every group has reward 1 (row 0) and 0 (row 1): its rewards differ, so row 0's advantage is > 0,
  row 1's is < 0, and the policy gradient sum_i A_i grad log p_i is not zero;
- every step has tokens with a negative advantage (row 1's: 4 per group with the tiny model's
  character tokenizer, about a quarter of a step's tokens), so Clip_B's and Clip_V's released rules
  (which only drop A < 0 / A <= 0 tokens) and the adaptive share have tokens they may drop;
- row 1's first token ("+" right after "=") has p ~ 0, below 1/V <= exp(-H), so its
  S* = p (H + log p) is < 0 and ~ 0, while E_p[S*] = sum_k p_k^2 (H + log p_k) >= 0 for any
  distribution: its Clip_V deviation S* - E_p[S*] is < 0. How far below the centre it sits is the
  data's: over ENTCLIP_TEST_SEED 0-11 its Clip_B z was -0.54 to -0.91 and the lowest Clip_V z of a
  wrong row -2.1 to -3.9 in every step (the tests' small mu is 0.3); with SmolLM2, -1.4 to -2.5.
"""

from __future__ import annotations

import torch

from entclip.training.rollout import Rollout, Sampler

WRONG = "+=+"


def arithmetic_answer(prompt: str) -> str:
    """The built-in task's answer: "12+34=" -> "46"."""
    a, b = prompt.rstrip("=").split("+")
    return str(int(a) + int(b))


class MixedGroups(Sampler):
    """Delegates to `inner`, then overwrites rows 0 and 1 of each group (see the module docstring)."""

    def __init__(self, inner: Sampler, tokenizer, answer_of=arithmetic_answer, wrong: str = WRONG):
        self.inner, self.tokenizer, self.answer_of, self.wrong = inner, tokenizer, answer_of, wrong

    def sample(self, prompts: list[str], n: int, temperature: float, max_new_tokens: int,
               seeds: list[int] | None = None, greedy: bool = False) -> Rollout:
        roll = self.inner.sample(prompts, n, temperature, max_new_tokens, seeds=seeds, greedy=greedy)
        if greedy or n < 2:
            return roll
        tok = self.tokenizer
        eos, pad = tok.eos_token_id, tok.pad_token_id
        encode = lambda text: tok(text, add_special_tokens=False)["input_ids"] + [eos]  # noqa: E731
        built = {}  # row -> its completion token ids, EOS last
        for g, prompt in enumerate(prompts):
            built[g * n] = encode(self.answer_of(prompt))
            built[g * n + 1] = encode(self.wrong)
        T = max([roll.completion_ids.shape[1]] + [len(ids) for ids in built.values()])
        ids = torch.nn.functional.pad(roll.completion_ids, (0, T - roll.completion_ids.shape[1]), value=pad)
        mask = torch.nn.functional.pad(roll.completion_mask, (0, T - roll.completion_mask.shape[1]), value=0)
        completions = list(roll.completions)
        for row, new in built.items():
            ids[row] = pad
            ids[row, :len(new)] = torch.tensor(new, dtype=ids.dtype)
            mask[row] = 0
            mask[row, :len(new)] = 1
            completions[row] = tok.decode(new, skip_special_tokens=True).strip()
        return Rollout(prompt_ids=roll.prompt_ids, prompt_mask=roll.prompt_mask, completion_ids=ids,
                       completion_mask=mask, prompts=roll.prompts, completions=completions)

    def sync_weights(self, model) -> None:
        self.inner.sync_weights(model)

    def close(self) -> None:
        self.inner.close()


def mixed_groups(sampler) -> MixedGroups:
    """The `wrap_sampler` for the engine: the run's HFSampler, with every group mixed."""
    return MixedGroups(sampler, sampler.tokenizer)


def mixed_groups_for(answer_of, wrong: str = WRONG):
    """A `wrap_sampler` for another task: `answer_of(prompt text)` -> the answer the reward accepts."""
    return lambda sampler: MixedGroups(sampler, sampler.tokenizer, answer_of, wrong)


def mixed_rewards(group_size: int):
    """A TRL reward function with the same guarantee for TRL's GRPOTrainer, which has no sampler seam:
    whatever was sampled, in every group of `group_size` consecutive completions (TRL keeps a prompt's
    generations together) even rows score 1 and odd rows 0, so every group's rewards differ and every
    step has tokens with a negative advantage for Clip_B / Clip_V to drop."""
    def reward(prompts, completions, **kwargs):
        return [float((i % group_size) % 2 == 0) for i in range(len(completions))]

    return reward
