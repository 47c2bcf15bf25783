"""Wall time of the embedded default, end to end: `entclip train` as a subprocess.

    .venv/bin/python benchmarks/default_run.py             # the real default (a few minutes)
    .venv/bin/python benchmarks/default_run.py --quick     # the tests' tiny settings, 2 steps
    .venv/bin/python benchmarks/default_run.py --reps 2    # cold, warm, cold, warm
    .venv/bin/python benchmarks/default_run.py --seeds 0,1,2,3,4 --cold-only   # first runs, per seed

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
import statistics
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


def run_once(cache: Path, out: Path, name: str, sets: list[str], seed: int | None = None) -> dict:
    env = {**os.environ, "ENTCLIP_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "entclip", "train", "--out-dir", str(out), "--name", name, "--quiet"]
    if seed is not None:
        cmd += ["--seed", str(seed)]
    for s in sets:
        cmd += ["--set", s]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"entclip train failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    summary = json.loads((out / name / "summary.json").read_text())
    ws = summary.get("warm_start") or {}
    first, last = summary.get("eval_first") or {}, summary.get("eval_last") or {}
    return {"greedy": (first.get("test/greedy_acc"), last.get("test/greedy_acc")),
            "entropy": ((summary.get("entropy") or {}).get("first"), (summary.get("entropy") or {}).get("last")),
            "wall": wall, "train_wall": summary.get("wall_s", float("nan")),
            "warm_start_s": ws.get("seconds", float("nan")) if not ws.get("cached") else 0.0,
            "cached": ws.get("cached"), "ws_steps": ws.get("steps"), "ws_acc": ws.get("accuracy"),
            "steps": summary.get("steps")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=1, help="cold/warm pairs")
    ap.add_argument("--threads", type=int, default=None, help="--set threads=N (default: entclip's, 1)")
    ap.add_argument("--quick", action="store_true", help="the tests' tiny settings, 2 steps")
    ap.add_argument("--seeds", default=None, help="comma-separated seeds: one cold (and warm) pair each")
    ap.add_argument("--cold-only", action="store_true", help="only the first run (empty cache) of each pair")
    args = ap.parse_args()
    sets = [f"{k}={v}" for k, v in TINY.items()] if args.quick else []
    if args.threads is not None:
        sets.append(f"threads={args.threads}")

    print(f"machine: {machine()}")
    print(f"python {sys.version.split()[0]}; command: {sys.executable} -m entclip train "
          f"{' '.join('--set ' + s for s in sets) or '(no options)'}; threads: "
          f"{args.threads if args.threads is not None else '1 (entclip default)'}")
    kinds = ("cold",) if args.cold_only else ("cold", "warm")
    res: dict[str, list[dict]] = {k: [] for k in kinds}
    seeds = [int(x) for x in args.seeds.split(",")] if args.seeds else [None] * args.reps
    work = Path(tempfile.mkdtemp(prefix="entclip-default-run-"))
    try:
        for r, seed in enumerate(seeds):
            cache = work / f"cache{r}"  # fresh and empty: nothing cached yet
            for kind in kinds:
                res[kind].append(run_once(cache, work / "runs", f"{kind}{r}", sets, seed))
                x = res[kind][-1]
                print(f"  {kind} #{r + 1}{'' if seed is None else f' (seed {seed})'}: {x['wall']:.1f} s "
                      f"(warm start cached: {x['cached']})", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    if args.seeds:  # one row per seed: what a user's first run of that seed costs and shows
        rows = []
        for seed, x in zip(seeds, res["cold"]):
            rows.append([seed, f"{x['ws_steps']}", f"{x['warm_start_s']:.1f}", f"{x['ws_acc']:.3f}",
                         f"{x['train_wall']:.1f}", f"**{x['wall']:.1f}**",
                         f"{x['greedy'][0]:.3f} -> {x['greedy'][1]:.3f}",
                         f"{x['entropy'][0]:.3f} -> {x['entropy'][1]:.3f}"])
        def ms(vals, fmt):
            m = statistics.mean(vals)
            return f"{m:{fmt}} ± {statistics.stdev(vals):{fmt.lstrip('+')}}" if len(vals) > 1 else f"{m:{fmt}}"

        cold = res["cold"]
        rows.append(["mean ± std", ms([x["ws_steps"] for x in cold], ".0f"), ms([x["warm_start_s"] for x in cold], ".1f"),
                     ms([x["ws_acc"] for x in cold], ".3f"), ms([x["train_wall"] for x in cold], ".1f"),
                     ms([x["wall"] for x in cold], ".1f"),
                     f"{ms([x['greedy'][0] for x in cold], '.3f')} -> {ms([x['greedy'][1] for x in cold], '.3f')} "
                     f"(gain {ms([x['greedy'][1] - x['greedy'][0] for x in cold], '+.3f')})",
                     f"{ms([x['entropy'][0] for x in cold], '.3f')} -> {ms([x['entropy'][1] for x in cold], '.3f')}"])
        print()
        table(["seed", "warm-start steps", "warm-start s", "warm-start train acc", "GRPO loop + evals s",
               "first run wall s", "held-out greedy (first -> last)", "entropy (first -> last step)"], rows)

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
