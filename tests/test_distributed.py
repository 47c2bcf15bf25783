"""Data parallel: `accelerate launch` with 2 CPU processes (gloo) selects the same tokens as 1 process.

Both runs sample the same completions (per-row seeded sampling), so the token filter - whose
statistics are gathered over the whole batch - must drop the same positions of the same sequences,
and the logged figures (rewards, entropy, filter shares, losses, gradient norms) must agree.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import tiny_sets
from entclip.contracts.config import resolve
from entclip.training.loop import train
from entclip.contracts.rundir import RunDir

# Clip_B with the two-sided paper rule and mu = 1 drops tokens whatever was sampled: it keeps a token
# iff |x| <= sigma, x = S* - mean S* and sigma^2 = mean x^2 over the batch, so keeping all would need
# |x| = sigma for every token (S* taking two values, symmetric, in equal counts).
SETS = tiny_sets(steps=2, prompts_per_step=4, group_size=4, minibatches=1, eval_every=0, eval_n=6,
                 entropy_control="clip_b", filter_rule="paper", clip_b_mu=1.0, log_filter=True,
                 samples_per_step=1)


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("dp")
    cfg = resolve(sets=[*SETS, f"out_dir={out}", "name=one"])
    run = RunDir.create(out / "one")
    run.write_config(cfg.to_yaml())
    train(cfg, run, log=lambda s: None)  # also fills the warm-start cache the 2 processes share
    launcher = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    assert launcher, "accelerate's launcher is installed with entclip"
    cmd = [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           "-m", "entclip", "train", "-q", "--out-dir", str(out), "--name", "two",
           *[a for s in SETS for a in ("--set", s)]]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out / "one", out / "two"


def test_two_processes_drop_the_same_tokens_as_one(runs):
    one, two = (_rows(r / "filter.jsonl") for r in runs)
    assert len(one) == len(two) == 2 * 4 * 4  # steps x prompts x samples, every sequence once
    for a, b in zip(one, two):
        assert (a["step"], a["problem"], a["sample"]) == (b["step"], b["problem"], b["sample"])
        assert a["tokens"] == b["tokens"]
        assert a["dropped"] == b["dropped"]
    dropped = sum(len(r["dropped"]) for r in one)
    assert dropped > 0, "the test needs a filter that drops tokens"


def test_two_processes_log_the_same_figures(runs):
    one, two = (_rows(r / "metrics.jsonl") for r in runs)
    assert len(one) == len(two) == 2
    for a, b in zip(one, two):
        keys = {k for k in a if not k.startswith("perf/")}
        assert keys == {k for k in b if not k.startswith("perf/")}
        for k in sorted(keys):
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), k


def test_checkpoints_and_summary_are_written_once(runs):
    _, two = runs
    ckpts = sorted(p.name for p in (two / "checkpoints").iterdir())
    assert ckpts == ["step_000002"]
    summary = json.loads((two / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 2
    assert len(_rows(two / "eval.jsonl")) == 2  # before and after, each once


def test_a_run_killed_on_one_process_resumes_on_two(tmp_path):
    """SIGKILL a 1-process run after a checkpoint, resume it with `accelerate launch` on 2 processes:
    the rows after the checkpoint match an uninterrupted 1-process run's (minibatches=1)."""
    import signal
    import time

    sets = [s for s in SETS if not s.startswith(("steps=", "log_filter="))] + ["steps=3", "save_every=1",
                                                                                "keep_checkpoints=0"]
    cfg = resolve(sets=[*sets, f"out_dir={tmp_path}", "name=whole"])
    run = RunDir.create(tmp_path / "whole")
    run.write_config(cfg.to_yaml())
    train(cfg, run, log=lambda s: None)
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "entclip", "train", "-q", "--out-dir", str(tmp_path),
                             "--name", "killed", *[a for s in sets for a in ("--set", s)]],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (killed / "checkpoints" / "step_000001" / "trainer_state.pt").exists():
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.communicate(timeout=60)
    launcher = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    res = subprocess.run([launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                          "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
                          str(_free_port()), "-m", "entclip", "train", "-q", "--resume", str(killed)],
                         capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    whole, resumed = _rows(tmp_path / "whole" / "metrics.jsonl"), _rows(killed / "metrics.jsonl")
    assert [r["step"] for r in resumed] == [1, 2, 3]
    for a, b in zip(whole, resumed):
        for k in a:
            if not k.startswith("perf/"):
                assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), (a["step"], k)
    assert json.loads((killed / "summary.json").read_text())["status"] == "completed"
