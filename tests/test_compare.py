"""compare, sweeps (--seeds / --presets) and evaluate on real tiny runs."""

from __future__ import annotations

import csv
import json
import math

import pytest
from typer.testing import CliRunner

from conftest import TEST_SEED, tiny_sets
from entclip.reports import compare as cmp
from entclip.cli import app
from entclip.contracts.rundir import LoadedRun

runner = CliRunner()
S0, S1 = TEST_SEED, TEST_SEED + 1  # the sweep's two seeds, shifted with ENTCLIP_TEST_SEED


def _sets(**overrides) -> list[str]:
    # No --set seed: the sweep's --seeds sets each run's seed (a --set seed would win over it).
    return [a for item in tiny_sets(**overrides) if not item.startswith("seed=") for a in ("--set", item)]


@pytest.fixture(scope="module")
def group(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    res = runner.invoke(app, ["train", "--seeds", f"{S0},{S1}", "--presets", "none,clip-b-active", "--out-dir", str(out),
                              "--name", "g", "-q", *_sets(steps=3)])
    assert res.exit_code == 0, res.output
    return out / "g"


def test_sweep_writes_one_run_per_preset_and_seed(group):
    assert sorted(p.name for p in group.iterdir()) == [f"clip-b-active-s{S0}", f"clip-b-active-s{S1}",
                                                       f"none-s{S0}", f"none-s{S1}"]
    cfg = (group / f"clip-b-active-s{S1}" / "config.yaml").read_text()
    assert f"seed: {S1}" in cfg and "entropy_control: clip_b" in cfg


def test_compare_groups_seeds_by_method_with_mean_and_std(group, tmp_path):
    res = runner.invoke(app, ["compare", str(group), "--json", "--csv", str(tmp_path / "t.csv"),
                              "--plot", str(tmp_path / "p.png")])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    rows = {r["method"]: r for r in data["rows"]}
    assert set(rows) == {"none", "clip-b-active"} and all(r["seeds"] == 2 for r in rows.values())
    assert rows["none"]["eval_pass"]["mean"] is not None and rows["none"]["eval_pass"]["std"] is not None
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    with open(tmp_path / "t.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 2
    md = runner.invoke(app, ["compare", str(group / f"none-s{S0}"), str(group / f"none-s{S1}"), "--markdown"]).output
    assert md.startswith("| method | seeds |") and "| none | 2 |" in md


def test_compare_statistics_on_hand_made_runs(tmp_path):
    def run(name, ent, rew, k=4):
        rows = [{"step": i + 1, "entropy/mean": e, "reward/mean": r, "clip/filter_frac": 0.1, "perf/step_s": 0.5}
                for i, (e, r) in enumerate(zip(ent, rew))]
        evals = [{"step": len(rows), "test/greedy_acc": 0.5, f"test/avg@{k}": 0.4, f"test/pass@{k}": 0.8}]
        return LoadedRun(path=tmp_path / name, config={"eval_k": k}, metrics=rows, evals=evals)

    runs = [run("a-s0", [0.5, 0.3, 0.1], [0.1, 0.2, 0.3]), run("a-s1", [0.5, 0.4, 0.3], [0.1, 0.2, 0.5]),
            run("b-s0", [0.5, 0.5, 0.5], [0.0, 0.0, 0.0])]
    rows = {r["method"]: r for r in cmp.table(runs, collapse=0.2)}
    assert rows["a"]["seeds"] == 2 and math.isclose(rows["a"]["reward_final"]["mean"], 0.4)
    assert math.isclose(rows["a"]["reward_final"]["std"], math.sqrt(0.02))
    assert rows["a"]["collapse_step"]["mean"] == (3 + 4) / 2  # never collapsing counts as steps + 1
    assert math.isclose(rows["b"]["entropy_auc"]["mean"], 0.5)
    top = cmp.best(list(rows.values()))
    assert top["reward_final"] == ["a"] and top["entropy_final"] == ["b"]
    tied = cmp.table([run("c-s0", [0.5] * 3, [0.1] * 3), run("d-s0", [0.5] * 3, [0.1] * 3)])
    assert "reward_final" not in cmp.best(tied)  # all tied: nothing marked


def test_mean_and_sample_std_by_hand():
    """1 2 3 4: mean 2.5, squared deviations 2.25 + 0.25 + 0.25 + 2.25 = 5 over n - 1 = 3."""
    m, s = cmp._mean_std([1.0, 2.0, None, 3.0, 4.0])  # None: a seed without that figure
    assert m == 2.5 and math.isclose(s, math.sqrt(5 / 3), rel_tol=1e-12)
    assert cmp._mean_std([7]) == (7.0, 0.0) and cmp._mean_std([None]) == (None, None)
    assert cmp._mean_std([0.1, 0.1, 0.1])[1] == 0.0
    m, s = cmp._mean_std([1.0, math.nan])  # a NaN literal in a hand-written file: nan, no crash
    assert math.isnan(m) and math.isnan(s)


def test_a_run_without_logged_steps_gives_empty_figures(tmp_path):
    (row,) = cmp.table([LoadedRun(path=tmp_path / "new-s0", config={}, metrics=[])])
    assert row["reward_best"] == {"mean": None, "std": None} and row["collapse_step"]["mean"] == 1


def test_evaluate_a_finished_run(group):
    res = runner.invoke(app, ["evaluate", str(group / f"none-s{S0}"), "--n", "8", "--k", "2", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert data["problems"] == 8 and {"greedy_acc", "avg@2", "pass@1", "pass@2"} <= data.keys()
    # Unbiased pass@1 from 2 samples is c / 2 per problem (c correct): exactly avg@2, in binary too.
    # pass@2 from 2 samples is 1 iff c >= 1: a whole number of the 8 problems.
    assert data["pass@1"] == data["avg@2"]
    assert (8 * data["pass@2"]).is_integer()


def test_evaluate_with_the_runs_step_redraws_its_own_last_evaluation_exactly(group):
    run = group / f"none-s{S0}"
    last = json.loads((run / "eval.jsonl").read_text().splitlines()[-1])
    res = runner.invoke(app, ["evaluate", str(run), "--step", str(last["step"]), "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert {f"test/{k}": v for k, v in data.items() if f"test/{k}" in last} == {k: v for k, v in last.items()
                                                                                  if k != "step"}
    assert data["solved_none@4"] + data["solved_some@4"] + data["solved_all@4"] == pytest.approx(1.0)


@pytest.mark.parametrize("args, code, needle", [
    (["compare", "/nonexistent"], 3, "does not exist"),
    (["train", "--seeds", "x"], 2, "expected integers"),
    (["train", "--seeds", "0,1", "--set", "seed=3"], 2, "would override every seed of --seeds"),
    (["train", "--presets", "nope"], 2, "unknown preset"),
    (["evaluate", "/nonexistent"], 3, "does not exist"),
])
def test_bad_compare_sweep_evaluate_input(args, code, needle):
    res = runner.invoke(app, args)
    assert res.exit_code == code and needle in res.output and len(res.output.strip().splitlines()) == 1
