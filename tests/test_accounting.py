"""Entropy accounting: predicted vs measured entropy change per step, and the sign intervention."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from conftest import tiny_sets
from entclip.core import losses, theory
from entclip.training.accounting import StepAccount, loss_weights, quadrants
from entclip.contracts.config import resolve
from entclip.training.loop import train
from entclip.contracts.rundir import RunDir, load_run


def pearson(a, b):
    ma, mb = statistics.fmean(a), statistics.fmean(b)
    cov = sum((x - ma) * (y - mb) for x, y in zip(a, b))
    return cov / math.sqrt(sum((x - ma) ** 2 for x in a) * sum((y - mb) ** 2 for y in b))


def test_entropy_delta_from_logit_change_matches_finite_differences():
    torch.manual_seed(0)
    z = torch.randn(5, 40, dtype=torch.float64) * 2
    dz = torch.randn(5, 40, dtype=torch.float64) * 1e-4
    for t in (1.0, 0.7):
        h = lambda x: -(torch.softmax(x / t, -1) * torch.log_softmax(x / t, -1)).sum(-1)  # noqa: E731
        measured = h(z + dz) - h(z)
        pred = theory.entropy_delta_from_logit_change(z, dz, t)
        assert torch.allclose(pred.double(), measured, rtol=1e-2, atol=1e-9)


def test_entropy_delta_ignores_a_constant_shift_of_the_logits():
    z = torch.randn(3, 10)
    assert theory.entropy_delta_from_logit_change(z, torch.full_like(z, 0.5)).abs().max() < 1e-6


def test_loss_weights_are_the_aggregation_weights():
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    assert torch.allclose(loss_weights(mask, "token-mean", None), mask / 6)
    seq = torch.tensor([[0.5, 0.5, 0, 0], [0.25] * 4]) / 2
    assert torch.allclose(loss_weights(mask, "seq-mean-token-mean", None), seq)
    assert torch.allclose(loss_weights(mask, "constant", 8), mask / 16)


def test_quadrants_count_valid_tokens_by_sign_of_advantage_and_deviation():
    dev = torch.tensor([[0.3, -0.1, 0.0, 0.5], [-0.2, 0.4, -0.3, 9.0]])
    adv = torch.tensor([[1.0, 1.0, 1.0, 1.0], [-2.0, -2.0, 0.0, -2.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])  # 7 valid; (1, 3) is padding
    contrib = torch.tensor([[1.0, 2.0, 4.0, 8.0], [16.0, 32.0, 64.0, 128.0]])
    out = quadrants(dev, adv, mask, contrib)
    # (0, 2) and (1, 2) fall in no quadrant (deviation 0, A = 0); padding (1, 3) in none either.
    assert out == {"pos_devpos": (2 / 7, 9.0), "pos_devneg": (1 / 7, 2.0),
                   "neg_devpos": (1 / 7, 32.0), "neg_devneg": (1 / 7, 16.0)}


def test_sign_mask_keeps_the_requested_quadrant_and_never_padding():
    disc = torch.tensor([[0.3, 0.1, 0.5, 0.9], [0.2, 0.6, 0.1, 0.4]])
    base = torch.tensor([[0.2, 0.2, 0.2, 0.2], [0.3, 0.3, 0.3, 0.3]])   # dev: + - + + / - + - +
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    adv = torch.tensor([1.0, -1.0])
    keep = losses.sign_mask(disc, base, adv, mask, deviation="pos", samples="all", statistic="deviation")
    assert keep.tolist() == [[True, False, True, False], [False, True, False, True]]
    keep = losses.sign_mask(disc, base, adv, mask, deviation="neg", samples="pos", statistic="deviation")
    assert keep.tolist() == [[False, True, False, False], [False, False, False, False]]
    keep = losses.sign_mask(disc, base, adv, mask, deviation="neg", samples="neg", statistic="deviation")
    assert keep.tolist() == [[False, False, False, False], [True, False, True, False]]


@pytest.fixture(scope="module")
def accounted_run(tmp_path_factory):
    """50 steps of 8 x 8 at AdamW lr 1e-5: steps small enough that first order holds on any data.

    The prediction misses by the second-order term, O(lr^2) against the first-order O(lr): at lr
    1e-5 the measured change per step (median ~3e-4) is far above float noise and the miss is small.
    """
    cfg = resolve(sets=tiny_sets(steps=50, prompts_per_step=8, group_size=8, eval_every=0, lr=1e-5))
    run = RunDir.create(tmp_path_factory.mktemp("acct") / "r")
    run.write_config(cfg.to_yaml())
    train(cfg, run, log=lambda s: None)
    return load_run(run.path)


def test_parameter_level_prediction_tracks_measured_entropy_change(accounted_run):
    """Pearson over the 50 steps; thresholds well below what first order gives at lr 1e-5.

    Measured over ENTCLIP_TEST_SEED 0-7: pred_param 0.999-1.000, pred_dz 0.998-1.000, signs 100%.
    At lr 5e-5 the same seeds gave pred_param 0.92-0.996 and pred_dz 0.91-0.994 (one seed near
    the 0.9 bound), at lr 1e-4 lower still: Adam's first, bias-corrected updates move every parameter
    by about lr whatever its gradient, a step where first order visibly misses; the miss shrinks
    with lr, the data only picks where it starts to show.
    """
    rows = accounted_run.metrics
    measured = [r["entropy/measured"] for r in rows]
    assert pearson([r["entropy/pred_param"] for r in rows], measured) >= 0.9
    assert pearson([r["entropy/pred_dz"] for r in rows], measured) >= 0.8
    sign = sum((r["entropy/pred_param"] > 0) == (m > 0) for r, m in zip(rows, measured)) / len(rows)
    assert sign >= 0.85


def test_accounting_rows_are_complete_and_consistent(accounted_run):
    for r in accounted_run.metrics:
        assert all(math.isfinite(r[k]) for k in ("entropy/pred_logit", "entropy/pred_logit_drive"))
        assert math.isclose(r["entropy/mean_after"] - r["entropy/mean"], r["entropy/measured"], abs_tol=1e-5)
        # The quadrants split the same per-token contributions pred_logit sums (A = 0 adds 0).
        preds = sum(r[f"quad/{q}_pred"] for q in ("pos_devpos", "pos_devneg", "neg_devpos", "neg_devneg"))
        assert math.isclose(preds, r["entropy/pred_logit"], rel_tol=1e-4, abs_tol=1e-12)
        assert r["perf/accounting_s"] > 0


def test_accounting_can_be_turned_off_and_thinned(tmp_path):
    cfg = resolve(sets=tiny_sets(steps=2, entropy_accounting="false"))
    run = RunDir.create(tmp_path / "off")
    run.write_config(cfg.to_yaml())
    train(cfg, run, log=lambda s: None)
    rows = [r for r in _metric_rows(run.path)]
    assert rows and all("entropy/measured" not in r for r in rows)
    cfg = resolve(sets=tiny_sets(steps=2, accounting_every=2))
    run = RunDir.create(tmp_path / "thin")
    run.write_config(cfg.to_yaml())
    train(cfg, run, log=lambda s: None)
    rows = _metric_rows(run.path)
    assert "entropy/measured" not in rows[0] and "entropy/measured" in rows[1]


def _hand_account(per_update=True):
    """theta_0 = (1, 2), g_0 = (0.5, -1), Hbar(theta_0) = 0.7 over 4 tokens of one (1, 2) sequence."""
    return StepAccount(params=[torch.tensor([1.0, 2.0])], grad_h=[torch.tensor([0.5, -1.0])], logits=None,
                       h_old=0.7, n_valid=4.0, shape=(1, 2), per_update=per_update)


def _finish(acct):
    zeros = torch.zeros(1, 2)
    stats = type("S", (), {"disc": zeros, "baseline": zeros})()
    return {k: m.value for k, m in acct.finish(acct.last_logits, acct.h_u, [], stats, zeros, torch.ones(1, 2),
                                               1.0).items()}


def test_each_update_is_accounted_at_its_own_start_and_by_the_trapezoid():
    acct = _hand_account()
    g1 = torch.tensor([0.3, -0.5])
    acct.record(0.68, [g1], [torch.tensor([1.1, 1.9])], None)  # d = (0.1, -0.1)
    g1.zero_()  # the engine passes the live .grad: the account must hold its own copy
    acct.record(0.69, [torch.tensor([0.1, 0.2])], [torch.tensor([1.0, 2.0])], None)  # d = (-0.1, 0.1)
    out = _finish(acct)
    # update 1: g_0.d = 0.15, g_1.d = 0.08 -> trapezoid 0.115; update 2: g_1.d = -0.08, g_2.d = 0.01 -> -0.035
    assert out["entropy/pred_param_upd"] == pytest.approx(0.15 - 0.08)
    assert out["entropy/pred_param2"] == pytest.approx(0.115 - 0.035)
    assert out["entropy/order_gap"] == pytest.approx(0.01)
    assert out["entropy/pred_param"] == pytest.approx(0.0, abs=1e-7)  # g_0 . (theta_2 - theta_0), theta_2 = theta_0
    assert out["entropy/measured"] == pytest.approx(0.69 - 0.7)
    assert out["entropy/updates_accounted"] == 2


def test_effective_learning_rate_is_the_optimizer_step_projected_on_the_loss_gradient():
    acct = _hand_account()
    g = torch.tensor([2.0, -4.0])
    acct.drive = torch.tensor([[0.01, 0.03]])  # Theorem 3.3 drive of the first update's tokens
    acct.update_taken([torch.tensor([1.0, 2.0]) - 0.05 * g], [g])  # plain gradient descent at 0.05
    acct.record(0.7, [torch.zeros(2)], [torch.tensor([1.0, 2.0]) - 0.05 * g], None)
    acct.drive = torch.tensor([[0.02, 0.03]])  # the second update adds 0.01
    theta = acct.params[0].clone()
    acct.update_taken([theta + torch.tensor([0.3, 0.0])], [torch.tensor([-1.0, 1.0])])  # eta = 0.3 / 2
    out = _finish(acct)
    assert out["entropy/pred_logit_eff"] == pytest.approx(0.05 * 0.04 + 0.15 * 0.01)


def test_update_and_step_units_train_alike_and_agree_on_the_whole_step(tmp_path):
    rows = {}
    for unit in ("update", "step"):
        cfg = resolve(sets=tiny_sets(steps=3, accounting_unit=unit, eval_every=0))
        run = RunDir.create(tmp_path / unit)
        run.write_config(cfg.to_yaml())
        train(cfg, run, log=lambda s: None)
        rows[unit] = _metric_rows(run.path)
    for upd, stp in zip(rows["update"], rows["step"]):
        for key in ("reward/mean", "entropy/mean", "loss/total", "grad/norm"):  # the accounting never steers
            assert upd[key] == stp[key], key
        assert upd["entropy/pred_param"] == pytest.approx(stp["entropy/pred_param"], rel=1e-4, abs=1e-9)
        assert upd["entropy/measured"] == pytest.approx(stp["entropy/measured"], abs=1e-6)
        assert upd["entropy/pred_dz"] == pytest.approx(stp["entropy/pred_dz"], rel=1e-4, abs=1e-9)
        assert upd["entropy/updates_accounted"] == 2  # minibatches=2, epochs=1
        assert "entropy/pred_param2" not in stp


@pytest.fixture(scope="module")
def large_step_run(tmp_path_factory):
    """30 steps of 8 x 8 at AdamW lr 3e-4 on the tiny model: updates where first order visibly misses."""
    cfg = resolve(sets=tiny_sets(steps=30, prompts_per_step=8, group_size=8, eval_every=0, lr=3e-4))
    run = RunDir.create(tmp_path_factory.mktemp("acct-large") / "r")
    run.write_config(cfg.to_yaml())
    train(cfg, run, log=lambda s: None)
    return load_run(run.path)


def test_second_order_prediction_tracks_large_steps_better_than_first_order(large_step_run):
    rows = large_step_run.metrics
    measured = [r["entropy/measured"] for r in rows]
    err = {k: sum((r[k] - m) ** 2 for r, m in zip(rows, measured))
           for k in ("entropy/pred_param", "entropy/pred_param_upd", "entropy/pred_param2")}
    assert err["entropy/pred_param2"] < 0.5 * err["entropy/pred_param_upd"]
    assert err["entropy/pred_param_upd"] < err["entropy/pred_param"]  # per update beats the whole step
    assert pearson([r["entropy/pred_param2"] for r in rows], measured) >= 0.95


def _metric_rows(path):
    import json

    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
