"""Markdown tables of finished run directories (the README's result tables come from here).

    python scripts/runs_table.py runs/readme/none-s* runs/readme/clip_b-*      # methods: mean ± std over seeds
    python scripts/runs_table.py --seeds runs/readme/none-s*                   # one row per run (seed)
    python scripts/runs_table.py --calibration runs/readme/none-s*             # predictions vs measured

Runs are grouped by their name without the `-s<seed>` suffix; every figure is the mean ± sample std
over the group's runs. Columns come from `entclip analyze --json` (entclip.reports.analyze.summarize) and the
run's summary.json; nothing is typed by hand.
"""

from __future__ import annotations

import re
import statistics
import sys
from pathlib import Path

from entclip.reports.analyze import summarize
from entclip.contracts.rundir import load_run


def method_label(cfg: dict) -> str:
    method = cfg.get("entropy_control", "none")
    if method == "clip_b":
        method += f" mu={cfg['clip_b_mu']:g}"
    elif method == "clip_v":
        method += f" mu={cfg['clip_v_mu']:g}" + (f" cap={cfg['clip_v_max_frac']:g}" if cfg.get("clip_v_max_frac") else "")
    elif method == "sign":
        # runs from before sign_statistic existed used the deviation
        stat = "S*" if cfg.get("sign_statistic", "deviation") == "s_star" else "dev"
        method += f" A{'>' if cfg['sign_samples'] == 'pos' else '<'}0 {stat}{'>' if cfg['sign_deviation'] == 'pos' else '<'}0"
    return method


def figures(path: Path) -> dict:
    """The per-run numbers the tables show (and the run's config under "config")."""
    run = load_run(path)
    s = summarize(run)
    cfg, k = run.config, run.config.get("eval_k", 8)
    e, first, last = s["entropy"], s["eval"]["first"], s["eval"]["last"]
    acct = s.get("entropy_accounting", {})
    ws = (run.summary or {}).get("warm_start") or {}
    out = {
        "entropy_first": e["first"], "entropy_last": e["last"],
        "entropy_start10": e["start_mean"], "entropy_end10": e["end_mean"],
        "dh_total": acct.get("measured_total", float("nan")),
        "drop": s["shares_mean"].get("clip/filter_frac", 0.0),
        "min_z_b": s["min_z"]["disc/min_z_b"], "min_z_v": s["min_z"]["disc/min_z_v"],
        "reward_end": s["reward"]["end_mean"],
        "greedy_first": first["test/greedy_acc"], "greedy_last": last["test/greedy_acc"],
        f"avg@{k}": last[f"test/avg@{k}"], f"pass@{k}": last[f"test/pass@{k}"],
        "wall_s": (run.summary or {}).get("wall_s", float("nan")),
        "ws_steps": ws.get("steps", float("nan")), "ws_seconds": ws.get("seconds", float("nan")),
        "ws_acc": ws.get("accuracy", float("nan")),
        "dev_mean": s.get("corollary_3_5", {}).get("dev_mean", float("nan")),
        "disc_mean": s.get("corollary_3_5", {}).get("disc_mean", float("nan")),
        "step_s": s.get("perf", {}).get("step_s_mean", float("nan")),
        "config": cfg,
    }
    for key, cal in acct.get("calibration", {}).items():
        for stat, v in cal.items():
            if stat != "n" and v is not None:
                out[f"{key}:{stat}"] = v
    out["gap_median"] = acct.get("order_gap", {}).get("median_rel")
    return out


def ms(xs: list[float], fmt: str) -> str:
    """mean ± sample std (just the value for one run)."""
    if len(xs) == 1:
        return format(xs[0], fmt)
    return f"{format(statistics.mean(xs), fmt)} ± {format(statistics.stdev(xs), fmt.lstrip('+'))}"


def groups(paths: list[str]) -> dict[str, list[Path]]:
    out: dict[str, list[Path]] = {}
    for p in map(Path, paths):
        out.setdefault(re.sub(r"-s\d+$", "", p.name), []).append(p)
    return out


def table(head: list[str], rows: list[list[str]]) -> None:
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        print("| " + " | ".join(r) + " |")


def methods(paths: list[str]) -> None:
    rows = []
    for name, runs in groups(paths).items():
        f = [figures(p) for p in runs]
        col = lambda key, fmt: ms([x[key] for x in f], fmt)  # noqa: E731
        k = f[0]["config"].get("eval_k", 8)
        rows.append([name, method_label(f[0]["config"]), str(len(runs)),
                     f"{col('entropy_start10', '.3f')} -> {col('entropy_end10', '.3f')}", col("dh_total", "+.2f"),
                     col("drop", ".4f"), f"{col('min_z_b', '.2f')} / {col('min_z_v', '.2f')}",
                     col("reward_end", ".3f"), f"{col('greedy_first', '.3f')} -> {col('greedy_last', '.3f')}",
                     col(f"avg@{k}", ".3f"), col(f"pass@{k}", ".3f")])
    table(["run", "filter", "seeds", "entropy (first -> last 10% of steps)", "sum of measured dH", "drop share",
           "lowest z (B / V)", "train reward (last 10%)", "held-out greedy (first -> last)", "avg@8", "pass@8"], rows)


def seeds(paths: list[str]) -> None:
    rows, all_f = [], []
    for p in map(Path, paths):
        f = figures(p)
        all_f.append(f)
        seed = f["config"].get("seed")
        rows.append([str(seed), f"{f['ws_steps']:.0f}", f"{f['ws_seconds']:.0f}", f"{f['ws_acc']:.3f}",
                     f"{f['wall_s']:.0f}", f"{f['greedy_first']:.3f} -> {f['greedy_last']:.3f}",
                     f"{f['greedy_last'] - f['greedy_first']:+.3f}",
                     f"{f['entropy_first']:.3f} -> {f['entropy_last']:.3f}"])
    col = lambda key, fmt: ms([x[key] for x in all_f], fmt)  # noqa: E731
    gain = ms([x["greedy_last"] - x["greedy_first"] for x in all_f], "+.3f")
    rows.append(["mean ± std", col("ws_steps", ".0f"), col("ws_seconds", ".0f"), col("ws_acc", ".3f"),
                 col("wall_s", ".0f"), f"{col('greedy_first', '.3f')} -> {col('greedy_last', '.3f')}", gain,
                 f"{col('entropy_first', '.3f')} -> {col('entropy_last', '.3f')}"])
    table(["seed", "warm-start steps", "warm-start s", "warm-start train acc", "GRPO wall s",
           "held-out greedy (first -> last)", "gain", "entropy (first -> last step)"], rows)


def calibration(paths: list[str]) -> None:
    """Mean ± std over runs of each prediction's calibration, then every run's Pearson on its own."""
    from entclip.reports.analyze import PREDICTIONS

    f = [figures(Path(p)) for p in paths]
    rows = []
    for key, label in PREDICTIONS.items():
        have = [x for x in f if f"{key}:pearson" in x]
        if have:
            rows.append([label] + [ms([x[f"{key}:{s}"] for x in have], fmt) for s, fmt in
                                   (("pearson", ".3f"), ("spearman", ".3f"), ("sign_agreement", ".2f"),
                                    ("slope", ".2g"))])
    table(["prediction", "Pearson", "Spearman", "sign agreement", "slope"], rows)
    keys = [k for k in PREDICTIONS if any(f"{k}:pearson" in x for x in f)]
    print("\nPearson per run:\n")
    per = [[Path(p).name] + [f"{x[f'{k}:pearson']:.3f}" if x.get(f"{k}:pearson") is not None else "-" for k in keys]
           + [f"{x['gap_median']:.3f}" if x.get("gap_median") is not None else "-"]
           for p, x in zip(paths, f)]
    table(["run"] + [k.split("/")[1] for k in keys] + ["second-order part (median)"], per)
    print(f"\nCorollary 3.5: batch mean of S* - E_p[S] {ms([x['dev_mean'] for x in f], '.1e')}, "
          f"of S* {ms([x['disc_mean'] for x in f], '.3f')}; step time {ms([x['step_s'] for x in f], '.3f')} s")


if __name__ == "__main__":
    args = sys.argv[1:]
    if args and args[0] == "--seeds":
        seeds(args[1:])
    elif args and args[0] == "--calibration":
        calibration(args[1:])
    else:
        methods(args)
