"""The rollout/trainer mismatch correction (rollout_is), without vLLM: hand-computed weights, the token
terms they scale, and the engine with a sampler that reports planted log-probs (tests/test_vllm.py
runs the real engine)."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
from typer.testing import CliRunner

from conftest import tiny_sets
from entclip.cli import app
from entclip.contracts.config import inert_settings, resolve
from entclip.contracts.errors import EntclipError
from entclip.contracts.rundir import RunDir, load_run
from entclip.core import theory
from entclip.core.mismatch import importance_weights, mismatch_stats
from entclip.training import objective
from entclip.training.loop import train
from entclip.training.rollout import Rollout, Sampler, completion_logits
from mixed_groups import mixed_groups

LN = math.log


def _logps():
    """Two sequences of 4 positions, the second with 2 valid tokens; log rho per token by hand."""
    old = torch.tensor([[-1.0, -2.0, -0.5, -0.1], [-0.3, -0.2, -9.0, -9.0]])
    log_rho = torch.tensor([[LN(3.0), 0.0, LN(0.5), LN(1.5)], [LN(1.2), LN(1.5), 5.0, 5.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    return old, old - log_rho, mask


def test_token_truncate_caps_each_tokens_ratio_at_the_threshold():
    old, rollout, mask = _logps()
    w, corrected = importance_weights(old, rollout, mask, "token_truncate", 2.0)
    expected = torch.tensor([[2.0, 1.0, 0.5, 1.5], [1.2, 1.5, 0.0, 0.0]])  # 3 -> 2; padding 0
    assert torch.allclose(w, expected, atol=1e-6)
    assert corrected.tolist() == [[True, False, False, False], [False, False, False, False]]


def test_sequence_mask_weighs_each_sequence_by_its_ratio_and_zeroes_those_outside_the_band():
    old, rollout, mask = _logps()
    # Sequence ratios: 3 * 1 * 0.5 * 1.5 = 2.25 and 1.2 * 1.5 = 1.8 (padding's log rho of 5 not counted).
    w, corrected = importance_weights(old, rollout, mask, "sequence_mask", 3.0)
    assert torch.allclose(w, torch.tensor([[2.25] * 4, [1.8, 1.8, 0, 0]]), atol=1e-5)
    assert not corrected.any()
    w, corrected = importance_weights(old, rollout, mask, "sequence_mask", 2.0)  # 2.25 > 2: masked
    assert torch.allclose(w, torch.tensor([[0.0] * 4, [1.8, 1.8, 0, 0]]), atol=1e-5)
    assert corrected.tolist() == [[True] * 4, [False] * 4]
    w, _ = importance_weights(old, rollout, mask, "sequence_mask", 3.0, threshold_lower=2.0)  # 1.8 < 2: masked
    assert torch.allclose(w, torch.tensor([[2.25] * 4, [0.0] * 4]), atol=1e-5)


def test_mismatch_stats_are_over_valid_tokens_only():
    old, rollout, mask = _logps()
    _, corrected = importance_weights(old, rollout, mask, "token_truncate", 2.0)
    st = mismatch_stats(old, rollout, mask, corrected)
    diffs = [LN(3.0), 0.0, LN(2.0), LN(1.5), LN(1.2), LN(1.5)]  # |log rho| of the six valid tokens
    assert st["n"] == 6
    assert st["logp_diff_mean"] == pytest.approx(sum(diffs) / 6, abs=1e-6)
    assert st["logp_diff_max"] == pytest.approx(LN(3.0), abs=1e-6)  # not padding's 5
    assert (st["is_ratio_min"], st["is_ratio_max"]) == (pytest.approx(0.5), pytest.approx(3.0))
    assert st["is_ratio_mean"] == pytest.approx((3 + 1 + 0.5 + 1.5 + 1.2 + 1.5) / 6, abs=1e-6)
    assert st["is_corrected_frac"] == pytest.approx(1 / 6)


def test_the_weight_scales_the_policy_term_and_its_gradient_but_not_the_kl():
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    old, ref = torch.tensor([[-1.05, -1.95]]), torch.tensor([[-1.5, -1.0]])  # ratios inside the clip
    adv, mask = torch.tensor([[1.0, -1.0]]), torch.ones(1, 2)
    w = torch.tensor([[2.0, 0.5]])
    cfg = resolve(sets=["kl_coef=0.5"])
    weighted = objective.token_terms(cfg, logp, old, adv, ref, None, mask, is_weight=w)
    assert torch.allclose(weighted.loss, weighted.surrogate * w + 0.5 * weighted.kl)  # the KL unweighted
    assert torch.equal(weighted.weights, w)  # the accounting weighs each token's term by it
    cfg = resolve(sets=["kl_coef=0"])
    g_plain, = torch.autograd.grad(objective.token_terms(cfg, logp, old, adv, None, None, mask).loss.sum(), logp)
    g_weighted, = torch.autograd.grad(
        objective.token_terms(cfg, logp, old, adv, None, None, mask, is_weight=w).loss.sum(), logp)
    assert g_plain.abs().min() > 0
    assert torch.allclose(g_weighted, g_plain * w)


class PlantedLogp(Sampler):
    """The run's sampler (every group mixed), reporting as its own log p the trainer's minus `offset`
    on the rows `rows` (all rows when None): a sampler whose weights differ from the trainer's by a
    known ratio pi_train / pi_rollout = exp(offset) per token."""

    def __init__(self, inner, model_fn, offset: float, rows: slice | None = None):
        self.inner, self.model_fn, self.offset, self.rows = inner, model_fn, offset, rows

    @torch.no_grad()
    def sample(self, prompts, n, temperature, max_new_tokens, seeds=None, greedy=False) -> Rollout:
        roll = self.inner.sample(prompts, n, temperature, max_new_tokens, seeds=seeds, greedy=greedy)
        logits = completion_logits(self.model_fn(), roll.input_ids, roll.attention_mask, roll.completion_ids.shape[1])
        logp = theory.token_logp(logits, roll.completion_ids, temperature)  # (B, T)
        shift = torch.zeros_like(logp)
        shift[self.rows if self.rows is not None else slice(None)] = self.offset
        roll.logp = (logp - shift) * roll.completion_mask
        return roll

    def sync_weights(self, model) -> None:
        self.inner.sync_weights(model)

    def close(self) -> None:
        self.inner.close()


def _one_step(tmp_path, name, offset=None, rows=None, **overrides):
    cfg = resolve(sets=tiny_sets(steps=1, minibatches=1, eval_every=0, entropy_control="clip_b", clip_b_mu=0.5,
                                 **overrides))
    wrap = mixed_groups if offset is None else (lambda s: PlantedLogp(mixed_groups(s), s.model_fn, offset, rows))
    run = RunDir.create(tmp_path / name)
    run.write_config(cfg.to_yaml())
    train(cfg, run, log=lambda s: None, wrap_sampler=wrap)
    return load_run(run.path).metrics[0]


FILTER_KEYS = ("clip/filter_frac", "clip/filter_frac_pos", "clip/filter_frac_neg", "disc/min_z_b", "disc/min_z_v",
               "disc/mean", "disc/dev_mean", "entropy/mean")


@pytest.fixture(scope="module")
def plain_step(tmp_path_factory):
    return _one_step(tmp_path_factory.mktemp("is"), "plain")


def test_the_filters_never_read_the_samplers_log_probs(plain_step, tmp_path):
    """A sampler whose log p is far off (ratio 5 on every token) leaves every statistic and the
    filter's drops as they are; only the sampling/* figures and the weighted loss see it."""
    planted = _one_step(tmp_path, "planted", offset=LN(5.0))
    assert plain_step["clip/filter_frac"] > 0  # the filter acts (clip_b_mu 0.5 on mixed groups)
    assert {k: planted[k] for k in FILTER_KEYS} == {k: plain_step[k] for k in FILTER_KEYS}
    assert not any(k.startswith("sampling/") for k in plain_step)  # HFSampler: nothing to measure
    assert planted["sampling/logp_diff_mean"] == pytest.approx(LN(5.0), abs=1e-5)
    assert planted["sampling/logp_diff_max"] == pytest.approx(LN(5.0), abs=1e-5)
    for k in ("min", "mean", "max"):
        assert planted[f"sampling/is_ratio_{k}"] == pytest.approx(5.0, rel=1e-5)
    assert planted["sampling/is_corrected_frac"] == 1.0  # every token truncated to 2


def test_token_truncate_weighs_the_update_by_the_capped_ratio(plain_step, tmp_path):
    planted = _one_step(tmp_path, "planted", offset=LN(5.0))  # every weight min(5, 2) = 2
    assert planted["loss/total"] == pytest.approx(2.0 * plain_step["loss/total"], rel=1e-5)
    assert planted["grad/norm"] == pytest.approx(2.0 * plain_step["grad/norm"], rel=1e-5)
    assert planted["loss/policy"] == pytest.approx(plain_step["loss/policy"], rel=1e-6)  # the surrogate itself
    none = _one_step(tmp_path, "measured-only", offset=LN(5.0), rollout_is="none")
    assert none["loss/total"] == pytest.approx(plain_step["loss/total"], rel=1e-6)
    assert none["sampling/is_ratio_mean"] == pytest.approx(5.0, rel=1e-5)


def test_sequence_mask_drops_the_sequences_outside_the_band(plain_step, tmp_path):
    """Group 0's sequences have ratio 5^length > 3: masked; the others have ratio 1 and weigh 1."""
    G = 4
    planted = _one_step(tmp_path, "seqmask", offset=LN(5.0), rows=slice(0, G), rollout_is="sequence_mask")
    assert 0 < planted["sampling/is_corrected_frac"] < 1
    assert planted["sampling/is_ratio_min"] == pytest.approx(1.0, abs=1e-5)
    assert planted["grad/norm"] != pytest.approx(plain_step["grad/norm"], rel=1e-3)


def test_rollout_is_settings_are_checked_and_inert_ones_named():
    with pytest.raises(EntclipError, match="rollout_is_threshold=2.0"):
        resolve(sets=["rollout_is_threshold=0.9"])
    with pytest.raises(EntclipError, match="rollout_is_threshold_lower"):
        resolve(sets=["rollout_is=sequence_mask", "rollout_is_threshold_lower=4"])
    assert resolve(sets=["rollout_is=sequence_mask"]).is_threshold == 3.0  # TRL's clip_max
    assert resolve(sets=["rollout_is=token_truncate"]).is_threshold == 2.0  # verl's threshold
    assert any("no effect with sampler=hf" in w for w in inert_settings(resolve(sets=["vllm_dtype=bfloat16"])))


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_sampler_vllm_without_vllm_is_one_line_naming_the_extra(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(app, ["train", "--steps", "1", *sum((["--set", s] for s in tiny_sets(sampler="vllm")), [])])
    assert res.exit_code == 2, res.output
    assert "pip install 'entclip[vllm]'" in res.output and "sampler=hf" in res.output
    assert "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1, res.output
