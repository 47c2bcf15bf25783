"""Runs that survive: SIGKILL + resume == uninterrupted, Ctrl-C, non-finite updates."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_sets
from entclip.contracts.config import resolve
from entclip.training.loop import train
from entclip.contracts.errors import FAILED, EntclipError
from entclip.contracts.rundir import RunDir, load_run

SETS = tiny_sets(steps=40, save_every=5, eval_every=10, keep_checkpoints=0)


def _cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "entclip", "train", "-q", *args]


def _sets(sets) -> list[str]:
    return [a for s in sets for a in ("--set", s)]


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _start_and_signal(out: Path, name: str, sig: int, after_rows: int) -> tuple[int, str]:
    """Start a training subprocess, send `sig` once metrics.jsonl has `after_rows` rows."""
    proc = subprocess.Popen(_cmd("--out-dir", str(out), "--name", name, *_sets(SETS)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / name / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= after_rows:
            proc.send_signal(sig)
            break
        time.sleep(0.01)
    _, stderr = proc.communicate(timeout=240)
    return proc.returncode, stderr


def _strip(rows):
    return [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in rows]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    subprocess.run(_cmd("--out-dir", str(out), "--name", "ref", *_sets(SETS)), check=True, timeout=300)
    return out / "ref"


def test_sigkill_then_resume_ends_identical_to_an_uninterrupted_run(reference, tmp_path):
    code, _ = _start_and_signal(tmp_path, "killed", signal.SIGKILL, after_rows=12)
    assert code == -signal.SIGKILL, "the run finished before it could be killed"
    subprocess.run(_cmd("--resume", str(tmp_path / "killed")), check=True, timeout=300)
    a = load_file(reference / "checkpoints" / "step_000040" / "model.safetensors")
    b = load_file(tmp_path / "killed" / "checkpoints" / "step_000040" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = _rows(tmp_path / "killed" / "metrics.jsonl")  # parses: no torn line
    assert [r["step"] for r in rows] == list(range(1, 41))  # no duplicate, no gap
    assert _strip(rows) == _strip(_rows(reference / "metrics.jsonl"))
    assert [e["step"] for e in _rows(tmp_path / "killed" / "eval.jsonl")] == [0, 10, 20, 30, 40]
    assert json.loads((tmp_path / "killed" / "summary.json").read_text())["status"] == "completed"


def test_ctrl_c_stops_after_the_step_with_a_checkpoint_and_resume_finishes(reference, tmp_path):
    code, stderr = _start_and_signal(tmp_path, "int", signal.SIGINT, after_rows=6)
    assert code == 130, stderr
    assert "--resume" in stderr and "Traceback" not in stderr
    run = load_run(tmp_path / "int")
    last = run.metrics[-1]["step"]
    assert run.summary["status"] == "interrupted" and run.summary["checkpoint"].endswith(f"step_{last:06d}")
    subprocess.run(_cmd("--resume", str(tmp_path / "int")), check=True, timeout=300)
    rows = _rows(tmp_path / "int" / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 41))
    assert _strip(rows) == _strip(_rows(reference / "metrics.jsonl"))


def test_keep_checkpoints_prunes_older_ones(tmp_path):
    cfg = resolve(sets=tiny_sets(steps=6, save_every=1, keep_checkpoints=2, eval_every=0))
    run = RunDir.create(tmp_path / "r")
    run.write_config(cfg.to_yaml())
    train(cfg, run, log=lambda s: None)
    assert sorted(p.name for p in (tmp_path / "r" / "checkpoints").iterdir()) == ["step_000005", "step_000006"]


def _poison(monkeypatch, bad_calls):
    """Make the update's log-probs NaN on the given call numbers of token_logp (1-based)."""
    from entclip.core import theory

    real, calls = theory.token_logp, {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        out = real(*args, **kwargs)
        return out * float("nan") if bad_calls(calls["n"]) else out

    monkeypatch.setattr(theory, "token_logp", poisoned)


def test_a_non_finite_update_is_skipped_and_counted(tmp_path, monkeypatch):
    cfg = resolve(sets=tiny_sets(steps=3, eval_every=0, minibatches=2))
    _poison(monkeypatch, lambda n: n == 3)  # the first update of step 2
    run = RunDir.create(tmp_path / "r")
    run.write_config(cfg.to_yaml())
    summary = train(cfg, run, log=lambda s: None)
    rows = load_run(run.path).metrics
    assert [r["train/skipped_updates"] for r in rows] == [0, 1, 0]
    assert [r["train/updates"] for r in rows] == [2, 1, 2]
    assert rows[-1]["train/nonfinite_total"] == 1 and summary["status"] == "completed"
    assert all(math.isfinite(r["loss/total"]) for r in rows)


def test_too_many_non_finite_updates_stop_with_a_good_checkpoint(tmp_path, monkeypatch):
    cfg = resolve(sets=tiny_sets(steps=10, eval_every=0, minibatches=2, max_nonfinite=3))
    _poison(monkeypatch, lambda n: n > 4)  # steps 1-2 are fine, everything after is NaN
    run = RunDir.create(tmp_path / "r")
    run.write_config(cfg.to_yaml())
    with pytest.raises(EntclipError) as err:
        train(cfg, run, log=lambda s: None)
    assert err.value.exit_code == FAILED and "3 non-finite updates in a row" in str(err.value)
    loaded = load_run(run.path)
    assert loaded.summary["status"] == "failed" and loaded.summary["checkpoint"].endswith("step_000003")
    weights = load_file(run.path / loaded.summary["checkpoint"] / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_rng_states_round_trip_through_a_weights_only_checkpoint(tmp_path):
    import random

    import numpy as np

    from entclip.training.checkpoints import _rng_state, _set_rng_state

    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    torch.save(_rng_state(), tmp_path / "s.pt")
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(2), random.seed(2), np.random.seed(2)
    _set_rng_state(torch.load(tmp_path / "s.pt", weights_only=True))
    got = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(got[0], expected[0]) and got[1:] == expected[1:]
