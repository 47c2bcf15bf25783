"""analyze's statistics on hand-made series."""

from __future__ import annotations

import math

from entclip.report import calibration, pearson, summarize
from entclip.rundir import LoadedRun


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
