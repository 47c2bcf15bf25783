"""`entclip train` under `accelerate launch` with 2 CPU processes (gloo): every run of a sweep is
created once, by the main process, and a refusal stops every process with the same line.

Before runs.start_run, a sweep created each run directory on every process: the second process found
the first's config.yaml and stopped with exit 4 (or, with --overwrite, removed it).
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

from conftest import TEST_SEED, tiny_sets


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    launcher = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    assert launcher, "accelerate's launcher is installed with entclip"
    cmd = [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           "-m", "entclip", *args]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def _sets(**overrides) -> list[str]:
    return [a for item in tiny_sets(**overrides) if not item.startswith("seed=") for a in ("--set", item)]


def _errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


@pytest.mark.slow
def test_a_two_process_sweep_creates_and_trains_each_run_once(tmp_path):
    from entclip.contracts.config import resolve
    from entclip.data.models import load_policy

    sets = tiny_sets(steps=1, eval_every=0, eval_n=4)
    # The warm start first, in one process: two processes that find the cache cold both build it.
    load_policy(resolve(sets=sets), lambda s: None)
    res = _launch("train", "-q", "--presets", "none,clip-b-active", "--seeds", str(TEST_SEED), "--out-dir",
                  str(tmp_path), "--name", "g", *_sets(steps=1, eval_every=0, eval_n=4))
    assert res.returncode == 0, res.stderr[-3000:]
    group = tmp_path / "g"
    assert res.stdout.strip().splitlines() == [str(group)]  # the main process reports, once
    names = [f"clip-b-active-s{TEST_SEED}", f"none-s{TEST_SEED}"]
    assert sorted(p.name for p in group.iterdir()) == names
    for name in names:
        run = group / name
        assert f"seed: {TEST_SEED}" in (run / "config.yaml").read_text()
        assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1]
        assert json.loads((run / "summary.json").read_text())["status"] == "completed"


@pytest.mark.slow
@pytest.mark.parametrize("command", ["sweep", "train"])
def test_a_refusal_on_the_main_process_stops_both_processes(tmp_path, command):
    taken = tmp_path / "g" / "none-s1"
    taken.mkdir(parents=True)
    (taken / "config.yaml").write_text("seed: 1\n")
    (taken / "metrics.jsonl").write_text('{"step": 1}\n')
    args = (["--seeds", "0,1", "--out-dir", str(tmp_path), "--name", "g"] if command == "sweep"
            else ["--seed", "1", "--out-dir", str(tmp_path / "g"), "--name", "none-s1"])
    res = _launch("train", *args, *_sets(), timeout=300)  # a process left waiting would hang here
    assert res.returncode != 0  # the launcher's own code: the processes exited 4
    lines = _errors(res.stderr)
    assert len(lines) == 2 and lines[0] == lines[1] and "--overwrite" in lines[0], res.stderr[-3000:]
    assert "entclip/cli/" not in res.stderr  # no traceback from entclip's processes (the launcher has its own)
    assert sorted(p.name for p in (tmp_path / "g").iterdir()) == ["none-s1"]
    assert sorted(p.name for p in taken.iterdir()) == ["config.yaml", "metrics.jsonl"]
