"""`analyze --plot`: one run in pictures. `figure` builds it, `save` writes it atomically.

Rows: (1) entropy and reward per step, held-out evaluations as points; (2) predicted against measured
entropy change, one panel per prediction the run logged; (3) the four quadrants over the run. Rows
2-3 need entropy accounting; a run without it (or without eval.jsonl) gets a note instead. Every
panel carries a gid naming it, so tests can read the panel set off the Figure.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from entclip.contracts.errors import BAD_CONFIG, NOT_FOUND, EntclipError
from entclip.reports.analyze import QUADS, calibration, mean
from entclip.contracts.rundir import LoadedRun, eval_set_names, write_atomic

# Short panel labels (the analyze table has the long ones, analyze.PREDICTIONS): four panels share a row.
PREDICTIONS = {"entropy/pred_param2": "2nd order, per update",
               "entropy/pred_param": "1st order, parameters",
               "entropy/pred_dz": "1st order, logits",
               "entropy/pred_logit": "paper, logit level"}
QUAD_LABELS = {"pos_devpos": "A>0, dev>0 (lowers H)", "pos_devneg": "A>0, dev<0 (raises H)",
               "neg_devpos": "A<0, dev>0 (raises H)", "neg_devneg": "A<0, dev<0 (lowers H)"}
# Blue for the quadrants that lower entropy, warm for those that raise it; dashed when dev < 0.
QUAD_STYLE = {"pos_devpos": ("tab:blue", "-"), "pos_devneg": ("tab:orange", "--"),
              "neg_devpos": ("tab:red", "-"), "neg_devneg": ("tab:cyan", "--")}
EVAL_COLORS = ["tab:blue", "tab:orange", "tab:red", "tab:brown", "tab:pink", "tab:gray", "tab:olive", "black"]


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in rows
           if isinstance(r.get(key), (int, float)) and isinstance(r.get("step"), int)]
    return [s for s, _ in pts], [v for _, v in pts]


def _moving_mean(ys: list[float], n: int = 10) -> list[float]:
    return [mean(ys[max(0, i - n + 1):i + 1]) for i in range(len(ys))]


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=10, color="0.4", wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])


SMOOTH_FROM = 20  # series this long are drawn faint per step with a bold 10-step moving mean


def _noisy(ax, xs: list[int], ys: list[float], label: str, color: str, style: str = "-") -> None:
    """Per-step values faint, their 10-step moving mean bold (one rollout batch per step is noisy)."""
    if len(ys) >= SMOOTH_FROM:
        ax.plot(xs, ys, color=color, alpha=0.25, linewidth=0.8)
        ax.plot(xs, _moving_mean(ys), color=color, linestyle=style, linewidth=1.6, label=label)
    else:
        ax.plot(xs, ys, color=color, linestyle=style, linewidth=1.4, marker="o", markersize=3, label=label)


def _entropy_panel(ax, m: list[dict[str, Any]]) -> None:
    ax.set_gid("entropy")
    ax.set_title("mean token entropy")
    xs, ys = _series(m, "entropy/mean")
    if not ys:
        return _empty(ax, "no entropy/mean in metrics.jsonl")
    _noisy(ax, xs, ys, "entropy/mean", "tab:purple")
    ax.set_xlabel("step")
    ax.set_ylabel("nats")
    ax.legend(fontsize=8, loc="best")


def _k(key: str) -> int:
    """k of a `<set>/pass@k` key."""
    return int("0" + "".join(filter(str.isdigit, key.rsplit("@", 1)[1])))


def _reward_panel(ax, m: list[dict[str, Any]], evals: list[dict[str, Any]]) -> None:
    ax.set_gid("reward")
    ax.set_title("train reward and held-out evaluation")
    xs, ys = _series(m, "reward/mean")
    if ys:
        _noisy(ax, xs, ys, "reward/mean (train)", "tab:green")
    markers = {"greedy": "s", "avg": "o", "pass": "^"}
    names = eval_set_names(evals[-1]) if evals else []
    for i, name in enumerate(names):
        keys = [k for k in evals[-1] if k.startswith(f"{name}/")]
        passes = sorted((k for k in keys if "/pass@" in k), key=_k)
        shown = [k for k in keys if k.endswith("/greedy_acc") or "/avg@" in k] + passes[-1:]  # largest k only
        for key in shown:
            ex, ey = _series(evals, key)
            figure = key.split("/", 1)[1]
            kind = figure.split("@")[0].split("_")[0]
            # one set: a color per figure; several: a color per set, a marker per figure
            color = EVAL_COLORS[(list(markers).index(kind) if len(names) == 1 else i) % len(EVAL_COLORS)]
            ax.plot(ex, ey, linestyle=":", linewidth=1, marker=markers[kind], markersize=6, color=color,
                    label=f"{key} (eval)")
    if not ys and not names:
        return _empty(ax, "no reward/mean and no eval.jsonl")
    if not names:
        ax.text(0.98, 0.02, "no evaluation in this run (eval.jsonl)", ha="right", va="bottom",
                transform=ax.transAxes, fontsize=8, color="0.4")
    ax.set_xlabel("step")
    ax.set_ylabel("reward (train) / accuracy (eval)")
    ax.legend(fontsize=7, loc="best")


def _calibration_panel(ax, m: list[dict[str, Any]], key: str) -> None:
    ax.set_gid(f"calibration:{key}")
    pairs = [(r[key], r["entropy/measured"]) for r in m
             if isinstance(r.get(key), (int, float)) and isinstance(r.get("entropy/measured"), (int, float))]
    xs, ys = [p for p, _ in pairs], [y for _, y in pairs]
    c = calibration(xs, ys)
    r = "undefined" if c["pearson"] is None else f"{c['pearson']:.2f}"
    slope = "" if c["slope"] is None else f", slope {c['slope']:.2g}"
    ax.set_title(f"{key.split('/')[1]}: {PREDICTIONS[key]}\nPearson r = {r}{slope}, n = {c['n']}", fontsize=9)
    ax.scatter(xs, ys, s=9, alpha=0.6, color="tab:blue", label="one step")
    lo, hi = max(min(xs), min(ys)), min(max(xs), max(ys))  # y = x where it lies inside both ranges
    if lo < hi:
        ax.plot([lo, hi], [lo, hi], color="0.2", linestyle="--", linewidth=1, label="identity (y = x)")
    else:
        ax.text(0.98, 0.02, "identity y = x outside these ranges", ha="right", va="bottom",
                transform=ax.transAxes, fontsize=8, color="0.4")
    ax.axhline(0, color="0.8", linewidth=0.6, zorder=0)
    ax.axvline(0, color="0.8", linewidth=0.6, zorder=0)
    ax.set_xlabel("predicted dH per step (nats)")
    ax.set_ylabel("measured dH per step (nats)")
    ax.ticklabel_format(style="sci", scilimits=(-2, 3))
    ax.legend(fontsize=7, loc="upper left")


def _quadrant_panels(ax_share, ax_pred, m: list[dict[str, Any]]) -> None:
    ax_share.set_gid("quadrant shares")
    ax_share.set_title("quadrants: share of response tokens")
    ax_pred.set_gid("quadrant predictions")
    ax_pred.set_title("quadrants: predicted entropy change, summed over steps (logit level)")
    for q in QUADS:
        color, style = QUAD_STYLE[q]
        xs, ys = _series(m, f"quad/{q}_share")
        if ys:
            _noisy(ax_share, xs, ys, QUAD_LABELS[q], color, style)
        xs, ys = _series(m, f"quad/{q}_pred")
        if ys:
            total = [sum(ys[:i + 1]) for i in range(len(ys))]
            ax_pred.plot(xs, total, color=color, linestyle=style, linewidth=1.6, label=QUAD_LABELS[q])
    ax_pred.axhline(0, color="0.6", linewidth=0.6)
    for ax, unit in [(ax_share, "share of tokens (0-1)"), (ax_pred, "cumulative predicted dH (nats)")]:
        ax.set_xlabel("step")
        ax.set_ylabel(unit)
        ax.legend(fontsize=7, loc="best")


def figure(run: LoadedRun):
    """The Figure for one run (matplotlib, Agg). Panels present depend on what the run logged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = run.metrics
    preds = [k for k in PREDICTIONS if any(isinstance(r.get(k), (int, float))
                                           and isinstance(r.get("entropy/measured"), (int, float)) for r in m)]
    quads = any(f"quad/{q}_share" in r for r in m for q in QUADS)
    rows = 1 + bool(preds) + quads
    fig = plt.figure(figsize=(13, 4.2 * rows + 0.6), layout="constrained")
    grid = fig.add_gridspec(rows, 12)
    _entropy_panel(fig.add_subplot(grid[0, :6]), m)
    _reward_panel(fig.add_subplot(grid[0, 6:]), m, run.evals)
    row = 1
    if preds:
        width = 12 // len(preds)
        for i, key in enumerate(preds):
            _calibration_panel(fig.add_subplot(grid[row, i * width:(i + 1) * width]), m, key)
        row += 1
    if quads:
        _quadrant_panels(fig.add_subplot(grid[row, :6]), fig.add_subplot(grid[row, 6:]), m)
    notes = ["bold lines: 10-step moving mean, faint: per step"] if len(m) >= SMOOTH_FROM else []
    if not preds and not quads:
        off = run.config.get("entropy_accounting") is False
        notes.append("no entropy accounting" + (" (entropy_accounting=false)" if off else "")
                     + ": calibration and quadrant panels skipped")
    if not run.evals:
        notes.append("no eval.jsonl")
    method = run.config.get("entropy_control", "none")
    from matplotlib.ticker import MaxNLocator

    for ax in fig.axes:  # steps are whole numbers
        if ax.get_xlabel() == "step":
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(f"{run.path}  (method {method}, {len(m)} steps)" + (f"\n{'; '.join(notes)}" if notes else ""),
                 fontsize=11)
    return fig


def image_format(path: Path) -> str:
    """The format the suffix names (no suffix: png); an unknown one is a usage error."""
    from matplotlib.backend_bases import FigureCanvasBase

    fmt = path.suffix.lstrip(".").lower() or "png"
    if fmt not in FigureCanvasBase.get_supported_filetypes():
        raise EntclipError(f"--plot {path}: unknown image format {path.suffix!r}; end the name in .png "
                           "(or .pdf, .svg)", BAD_CONFIG)
    return fmt


def save(fig, path: Path) -> None:
    """Write the figure atomically (temporary name, then rename); the format follows the suffix."""
    buf = io.BytesIO()
    fig.savefig(buf, format=image_format(path), dpi=110)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, buf.getvalue())
    except OSError as exc:
        raise EntclipError(f"--plot {path}: cannot write there ({exc.strerror or type(exc).__name__}); "
                           "choose a writable path, e.g. --plot analyze.png", NOT_FOUND) from None


def plot(run: LoadedRun, path: Path) -> list[str]:
    """Draw `run` into `path`; returns the panels drawn (their gids), in order."""
    import matplotlib.pyplot as plt

    fig = figure(run)
    try:
        save(fig, path)
        return [ax.get_gid() for ax in fig.axes]
    finally:
        plt.close(fig)
