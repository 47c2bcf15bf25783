"""The test helper mixed_groups builds the rows it promises, in HFSampler's format."""

from __future__ import annotations

import torch

from entclip.training.rollout import Rollout, Sampler, completion_mask
from entclip.data.tasks.arithmetic import verify
from entclip.data.tasks.tiny import build_char_tokenizer
from mixed_groups import WRONG, MixedGroups


class Fixed(Sampler):
    """Returns one prepared rollout, whatever it is asked; records the calls."""

    def __init__(self, roll: Rollout):
        self.roll, self.calls, self.synced = roll, [], 0

    def sample(self, prompts, n, temperature, max_new_tokens, seeds=None, greedy=False):
        self.calls.append((tuple(prompts), n, greedy))
        return self.roll

    def sync_weights(self, model):
        self.synced += 1


def _rollout(tok, prompts, texts) -> Rollout:
    """Rows as HFSampler leaves them: prompts left-padded, completions right-padded after EOS."""
    enc = tok(prompts, return_tensors="pt", padding=True)
    ids = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in texts]
    T = 3  # shorter than the built rows: the wrapper must widen the batch
    ids = torch.tensor([(r + [tok.pad_token_id] * T)[:T] for r in ids])
    return Rollout(enc["input_ids"], enc["attention_mask"], ids, completion_mask(ids, tok.eos_token_id),
                   list(prompts), [tok.decode(r, skip_special_tokens=True) for r in ids.tolist()])


def test_each_group_gets_a_right_and_a_wrong_row_and_the_rest_is_kept():
    tok = build_char_tokenizer()
    prompts = ["12+34=", "1+2="]
    rows = [p for p in prompts for _ in range(3)]
    inner = Fixed(_rollout(tok, rows, ["4", "46", "7", "3", "3", "9"]))
    wrapped = MixedGroups(inner, tok)
    roll = wrapped.sample(prompts, 3, 1.0, 6, seeds=list(range(6)))
    eos, pad = tok.eos_token_id, tok.pad_token_id
    assert roll.completions[0::3] == ["46", "3"] and roll.completions[1::3] == [WRONG, WRONG]
    assert roll.completions[2::3] == ["7", "9"]  # sampled rows untouched
    assert [verify(c, a) for c, a in zip(roll.completions, ["46", "46", "46", "3", "3", "3"])] == [
        True, False, False, True, False, False]
    assert roll.completion_ids.shape == (6, len(WRONG) + 1)
    assert roll.completion_ids[1].tolist() == tok(WRONG, add_special_tokens=False)["input_ids"] + [eos]
    assert roll.completion_ids[0].tolist() == tok("46", add_special_tokens=False)["input_ids"] + [eos, pad]
    # The mask is what the sampler would compute: 1 up to and including the first EOS.
    assert torch.equal(roll.completion_mask, completion_mask(roll.completion_ids, eos))
    assert torch.equal(roll.prompt_ids, inner.roll.prompt_ids) and roll.prompts == rows


def test_greedy_and_single_sample_calls_pass_through():
    tok = build_char_tokenizer()
    inner = Fixed(_rollout(tok, ["1+2="], ["4"]))
    wrapped = MixedGroups(inner, tok)
    assert wrapped.sample(["1+2="], 1, 1.0, 6) is inner.roll
    assert wrapped.sample(["1+2="], 1, 1.0, 6, greedy=True) is inner.roll
    wrapped.sync_weights(None)
    assert inner.synced == 1 and [c[2] for c in inner.calls] == [False, True]
