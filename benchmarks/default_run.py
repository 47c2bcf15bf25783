"""Wall time of the embedded default, end to end: `entclip train` as a subprocess.

    .venv/bin/python benchmarks/default_run.py             # the real default (a few minutes)
    .venv/bin/python benchmarks/default_run.py --quick     # the tests' tiny settings, 2 steps
    .venv/bin/python benchmarks/default_run.py --reps 2    # cold, warm, cold, warm

"Cold": a fresh, empty ENTCLIP_CACHE, so the run first trains the supervised warm start. "Warm":
the same cache again, so the warm start is loaded and training begins at once. The wall time is
the user's: process start, imports, evaluation, checkpoint, everything. Cold runs must come before
their warm run, so repetitions alternate cold/warm pairs rather than shuffle. The thread count is
entclip's own default (threads=1) unless --threads is given.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from _common import machine, median, table  # noqa: E402

TINY = {  # tests/conftest.py TINY
    "max_operand": 19, "n_test": 50, "tiny_hidden": 64, "tiny_layers": 2, "tiny_heads": 2,
    "tiny_ffn": 128, "warmup_max_steps": 300, "warmup_target_acc": 0.3, "warmup_lr": 3e-3,
    "prompts_per_step": 4, "group_size": 4, "minibatches": 2, "steps": 2,
    "eval_n": 8, "eval_k": 4, "eval_every": 1, "log_every": 1,
}


def run_once(cache: Path, out: Path, name: str, sets: list[str]) -> dict:
    env = {**os.environ, "ENTCLIP_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "entclip", "train", "--out-dir", str(out), "--name", name, "--quiet"]
    for s in sets:
        cmd += ["--set", s]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"entclip train failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    summary = json.loads((out / name / "summary.json").read_text())
    ws = summary.get("warm_start") or {}
    return {"wall": wall, "train_wall": summary.get("wall_s", float("nan")),
            "warm_start_s": ws.get("seconds", float("nan")) if not ws.get("cached") else 0.0,
            "cached": ws.get("cached"), "ws_steps": ws.get("steps"), "ws_acc": ws.get("accuracy"),
            "steps": summary.get("steps")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=1, help="cold/warm pairs")
    ap.add_argument("--threads", type=int, default=None, help="--set threads=N (default: entclip's, 1)")
    ap.add_argument("--quick", action="store_true", help="the tests' tiny settings, 2 steps")
    args = ap.parse_args()
    sets = [f"{k}={v}" for k, v in TINY.items()] if args.quick else []
    if args.threads is not None:
        sets.append(f"threads={args.threads}")

    print(f"machine: {machine()}")
    print(f"python {sys.version.split()[0]}; command: {sys.executable} -m entclip train "
          f"{' '.join('--set ' + s for s in sets) or '(no options)'}; threads: "
          f"{args.threads if args.threads is not None else '1 (entclip default)'}")
    res: dict[str, list[dict]] = {"cold": [], "warm": []}
    work = Path(tempfile.mkdtemp(prefix="entclip-default-run-"))
    try:
        for r in range(args.reps):
            cache = work / f"cache{r}"  # fresh and empty: nothing cached yet
            for kind in ("cold", "warm"):
                res[kind].append(run_once(cache, work / "runs", f"{kind}{r}", sets))
                x = res[kind][-1]
                print(f"  {kind} #{r + 1}: {x['wall']:.1f} s (warm start cached: {x['cached']})")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    rows = []
    for kind, xs in res.items():
        wall, loop, ws = (median([x[k] for x in xs]) for k in ("wall", "train_wall", "warm_start_s"))
        x = xs[0]
        rows.append([kind, f"**{wall:.1f}**", f"{ws:.1f}", f"{loop:.1f}", f"{wall - ws - loop:.1f}",
                     f"{x['ws_steps']} steps to {x['ws_acc']:.2f}", x["steps"]])
    print()
    # summary.json's wall_s covers the GRPO loop, its evaluations and the final checkpoint; the
    # rest is process start-up, imports, loading the model and building the trainer.
    table(["cache", "wall s (median)", "warm-start training s", "GRPO loop + evals s (summary wall_s)",
           "rest: start-up, imports, loading s", "warm start", "GRPO steps"], rows)

if __name__ == "__main__":
    main()
