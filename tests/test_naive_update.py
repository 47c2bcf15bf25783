"""Every optimizer update of a real step, held against a slow float64 reference of the objective.

The engine's gradient of the parameters at each of a step's updates (2 epochs x 2 minibatches) is
compared with the gradient of the specification's loss, rebuilt in tests/naive.py with plain loops
over tokens in float64 from the same rollout, row order and parameters (the first step of a run, or
the second where a case sets steps=2). Inputs are built so that
every ingredient acts (STYLE 14): mixed_groups gives every group a right and a wrong row (A > 0 and
A < 0 in each group, wrong tokens with p ~ 0); lr 3e-3 moves later ratios by more than the clip
range eps = 0.02; the filters' thresholds are loose enough to drop tokens. Each case also checks its
own teeth: the reference with the case's ingredient left out (the keep-mask, the clip, the KL...)
must disagree with the engine, so agreement is not an accident of a comparison that cannot fail.
"""

from __future__ import annotations

import math
import shutil

import pytest
import torch

import naive
from conftest import TINY
from entclip.contracts.config import Config
from mixed_groups import mixed_groups

TOL = 1e-4  # relative gradient error, float32 engine vs float64 reference (observed ~1e-6)
TEETH = 100 * TOL  # a reference without the case's ingredient must be this far off at some update
BASE = {**TINY, "steps": 1, "epochs": 2, "minibatches": 2, "lr": 3e-3, "eps_low": 0.02, "eps_high": 0.02,
        "max_grad_norm": 0.0}  # no clipping: the optimizer sees the raw gradients
BAND = {"cov_frac": 0.2, "cov_lb": -100.0, "cov_ub": 100.0}  # every token in the band, 20% drawn

# name -> (overrides, the ingredient the reference must not do without: naive.OFF)
CASES = {
    "none": ({}, "clip"),
    "seq-mean-token-mean": ({"loss_agg": "seq-mean-token-mean"}, "agg"),
    "constant": ({"loss_agg": "constant", "scale_std": False}, "agg"),
    "temperature": ({"temperature": 0.7}, "temperature"),
    "dual_clip": ({"dual_clip_c": 1.5}, "dual"),
    "kl": ({"kl_coef": 0.1}, "kl"),
    # the second step (steps=2 captures step 2): the KL reference is the run's start, not the step's
    "kl_step2": ({"kl_coef": 0.1, "steps": 2}, "ref"),
    "static_bonus": ({"entropy_coef": 0.05}, "bonus"),
    # log V = log 16 < 10: always at or below the target, so the bonus is on from the second update
    "adaptive_bonus": ({"entropy_target": 10.0, "entropy_coef": 0.01, "entropy_coef_delta": 0.005}, "bonus"),
    # the coefficient carried into the second step, up to entropy_coef_max
    "adaptive_step2": ({"entropy_target": 10.0, "entropy_coef": 0.01, "entropy_coef_delta": 0.005,
                        "entropy_coef_max": 0.04, "steps": 2}, "bonus"),
    # entropy far above 0.05: the bonus stays off and the coefficient falls to its floor
    "adaptive_above_target": ({"entropy_target": 0.05, "entropy_coef": 0.01, "entropy_coef_delta": 0.005,
                               "entropy_coef_min": 0.002}, "clip"),
    "clip_b": ({"entropy_control": "clip_b", "clip_b_mu": 0.5}, "keep"),
    "clip_v": ({"entropy_control": "clip_v", "clip_v_mu": 0.5, "clip_v_max_frac": None, "kl_coef": 0.1}, "keep"),
    "clip_v_capped": ({"entropy_control": "clip_v", "clip_v_mu": 0.5, "clip_v_max_frac": 0.02}, "keep"),
    "sign_s_star": ({"entropy_control": "sign", "sign_statistic": "s_star"}, "keep"),
    "sign_deviation": ({"entropy_control": "sign", "sign_statistic": "deviation", "sign_deviation": "neg",
                        "sign_samples": "neg", "loss_agg": "constant"}, "keep"),
    "high_entropy": ({"entropy_control": "high_entropy", "entropy_coef": 0.05}, "keep"),
    "high_entropy_rollout": ({"entropy_control": "high_entropy", "filter_scope": "rollout",
                              "loss_agg": "seq-mean-token-mean"}, "keep"),
    "clip_cov": ({"entropy_control": "clip_cov", **BAND}, "keep"),
    "clip_cov_rollout": ({"entropy_control": "clip_cov", **BAND, "filter_scope": "rollout", "kl_coef": 0.1}, "keep"),
    "kl_cov": ({"entropy_control": "kl_cov", "kl_cov_frac": 0.2}, "penalty"),
    "steer": ({"entropy_control": "steer"}, "weights"),
    "steer_dual": ({"entropy_control": "steer", "dual_clip_c": 1.5}, "dual"),
    # several micro-batches per update: 8 rows in 2+2+2+2 or 3+3+2
    "micro_clip_cov": ({"entropy_control": "clip_cov", **BAND, "micro_batch_size": 2, "entropy_coef": 0.05}, "keep"),
    "micro_high_entropy": ({"entropy_control": "high_entropy", "micro_batch_size": 2}, "keep"),
    "micro_clip_b": ({"entropy_control": "clip_b", "clip_b_mu": 0.5, "micro_batch_size": 3,
                      "loss_agg": "seq-mean-token-mean", "entropy_coef": 0.05}, "keep"),
    # the normalizer overridden both ways
    "normalizer_all": ({"entropy_control": "clip_b", "clip_b_mu": 0.5, "filter_normalizer": "all",
                        "kl_coef": 0.1, "entropy_coef": 0.05}, "keep"),
    "normalizer_kept": ({"entropy_control": "high_entropy", "filter_scope": "rollout",
                         "filter_normalizer": "kept"}, "keep"),
}
FILTER_CASES = [name for name, (_, off) in CASES.items() if off == "keep"]

_captured: dict[str, naive.Capture] = {}


def captured(name: str) -> naive.Capture:
    """One engine step per case, shared by the tests of this module."""
    if name not in _captured:
        _captured[name] = naive.capture(Config(**{**BASE, **CASES[name][0]}), mixed_groups)
    return _captured[name]


@pytest.mark.parametrize("name", list(CASES))
def test_every_updates_gradient_equals_the_naive_reference(name):
    cap = captured(name)
    overrides, ingredient = CASES[name]
    ref = naive.Reference(cap)
    grads = ref.run()
    assert all(torch.equal(cap.updates[0].params[n], p) for n, p in cap.theta0.items()), \
        "the first update does not start from the parameters the old statistics were taken at"
    errors, zero = [], []
    for u, g_r in enumerate(grads):
        g_e = naive.engine_grad(cap, u)
        if float(g_r.norm()) == 0:  # every kept token ratio-clipped: nothing to compare but the zero
            assert float(g_e.norm()) == 0, f"update {u}: the reference's gradient is 0, the engine's is not"
            zero.append(u)
        else:
            errors.append(naive.rel_err(g_e, g_r))
    assert max(errors) < TOL, f"relative gradient error per update: {errors}"
    assert 0 not in zero and len(zero) < len(grads) - 1, f"updates {zero} had a zero gradient"
    # The properties the comparison needs, built into the inputs (see the module docstring).
    ref.margins.assert_clear()
    assert min(ref.A) < 0 < max(ref.A)
    assert ref.moved_late > 0, "no ratio left [1 - eps_low, 1 + eps_high] after the first update"
    if ingredient == "keep":
        assert sum(ref.dropped) > 0, "the filter dropped nothing"
    if ingredient == "dual":
        assert ref.dual_active > 0, "the dual clip never capped a token's loss"
    if ingredient == "weights":
        assert ref.steer_spread > 0.1, "STEER's weights did not spread"
    if ingredient == "penalty":
        assert ref.kl_cov_selected > 0
    if "micro_batch_size" in overrides:
        assert all(len(mb) > 1 for epoch in cap.plan for mb in epoch)


@pytest.mark.parametrize("name", list(CASES))
def test_the_reference_without_the_cases_ingredient_disagrees(name):
    """Teeth: e.g. for a filter, keep = every valid token (as if the engine computed
    `loss_mask = mask` instead of `mask * keep`) moves some update's gradient far outside the
    tolerance. (Not every update's: a minibatch may hold no dropped token, or only ratio-clipped ones.)"""
    cap = captured(name)
    ingredient = CASES[name][1]
    without = naive.Reference(cap, off=frozenset({ingredient}))
    errors = [naive.rel_err(naive.engine_grad(cap, u), g) for u, g in enumerate(without.run()) if g.norm() > 0]
    assert max(errors) > TEETH, (naive.OFF[ingredient], errors)


@pytest.mark.parametrize("name", ["clip_b", "high_entropy", "clip_cov", "micro_clip_cov"])
def test_dropped_tokens_get_exactly_zero_gradient(name, monkeypatch):
    """d loss / d log p_t at the first update (ratio 1: nothing ratio-clipped), in the reference and
    in the engine: exactly 0.0 on every dropped token, nonzero on every kept one (all have A != 0).
    The engine's is read off its per-micro-batch log-prob tensors (retain_grad on theory.token_logp),
    without accounting, whose extra passes would call it too. KL is off in these cases: with the
    normalizer 'all' a dropped token keeps its KL term by design."""
    from entclip.core import theory

    overrides = {k: v for k, v in CASES[name][0].items() if k != "entropy_coef"}
    assert "kl_coef" not in overrides
    real, seen = theory.token_logp, []

    def recording(*args, **kwargs):
        out = real(*args, **kwargs)
        if out.requires_grad:
            out.retain_grad()
            seen.append(out)
        return out

    monkeypatch.setattr(theory, "token_logp", recording)
    cap = naive.capture(Config(**{**BASE, **overrides, "entropy_accounting": False}), mixed_groups)
    micro = [[int(r) for r in m] for m in cap.plan[0][0]]
    n_micro = sum(len(mb) for epoch in cap.plan for mb in epoch)
    assert len(seen) == n_micro, "expected one differentiable log-prob tensor per micro-batch"
    ref = naive.Reference(cap)
    _, cur, keep = ref.update(0, logp_leaves=True)
    dropped = [bt for bt, k in keep.items() if not k]
    kept = [bt for bt, k in keep.items() if k]
    assert dropped and kept
    engine = {}
    for rows, logp in zip(micro, seen[:len(micro)]):
        for a, b in enumerate(rows):
            for t in range(logp.shape[1]):
                engine[(b, t)] = float(logp.grad[a, t])
    for bt in dropped:
        assert cur[bt].logp.grad.item() == 0.0 and engine[bt] == 0.0, bt
    for bt in kept:
        assert ref.A[bt[0]] != 0
        assert cur[bt].logp.grad.item() != 0.0 and engine[bt] != 0.0, bt
        assert engine[bt] == pytest.approx(cur[bt].logp.grad.item(), rel=1e-4)


@pytest.mark.parametrize("name, applied, coef", [
    ("adaptive_bonus", [0.0, 0.015, 0.02, 0.025], 0.03),  # off until an entropy is measured, then rising
    ("adaptive_step2", [0.03, 0.035, 0.04, 0.04], 0.04),  # carried over from step 1, clamped at the max
    ("adaptive_above_target", [0.0, 0.0, 0.0, 0.0], 0.002),  # never on, falling to entropy_coef_min
])
def test_adaptive_coefficient_follows_the_reference(name, applied, coef):
    """The coefficient each update applied (it shows in the gradients, compared above) and the
    trainer's coefficient and last measured entropy after the step, against the reference's. A run
    starts with coef = entropy_coef and last_entropy = +inf (so the first update has no bonus)."""
    cap = captured(name)
    if cap.step == 1:
        assert (cap.coef0, cap.last_entropy0) == (cap.cfg.entropy_coef, math.inf)
    ref = naive.Reference(cap)
    ref.run()
    assert ref.applied == pytest.approx(applied) and ref.coef == pytest.approx(coef)
    assert cap.trainer.state.entropy_coef == pytest.approx(ref.coef, abs=1e-12)
    assert math.isfinite(ref.last_entropy)
    assert cap.trainer.state.last_entropy == pytest.approx(ref.last_entropy, rel=1e-5)


def test_a_resumed_step_equals_the_uninterrupted_one(tmp_path, monkeypatch):
    """2 steps with the KL penalty and the adaptive bonus, checkpoint after step 1; a copy of the run
    as it stood then (the step 2 checkpoint gone, as after a kill) resumes: its step 2 has the same
    metrics and final weights, and starts from the same coefficient and last entropy."""
    from safetensors.torch import load_file

    import entclip.training.loop as loop
    from entclip.contracts.rundir import RunDir, load_run

    starts = {}  # run name -> (entropy_coef, last_entropy) as each step began

    class Recording(loop.Trainer):
        def step(self, i, batch=None):
            starts.setdefault(self.session.run_dir.path.name, []).append((i, self.state.entropy_coef,
                                                                  self.state.last_entropy))
            return super().step(i, batch)

    monkeypatch.setattr(loop, "Trainer", Recording)
    cfg = Config(**{**TINY, "steps": 2, "save_every": 1, "keep_checkpoints": 0, "eval_every": 0,
                    "kl_coef": 0.1, "entropy_target": 10.0, "entropy_coef": 0.01, "entropy_coef_delta": 0.005})
    first = RunDir.create(tmp_path / "first")
    first.write_config(cfg.to_yaml())
    loop.train(cfg, first, log=lambda s: None, wrap_sampler=mixed_groups)
    shutil.copytree(first.path, tmp_path / "second")
    shutil.rmtree(tmp_path / "second" / "checkpoints" / "step_000002")
    second, ckpt = RunDir.reopen(tmp_path / "second")
    assert ckpt.name == "step_000001" and len(load_run(second.path).metrics) == 1
    loop.train(cfg, second, log=lambda s: None, resume_from=ckpt, wrap_sampler=mixed_groups)

    a, b = starts["first"], starts["second"]
    assert [s[0] for s in a] == [1, 2] and [s[0] for s in b] == [2]
    assert a[1][1] != cfg.entropy_coef and math.isfinite(a[1][2]), "the coefficient did not move in step 1"
    assert b[0] == a[1], "the resumed step began from another coefficient or last entropy"
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in rows]  # noqa: E731
    assert strip(load_run(second.path).metrics) == strip(load_run(first.path).metrics)
    wa = load_file(first.path / "checkpoints" / "step_000002" / "model.safetensors")
    wb = load_file(second.path / "checkpoints" / "step_000002" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
