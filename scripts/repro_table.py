"""The miniature reproduction's tables: each method against GRPO over the same seeds (README).

    python scripts/repro_table.py runs/repro-arith        # a sweep group: <preset>-s<seed> run directories
    python scripts/repro_table.py runs/repro-arith --plot docs/repro-arith.png   # and the paired entropy curves

Prints, in Markdown: (1) mean ± sample std over seeds per method; (2) the paired difference to GRPO
(the `none` runs of the same seeds): its mean and a 95% bootstrap interval over seeds (10,000
resamples of the seeds, fixed RNG), and a verdict per claim of arXiv 2602.03392: entropy kept
higher, avg@k up, pass@k up, the pass-rate distribution moving toward the middle (more problems
with some but not all of k samples right). A verdict is "yes" when the interval lies above 0, "no
(lower)" when below, "unresolved" when it holds 0. The last evaluation is read from eval.jsonl, or
from eval_redrawn.jsonl (scripts/redraw_evals.py) for runs made before eval.jsonl had the
distribution. Nothing is typed by hand.
"""

from __future__ import annotations

import json
import random
import re
import statistics
import sys
from pathlib import Path

from entclip.reports.analyze import summarize
from entclip.contracts.rundir import load_run

RESAMPLES = 10_000


def last_eval(path: Path, k: int) -> dict:
    for name in ("eval.jsonl", "eval_redrawn.jsonl"):
        f = path / name
        if f.exists():
            rows = [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
            if rows and f"test/solved_some@{k}" in rows[-1]:
                return rows[-1]
    rows = [json.loads(x) for x in (path / "eval.jsonl").read_text().splitlines() if x.strip()]
    return rows[-1]


def figures(path: Path) -> dict:
    run = load_run(path)
    s = summarize(run)
    k = run.config.get("eval_k", 8)
    ev = last_eval(path, k)
    return {"entropy": s["entropy"]["end_mean"], "greedy": ev["test/greedy_acc"], "avg": ev[f"test/avg@{k}"],
            "pass": ev[f"test/pass@{k}"], "some": ev.get(f"test/solved_some@{k}", float("nan")),
            "drop": s["shares_mean"].get("clip/filter_frac", 0.0), "k": k}


def ms(xs: list[float], fmt: str = ".3f") -> str:
    return f"{format(statistics.mean(xs), fmt)} ± {format(statistics.stdev(xs), fmt)}" if len(xs) > 1 else format(xs[0], fmt)


def bootstrap(diffs: list[float], rng: random.Random) -> tuple[float, float]:
    means = sorted(statistics.fmean(rng.choices(diffs, k=len(diffs))) for _ in range(RESAMPLES))
    return means[int(0.025 * RESAMPLES)], means[int(0.975 * RESAMPLES) - 1]


def verdict(lo: float, hi: float) -> str:
    return "yes" if lo > 0 else "no (lower)" if hi < 0 else "unresolved"


def main(group: Path) -> None:
    runs: dict[str, dict[int, dict]] = {}
    for path in sorted(group.iterdir()):
        m = re.fullmatch(r"(.+)-s(\d+)", path.name)
        if m and (path / "summary.json").exists():
            runs.setdefault(m.group(1), {})[int(m.group(2))] = figures(path)
    base = runs.pop("none")
    k = next(iter(base.values()))["k"]
    cols = [("entropy", "entropy (last 10%)"), ("greedy", "held-out greedy"), ("avg", f"avg@{k}"),
            ("pass", f"pass@{k}"), ("some", f"some of {k} right"), ("drop", "drop share")]
    print(f"| method | seeds | {' | '.join(c for _, c in cols)} |\n|---|---|{'---|' * len(cols)}")
    for name, by_seed in [("none (GRPO)", base), *sorted(runs.items())]:
        f = list(by_seed.values())
        print(f"| {name} | {len(f)} | " + " | ".join(ms([x[key] for x in f], ".4f" if key == "drop" else ".3f")
                                                     for key, _ in cols) + " |")
    claims = [("entropy", "entropy higher"), ("avg", f"avg@{k} up"), ("pass", f"pass@{k} up"),
              ("some", "toward the middle")]
    print(f"\nPaired with GRPO on the same seeds: mean difference [95% bootstrap interval over seeds], verdict\n")
    print(f"| method | seeds | {' | '.join(c for _, c in claims)} |\n|---|---|{'---|' * len(claims)}")
    rng = random.Random(0)
    for name, by_seed in sorted(runs.items()):
        seeds = sorted(set(by_seed) & set(base))
        cells = []
        for key, _ in claims:
            d = [by_seed[s][key] - base[s][key] for s in seeds]
            lo, hi = bootstrap(d, rng)
            cells.append(f"{statistics.fmean(d):+.3f} [{lo:+.3f}, {hi:+.3f}] {verdict(lo, hi)}")
        print(f"| {name} | {len(seeds)} | " + " | ".join(cells) + " |")


def plot(group: Path, out: Path) -> None:
    """Per method: entropy minus GRPO's on the same seed, per step (10-step moving mean), mean over seeds
    with the seeds' min-max band. Paired differences, because the seeds differ far more than the methods."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def curve(path: Path) -> list[float]:
        h = [r["entropy/mean"] for r in load_run(path).metrics]
        return [statistics.fmean(h[max(0, i - 9):i + 1]) for i in range(len(h))]

    curves: dict[str, dict[int, list[float]]] = {}
    for path in sorted(group.iterdir()):
        m = re.fullmatch(r"(.+)-s(\d+)", path.name)
        if m and (path / "summary.json").exists():
            curves.setdefault(m.group(1), {})[int(m.group(2))] = curve(path)
    base = curves.pop("none")
    fig, ax = plt.subplots(figsize=(11, 5), layout="constrained")
    for name, by_seed in sorted(curves.items()):
        diffs = [[a - b for a, b in zip(by_seed[s], base[s])] for s in sorted(set(by_seed) & set(base))]
        steps = range(1, min(map(len, diffs)) + 1)
        mean = [statistics.fmean(d[i - 1] for d in diffs) for i in steps]
        line, = ax.plot(steps, mean, label=f"{name} ({len(diffs)} seeds)")
        ax.fill_between(steps, [min(d[i - 1] for d in diffs) for i in steps],
                        [max(d[i - 1] for d in diffs) for i in steps], color=line.get_color(), alpha=0.08)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("entropy minus GRPO's on the same seed (nats)")
    ax.set_title(f"{group.name}: mean token entropy against GRPO, paired by seed (10-step moving mean; "
                 "band: min-max over seeds)")
    ax.legend(fontsize=8, ncol=2)
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    if len(sys.argv) == 4 and sys.argv[2] == "--plot":
        plot(Path(sys.argv[1]), Path(sys.argv[3]))
