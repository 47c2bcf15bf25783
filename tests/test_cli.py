"""The CLI through Typer's CliRunner: dry runs, bad input, no damage, train -> analyze."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from conftest import tiny_sets
from entclip.cli import app

runner = CliRunner()


def _sets(**overrides) -> list[str]:
    out: list[str] = []
    for item in tiny_sets(**overrides):
        out += ["--set", item]
    return out


def test_dry_run_prints_config_and_plan_and_writes_nothing(tmp_path):
    res = runner.invoke(app, ["train", "--dry-run", "--preset", "clip-v", "--out-dir", str(tmp_path),
                              "--steps", "7", "--set", "lr=3e-5"])
    assert res.exit_code == 0, res.output
    assert "entropy_control: clip_v" in res.output and "lr: 3.0e-05" in res.output
    assert "steps: 7" in res.output and "# plan" in res.output and "clip_v (rule=released, mu=8.5" in res.output
    assert list(tmp_path.iterdir()) == []


def test_train_warns_once_about_a_key_the_method_ignores(tmp_path):
    res = runner.invoke(app, ["train", "--dry-run", "--preset", "clip-b", "--set", "clip_v_mu=3",
                              "--out-dir", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert res.output.count("warning: clip_v_mu=3.0 has no effect with entropy_control=clip_b") == 1


def test_flags_override_config_file_and_set_overrides_flags(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("seed: 1\nsteps: 5\ngroup_size: 4\n")
    res = runner.invoke(app, ["train", "--dry-run", "--config", str(cfg), "--seed", "2",
                              "--group-size", "6", "--set", "group_size=3"])
    assert res.exit_code == 0, res.output
    assert "seed: 2" in res.output and "steps: 5" in res.output and "group_size: 3" in res.output


def test_analyze_refuses_a_foreign_directory(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    res = runner.invoke(app, ["analyze", str(tmp_path)])
    assert res.exit_code == 3 and "not an entclip run directory" in res.output


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli")
    res = runner.invoke(app, ["train", "--out-dir", str(out), "--name", "r", "--quiet",
                              *_sets(entropy_control="clip_b", clip_b_mu=0.5)])
    assert res.exit_code == 0, res.output
    assert res.output.strip() == str(out / "r")
    return out / "r"


def test_train_refuses_to_touch_an_existing_run_without_overwrite(cli_run):
    before = {p: p.read_bytes() for p in cli_run.rglob("*") if p.is_file()}
    res = runner.invoke(app, ["train", "--out-dir", str(cli_run.parent), "--name", "r", *_sets()])
    assert res.exit_code == 4 and "--overwrite" in res.output
    assert {p: p.read_bytes() for p in cli_run.rglob("*") if p.is_file()} == before


def test_overwrite_refuses_a_directory_that_is_not_a_run(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    res = runner.invoke(app, ["train", "--out-dir", str(tmp_path), "--name", "mine", "--overwrite", *_sets()])
    assert res.exit_code == 4
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"


def test_analyze_prints_tables_and_json(cli_run):
    res = runner.invoke(app, ["analyze", str(cli_run)])
    assert res.exit_code == 0, res.output
    assert "entropy first / last / min" in res.output and "held-out evaluation" in res.output
    res = runner.invoke(app, ["analyze", str(cli_run), "--json"])
    data = json.loads(res.output)
    assert data["method"] == "clip_b" and data["steps_logged"] == 2
    assert set(data["entropy"]) >= {"first", "last", "min"}
    assert "clip/filter_frac" in data["shares_mean"] and data["eval"]["last"]["step"] == 2


def test_analyze_skips_a_torn_last_line_and_rejects_a_corrupt_middle(cli_run, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(cli_run, copy)
    metrics = copy / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"step": 3, "reward/me')
    res = runner.invoke(app, ["analyze", str(copy), "--json"])
    assert res.exit_code == 0 and "torn last line" in res.output
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join(["garbage", *lines]) + "\n")
    res = runner.invoke(app, ["analyze", str(copy)])
    assert res.exit_code == 5 and "line 1 is not valid JSON" in res.output
