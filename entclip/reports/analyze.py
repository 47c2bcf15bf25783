"""analyze: pure summaries of a loaded run -> a dict (for --json) and rich tables."""

from __future__ import annotations

import math
import statistics
from typing import Any

from entclip.contracts.rundir import LoadedRun


def _col(rows: list[dict[str, Any]], key: str) -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]


def mean(xs: list[float]) -> float | None:
    """The arithmetic mean, None for no values. A hand-written metrics file may hold NaN or inf
    (json reads them): where statistics.fmean refuses (inf - inf, a sum past the float range) the
    mean is what plain summation gives, nan or inf."""
    if not xs:
        return None
    try:
        return statistics.fmean(xs)
    except (ValueError, OverflowError):
        return sum(xs) / len(xs)


def _edge_means(series: list[tuple[int, float]], frac: float = 0.1) -> tuple[float | None, float | None]:
    """Means of the first and last `frac` of a series (at least one point): noise-robust start/end."""
    if not series:
        return None, None
    n = max(1, int(len(series) * frac))
    return mean([v for _, v in series[:n]]), mean([v for _, v in series[-n:]])


def _constant(xs: list[float]) -> bool:
    return len(set(xs)) < 2


def pearson(a: list[float], b: list[float]) -> float | None:
    """Pearson's r of two series of the same length; None (undefined) below 3 points or when either
    series is constant."""
    if len(a) < 3 or _constant(a) or _constant(b):
        return None
    try:
        return statistics.correlation(a, b)
    except statistics.StatisticsError:  # a spread so small that its square underflows: as constant
        return None
    except (ValueError, OverflowError):  # inf - inf, a sum past the float range (a hand-written file)
        return math.nan


def _ranks(xs: list[float]) -> list[float]:
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    ranks = [0.0] * len(xs)
    i = 0
    while i < len(order):  # ties share their mean rank
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2
        i = j + 1
    return ranks


def calibration(pred: list[float], measured: list[float]) -> dict[str, Any]:
    """How well a predicted entropy change tracks the measured one across steps.

    pearson / spearman correlation, sign agreement (share of steps with the same sign) and the
    least-squares slope of measured on predicted (1 = calibrated magnitude).
    """
    n = len(pred)
    slope = None  # undefined for a constant or non-finite prediction
    if n >= 2 and not _constant(pred) and all(map(math.isfinite, pred)):
        try:
            slope = statistics.linear_regression(pred, measured).slope
        except statistics.StatisticsError:  # a spread of pred so small that its square underflows
            pass
        except (ValueError, OverflowError):  # inf - inf among the measured values
            slope = math.nan
    return {"n": n, "pearson": pearson(pred, measured), "spearman": pearson(_ranks(pred), _ranks(measured)),
            "sign_agreement": sum((x > 0) == (y > 0) for x, y in zip(pred, measured)) / n if n else None,
            "slope": slope}


QUADS = ("pos_devpos", "pos_devneg", "neg_devpos", "neg_devneg")
# Every prediction of the measured entropy change a run may log (accounting.py), weakest assumption last.
PREDICTIONS = {
    "entropy/pred_logit": "logit level, positions independent (paper)",
    "entropy/pred_logit_eff": "logit level, the optimizer's effective step size",
    "entropy/pred_dz": "first order, measured logit change",
    "entropy/pred_param": "first order, measured parameter change (whole step)",
    "entropy/pred_param_upd": "first order per update, summed",
    "entropy/pred_param2": "second order per update (trapezoid), summed",
}
# A second-order part above this share of the prediction: the updates leave the first-order regime.
REGIME_GAP = 0.1


def _entropy_accounting(m: list[dict[str, Any]], segments: int = 4) -> dict[str, Any]:
    rows = [r for r in m if isinstance(r.get("entropy/measured"), (int, float))]
    if not rows:
        return {}
    measured = [r["entropy/measured"] for r in rows]
    out: dict[str, Any] = {"calibration": {}}
    for key in PREDICTIONS:
        pairs = [(r[key], r["entropy/measured"]) for r in rows if isinstance(r.get(key), (int, float))]
        if pairs:
            out["calibration"][key] = calibration([p for p, _ in pairs], [y for _, y in pairs])
    out["measured_total"] = sum(measured)
    gaps = [(abs(r["entropy/order_gap"]), abs(r["entropy/pred_param2"])) for r in rows
            if isinstance(r.get("entropy/order_gap"), (int, float)) and isinstance(r.get("entropy/pred_param2"), (int, float))]
    if gaps:  # how far the updates are from the first-order regime
        rel = sorted(g / p if p > 0 else 0.0 for g, p in gaps)
        out["order_gap"] = {"n": len(rel), "median_rel": rel[len(rel) // 2],
                            "share_above": sum(x > REGIME_GAP for x in rel) / len(rel), "threshold": REGIME_GAP,
                            "total_rel": sum(g for g, _ in gaps) / max(sum(p for _, p in gaps), 1e-30)}
    quads = []
    size = max(1, -(-len(rows) // segments))
    for i in range(0, len(rows), size):
        seg = rows[i:i + size]
        row = {"steps": f"{seg[0]['step']}-{seg[-1]['step']}"}
        for q in QUADS:
            row[f"{q}_share"] = mean([r.get(f"quad/{q}_share", 0.0) for r in seg])
            row[f"{q}_pred"] = sum(r.get(f"quad/{q}_pred", 0.0) for r in seg)
        quads.append(row)
    out["quadrants"] = quads
    return out


def summarize(run: LoadedRun, points: int = 6) -> dict[str, Any]:
    """Everything `entclip analyze` shows, as plain data. Tolerates missing keys."""
    m = run.metrics
    out: dict[str, Any] = {
        "run": str(run.path), "method": run.config.get("entropy_control", "none"),
        "steps_logged": len(m), "steps_planned": run.config.get("steps"),
        "status": (run.summary or {}).get("status", "incomplete"),
        "wall_s": (run.summary or {}).get("wall_s"), "warnings": run.warnings,
    }
    ent = _col(m, "entropy/mean")
    if ent:
        step_min, v_min = min(ent, key=lambda sv: sv[1])
        out["entropy"] = {"first": ent[0][1], "last": ent[-1][1], "min": v_min, "min_step": step_min,
                          "start_mean": _edge_means(ent)[0], "end_mean": _edge_means(ent)[1]}
    for key, name in [("reward/mean", "reward"), ("reward/accuracy", "accuracy")]:
        start, end = _edge_means(_col(m, key))
        if start is not None:
            out[name] = {"start_mean": start, "end_mean": end}
    shares = {}
    for key in ["clip/ratio_low_frac", "clip/ratio_high_frac", "clip/filter_frac",
                "clip/filter_frac_pos", "clip/filter_frac_neg", "reward/zero_var_frac"]:
        vals = [v for _, v in _col(m, key)]
        if vals:
            shares[key] = mean(vals)
    out["shares_mean"] = shares
    for key in ["disc/min_z_b", "disc/min_z_v"]:
        vals = [v for _, v in _col(m, key)]
        if vals:
            out.setdefault("min_z", {})[key] = min(vals)
    step_s = [v for _, v in _col(m, "perf/step_s")]
    if step_s:
        out["perf"] = {"step_s_mean": mean(step_s)}
    if m:  # an evenly spaced trajectory, first and last step included
        idx = sorted({round(i * (len(m) - 1) / max(points - 1, 1)) for i in range(points)})
        cols = ["reward/mean", "reward/accuracy", "entropy/mean", "clip/filter_frac"]
        out["trajectory"] = [{"step": m[i].get("step"), **{c: m[i].get(c) for c in cols}} for i in idx]
    dev, disc = [v for _, v in _col(m, "disc/dev_mean")], [v for _, v in _col(m, "disc/mean")]
    if dev and disc:  # Corollary 3.5: on-policy the deviation averages to ~0, S* does not
        out["corollary_3_5"] = {"dev_mean": mean(dev), "disc_mean": mean(disc),
                                "ratio": mean(dev) / mean(disc) if mean(disc) else None}
    acct = _entropy_accounting(m)
    if acct:
        out["entropy_accounting"] = acct
    if run.evals:
        out["eval"] = {"first": run.evals[0], "last": run.evals[-1]}
    return out


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 100 else f"{v:.1f}"
    return str(v)


def render(summary: dict[str, Any], console) -> None:
    """Print the analysis as rich tables."""
    from rich.table import Table

    head = Table(title=f"entclip run {summary['run']}", show_header=False)
    head.add_column("what", style="bold")
    head.add_column("value")
    head.add_row("method", summary["method"])
    head.add_row("status", f"{summary['status']} ({summary['steps_logged']}/{_fmt(summary['steps_planned'])} steps)")
    if summary.get("wall_s") is not None:
        head.add_row("wall time", f"{summary['wall_s']:.1f} s")
    if "perf" in summary:
        head.add_row("step time (mean)", f"{summary['perf']['step_s_mean']:.3f} s")
    if "entropy" in summary:
        e = summary["entropy"]
        head.add_row("entropy first / last / min", f"{e['first']:.4f} / {e['last']:.4f} / {e['min']:.4f} "
                     f"(min at step {e['min_step']})")
    for name in ["reward", "accuracy"]:
        if name in summary:
            s = summary[name]
            head.add_row(f"{name} (first -> last 10%)", f"{s['start_mean']:.4f} -> {s['end_mean']:.4f}")
    for key, v in summary.get("shares_mean", {}).items():
        head.add_row(f"{key} (mean)", f"{v:.4f}")
    for key, v in summary.get("min_z", {}).items():
        head.add_row(f"{key} (lowest)", f"{v:.3f}")
    console.print(head)
    if summary.get("trajectory"):
        traj = Table(title="trajectory")
        cols = list(summary["trajectory"][0].keys())
        for c in cols:
            traj.add_column(c, justify="right")
        for row in summary["trajectory"]:
            traj.add_row(*[_fmt(row[c]) for c in cols])
        console.print(traj)
    if summary.get("corollary_3_5"):
        c = summary["corollary_3_5"]
        console.print(f"Corollary 3.5: mean deviation S* - E_p[S] {c['dev_mean']:+.3e} vs mean S* "
                      f"{c['disc_mean']:+.3e} (ratio {_fmt(c['ratio'])})")
    acct = summary.get("entropy_accounting")
    if acct:
        cal = Table(title="entropy change per step: predicted vs measured "
                          f"({acct['calibration'].get('entropy/pred_param', {}).get('n', 0)} accounted steps)")
        for c in ("prediction", "pearson", "spearman", "sign agreement", "slope"):
            cal.add_column(c, justify="left" if c == "prediction" else "right")
        for key, c in acct["calibration"].items():
            cal.add_row(PREDICTIONS[key], _fmt(c["pearson"]), _fmt(c["spearman"]), _fmt(c["sign_agreement"]),
                        f"{c['slope']:.3g}" if c["slope"] is not None else "-")
        console.print(cal)
        gap = acct.get("order_gap")
        if gap:
            verdict = ("[yellow]the updates leave the first-order regime: a first-order theory (the paper's "
                       "included) misses a visible part of each step; lower lr or take smaller updates to "
                       "stay inside it[/yellow]" if gap["median_rel"] > gap["threshold"] else
                       "first order describes these updates: the second-order part is small")
            console.print(f"second-order part of the predicted change (|pred_param2 - pred_param_upd| / "
                          f"|pred_param2|): median {gap['median_rel']:.3f}, above {gap['threshold']:g} on "
                          f"{gap['share_above']:.0%} of the accounted steps; {verdict}")
        quad = Table(title="quadrants over the run: token share / summed logit-level prediction")
        quad.add_column("steps")
        for q in QUADS:
            quad.add_column(q.replace("_", " / "), justify="right")
        for row in acct["quadrants"]:
            quad.add_row(row["steps"], *[f"{row[f'{q}_share']:.3f} / {row[f'{q}_pred']:+.2e}" for q in QUADS])
        console.print(quad)
    if summary.get("eval"):
        ev = Table(title="held-out evaluation")
        first, last = summary["eval"]["first"], summary["eval"]["last"]
        ev.add_column("metric")
        ev.add_column(f"step {first.get('step')}", justify="right")
        ev.add_column(f"step {last.get('step')}", justify="right")
        for key in first:
            if key != "step":
                ev.add_row(key, _fmt(first.get(key)), _fmt(last.get(key)))
        console.print(ev)
    for w in summary.get("warnings", []):
        console.print(f"[yellow]warning:[/yellow] {w}")


def render_prediction(pred, console, top: int = 8) -> None:
    """Tables for `predict-entropy`: totals, quadrants, the tokens that move entropy most."""
    from rich.table import Table

    t = pred.totals
    head = Table(title="what one GRPO step would do to entropy (Theorem 3.3, first order)", show_header=False)
    head.add_column("what", style="bold")
    head.add_column("value")
    direction = "raise" if t["entropy/pred_logit"] > 0 else "lower"
    head.add_row("batch", f"{t['sequences']} sequences, {t['tokens']} response tokens, reward {t['reward/mean']:.3f}")
    head.add_row("mean token entropy", f"{t['entropy/mean']:.5f} nats")
    head.add_row("predicted change (lr {:g})".format(t["lr"]), f"{t['entropy/pred_logit']:+.3e} ({direction})")
    head.add_row("drive (without lr)", f"{t['entropy/pred_logit_drive']:+.4e}")
    head.add_row("Corollary 3.5: mean deviation / mean S*", f"{t['disc/dev_mean']:+.4e} / {t['disc/mean']:+.4e}")
    head.add_row("filter drops", f"{t['clip/filter_frac']:.4f} of tokens")
    console.print(head)
    quad = Table(title="quadrants: advantage sign x deviation (S* - E_p[S]) sign")
    for c in ("quadrant", "token share", "predicted dH", "theory says"):
        quad.add_column(c, justify="right" if c != "quadrant" else "left")
    says = {"pos_devpos": "lowers", "pos_devneg": "raises", "neg_devpos": "raises", "neg_devneg": "lowers"}
    for q, word in says.items():
        quad.add_row(q.replace("_", " / ").replace("dev", "dev "), f"{t[f'quad/{q}_share']:.3f}",
                     f"{t[f'quad/{q}_pred']:+.3e}", word)
    console.print(quad)
    for title, rows in [("tokens that lower entropy most", sorted(pred.records, key=lambda r: r["pred"])[:top]),
                        ("tokens that raise entropy most", sorted(pred.records, key=lambda r: -r["pred"])[:top])]:
        tab = Table(title=title)
        for c in ("context", "token", "p", "H", "S*", "E_p[S]", "A", "predicted dH"):
            tab.add_column(c, justify="left" if c in ("context", "token") else "right")
        for r in rows:
            tab.add_row(f"{r['prompt']}[dim]{r['context']}[/dim]", repr(r["token"]), f"{r['p']:.3f}",
                        f"{r['entropy']:.3f}", f"{r['disc']:+.4f}", f"{r['baseline']:+.4f}",
                        f"{r['advantage']:+.2f}", f"{r['pred']:+.2e}")
        console.print(tab)
    if pred.applied:
        a = pred.applied
        app = Table(title="the step taken (--apply): predicted vs measured change of mean token entropy")
        app.add_column("quantity")
        app.add_column("value", justify="right")
        for key, label in [*PREDICTIONS.items(), ("entropy/measured", "measured")]:
            if key in a:
                app.add_row(label, f"{a[key]:+.4e}")
        console.print(app)
        console.print("[dim]The logit-level figure assumes plain gradient ascent at step lr moving each position "
                      "alone; Adam's normalized steps and shared parameters make a real step larger and "
                      "coupled: read its sign and its correlation over a run, not its size.[/dim]")


def render_distribution(explained: dict, console, labels=None, top: int = 12) -> None:
    """Theorem 3.2 for one distribution: which tokens, if rewarded, raise or lower entropy."""
    from rich.table import Table

    tab = Table(title=f"Theorem 3.2: H = {explained['entropy']:.4f} nats; rewarding a token with "
                      f"p > exp(-H) = {explained['threshold_p']:.4f} lowers entropy")
    for c in ("token", "p", "S = p(H + log p)", "dH/d eps if rewarded", "effect"):
        tab.add_column(c, justify="left" if c in ("token", "effect") else "right")
    for r in explained["rows"][:top]:
        name = repr(labels[r["index"]]) if labels else f"#{r['index']}"
        effect = "lowers" if r["dH_if_rewarded"] < 0 else "raises"
        tab.add_row(name, f"{r['p']:.4f}", f"{r['disc']:+.5f}", f"{r['dH_if_rewarded']:+.5f}", effect)
    console.print(tab)
