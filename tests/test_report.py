"""analyze's statistics on hand-made series."""

from __future__ import annotations

import json
import math

import pytest
from typer.testing import CliRunner

from entclip.reports import gates
from entclip.cli import app
from entclip.contracts.errors import GATE, EntclipError
from entclip.reports.analyze import calibration, pearson, summarize
from entclip.contracts.rundir import LoadedRun, load_run


def test_calibration_of_a_scaled_prediction():
    pred = [0.1, -0.2, 0.3, -0.4, 0.5]
    measured = [2 * x for x in pred]
    c = calibration(pred, measured)
    assert math.isclose(c["pearson"], 1.0) and math.isclose(c["spearman"], 1.0)
    assert c["sign_agreement"] == 1.0 and math.isclose(c["slope"], 2.0)


def test_calibration_counts_sign_disagreements_and_ranks_ties():
    c = calibration([1.0, 1.0, -1.0, 2.0], [1.0, -1.0, -2.0, 3.0])
    assert c["sign_agreement"] == 0.75
    assert math.isclose(c["spearman"], pearson([1.5, 1.5, 0.0, 3.0], [2.0, 1.0, 0.0, 3.0]))


def test_pearson_of_constant_series_is_undefined():
    assert pearson([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]) is None
    assert pearson([0.1] * 3, [1.0, 2.0, 3.0]) is None  # its float mean is not exactly 0.1
    assert pearson([1.0, 2.0], [1.0, 2.0]) is None  # below 3 points
    c = calibration([0.3, 0.3, 0.3], [1.0, 2.0, 3.0])
    assert c["pearson"] is None and c["spearman"] is None and c["slope"] is None
    assert calibration([1.0], [2.0])["slope"] is None and calibration([], [])["n"] == 0


def test_calibration_by_hand():
    """x = 1..5, y = 2 4 5 4 5: deviations (-2 -1 0 1 2), (-2 0 1 0 1), so Sxy = 6, Sxx = 10, Syy = 6:
    r = 6 / sqrt(60), slope = 6 / 10. Ranks of y, ties averaged: 0 1.5 3.5 1.5 3.5, whose deviations
    (-2 -0.5 1.5 -0.5 1.5) give Sxy = 7, Syy = 9: Spearman 7 / sqrt(90)."""
    c = calibration([1.0, 2.0, 3.0, 4.0, 5.0], [2.0, 4.0, 5.0, 4.0, 5.0])
    assert math.isclose(c["pearson"], 6 / math.sqrt(60), rel_tol=1e-12)
    assert math.isclose(c["pearson"], 0.7745966692414834, rel_tol=1e-12)
    assert math.isclose(c["slope"], 0.6, rel_tol=1e-12)
    assert math.isclose(c["spearman"], 7 / math.sqrt(90), rel_tol=1e-12)
    assert c["n"] == 5 and c["sign_agreement"] == 1.0
    assert math.isclose(calibration([1.0, 2.0, 3.0], [3.0, 2.0, 1.0])["pearson"], -1.0)


def test_mean_of_nothing_and_of_non_finite_values():
    from entclip.reports.analyze import mean

    assert mean([]) is None and mean([1, 2]) == 1.5 and isinstance(mean([1, 2]), float)
    assert math.isnan(mean([math.inf, -math.inf])) and mean([1.0, math.inf]) == math.inf


def test_summarize_tolerates_missing_keys_and_reports_accounting(tmp_path):
    rows = [{"step": i, "entropy/mean": 1.0 - 0.1 * i, "entropy/measured": -0.1, "entropy/pred_param": -0.09 - 0.001 * i,
             "disc/dev_mean": 0.001, "disc/mean": 0.1} for i in range(1, 6)]
    rows.append({"step": 6})
    out = summarize(LoadedRun(path=tmp_path, config={"steps": 6}, metrics=rows))
    assert out["entropy"]["min"] == 0.5 and out["entropy"]["min_step"] == 5
    assert math.isclose(out["corollary_3_5"]["ratio"], 0.01)
    cal = out["entropy_accounting"]["calibration"]["entropy/pred_param"]
    assert cal["n"] == 5 and cal["sign_agreement"] == 1.0
    assert out["status"] == "incomplete"


# ---- analyze --require: gates for shell scripts ---------------------------------------------
runner = CliRunner()
# Binary-exact values, so means compare exactly: last step 0.25, last 2 steps 0.375, all 4 0.625.
ENTROPY = [1.0, 0.75, 0.5, 0.25]


def _run_dir(path, entropy=ENTROPY, evals=((0, 0.625), (4, 0.375))):
    """A run directory written by hand: entropy/measured only on even steps, as accounting_every=2 logs."""
    path.mkdir()
    (path / "config.yaml").write_text("entropy_control: none\nsteps: 4\n")
    rows = [{"step": i, "entropy/mean": h, "reward/mean": 0.5, **({"entropy/measured": -0.5 * i} if i % 2 == 0 else {})}
            for i, h in enumerate(entropy, 1)]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (path / "eval.jsonl").write_text("".join(json.dumps({"step": s, "test/avg@8": a, "test/pass@8": 1.0}) + "\n"
                                             for s, a in evals))
    return path


def _analyze(run, *args):
    return runner.invoke(app, ["analyze", str(run), *args])


@pytest.mark.parametrize("op,holds", [(">=", True), ("<=", True), (">", False), ("<", False), ("==", True),
                                      ("!=", False)])
def test_each_operator_compares_the_last_step(tmp_path, op, holds):
    (v,) = gates.check(load_run(_run_dir(tmp_path / "r")), [gates.parse(f"entropy/mean {op} 0.25")])
    assert v.value == 0.25 and v.holds is holds and v.where == "step 4"


def test_window_means_the_last_rows_that_carry_the_metric(tmp_path):
    run = load_run(_run_dir(tmp_path / "r"))
    two, everything = gates.check(run, [gates.parse("entropy/mean>=0"), gates.parse("entropy/measured<0")], window=2)
    assert two.value == 0.375 and two.where == "mean of 2 steps 3-4"
    assert everything.value == -1.5 and everything.where == "mean of 2 steps 2-4"  # steps 2 and 4 only
    (longer,) = gates.check(run, [gates.parse("entropy/mean>=0")], window=10)  # fewer rows: says how many
    assert longer.value == 0.625 and longer.where == "mean of 4 steps 1-4"


def test_gates_hold_silently_and_break_with_exit_6_one_line_each(tmp_path):
    run = _run_dir(tmp_path / "r")
    res = _analyze(run, "--quiet", "--require", "entropy/mean>=0.2", "--require", "test/avg@8>=0.25")
    assert res.exit_code == 0 and res.output == ""
    res = _analyze(run, "--quiet", "--require", "entropy/mean>=0.2", "--require", "entropy/mean>=0.3",
                   "--require", "test/avg@8>=0.5")  # the first evaluation (0.625) would hold: the last is read
    assert res.exit_code == GATE == 6 and res.stdout == ""
    assert res.stderr.splitlines() == ["gate failed: entropy/mean = 0.25 (step 4); required >= 0.3",
                                       "gate failed: test/avg@8 = 0.375 (eval at step 4); required >= 0.5"]


def test_a_gate_keeps_the_tables_and_json_carries_the_verdicts(tmp_path):
    run = _run_dir(tmp_path / "r")
    res = _analyze(run, "--require", "entropy/mean>0.25")
    assert res.exit_code == GATE and "entropy first / last / min" in res.stdout
    res = _analyze(run, "--json", "--window", "4", "--require", "entropy/mean>0.25")
    assert res.exit_code == 0 and res.stderr == ""
    (verdict,) = json.loads(res.stdout)["gates"]
    assert verdict == {"condition": "entropy/mean>0.25", "metric": "entropy/mean", "value": 0.625,
                       "source": "metrics", "where": "mean of 4 steps 1-4", "holds": True}


def test_a_null_value_breaks_its_condition(tmp_path):
    run = _run_dir(tmp_path / "r", entropy=[1.0, 0.75, 0.5, None])  # NaN is written as null
    res = _analyze(run, "--quiet", "--require", "entropy/mean>=0")
    assert res.exit_code == GATE and "entropy/mean = non-finite (null) (step 4)" in res.stderr


@pytest.mark.parametrize("args,says", [
    (["--require", "entropy/mean=0.2"], "expected METRIC OP NUMBER with OP one of >=, <=, >, <, ==, !="),
    (["--require", "entropy/mean>=high"], "'high' is not a finite number"),
    (["--require", "entropy/mean>=nan"], "'nan' is not a finite number"),
    (["--require", "entropy/mena>=0.2"], "unknown metric 'entropy/mena'"),
    (["--require", "test/avg@9>=0.2"], "close: test/avg@8"),
    (["--window", "0", "--require", "entropy/mean>=0.2"], "--window 0"),
])
def test_a_bad_condition_is_one_line_exit_2_before_any_table(tmp_path, args, says):
    res = _analyze(_run_dir(tmp_path / "r"), *args)
    assert res.exit_code == 2 and res.stdout == ""
    assert len(res.stderr.strip().splitlines()) == 1 and says in res.stderr, res.stderr


def test_an_unknown_metric_lists_the_close_names(tmp_path):
    with pytest.raises(EntclipError) as err:
        gates.check(load_run(_run_dir(tmp_path / "r")), [gates.parse("entropy/meen>=0.2")])
    assert err.value.exit_code == 2 and "close: entropy/mean, entropy/measured" in str(err.value)


def _gap_run(path, gaps):
    """A hand-written run whose accounted steps have the given second-order parts (order_gap / pred_param2)."""
    path.mkdir()
    (path / "config.yaml").write_text("entropy_control: none\nsteps: 4\n")
    rows = [{"step": i, "entropy/mean": 0.5, "entropy/measured": -0.01 * i, "entropy/pred_param2": -0.01 * i,
             "entropy/pred_param_upd": -0.01 * i * (1 - g), "entropy/order_gap": -0.01 * i * g}
            for i, g in enumerate(gaps, 1)]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_analyze_says_when_updates_leave_the_first_order_regime(tmp_path):
    small = _analyze(_gap_run(tmp_path / "small", [0.01, 0.02, 0.03, 0.5]))
    text = " ".join(small.stdout.split())  # the console wraps long lines
    assert small.exit_code == 0
    assert "median 0.030, above 0.1 on 25%" in text and "first order describes these updates" in text
    large = _analyze(_gap_run(tmp_path / "large", [0.2, 0.3, 0.01, 0.4]), "--json")
    gap = json.loads(large.stdout)["entropy_accounting"]["order_gap"]
    assert gap["median_rel"] == pytest.approx(0.3) and gap["share_above"] == 0.75 and gap["n"] == 4
    assert "leave the first-order regime" in " ".join(_analyze(tmp_path / "large").stdout.split())
    cal = json.loads(large.stdout)["entropy_accounting"]["calibration"]
    assert set(cal) == {"entropy/pred_param_upd", "entropy/pred_param2"}
