"""Held-out figures from per-problem counts: unbiased pass@k and the pass-rate distribution."""

from __future__ import annotations

import pytest

from entclip.training.evaluation import pass_at_k, summarize


def test_pass_at_k_is_one_minus_the_chance_that_k_draws_miss_every_right_sample():
    assert pass_at_k(8, 0, 4) == 0.0 and pass_at_k(8, 5, 4) == 1.0  # 3 wrong: any 4 draws hold a right one
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)  # C(3, 2) / C(4, 2) of the pairs miss it
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)


def test_pass_rate_distribution_splits_problems_into_none_some_and_all_right():
    out = summarize([1, 0, 1, 0], [0, 3, 8, 8], 8)
    assert out["greedy_acc"] == 0.5 and out["avg@8"] == pytest.approx(19 / 32)
    assert (out["solved_none@8"], out["solved_some@8"], out["solved_all@8"]) == (0.25, 0.25, 0.5)
    assert out["pass@8"] == 0.75 and out["pass@1"] == out["avg@8"]
