"""`entclip predict-entropy`: per-token records that re-add to the totals, --apply, Theorem 3.2 mode."""

from __future__ import annotations

import json
import math

import pytest
from typer.testing import CliRunner

from conftest import tiny_sets
from entclip.cli import app

runner = CliRunner()


def _sets(**overrides) -> list[str]:
    return [arg for item in tiny_sets(**overrides) for arg in ("--set", item)]


def test_builtin_task_records_re_add_to_the_reported_total(tmp_path):
    out = tmp_path / "records.jsonl"
    res = runner.invoke(app, ["predict-entropy", "--out", str(out), "--json", "--apply", *_sets()])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == data["totals"]["tokens"]
    assert math.isclose(sum(r["pred"] for r in records), data["totals"]["entropy/pred_logit"],
                        rel_tol=1e-5, abs_tol=1e-15)
    for r in records:
        assert math.isclose(r["deviation"], r["disc"] - r["baseline"], abs_tol=1e-6)
        assert 0 < r["p"] <= 1 and {"token", "context", "advantage", "entropy", "kept"} <= r.keys()
    applied = data["applied"]
    # The step's own accounting of the same update reproduces the prediction (on-policy, ratio 1).
    assert math.isclose(applied["entropy/pred_logit"], data["totals"]["entropy/pred_logit"], rel_tol=1e-3,
                        abs_tol=1e-15)
    assert {"entropy/measured", "entropy/pred_param", "entropy/pred_dz"} <= applied.keys()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("pred")
    res = runner.invoke(app, ["train", "--out-dir", str(out), "--name", "r", "-q", *_sets()])
    assert res.exit_code == 0, res.output
    return out / "r"


def test_works_on_a_run_directory_and_prints_tables(finished_run, tmp_path):
    res = runner.invoke(app, ["predict-entropy", str(finished_run), "--n-prompts", "4", "--top", "3"])
    assert res.exit_code == 0, res.output
    assert "quadrants" in res.output and "tokens that lower entropy most" in res.output


def test_prompts_file_with_answers(finished_run, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "3+4=", "answer": "7"}\n{"prompt": "10+5=", "answer": "15"}\n')
    res = runner.invoke(app, ["predict-entropy", str(finished_run / "checkpoints" / "step_000002"),
                              "--config", str(finished_run / "config.yaml"), "--prompts", str(prompts), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["totals"]["sequences"] == 2 * 4


def test_prompts_from_a_csv_with_named_columns_and_a_missing_column(finished_run, tmp_path):
    prompts = tmp_path / "p.csv"
    prompts.write_text("question,solution\n3+4=,7\n10+5=,15\n1+1=,2\n")
    args = ["predict-entropy", str(finished_run), "--prompts", str(prompts), "--n-prompts", "2", "--json"]
    res = runner.invoke(app, [*args, "--prompt-field", "question", "--answer-field", "solution"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["totals"]["sequences"] == 2 * 4
    res = runner.invoke(app, args)
    assert res.exit_code == 5 and "no column 'prompt'" in res.output


def test_theorem_3_2_mode_for_given_logits():
    res = runner.invoke(app, ["predict-entropy", "--logits", "3,1,0.5,0", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    for row in data["rows"]:  # rewarding a token lowers entropy iff p > exp(-H)
        assert (row["dH_if_rewarded"] < 0) == (row["p"] > data["threshold_p"])


def test_theorem_3_2_mode_at_a_prompt_position(finished_run):
    res = runner.invoke(app, ["predict-entropy", str(finished_run), "--position", "12+5=", "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.output)["rows"]
    assert math.isclose(sum(r["p"] for r in rows), 1.0, rel_tol=1e-6)


def test_the_applied_step_reproduces_a_nonzero_prediction(tmp_path):
    """Every group mixed (tests/mixed_groups.py), so advantages are nonzero and so is the prediction:
    the step's own accounting of the same update must reproduce it (on-policy, ratio 1)."""
    from mixed_groups import mixed_groups

    from entclip.contracts.config import resolve
    from entclip.training.predict import predict
    from entclip.data.tasks.arithmetic import ArithmeticTask

    cfg = resolve(sets=tiny_sets(minibatches=1, epochs=1))
    problems = ArithmeticTask(cfg.max_operand, cfg.n_test).train[:cfg.prompts_per_step]
    pred = predict(cfg, None, problems, apply=True, wrap_sampler=mixed_groups)
    assert pred.totals["reward/mean"] > 0 and pred.totals["entropy/pred_logit"] != 0
    assert math.isclose(pred.applied["entropy/pred_logit"], pred.totals["entropy/pred_logit"], rel_tol=1e-3)
    assert pred.applied["entropy/measured"] != 0
