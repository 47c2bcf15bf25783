"""Rewards: functions fn(completion, answer, prompt) -> float, a spec that combines them, a runner.

Builtins: `exact` (stripped string equality), `math` (math-verify on the last \\boxed{...}),
`format` (exactly one non-empty \\boxed{...}) and `countdown` (the countdown task's step checker,
reading the numbers and target from the prompt). A spec "math=1.0,format=0.1" sums weighted scores;
a NAME may also be `module:function`, any importable callable with the RewardFn signature.

Where rewards run (RewardRunner): exact, format and countdown are pure and fast, so they run
in-process. math and every custom reward run in ONE long-lived worker process (spawn context,
started on first need, reused). The worker answers item by item; the parent waits for each answer at
most `timeout` seconds, so a stuck reward is cut off wherever the runner is called from
(signal-based timeouts only work in the main thread). On a timeout the worker is killed and a fresh
one continues with the remaining items; a worker that dies mid-item costs that item only. A reward
that raises, returns a non-number or a non-finite number, times out or kills its process scores 0
and is counted; the caller never sees the exception. timeout=0 runs everything in-process, without
a timeout.
As with any spawn-based multiprocessing, a script that creates a runner needs the
`if __name__ == "__main__":` guard.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import math
import multiprocessing as mp
import re
import threading
from dataclasses import dataclass
from typing import Any, Callable

from entclip.contracts.errors import FAILED, EntclipError
from entclip.contracts.metrics import Mean, Metric, Sum

RewardFn = Callable[[str, str, str], float]  # fn(completion, answer, prompt) -> float

_BOXED = re.compile(r"\\boxed\s*\{")
_LOCAL = ("exact", "format", "countdown")  # pure and fast: never worth a round trip to the worker
_VERIFIERS = ("exact", "math", "countdown")
_STARTUP_S = 60.0  # a fresh worker imports math-verify and the custom modules; not charged to items
_TIMED_OUT = object()  # stands for the error of a call cut off by the timeout


def exact_reward(completion: str, answer: str, prompt: str = "") -> float:
    """1.0 iff the completion is the answer, ignoring surrounding whitespace."""
    return 1.0 if completion.strip() == answer.strip() else 0.0


def _boxed(text: str) -> list[str | None]:
    """Contents of each \\boxed{...} in order (nested and escaped braces handled); None = unclosed."""
    out: list[str | None] = []
    for m in _BOXED.finditer(text):
        depth, j = 1, m.end()
        while j < len(text):
            ch = text[j]
            if ch == "\\":
                j += 2  # \{ and \} are literal braces, not grouping
                continue
            depth += (ch == "{") - (ch == "}")
            if depth == 0:
                out.append(text[m.end():j])
                break
            j += 1
        else:
            out.append(None)
    return out


def format_reward(completion: str, answer: str, prompt: str = "") -> float:
    """1.0 iff the completion holds exactly one \\boxed{...}, closed and non-empty."""
    boxes = _boxed(completion)
    return 1.0 if len(boxes) == 1 and boxes[0] is not None and boxes[0].strip() else 0.0


@functools.lru_cache(maxsize=4096)
def _parse_gold(answer: str) -> tuple:
    """The reference parsed once per distinct answer (G completions share it).

    A bare answer ("\\frac{1}{2}", "2x+1", "(3, -1)") is read as the content of a \\boxed{}, as
    MATH-style answers were written; math-verify's plain-text extraction would read "2x+1" as 2.
    Text with $...$ or \\boxed{} is left to math-verify's own extraction first.
    """
    from math_verify import parse

    text = answer.strip()
    wrapped = "\\boxed{" + text + "}"
    order = (text, wrapped) if ("$" in text or "\\boxed" in text) else (wrapped, text)
    for candidate in order:
        gold = parse(candidate, parsing_timeout=None)
        if gold:
            return tuple(gold)
    return ()


def math_reward(completion: str, answer: str, prompt: str = "") -> float:
    """1.0 iff the completion's final answer equals the reference by math-verify, else 0.0.

    The final answer is the last closed \\boxed{...}; without one, math-verify's own extraction from
    the whole completion ("The answer is $\\frac{3}{4}$"). Equality is math-verify's: symbolic and
    numeric (0.5 = \\frac{1}{2}, 1,000 = 1000, 50\\% = 0.5 = 50, units and \\text{} dropped).
    math-verify's own signal timeouts are off (they fail outside the main thread); RewardRunner
    bounds the time instead, so a direct call has no time limit.
    """
    from math_verify import parse, verify

    gold = _parse_gold(answer)
    closed = [b for b in _boxed(completion) if b is not None]
    pred = parse("\\boxed{" + closed[-1] + "}" if closed else completion, parsing_timeout=None)
    return 1.0 if gold and pred and verify(list(gold), pred, timeout_seconds=None) else 0.0


def countdown_reward(completion: str, answer: str, prompt: str) -> float:
    """1.0 iff the completion's steps reach the prompt's target (entclip.data.tasks.countdown.verify)."""
    from entclip.data.tasks.countdown import reward

    return reward(completion, answer, prompt)


BUILTIN: dict[str, RewardFn] = {"exact": exact_reward, "math": math_reward, "format": format_reward,
                                "countdown": countdown_reward}


def _resolve(name: str) -> RewardFn:
    """A builtin key or module:function -> the callable (imports the module)."""
    if name in BUILTIN:
        return BUILTIN[name]
    module, _, attr = name.partition(":")
    return getattr(importlib.import_module(module), attr)


def _check_name(name: str, spec: str) -> None:
    bad = f"reward={spec!r}: "
    if ":" not in name:
        if name not in BUILTIN:
            close = difflib.get_close_matches(name, BUILTIN, n=3)
            hint = f"did you mean {' or '.join(close)}? " if close else ""
            raise EntclipError(f"{bad}unknown reward {name!r}; {hint}choose one of "
                               f"{', '.join(BUILTIN)}, or module:function")
        return
    module, _, attr = name.partition(":")
    if not module or not attr or ":" in attr:
        raise EntclipError(f"{bad}{name!r} is not module:function; write e.g. mypkg.rewards:score")
    try:
        mod = importlib.import_module(module)
    except Exception as e:  # a missing module or one that fails while importing: both need a fix
        raise EntclipError(f"{bad}cannot import module {module!r} ({_describe(e)}); install it or run "
                           "from the folder that holds it (or add that folder to PYTHONPATH)") from None
    if not hasattr(mod, attr):
        names = [n for n in dir(mod) if not n.startswith("_") and callable(getattr(mod, n))]
        close = difflib.get_close_matches(attr, names, n=3)
        hint = (f"did you mean {' or '.join(close)}?" if close
                else f"functions there: {', '.join(names[:8]) or 'none'}")
        raise EntclipError(f"{bad}module {module!r} has no {attr!r}; {hint}")
    if not callable(getattr(mod, attr)):
        raise EntclipError(f"{bad}{name!r} is not callable (type {type(getattr(mod, attr)).__name__}); point "
                           "it at a function fn(completion, answer, prompt) -> float")


def parse_spec(spec: str, default: str) -> list[tuple[str, float]]:
    """"math=1.0,format=0.1" -> [("math", 1.0), ("format", 0.1)]; "auto" -> the default spec.

    Each entry is NAME or NAME=WEIGHT (weight 1.0 when left out); NAME is a builtin or an importable
    module:function, imported here so that a bad name fails before training. Raises EntclipError.
    """
    if spec.strip() == "auto":
        if default.strip() == "auto":
            raise EntclipError("reward='auto' needs a default reward; set --set reward=math or exact")
        return parse_spec(default, default)
    if not spec.strip():
        raise EntclipError(f"reward={spec!r}: empty; name at least one reward, e.g. --set reward=math "
                           f"(choices: {', '.join(BUILTIN)}, module:function)")
    terms: list[tuple[str, float]] = []
    for entry in spec.split(","):
        name, eq, raw = (part.strip() for part in entry.partition("="))
        if not name:
            raise EntclipError(f"reward={spec!r}: an empty entry; write NAME[=WEIGHT] entries separated by "
                               "single commas, e.g. math=1.0,format=0.1")
        try:
            weight = float(raw) if eq else 1.0
        except ValueError:
            weight = math.nan
        if not math.isfinite(weight):
            raise EntclipError(f"reward={spec!r}: weight {raw!r} of {name!r} is not a finite number; "
                               f"write {name}=1.0")
        if name in (n for n, _ in terms):
            raise EntclipError(f"reward={spec!r}: {name!r} is listed twice; give each reward once, with "
                               "its weight")
        _check_name(name, spec)
        terms.append((name, weight))
    return terms


@dataclass
class RewardBatch:
    """Scores of one batch of completions. Failed calls score 0 and are counted, never raised."""

    total: list[float]  # weighted sum per completion
    correct: list[bool]  # the verifier's verdict per completion (accuracy, pass@k)
    components: dict[str, list[float]]  # spec name -> unweighted score per completion
    errors: int  # calls that raised, returned a non-number / non-finite value, or killed the worker
    timeouts: int  # calls cut off after `timeout` seconds
    first_error: str | None = None  # "name: ExcType: message" of the first failed call, for the log

    def metrics(self) -> dict[str, Metric]:
        """Counts of failed and timed-out calls (they add up over processes), each reward's mean score
        (averaged over processes: each holds as many rows)."""
        out: dict[str, Metric] = {"reward/errors": Sum(float(self.errors)), "reward/timeouts": Sum(float(self.timeouts))}
        for name, scores in self.components.items():
            out[f"reward/{name}_mean"] = Mean(sum(scores) / len(scores) if scores else 0.0)
        return out


def _value(result: Any) -> float:
    """A reward's return value as a finite float; anything else raises (and so is counted)."""
    if isinstance(result, bool) or (isinstance(result, (int, float)) and math.isfinite(result)):
        return float(result)
    if hasattr(result, "__float__") and not hasattr(result, "__len__") and math.isfinite(float(result)):
        return float(result)  # numpy scalars, Fraction, Decimal
    raise TypeError(f"returned {result!r}, not a finite number")


def _describe(e: BaseException) -> str:
    """'ExcType: first line of the message', short enough for a one-line log entry."""
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"[:300]


def _call(fn: RewardFn, completion: str, answer: str, prompt: str) -> tuple[float, str | None]:
    try:
        return _value(fn(completion, answer, prompt)), None
    except (Exception, SystemExit) as e:
        return 0.0, _describe(e)


def _worker_main(conn: Any, names: list[str]) -> None:
    """Worker loop: resolve the rewards once, then answer each job (name, completion, answer, prompt)."""
    import logging
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's; it stops us cleanly
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # "timeout disabled": we are the timeout
    fns: dict[str, Any] = {}
    for name in names:
        try:
            fns[name] = _resolve(name)
            if name == "math":
                math_reward("\\boxed{1}", "1")  # import sympy and the LaTeX parser before the clock runs
        except Exception as e:
            fns[name] = e
    conn.send("ready")
    while True:
        try:
            jobs = conn.recv()
        except (EOFError, OSError):
            return  # the parent is gone
        if jobs is None:
            return
        for name, completion, answer, prompt in jobs:
            fn = fns[name]
            if isinstance(fn, Exception):
                conn.send((0.0, _describe(fn)))
            else:
                conn.send(_call(fn, completion, answer, prompt))


class RewardRunner:
    """Scores batches with a reward spec; math and custom rewards run in a worker with a timeout."""

    def __init__(self, spec: str, default: str = "exact", verifier: str = "exact", timeout: float = 10.0):
        if verifier not in _VERIFIERS:
            raise EntclipError(f"verifier={verifier!r}: choose one of {', '.join(_VERIFIERS)}")
        if not timeout >= 0:
            raise EntclipError(f"reward_timeout={timeout}: seconds, not negative (0 = no timeout)")
        self.terms = parse_spec(spec, default)
        self.verifier, self.timeout = verifier, float(timeout)
        names = [n for n, _ in self.terms]
        self.names = names + ([verifier] if verifier not in names else [])  # each computed once
        self.remote = [n for n in self.names if timeout > 0 and n not in _LOCAL]
        self._fns = {n: _resolve(n) for n in self.names if n not in self.remote}
        self._proc: Any = None
        self._conn: Any = None
        self._lock = threading.Lock()

    def score(self, completions: list[str], answers: list[str], prompts: list[str]) -> RewardBatch:
        scores, problems = self._scores(self.names, completions, answers, prompts)
        n = len(completions)
        timeouts = sum(err is _TIMED_OUT for _, err in problems)
        first = next((f"{name}: {err}" for name, err in problems if err is not _TIMED_OUT), None)
        weights = dict(self.terms)
        total = [sum(w * scores[name][i] for name, w in weights.items()) for i in range(n)]
        return RewardBatch(total=total, correct=[s >= 1.0 for s in scores[self.verifier]],
                           components={name: scores[name] for name in weights},
                           errors=len(problems) - timeouts, timeouts=timeouts, first_error=first)

    def verify(self, completions: list[str], answers: list[str], prompts: list[str]) -> list[bool]:
        """The verifier's verdicts only (evaluation): no other reward term is computed."""
        scores, _ = self._scores([self.verifier], completions, answers, prompts)
        return [s >= 1.0 for s in scores[self.verifier]]

    def _scores(self, names: list[str], completions: list[str], answers: list[str], prompts: list[str]
                ) -> tuple[dict[str, list[float]], list[tuple[str, Any]]]:
        """Unweighted scores of the reward terms `names`, and (name, error or _TIMED_OUT) per failed call."""
        n = len(completions)
        if not len(answers) == len(prompts) == n:
            raise ValueError(f"{n} completions, {len(answers)} answers, {len(prompts)} prompts: one each")
        scores = {name: [0.0] * n for name in names}
        problems: list[tuple[str, Any]] = []
        for name, fn in self._fns.items():
            if name not in scores:
                continue
            for i in range(n):
                scores[name][i], err = _call(fn, completions[i], answers[i], prompts[i])
                if err is not None:
                    problems.append((name, err))
        slots = [(name, i) for name in self.remote if name in scores for i in range(n)]
        with self._lock:
            try:
                jobs = [(name, completions[i], answers[i], prompts[i]) for name, i in slots]
                results = self._run_remote(jobs)
            except BaseException:  # e.g. Ctrl-C: its unread answers would be taken for the next batch's
                self._stop(kill=True)
                raise
        for (name, i), (value, err) in zip(slots, results):
            scores[name][i] = value
            if err is not None:
                problems.append((name, err))
        return scores, problems

    def _run_remote(self, jobs: list[tuple]) -> list[tuple[float, Any]]:
        """(value, None | error message | _TIMED_OUT) per job, in order; restarts the worker as needed."""
        out: list[tuple[float, Any]] = []
        while len(out) < len(jobs):
            self._start()
            try:
                self._conn.send(jobs[len(out):])  # one message; the worker answers job by job
            except OSError:  # it died right after starting: charge one job so that the loop ends
                self._stop(kill=True)
                out.append((0.0, "the reward worker died before the job reached it"))
                continue
            while len(out) < len(jobs):
                # The clock for job k starts when job k-1's answer arrived (or the jobs were sent).
                if not self._conn.poll(self.timeout):
                    self._stop(kill=True)
                    out.append((0.0, _TIMED_OUT))
                    break
                try:
                    out.append(self._conn.recv())
                except (EOFError, OSError):
                    proc = self._proc
                    self._stop(kill=True)  # joins it, so its exit code is known
                    out.append((0.0, f"the reward worker died (exit code {proc.exitcode})"))
                    break
        return out

    def _start(self) -> None:
        if self._proc is not None and self._proc.is_alive():
            return
        self._stop(kill=True)
        ctx = mp.get_context("spawn")  # no fork: the parent has torch threads and maybe CUDA
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_worker_main, args=(child, self.remote), daemon=True,
                                 name="entclip-rewards")
        self._proc.start()
        child.close()  # only the worker holds its end now, so its death reads as EOF here
        try:
            ready = self._conn.poll(_STARTUP_S) and self._conn.recv() == "ready"
        except (EOFError, OSError):
            ready = False
        if not ready:
            proc = self._proc
            self._stop(kill=True)
            raise EntclipError(f"the reward worker did not start (exit code {proc.exitcode}); if a script of "
                               "yours creates the trainer, put its top-level code under "
                               "`if __name__ == \"__main__\":`, or set --set reward_timeout=0", FAILED)

    def _stop(self, kill: bool) -> None:
        proc, conn, self._proc, self._conn = self._proc, self._conn, None, None
        if proc is not None:
            if not kill and proc.is_alive():
                try:
                    conn.send(None)
                except OSError:
                    pass
                proc.join(2.0)
            if proc.is_alive():
                proc.kill()
            proc.join()
        if conn is not None:
            conn.close()

    def close(self) -> None:
        """Stops the worker (if any). Safe to call twice; the runner restarts it if used again."""
        with self._lock:
            self._stop(kill=False)

    def __enter__(self) -> RewardRunner:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
