"""analyze --plot: the panel set follows what a run logged; the PNG is written atomically or not at all."""

from __future__ import annotations

import json

import matplotlib.pyplot as plt
import pytest
from typer.testing import CliRunner

from conftest import tiny_sets
from entclip.cli import app
from entclip.reports.plots import figure
from entclip.contracts.rundir import load_run

runner = CliRunner()
PNG = b"\x89PNG\r\n\x1a\n"
ACCOUNTED = ["entropy", "reward", "calibration:entropy/pred_param", "calibration:entropy/pred_dz",
             "calibration:entropy/pred_logit", "quadrant shares", "quadrant predictions"]


def _run_dir(path, accounting=True, evals=True, steps=30):
    """pred_param = 2 x measured (Pearson +1, slope 0.5), pred_logit = -measured (Pearson -1), all absent
    without accounting; two eval points with pass@1..8 (only the largest k is drawn)."""
    path.mkdir()
    (path / "config.yaml").write_text(f"entropy_control: clip_b\nentropy_accounting: {str(accounting).lower()}\n")
    rows = []
    for i in range(1, steps + 1):
        row = {"step": i, "entropy/mean": 1.0 - 0.01 * i, "reward/mean": 0.02 * i}
        if accounting:
            measured = (-1) ** i * 0.001 * i
            row |= {"entropy/measured": measured, "entropy/pred_param": 2 * measured,
                    "entropy/pred_dz": measured + 1e-4 * (i % 3), "entropy/pred_logit": -measured,
                    **{f"quad/{q}_{w}": 0.1 for q in ("pos_devpos", "pos_devneg", "neg_devpos", "neg_devneg")
                       for w in ("share", "pred")}}
        rows.append(row)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if evals:
        (path / "eval.jsonl").write_text("".join(json.dumps(
            {"step": s, "test/greedy_acc": 0.5, "test/avg@8": 0.4, "test/pass@1": 0.4, "test/pass@8": 0.9}) + "\n"
            for s in (0, steps)))
    return path


def _figure(run_path):
    fig = figure(load_run(run_path))
    panels = {ax.get_gid(): ax for ax in fig.axes}
    return fig, panels


def test_an_accounted_run_gets_every_panel_with_its_correlation_in_the_title(tmp_path):
    fig, panels = _figure(_run_dir(tmp_path / "r"))
    assert [ax.get_gid() for ax in fig.axes] == ACCOUNTED
    assert "Pearson r = 1.00, slope 0.5," in panels["calibration:entropy/pred_param"].get_title()
    assert "Pearson r = -1.00, slope -1," in panels["calibration:entropy/pred_logit"].get_title()
    assert "n = 30" in panels["calibration:entropy/pred_dz"].get_title()
    ident = [ln for ln in panels["calibration:entropy/pred_param"].get_lines() if ln.get_label() == "identity (y = x)"]
    assert len(ident) == 1 and list(ident[0].get_xdata()) == list(ident[0].get_ydata())
    legend = [t.get_text() for t in panels["reward"].get_legend().get_texts()]
    assert legend == ["reward/mean (train)", "test/greedy_acc (eval)", "test/avg@8 (eval)", "test/pass@8 (eval)"]
    assert all(ax.get_xlabel() and ax.get_ylabel() for ax in fig.axes)
    plt.close(fig)


def test_a_run_without_accounting_or_eval_plots_entropy_and_reward_and_says_why(tmp_path):
    fig, panels = _figure(_run_dir(tmp_path / "r", accounting=False, evals=False))
    assert list(panels) == ["entropy", "reward"]
    note = fig.get_suptitle()
    assert "no entropy accounting (entropy_accounting=false)" in note and "no eval.jsonl" in note
    assert [t.get_text() for t in panels["reward"].get_legend().get_texts()] == ["reward/mean (train)"]
    plt.close(fig)


def test_a_run_with_no_steps_still_draws(tmp_path):
    path = tmp_path / "r"
    path.mkdir()
    (path / "config.yaml").write_text("entropy_control: none\n")
    res = runner.invoke(app, ["analyze", str(path), "--quiet", "--plot", str(tmp_path / "p.png")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "p.png").read_bytes().startswith(PNG)


def test_analyze_plot_writes_a_png_in_place_and_nothing_else(tmp_path):
    out = tmp_path / "pictures" / "run.png"  # a missing folder is created
    res = runner.invoke(app, ["analyze", str(_run_dir(tmp_path / "r")), "--plot", str(out)])
    assert res.exit_code == 0, res.output
    assert out.read_bytes().startswith(PNG) and f"plot: {out}" in res.stdout
    assert [p.name for p in out.parent.iterdir()] == ["run.png"]  # no temporary file left
    res = runner.invoke(app, ["analyze", str(tmp_path / "r"), "--json", "--plot", str(out)])
    assert res.exit_code == 0 and json.loads(res.stdout)["method"] == "clip_b"  # stdout stays JSON


@pytest.mark.parametrize("where,code,says", [
    ("file.txt/run.png", 3, "cannot write there"),  # a folder that is a file
    ("run.gif2", 2, "unknown image format '.gif2'"),
])
def test_a_plot_path_that_cannot_be_written_is_one_line(tmp_path, where, code, says):
    (tmp_path / "file.txt").write_text("not a folder")
    res = runner.invoke(app, ["analyze", str(_run_dir(tmp_path / "r")), "--quiet", "--plot", str(tmp_path / where)])
    assert res.exit_code == code and res.stdout == ""
    assert len(res.stderr.strip().splitlines()) == 1 and says in res.stderr, res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt", "r"]


def test_a_trained_run_has_every_accounting_panel(tmp_path):
    """The key names the engine writes are the ones the plot reads."""
    sets = [a for item in tiny_sets() for a in ("--set", item)]
    res = runner.invoke(app, ["train", "--out-dir", str(tmp_path), "--name", "t", "--quiet", *sets])
    assert res.exit_code == 0, res.output
    fig, panels = _figure(tmp_path / "t")
    assert list(panels) == ACCOUNTED[:2] + ["calibration:entropy/pred_param2"] + ACCOUNTED[2:]  # per-update unit
    assert any("test/avg@4" in t.get_text() for t in panels["reward"].get_legend().get_texts())
    plt.close(fig)
