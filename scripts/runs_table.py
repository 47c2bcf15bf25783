"""Print a Markdown table of finished run directories (the README's result tables come from here).

    python scripts/runs_table.py runs/readme/none runs/readme/clip_b ...

Columns come from `entclip analyze --json` (entclip.report.summarize); nothing is typed by hand.
"""

from __future__ import annotations

import sys
from pathlib import Path

from entclip.report import summarize
from entclip.rundir import load_run


def row(path: Path) -> list[str]:
    s = summarize(load_run(path))
    cfg = load_run(path).config
    method = cfg.get("entropy_control", "none")
    if method == "clip_b":
        method += f" mu={cfg['clip_b_mu']:g}"
    elif method == "clip_v":
        method += f" mu={cfg['clip_v_mu']:g}" + (f" cap={cfg['clip_v_max_frac']:g}" if cfg.get("clip_v_max_frac") else "")
    elif method == "sign":
        method += f" A{'>' if cfg['sign_samples'] == 'pos' else '<'}0 dev{'>' if cfg['sign_deviation'] == 'pos' else '<'}0"
    e, ev = s["entropy"], s["eval"]["last"]
    k = cfg.get("eval_k", 8)
    acct = s.get("entropy_accounting", {})
    return [path.name, method, f"{e['start_mean']:.3f} -> {e['end_mean']:.3f}",
            f"{acct.get('measured_total', float('nan')):+.3f}",
            f"{s['shares_mean'].get('clip/filter_frac', 0):.4f}",
            f"{s['min_z']['disc/min_z_b']:.2f} / {s['min_z']['disc/min_z_v']:.2f}",
            f"{s['reward']['end_mean']:.3f}", f"{ev['test/greedy_acc']:.3f}",
            f"{ev[f'test/avg@{k}']:.3f}", f"{ev[f'test/pass@{k}']:.3f}"]


def main(paths: list[str]) -> None:
    head = ["run", "filter", "entropy (first -> last 10% of steps)", "sum of measured dH", "drop share",
            "lowest z (B / V)", "train reward (last 10%)", "held-out greedy", "avg@8", "pass@8"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for p in paths:
        print("| " + " | ".join(row(Path(p))) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
