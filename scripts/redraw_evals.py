"""Redraw the first and last held-out evaluations of finished runs, with every figure entclip now logs.

    python scripts/redraw_evals.py runs/repro-arith/*-s*

For runs made before eval.jsonl carried the pass-rate distribution (solved_none/some/all@k): each
run's start model (its warm start) and last checkpoint are evaluated with the seeds of the run's own
evaluation at those steps (`entclip evaluate --step`), so avg@k and pass@k come out exactly as in
eval.jsonl and the distribution is added. Writes RUN/eval_redrawn.jsonl (two rows); runs that have
it already are skipped. scripts/runs_table.py reads it where eval.jsonl lacks the keys.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def redraw(run: Path) -> None:
    out = run / "eval_redrawn.jsonl"
    if out.exists():
        return
    summary = json.loads((run / "summary.json").read_text())
    last = [json.loads(x) for x in (run / "eval.jsonl").read_text().splitlines() if x.strip()][-1]["step"]
    start = summary["warm_start"]["path"]
    rows = []
    for step, model in ((0, start), (last, str(run))):
        cmd = ["entclip", "evaluate", model, "--config", str(run / "config.yaml"), "--step", str(step), "--json"]
        res = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
        rows.append({"step": step, **{f"test/{k}": v for k, v in res.items()
                                       if k not in ("model", "k", "temperature", "problems")}})
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"{run}: {rows[0]['test/avg@8']:.4f} -> {rows[1]['test/avg@8']:.4f}", flush=True)


if __name__ == "__main__":
    for path in sys.argv[1:]:
        redraw(Path(path))
