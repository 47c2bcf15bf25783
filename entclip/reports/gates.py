"""`analyze --require`: conditions on a run's metrics for shell scripts and CI.

A condition is `METRIC OP NUMBER` (OP one of >=, <=, >, <, ==, !=; spaces allowed). A metric of
metrics.jsonl reads the last row that carries it, or with `window` > 1 the mean over the last
`window` such rows (one per logged step); a metric of eval.jsonl (`test/avg@8`, `<set>/pass@4`, ...)
reads the last evaluation (a key in both files: metrics.jsonl). A null (non-finite) value in what
is read breaks the condition; `==` and `!=` compare exactly (for counters).
"""

from __future__ import annotations

import difflib
import math
import operator
import re
from dataclasses import dataclass
from typing import Any

from entclip.contracts.errors import BAD_CONFIG, EntclipError
from entclip.contracts.rundir import LoadedRun
from entclip.reports.analyze import mean

OPS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt, "==": operator.eq, "!=": operator.ne}
_CONDITION = re.compile(r"^\s*(?P<metric>[^<>=!\s]+)\s*(?P<op>>=|<=|==|!=|>|<)\s*(?P<number>\S+)\s*$")


@dataclass(frozen=True)
class Condition:
    text: str    # as the user wrote it
    metric: str
    op: str
    number: float


@dataclass(frozen=True)
class Verdict:
    condition: Condition
    value: float | None  # None: a null (non-finite) value among the rows read
    source: str          # "metrics" | "eval"
    where: str           # "step 200", "mean of steps 191-200", "eval at step 200"
    holds: bool

    def line(self) -> str:
        """One line for a broken condition: metric, the value found, the condition."""
        value = "non-finite (null)" if self.value is None else f"{self.value:.6g}"
        c = self.condition
        return f"{c.metric} = {value} ({self.where}); required {c.op} {c.number:g}"

    def as_dict(self) -> dict[str, Any]:
        return {"condition": self.condition.text, "metric": self.condition.metric, "value": self.value,
                "source": self.source, "where": self.where, "holds": self.holds}


def parse(text: str) -> Condition:
    m = _CONDITION.match(text)
    if m is None:
        raise EntclipError(f"--require {text!r}: expected METRIC OP NUMBER with OP one of "
                           f"{', '.join(OPS)}; e.g. --require 'entropy/mean>=0.2'", BAD_CONFIG)
    try:
        number = float(m["number"])
    except ValueError:
        number = math.nan
    if not math.isfinite(number):
        raise EntclipError(f"--require {text!r}: {m['number']!r} is not a finite number; "
                           f"e.g. --require '{m['metric']}{m['op']}0.5'", BAD_CONFIG)
    return Condition(text=text, metric=m["metric"], op=m["op"], number=number)


def _keys(rows: list[dict[str, Any]]) -> list[str]:
    seen: dict[str, None] = {}
    for row in rows:
        seen.update(dict.fromkeys(k for k in row if k != "step"))
    return list(seen)


def check(run: LoadedRun, conditions: list[Condition], window: int = 1) -> list[Verdict]:
    """Every condition's verdict, in order. Unknown metrics raise (exit 2) before any is judged."""
    if window < 1:
        raise EntclipError(f"--window {window}: the window counts logged steps, at least 1; "
                           "e.g. --window 10 for the mean over the last 10 steps", BAD_CONFIG)
    metric_keys, eval_keys = _keys(run.metrics), _keys(run.evals)
    known = set(metric_keys) | set(eval_keys)
    for c in conditions:
        if c.metric not in known:
            close = difflib.get_close_matches(c.metric, metric_keys + eval_keys, n=4, cutoff=0.5)
            some = metric_keys[:4] + eval_keys[:2]
            hint = (f"close: {', '.join(close)}" if close else f"its keys include {', '.join(some)}" if some
                    else "the run has no logged steps or evaluations yet")
            raise EntclipError(f"--require {c.text!r}: unknown metric {c.metric!r} (not a key of metrics.jsonl "
                               f"or eval.jsonl); {hint}", BAD_CONFIG)
    return [_judge(run, c, window) for c in conditions]


def _judge(run: LoadedRun, c: Condition, window: int) -> Verdict:
    in_metrics = any(c.metric in r for r in run.metrics)
    rows = [r for r in (run.metrics if in_metrics else run.evals) if c.metric in r]
    rows = rows[-window:] if in_metrics else rows[-1:]
    raw = [r[c.metric] for r in rows]
    finite = all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in raw)
    value = mean(raw) if finite else None
    steps = [r.get("step") for r in rows]
    if not in_metrics:
        where = f"eval at step {steps[-1]}"
    elif len(rows) == 1:
        where = f"step {steps[-1]}"
    else:
        where = f"mean of {len(rows)} steps {steps[0]}-{steps[-1]}"
    holds = value is not None and OPS[c.op](value, c.number)
    return Verdict(condition=c, value=value, source="metrics" if in_metrics else "eval", where=where, holds=holds)
