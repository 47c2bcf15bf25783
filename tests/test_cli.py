"""The CLI through Typer's CliRunner: dry runs, bad input, no damage, train -> analyze."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from conftest import TEST_SEED as TINY_SEED, tiny_sets
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
    assert "steps: 7" in res.output and "# plan" in res.output and "clip_v: token filter, clip_v_mu=8.5, clip_v_max_frac=0.0001, filter_rule=released" in res.output
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


# ---- --debug is the app's: `entclip --debug COMMAND ...` ---------------------------------------

def _entclip_commands() -> dict[str, list[str]]:
    import shutil
    import sys
    from pathlib import Path

    script = shutil.which("entclip", path=str(Path(sys.executable).parent))
    assert script, "the console script is installed with entclip"
    return {"python -m entclip": [sys.executable, "-m", "entclip"], "console script": [script]}


@pytest.mark.parametrize("how", ["python -m entclip", "console script"])
def test_debug_on_the_app_shows_the_traceback_and_without_it_one_line(how, tmp_path):
    import subprocess

    cmd = _entclip_commands()[how]
    args = ["train", "--set", "lr=fast", "--out-dir", str(tmp_path)]
    plain = subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=120)
    assert plain.returncode == 2, plain.stderr
    assert plain.stderr.strip().splitlines() == ["error: lr='fast': expected a number; e.g. --set lr=0.0001"]
    assert plain.stdout == ""
    debug = subprocess.run([*cmd, "--debug", *args], capture_output=True, text=True, timeout=120)
    assert debug.returncode == 1
    assert "Traceback (most recent call last)" in debug.stderr
    assert debug.stderr.strip().splitlines()[-1].startswith("entclip.contracts.errors.EntclipError: lr='fast'")
    assert list(tmp_path.iterdir()) == []


def test_debug_raises_every_command_s_errors_and_is_no_longer_a_command_option(tmp_path):
    from entclip.contracts.errors import EntclipError

    for args in (["analyze", str(tmp_path / "none")], ["compare", str(tmp_path / "none")],
                 ["evaluate", str(tmp_path / "none")], ["predict-entropy", "--logits", "1"],
                 ["export-merged", str(tmp_path), str(tmp_path)], ["train", "--seeds", "x"]):
        plain = runner.invoke(app, args)
        assert plain.exit_code in (2, 3, 4) and len(plain.output.strip().splitlines()) == 1, (args, plain.output)
        res = runner.invoke(app, ["--debug", *args])
        assert res.exit_code == 1 and isinstance(res.exception, EntclipError), (args, res.output)
    res = runner.invoke(app, ["--debug", "train", "--dry-run", "--out-dir", str(tmp_path)])
    assert res.exit_code == 0 and "# plan" in res.output
    assert runner.invoke(app, ["train", "--dry-run"]).exit_code == 0  # the last --debug does not linger
    res = runner.invoke(app, ["train", "--debug"])
    assert res.exit_code == 2 and "No such option" in res.output


def test_an_unexpected_failure_is_one_line_pointing_at_the_app_s_debug(tmp_path, monkeypatch):
    import entclip.training.loop

    def broken(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(entclip.training.loop, "train", broken)
    res = runner.invoke(app, ["train", "--out-dir", str(tmp_path), "--name", "r", *_sets()])
    assert res.exit_code == 1
    assert res.output.strip().splitlines() == [
        "error: RuntimeError: disk on fire (rerun as `entclip --debug ...` for the traceback)"]
    assert list(tmp_path.iterdir()) == []  # the run never took a step: nothing is left


# ---- option help comes from the config ----------------------------------------------------------

CONFIG_OPTIONS = {  # command -> {parameter: config key}
    "train": {k: k for k in ("steps", "seed", "lr", "group_size", "entropy_control", "out_dir", "name")},
    "predict-entropy": {k: k for k in ("seed", "lr", "group_size")},
    "evaluate": {"n": "eval_n", "k": "eval_k", "temperature": "eval_temperature"},
}
METHODS = ["none", "clip_b", "clip_v", "sign", "high_entropy", "clip_cov", "kl_cov", "steer"]


def _params(command: str) -> dict:
    from typer.main import get_command

    return {p.name: p for p in get_command(app).commands[command].params}


@pytest.mark.parametrize("command", sorted(CONFIG_OPTIONS))
def test_options_that_set_a_config_key_carry_its_help(command):
    from entclip.contracts.config import FIELDS

    params = _params(command)
    for param, key in CONFIG_OPTIONS[command].items():
        assert params[param].help == FIELDS[key].metadata["help"], (command, param)


def test_entropy_control_help_names_every_method_of_the_config():
    import typing

    from entclip.cli.options import method_choices
    from entclip.contracts.config import Config

    assert list(method_choices()) == METHODS == list(typing.get_args(typing.get_type_hints(Config)["entropy_control"]))
    res = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "200", "TERMINAL_WIDTH": "200"})
    assert res.exit_code == 0
    from entclip.core.registry import method_choices_help

    text = " ".join(res.output.replace("│", " ").split())  # the help box's text, unwrapped
    for method in METHODS:
        assert f"{method} (" in text, method  # each with its few words, from the registry
    assert " ".join(method_choices_help().split()) in text


# ---- one function starts every run: train, sweep and resume -------------------------------------

def _sweep_sets(**overrides) -> list[str]:
    return [a for item in tiny_sets(**overrides) if not item.startswith("seed=") for a in ("--set", item)]


def test_train_sweep_and_resume_all_start_their_runs_through_start_run(tmp_path, monkeypatch):
    import yaml

    from entclip.cli import runs
    from entclip.contracts.config import Config

    calls = []

    def record(cfg, path, *, overwrite=False, resume=False, quiet=False):
        calls.append((path, cfg.seed, overwrite, resume))
        return {}

    monkeypatch.setattr(runs, "start_run", record)
    assert runner.invoke(app, ["train", "-q", "--out-dir", str(tmp_path), "--name", "one", *_sets()]).exit_code == 0
    res = runner.invoke(app, ["train", "-q", "--seeds", "3,4", "--out-dir", str(tmp_path), "--name", "g",
                              "--overwrite", *_sweep_sets()])
    assert res.exit_code == 0, res.output
    old = tmp_path / "old"
    (old / "checkpoints" / "step_000002").mkdir(parents=True)
    (old / "config.yaml").write_text(yaml.safe_dump({**Config().to_dict(), "steps": 5}))
    (old / "checkpoints" / "step_000002" / "entclip_checkpoint.json").write_text('{"step": 2, "format": 1}')
    res = runner.invoke(app, ["train", "-q", "--resume", str(old)])
    assert res.exit_code == 0, res.output
    assert calls == [(tmp_path / "one", TINY_SEED, False, False), (tmp_path / "g" / "none-s3", 3, True, False),
                     (tmp_path / "g" / "none-s4", 4, True, False), (old, 0, False, True)]


@pytest.mark.parametrize("taken", ["run", "foreign"])
def test_a_sweep_into_an_existing_run_directory_is_refused_before_any_run_starts(tmp_path, taken):
    group = tmp_path / "g"
    (group / "none-s1").mkdir(parents=True)
    if taken == "run":
        (group / "none-s1" / "config.yaml").write_text("seed: 1\n")
        (group / "none-s1" / "metrics.jsonl").write_text('{"step": 1}\n')
        args = []
    else:  # --overwrite replaces only entclip runs: a foreign folder is refused with it, too
        (group / "none-s1" / "thesis.tex").write_text("precious")
        args = ["--overwrite"]
    before = {p: p.read_bytes() for p in group.rglob("*") if p.is_file()}
    res = runner.invoke(app, ["train", "--seeds", "0,1", "--out-dir", str(tmp_path), "--name", "g", *args,
                              *_sweep_sets()])
    assert res.exit_code == 4, res.output
    assert "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1, res.output
    assert sorted(p.name for p in group.iterdir()) == ["none-s1"]  # none-s0, the first run, never started
    assert {p: p.read_bytes() for p in group.rglob("*") if p.is_file()} == before
    # The very line `train` prints for the same directory: the same refusal, from the same place.
    one = runner.invoke(app, ["train", "--seed", "1", "--out-dir", str(group), "--name", "none-s1", *args,
                              *_sweep_sets()])
    assert one.exit_code == 4 and one.output == res.output


def test_a_sweep_run_that_fails_before_its_first_step_leaves_nothing(tmp_path, monkeypatch):
    import entclip.training.loop

    started = []

    def broken(cfg, run, **kwargs):
        started.append(run.path.name)
        assert (run.path / "config.yaml").exists()
        raise RuntimeError("no model")

    monkeypatch.setattr(entclip.training.loop, "train", broken)
    res = runner.invoke(app, ["train", "-q", "--seeds", "0,1", "--out-dir", str(tmp_path), "--name", "g",
                              *_sweep_sets()])
    assert res.exit_code == 1 and "RuntimeError: no model" in res.output
    assert started == ["none-s0"]
    assert list((tmp_path / "g").iterdir()) == []
