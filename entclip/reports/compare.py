"""compare: runs (or groups of runs) side by side, one row per method, mean +- std over seeds.

A method's label is its run directory name without the `-s<seed>` suffix (and the time stamp of
an unnamed run), so a sweep's `clip-b-active-s0..2` form one row of three seeds.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import statistics
from pathlib import Path
from typing import Any

from entclip.contracts.errors import NOT_FOUND, EntclipError
from entclip.contracts.rundir import CONFIG, LoadedRun, eval_set_names, load_run
from entclip.reports.analyze import mean

_SUFFIX = re.compile(r"-s\d+(-\d{8}-\d{6})?$")

# (key, header, higher is better: True / False / None = no "best")
COLUMNS = [
    ("reward_final", "reward (last 10%)", True),
    ("reward_best", "best reward (10-step mean)", True),
    ("eval_greedy", "held-out greedy", True),
    ("eval_avg", "avg@k", True),
    ("eval_pass", "pass@k", True),
    ("entropy_final", "entropy (last 10%)", True),
    ("entropy_auc", "entropy AUC (mean)", True),
    ("collapse_step", "steps to collapse", True),
    ("filter_frac", "drop share", None),
    ("step_s", "step time (s)", False),
]


def expand(paths: list[Path]) -> list[LoadedRun]:
    """Run directories, and the run directories directly inside each group directory given."""
    runs: list[LoadedRun] = []
    for path in paths:
        if not path.exists():
            raise EntclipError(f"{path} does not exist; give run directories or sweep groups", NOT_FOUND)
        if (path / CONFIG).exists():
            runs.append(load_run(path))
            continue
        children = sorted(p for p in path.iterdir() if (p / CONFIG).exists()) if path.is_dir() else []
        if not children:
            raise EntclipError(f"{path} holds no entclip run (no {CONFIG} in it or its subfolders)", NOT_FOUND)
        runs.extend(load_run(p) for p in children)
    return runs


def label(run: LoadedRun) -> str:
    return _SUFFIX.sub("", run.path.name)


def _series(run: LoadedRun, key: str) -> list[float]:
    return [r[key] for r in run.metrics if isinstance(r.get(key), (int, float))]


def _tail_mean(xs: list[float], frac: float = 0.1) -> float | None:
    if not xs:
        return None
    n = max(1, int(len(xs) * frac))
    return mean(xs[-n:])


def run_figures(run: LoadedRun, collapse: float) -> dict[str, Any]:
    """The per-run numbers behind one compare row."""
    reward, ent = _series(run, "reward/mean"), _series(run, "entropy/mean")
    smooth = [mean(reward[i:i + 10]) for i in range(0, max(len(reward) - 9, 1))]
    ev = run.evals[-1] if run.evals else {}
    k = run.config.get("eval_k", 8)
    main = (eval_set_names(ev) or ["test"])[0]  # the first eval set stands for the run
    below = [r["step"] for r in run.metrics if isinstance(r.get("entropy/mean"), (int, float))
             and r["entropy/mean"] < collapse]
    steps = len(run.metrics)
    return {
        "reward_final": _tail_mean(reward), "reward_best": max(smooth) if reward else None,
        "eval_greedy": ev.get(f"{main}/greedy_acc"), "eval_avg": ev.get(f"{main}/avg@{k}"),
        "eval_pass": ev.get(f"{main}/pass@{k}"), "entropy_final": _tail_mean(ent),
        "entropy_auc": mean(ent),
        # Never below the threshold counts as the run's length + 1 (a lower bound).
        "collapse_step": below[0] if below else steps + 1,
        "filter_frac": _tail_mean(_series(run, "clip/filter_frac"), 1.0),
        "step_s": _tail_mean(_series(run, "perf/step_s"), 1.0),
        "k": k,
    }


def _mean_std(xs: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (n - 1) over seeds; one seed has std 0, none gives None."""
    xs = [x for x in xs if x is not None]
    if not xs:
        return None, None
    if len(xs) == 1:
        return mean(xs), 0.0
    if not all(map(math.isfinite, xs)):  # statistics.stdev cannot take nan or inf
        return mean(xs), math.nan
    return mean(xs), statistics.stdev(xs)


def table(runs: list[LoadedRun], collapse: float = 0.2) -> list[dict[str, Any]]:
    """One row per method label: {"method", "seeds", key: {"mean", "std"} ...}, in first-seen order."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault(label(run), []).append(run_figures(run, collapse))
    rows = []
    for name, figs in groups.items():
        row: dict[str, Any] = {"method": name, "seeds": len(figs), "k": figs[0]["k"]}
        for key, _, _ in COLUMNS:
            m, s = _mean_std([f[key] for f in figs])
            row[key] = {"mean": m, "std": s}
        rows.append(row)
    return rows


def best(rows: list[dict[str, Any]]) -> dict[str, list[str]]:
    """Column key -> the methods with the best mean (all of them on a tie; none if all tie)."""
    out = {}
    for key, _, higher in COLUMNS:
        vals = [(r[key]["mean"], r["method"]) for r in rows if r[key]["mean"] is not None]
        if higher is None or len(vals) < 2:
            continue
        top = (max if higher else min)(v for v, _ in vals)
        winners = [m for v, m in vals if math.isclose(v, top, rel_tol=1e-9, abs_tol=1e-12)]
        if len(winners) < len(vals):
            out[key] = winners
    return out


def _cell(v: dict[str, Any], seeds: int) -> str:
    if v["mean"] is None:
        return "-"
    fmt = "{:.0f}" if abs(v["mean"]) >= 10 else "{:.3f}"
    return fmt.format(v["mean"]) + (f" ± {fmt.format(v['std'])}" if seeds > 1 else "")


def headers(rows: list[dict[str, Any]], collapse: float) -> list[str]:
    k = rows[0]["k"] if rows else "k"
    names = [h.replace("@k", f"@{k}") for _, h, _ in COLUMNS]
    names[COLUMNS.index(("collapse_step", "steps to collapse", True))] = (
        f"first step with entropy < {collapse:g} (steps + 1 = never)")
    return ["method", "seeds", *names]


def markdown(rows: list[dict[str, Any]], collapse: float) -> str:
    top = best(rows)
    lines = ["| " + " | ".join(headers(rows, collapse)) + " |", "|" + "---|" * (len(COLUMNS) + 2)]
    for r in rows:
        cells = [_cell(r[key], r["seeds"]) for key, _, _ in COLUMNS]
        cells = [f"**{c}**" if r["method"] in top.get(key, []) else c for (key, _, _), c in zip(COLUMNS, cells)]
        lines.append("| " + " | ".join([r["method"], str(r["seeds"]), *cells]) + " |")
    return "\n".join(lines)


def to_csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["method", "seeds"] + [f"{key}_{s}" for key, _, _ in COLUMNS for s in ("mean", "std")])
    for r in rows:
        w.writerow([r["method"], r["seeds"]] + [r[key][s] for key, _, _ in COLUMNS for s in ("mean", "std")])
    return buf.getvalue()


def to_json(rows: list[dict[str, Any]]) -> str:
    return json.dumps({"rows": rows, "best": best(rows)}, indent=2)


def render(rows: list[dict[str, Any]], console, collapse: float) -> None:
    from rich.table import Table

    top = best(rows)
    tab = Table(title="entclip compare (mean ± std over seeds; best per column in bold)")
    for i, h in enumerate(headers(rows, collapse)):
        tab.add_column(h, justify="left" if i == 0 else "right")
    for r in rows:
        cells = [_cell(r[key], r["seeds"]) for key, _, _ in COLUMNS]
        cells = [f"[bold green]{c}[/]" if r["method"] in top.get(key, []) else c
                 for (key, _, _), c in zip(COLUMNS, cells)]
        tab.add_row(r["method"], str(r["seeds"]), *cells)
    console.print(tab)


def plot(runs: list[LoadedRun], path: Path) -> None:
    """Entropy and reward per step, one line per method (mean over seeds) with a min-max band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[str, list[LoadedRun]] = {}
    for run in runs:
        groups.setdefault(label(run), []).append(run)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key, title in [(axes[0], "entropy/mean", "mean token entropy, nats (10-step moving mean)"),
                           (axes[1], "reward/mean", "train reward (10-step moving mean)")]:
        for name, members in groups.items():
            series = [_series(r, key) for r in members]
            n = min(len(s) for s in series)
            if n == 0:
                continue
            # Both are means over one rollout batch and noisy step to step: smooth for the eye.
            series = [[mean(s[max(0, i - 9):i + 1]) for i in range(n)] for s in series]
            cols = list(zip(*[s[:n] for s in series]))
            line, = ax.plot(range(1, n + 1), [mean(c) for c in cols], label=f"{name} ({len(members)})",
                            linewidth=1.2)
            if len(members) > 1:
                ax.fill_between(range(1, n + 1), [min(c) for c in cols], [max(c) for c in cols],
                                color=line.get_color(), alpha=0.08)
        ax.set_title(title)
        ax.set_xlabel("step")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    from entclip.reports.plots import save

    save(fig, path)  # atomic, format from the suffix, one-line error for an unwritable path
    plt.close(fig)
