"""Bad input everywhere a user can type: one line naming the fix, its exit code, nothing changed.

Exit codes (entclip.contracts.errors): 2 bad config/arguments, 3 not found / not a run, 4 run exists,
5 unusable data.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from entclip.cli import app
from entclip.contracts.config import Config

runner = CliRunner()


def _run_dir(root: Path, name: str = "run", steps: int = 5, checkpoint: int | None = None) -> Path:
    """A minimal run directory as `train` leaves it (config first, a metrics row, maybe a checkpoint)."""
    run = root / name
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({**Config().to_dict(), "steps": steps}))
    (run / "metrics.jsonl").write_text('{"step": 1, "entropy/mean": 0.5}\n')
    if checkpoint is not None:
        ck = run / "checkpoints" / f"step_{checkpoint:06d}"
        ck.mkdir(parents=True)
        (ck / "entclip_checkpoint.json").write_text('{"step": %d, "format": 1}' % checkpoint)
    return run


def _write(root: Path, name: str, text: str) -> Path:
    path = root / name
    path.write_text(text)
    return path


# (id, setup(tmp) -> args, exit code, text the message must contain)
CASES = [
    ("yaml-malformed", lambda t: ["train", "--config", str(_write(t, "c.yaml", "lr: [1, 2\n"))], 2, "not valid YAML"),
    ("yaml-not-mapping", lambda t: ["train", "--config", str(_write(t, "c.yaml", "- 1\n- 2\n"))], 2, "mapping"),
    ("yaml-unknown-key", lambda t: ["train", "--config", str(_write(t, "c.yaml", "lrr: 1\n"))], 2, "did you mean lr"),
    ("yaml-wrong-type", lambda t: ["train", "--config", str(_write(t, "c.yaml", "steps: many\n"))], 2, "expected an integer"),
    ("config-missing", lambda t: ["train", "--config", str(t / "nope.yaml")], 3, "cannot read"),
    ("preset-unknown", lambda t: ["train", "--preset", "clip-q"], 2, "unknown preset"),
    ("preset-path-missing", lambda t: ["train", "--preset", str(t / "p.yaml")], 3, "cannot read"),
    ("preset-malformed", lambda t: ["train", "--preset", str(_write(t, "p.yaml", "a: : b\n"))], 2, "not valid YAML"),
    ("set-unknown-key", lambda t: ["train", "--set", "grup_size=4"], 2, "did you mean group_size"),
    ("set-no-equals", lambda t: ["train", "--set", "lr"], 2, "expected key=value"),
    ("set-wrong-type", lambda t: ["train", "--set", "lr=fast"], 2, "expected a number"),
    ("set-bool", lambda t: ["train", "--set", "scale_std=maybe"], 2, "true or false"),
    ("set-choice", lambda t: ["train", "--set", "loss_agg=mean"], 2, "choose one of"),
    ("range-group", lambda t: ["train", "--set", "group_size=1"], 2, "group_size=8"),
    ("range-eps", lambda t: ["train", "--set", "eps_low=1.5"], 2, "eps_low"),
    ("range-steps-flag", lambda t: ["train", "--steps", "0"], 2, "steps=0"),
    ("range-negative-lr", lambda t: ["train", "--lr", "-1e-4"], 2, "must be positive"),
    ("batch-arithmetic", lambda t: ["train", "--set", "minibatches=5"], 2, "does not divide"),
    ("paper-band-on-released", lambda t: ["train", "--set", "filter_mu_low=1"], 2, "filter_rule=paper"),
    ("task-test-too-big", lambda t: ["train", "--set", "n_test=9990", "--out-dir", str(t)], 2, "n_test=9990"),
    ("method-choice-flag", lambda t: ["train", "--entropy-control", "clipb"], 2, "choose one of"),
    ("run-exists", lambda t: ["train", "--out-dir", str(t), "--name", _run_dir(t).name], 4, "--overwrite"),
    ("overwrite-foreign", lambda t: ["train", "--out-dir", str(t), "--name", "mine", "--overwrite"], 4,
     "not an entclip run directory"),
    ("out-is-file", lambda t: ["train", "--out-dir", str(t), "--name", _write(t, "afile", "x").name], 4,
     "not a directory"),
    ("resume-missing", lambda t: ["train", "--resume", str(t / "none")], 3, "no such run directory"),
    ("resume-foreign", lambda t: ["train", "--resume", str(t)], 3, "not an entclip run directory"),
    ("resume-no-checkpoint", lambda t: ["train", "--resume", str(_run_dir(t))], 3, "no complete checkpoint"),
    ("resume-finished", lambda t: ["train", "--resume", str(_run_dir(t, steps=2, checkpoint=2))], 2, "already finished"),
    ("resume-with-set", lambda t: ["train", "--resume", str(_run_dir(t, checkpoint=2)), "--set", "lr=1"], 2,
     "own config.yaml"),
    ("analyze-missing", lambda t: ["analyze", str(t / "none")], 3, "does not exist"),
    ("analyze-foreign", lambda t: ["analyze", str(t)], 3, "not an entclip run directory"),
    ("analyze-corrupt-metrics", lambda t: ["analyze", str(_corrupt(_run_dir(t), "metrics.jsonl", "{bad\n{}\n"))], 5,
     "not valid JSON"),
    ("analyze-metrics-not-object", lambda t: ["analyze", str(_corrupt(_run_dir(t), "metrics.jsonl", "[1]\n{}\n"))], 5,
     "not a JSON object"),
    ("analyze-corrupt-config", lambda t: ["analyze", str(_corrupt(_run_dir(t), "config.yaml", "a: [\n"))], 5,
     "not valid YAML"),
    ("predict-model-missing", lambda t: ["predict-entropy", str(t / "model")], 3, "does not exist"),
    ("predict-model-not-a-model", lambda t: ["predict-entropy", str(t)], 3, "neither a run directory"),
    ("predict-run-without-checkpoint", lambda t: ["predict-entropy", str(_run_dir(t, checkpoint=None)) + "/"], 3,
     "no checkpoint"),
    ("predict-logits", lambda t: ["predict-entropy", "--logits", "1,x"], 2, "comma-separated"),
    ("predict-logits-one", lambda t: ["predict-entropy", "--logits", "1"], 2, "at least two"),
    ("predict-prompts-missing", lambda t: ["predict-entropy", "--prompts", str(t / "p.jsonl")], 3, "not found"),
    ("predict-prompts-empty", lambda t: ["predict-entropy", "--prompts", str(_write(t, "p.tsv", ""))], 5, "no prompts"),
    ("predict-prompts-bad-tsv", lambda t: ["predict-entropy", "--prompts", str(_write(t, "p.tsv", "1+1=\n"))], 5,
     "prompt<TAB>answer"),
    ("predict-prompts-missing-field", lambda t: ["predict-entropy", "--prompts",
                                                 str(_write(t, "p.jsonl", '{"question": "1+1=", "answer": "2"}\n'))],
     5, "no column 'prompt'"),
    ("predict-prompts-malformed-json", lambda t: ["predict-entropy", "--prompts", str(_write(t, "p.jsonl", "{oops\n"))],
     5, "line 1 is not valid JSON"),
]


def _corrupt(run: Path, name: str, text: str) -> Path:
    (run / name).write_text(text)
    return run


def _snapshot(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in root.rglob("*")}


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_one_line_its_exit_code_and_changes_nothing(tmp_path, case, monkeypatch):
    _, setup, code, needle = case
    monkeypatch.chdir(tmp_path)  # a default runs/ folder would land here, and be seen
    if case[0] == "overwrite-foreign":
        (tmp_path / "mine").mkdir()
        (tmp_path / "mine" / "notes.txt").write_text("precious")
    args = setup(tmp_path)
    before = _snapshot(tmp_path)
    res = runner.invoke(app, args)
    assert res.exit_code == code, res.output
    assert needle in res.output, res.output
    assert "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1, res.output
    assert _snapshot(tmp_path) == before
