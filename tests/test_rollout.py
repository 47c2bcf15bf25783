"""Sampling: the counter-based Gumbel noise, and generate drawing from softmax(z / T) only."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import TINY
from entclip.contracts.config import resolve
from entclip.training.rollout import HFSampler, _uniform, gumbel_noise


def test_uniforms_stay_strictly_inside_zero_one():
    extremes = _uniform(torch.tensor([-1, 0, 2**62, -(2**63)]))  # all bits set, none, and between
    assert (extremes > 0).all() and (extremes < 1).all()
    assert torch.isfinite(-torch.log(-torch.log(extremes))).all()


def test_gumbel_noise_is_finite_and_standard():
    noise = gumbel_noise(torch.arange(64) * 7919 + 3, 5, 151_936)  # a Qwen-sized vocabulary, 9.7M draws
    assert torch.isfinite(noise).all()
    assert noise.max() < 16.7  # the cap: u <= 1 - 2**-24 (never 1.0, whose noise is +inf)
    assert abs(float(noise.mean()) - 0.5772) < 0.01  # Euler-Mascheroni
    assert abs(float(noise.std()) - math.pi / math.sqrt(6)) < 0.01


def test_gumbel_max_samples_the_softmax():
    logits = torch.tensor([0.0, 1.0, 2.0, -1.0, 0.5])
    seeds = torch.arange(100_000) * 104_729 + 11
    for position in (0, 7):
        picks = (logits[None] + gumbel_noise(seeds, position, 5)).argmax(-1)
        freq = torch.bincount(picks, minlength=5).double() / len(seeds)
        p = torch.softmax(logits.double(), -1)
        assert torch.allclose(freq, p, atol=5 * float((p * (1 - p) / len(seeds)).sqrt().max()))


@pytest.fixture(scope="module")
def tiny():
    from entclip.data.models import load_policy

    model, tok, _ = load_policy(resolve(sets=[f"{k}={v}" for k, v in TINY.items()]), lambda s: None)
    return model.eval(), tok


def test_the_models_generation_config_does_not_change_the_samples(tiny):
    model, tok = tiny
    sampler = HFSampler(lambda: model, tok)
    prompts = ["3+4=", "12+7=", "9+9="]
    seeds = list(range(100, 100 + 3 * 4))
    plain = sampler.sample(prompts, 4, 1.0, 5, seeds=seeds)
    model.generation_config.repetition_penalty = 5.0  # what an instruct model may ship with
    model.generation_config.suppress_tokens = [tok.convert_tokens_to_ids(str(d)) for d in range(10)]
    try:
        again = sampler.sample(prompts, 4, 1.0, 5, seeds=seeds)
    finally:
        model.generation_config.repetition_penalty = None
        model.generation_config.suppress_tokens = None
    assert torch.equal(plain.completion_ids, again.completion_ids)
    # Digits were drawn (the warm start answers in digits), so suppressing them would show.
    assert any(ch.isdigit() for c in plain.completions for ch in c)
