"""Same code path, same numbers: record a set of runs' metrics, then check that a refactor keeps them.

    python scripts/golden.py record --code /tmp/before --out /tmp/golden-before   # the code to run
    python scripts/golden.py record --code .           --out /tmp/golden-after
    python scripts/golden.py check /tmp/golden-before /tmp/golden-after

`record` trains each case below with the code at `--code` (a checkout; the installed entclip is bypassed)
and keeps its
metrics.jsonl and eval.jsonl. `check` compares them byte for byte after removing the timings
(`perf/*` keys, which differ from run to run), and prints one line per case. On one machine and one
thread the same code gives the same bytes; a different CPU gives a different trajectory (STYLE 14).
The cases cover every method and the update's options (epochs, minibatches, micro-batches, KL,
accounting per update and per step, the adaptive bonus, LoRA, countdown), two of them at full length.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

SHORT = ["--steps", "12", "--set", "eval_every=6", "--set", "eval_n=16", "--set", "accounting_every=1"]
CASES: dict[str, list[str]] = {
    "default": [],
    "clip-v-active": ["--preset", "clip-v-active"],
    "clip-b-paper-epochs": ["--preset", "clip-b-active", "--set", "filter_rule=paper", "--set", "epochs=2",
                            "--set", "minibatches=2", *SHORT],
    "clip-v-adaptive": ["--preset", "clip-v-adaptive", *SHORT],
    "clip-b-adaptive-micro": ["--preset", "clip-b-adaptive", "--set", "micro_batch_size=8", *SHORT],
    "high-entropy-micro": ["--preset", "high-entropy", "--set", "filter_scope=micro", "--set", "minibatches=2",
                           *SHORT],
    "high-entropy-rollout": ["--preset", "high-entropy", "--set", "filter_scope=rollout", *SHORT],
    "clip-cov-micro": ["--preset", "clip-cov", "--set", "filter_scope=micro", *SHORT],
    "clip-cov-rollout": ["--preset", "clip-cov", "--set", "filter_scope=rollout", *SHORT],
    "kl-cov": ["--preset", "kl-cov", *SHORT],
    "steer": ["--preset", "steer", *SHORT],
    "bonus-adaptive": ["--preset", "entropy-bonus", "--set", "entropy_target=1.0", *SHORT],
    "bonus-fixed-kl": ["--preset", "entropy-bonus", "--set", "kl_coef=0.05", "--set", "filter_normalizer=kept",
                       *SHORT],
    "sign": ["--preset", "sign-neg-devneg", *SHORT],
    "clip-higher-dual-step-acct": ["--preset", "clip-higher", "--set", "dual_clip_c=3.0",
                                   "--set", "accounting_unit=step", "--set", "loss_agg=seq-mean-token-mean",
                                   *SHORT],
    "lora": ["--set", "lora_r=4", *SHORT],
    "countdown": ["--preset", "countdown", *SHORT],
}


# An editable install's import hook would find the installed tree before PYTHONPATH, and `-c` puts the
# working directory first: drop both, so that `--code` is the code that runs.
LAUNCH = ("import sys; sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f)]; "
          "sys.path[:] = [p for p in sys.path if p not in ('', '.')]; "
          "sys.argv[0] = 'entclip'; from entclip.cli import main; main()")


def record(code: Path, out: Path, cases: list[str], jobs: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    code = code.resolve()
    presets = code / "entclip" / "presets"
    if not presets.exists():  # a plain checkout: the presets folder maps to entclip.presets on install
        presets.symlink_to(code / "presets", target_is_directory=True)
    env = {**os.environ, "PYTHONPATH": str(code)}

    def one(name: str) -> str:
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, "-c", LAUNCH, "train", "--out-dir", tmp, "--name", name, "-q", *CASES[name]]
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tmp)
            if done.returncode:
                return f"{name}: FAILED (exit {done.returncode}) {done.stderr.strip()[-300:]}"
            for f in ("metrics.jsonl", "eval.jsonl"):
                shutil.copy(Path(tmp, name, f), out / f"{name}.{f}")
        return f"{name}: recorded"

    with ThreadPoolExecutor(jobs) as pool:
        for line in pool.map(one, cases):
            print(line, flush=True)


def _stripped(path: Path) -> list[str]:
    rows = []
    for line in path.read_text().splitlines():
        row = json.loads(line)
        rows.append(json.dumps({k: v for k, v in row.items() if not k.startswith("perf/")}))
    return rows


def check(a: Path, b: Path, cases: list[str]) -> int:
    bad = 0
    for name in cases:
        for f in ("metrics.jsonl", "eval.jsonl"):
            pa, pb = a / f"{name}.{f}", b / f"{name}.{f}"
            if not (pa.exists() and pb.exists()):
                print(f"{name} {f}: missing in {a if not pa.exists() else b}")
                bad += 1
                continue
            ra, rb = _stripped(pa), _stripped(pb)
            if ra == rb:
                print(f"{name} {f}: identical ({len(ra)} rows, timings removed)")
            else:
                bad += 1
                first = next((i for i, (x, y) in enumerate(zip(ra, rb)) if x != y), min(len(ra), len(rb)))
                print(f"{name} {f}: DIFFERENT from row {first} ({len(ra)} vs {len(rb)} rows)")
    return 1 if bad else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("record")
    r.add_argument("--code", type=Path, default=Path("."))
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--jobs", type=int, default=2)
    r.add_argument("--cases", default=",".join(CASES))
    c = sub.add_parser("check")
    c.add_argument("a", type=Path)
    c.add_argument("b", type=Path)
    c.add_argument("--cases", default=",".join(CASES))
    args = ap.parse_args()
    cases = args.cases.split(",")
    unknown = [n for n in cases if n not in CASES]
    if unknown:
        print(f"unknown cases {unknown}; choose from {', '.join(CASES)}", file=sys.stderr)
        return 2
    if args.cmd == "record":
        record(args.code, args.out, cases, args.jobs)
        return 0
    return check(args.a, args.b, cases)


if __name__ == "__main__":
    raise SystemExit(main())
