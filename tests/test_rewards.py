"""Rewards: builtin verifiers on real strings, spec parsing, and the worker's timeouts and crashes."""

from __future__ import annotations

import os
import signal
import sys
import textwrap
import threading
import time

import pytest

from entclip.contracts.errors import EntclipError
from entclip.data.rewards import (BUILTIN, RewardBatch, RewardRunner, exact_reward, format_reward, math_reward,
                             parse_spec)

MOD = "entclip_test_custom_rewards"  # written to a temporary folder, importable only through sys.path

CUSTOM = '''
import os, time

def score(completion, answer, prompt):
    return 1.0 if answer in completion else 0.0

def prompt_len(completion, answer, prompt):
    return float(len(prompt))

def pid(completion, answer, prompt):
    return float(os.getpid())

def boom(completion, answer, prompt):
    if completion == "bad":
        raise RuntimeError("boom")
    if completion == "nan":
        return float("nan")
    if completion == "str":
        return "1.0"
    return 1.0

def slow(completion, answer, prompt):
    if completion == "slow":
        time.sleep(30)
    return 1.0 if completion == answer else 0.0

def die(completion, answer, prompt):
    if completion == "die":
        os._exit(3)
    return 1.0 if completion == answer else 0.0

CONST = 3
'''


@pytest.fixture(scope="module", autouse=True)
def custom_module(tmp_path_factory):
    """A user module outside the package, found only because its folder is on sys.path."""
    folder = tmp_path_factory.mktemp("user_rewards")
    (folder / f"{MOD}.py").write_text(textwrap.dedent(CUSTOM))
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(folder))
        yield
    sys.modules.pop(MOD, None)


# (reference answer, completion, expected): math-verify's semantics, pinned.
MATH_CASES = [
    ("0.5", r"so \boxed{\frac{1}{2}}", 1.0),
    (r"\frac12", "The answer is 0.5", 1.0),
    ("1000", r"\boxed{1,000}", 1.0),
    ("1000", "We sold 1,000 apples.", 1.0),
    (r"\frac{3}{4}", r"The answer is $\frac{3}{4}$", 1.0),
    (r"\frac{\sqrt{2}}{2}", r"\boxed{\frac{1}{\sqrt{2}}}", 1.0),
    ("$x^2$", r"\boxed{x^2}", 1.0),
    (r"\boxed{42}", r"Thus \boxed{42}.", 1.0),
    ("2x+1", r"\boxed{1+2x}", 1.0),
    ("2x+1", r"\boxed{2}", 0.0),  # a bare reference is read whole, not as its first number
    ("(3, -1)", r"\boxed{(3,-1)}", 1.0),
    ("(3, -1)", r"\boxed{(-1,3)}", 0.0),
    ("50%", r"\boxed{0.5}", 1.0),
    ("10", r"\boxed{10\text{ cm}}", 1.0),
    ("18", r"\boxed{\$18.00}", 1.0),
    ("42", r"first \boxed{41}, then \boxed{42}", 1.0),  # the last box is the answer
    ("41", r"first \boxed{41}, then \boxed{42}", 0.0),
    ("42", r"\boxed{42} but wait, \boxed{4", 1.0),  # a truncated box does not count
    ("42", r"\boxed{41}", 0.0),
    (r"\frac{3}{4}", r"The answer is $\frac{4}{3}$", 0.0),
    ("7", "no idea", 0.0),
    ("7", "", 0.0),
]


@pytest.mark.parametrize("answer,completion,expected", MATH_CASES)
def test_math_reward_follows_math_verify_on_real_formats(answer, completion, expected):
    assert math_reward(completion, answer) == expected


def test_math_reward_works_outside_the_main_thread():
    # math-verify's default signal.alarm timeouts raise there; they must be off.
    out = []
    t = threading.Thread(target=lambda: out.append(math_reward(r"\boxed{\frac{1}{2}}", "0.5")))
    t.start()
    t.join()
    assert out == [1.0]


@pytest.mark.parametrize("completion,expected", [
    (r"so \boxed{5}.", 1.0),
    (r"\boxed{\frac{1}{\sqrt{2}}}", 1.0),
    (r"\boxed{\{1, 2\}}", 1.0),
    (r"\boxed {x}", 1.0),
    ("5", 0.0),
    (r"\boxed{}", 0.0),
    (r"\boxed{  }", 0.0),
    (r"\boxed{1} or \boxed{2}", 0.0),
    (r"\boxed{\frac{1}{2}", 0.0),
    ("", 0.0),
])
def test_format_reward_wants_exactly_one_closed_nonempty_box(completion, expected):
    assert format_reward(completion, "ignored") == expected


def test_exact_reward_ignores_only_surrounding_whitespace():
    assert exact_reward(" 42\n", "42") == 1.0
    assert exact_reward("4 2", "42") == 0.0


def test_parse_spec_reads_names_weights_auto_and_custom():
    assert parse_spec("math=1.0,format=0.1", "exact") == [("math", 1.0), ("format", 0.1)]
    assert parse_spec(" exact = 2 , format=-0.5", "exact") == [("exact", 2.0), ("format", -0.5)]
    assert parse_spec("math", "exact") == [("math", 1.0)]
    assert parse_spec("auto", "math") == [("math", 1.0)]
    assert parse_spec(f"{MOD}:score=0.5,format", "exact") == [(f"{MOD}:score", 0.5), ("format", 1.0)]
    assert set(BUILTIN) == {"exact", "math", "format", "countdown"}


@pytest.mark.parametrize("spec,needle", [
    ("", "empty"),
    ("   ", "empty"),
    ("mathh", "did you mean math?"),
    ("accuracy", "choose one of exact, math, format, countdown, or module:function"),
    ("math=abc", "'abc' of 'math' is not a finite number"),
    ("math=nan", "not a finite number"),
    ("math,,format", "an empty entry"),
    ("math,math=2", "listed twice"),
    ("no_such_module_xyz:f", "cannot import module 'no_such_module_xyz'"),
    (f"{MOD}:scor", "did you mean score?"),
    (f"{MOD}:CONST", "is not callable (type int)"),
    (f"{MOD}:", "is not module:function"),
])
def test_parse_spec_rejects_bad_specs_with_one_line_fix(spec, needle):
    with pytest.raises(EntclipError) as e:
        parse_spec(spec, "exact")
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_auto_without_a_default_is_refused():
    with pytest.raises(EntclipError, match="needs a default"):
        parse_spec("auto", "auto")


def test_runner_weights_components_and_takes_correct_from_the_verifier():
    completions = [r"\boxed{0.5}", r"\boxed{\frac{1}{2}}", "0.5", r"\boxed{3}"]
    with RewardRunner("exact=2,format=0.5", verifier="math", timeout=0) as runner:
        batch = runner.score(completions, ["0.5"] * 4, [""] * 4)
    assert batch.components == {"exact": [0.0, 0.0, 1.0, 0.0], "format": [1.0, 1.0, 0.0, 1.0]}
    assert batch.total == [0.5, 0.5, 2.0, 0.5]
    assert batch.correct == [True, True, True, False]  # math, not exact, though math is not in the spec
    assert (batch.errors, batch.timeouts) == (0, 0)


def test_math_in_worker_is_reused_as_verifier_and_metrics_are_flat():
    with RewardRunner("math=1,format=0.1", verifier="math", timeout=10) as runner:
        assert runner.names == ["math", "format"] and runner.remote == ["math"]
        batch = runner.score([r"\boxed{1,000}", "1000", r"\boxed{999}"], ["1000"] * 3, [""] * 3)
    assert batch.components["math"] == [1.0, 1.0, 0.0]
    assert batch.total == pytest.approx([1.1, 1.0, 0.1])
    assert batch.correct == [True, True, False]
    assert {k: m.value for k, m in batch.metrics().items()} == pytest.approx({"reward/errors": 0.0, "reward/timeouts": 0.0,
                                             "reward/math_mean": 2 / 3, "reward/format_mean": 2 / 3})


def test_custom_reward_runs_in_a_worker_process_with_the_prompt():
    with RewardRunner(f"{MOD}:score,{MOD}:prompt_len=0,{MOD}:pid=0", timeout=5) as runner:
        batch = runner.score(["x = 12", "x = 13"], ["12", "12"], ["abc", "hello"])
    assert batch.components[f"{MOD}:score"] == [1.0, 0.0]
    assert batch.components[f"{MOD}:prompt_len"] == [3.0, 5.0]
    assert batch.total == [1.0, 0.0]
    worker_pids = set(batch.components[f"{MOD}:pid"])
    assert len(worker_pids) == 1 and os.getpid() not in worker_pids


def test_timeout_zero_runs_custom_rewards_in_process():
    with RewardRunner(f"{MOD}:pid", timeout=0) as runner:
        batch = runner.score(["a"], ["a"], [""])
    assert batch.total == [float(os.getpid())]


@pytest.mark.parametrize("timeout", [0, 5])
def test_raising_or_non_number_reward_scores_zero_and_is_counted(timeout):
    with RewardRunner(f"{MOD}:boom", timeout=timeout) as runner:
        batch = runner.score(["ok", "bad", "nan", "str", "ok"], [""] * 5, [""] * 5)
    assert batch.total == [1.0, 0.0, 0.0, 0.0, 1.0]
    assert (batch.errors, batch.timeouts) == (3, 0)
    assert batch.first_error == f"{MOD}:boom: RuntimeError: boom"


def _slow_batch(runner: RewardRunner) -> RewardBatch:
    return runner.score(["a", "slow", "b", "x"], ["a", "slow", "b", "y"], [""] * 4)


def test_slow_reward_times_out_and_a_fresh_worker_scores_the_rest():
    with RewardRunner(f"{MOD}:slow", timeout=0.5) as runner:
        start = time.monotonic()
        batch = _slow_batch(runner)
        assert time.monotonic() - start < 10  # not the 30 s sleep
        assert batch.total == [1.0, 0.0, 1.0, 0.0]
        assert (batch.errors, batch.timeouts) == (0, 1)
        assert runner.score(["c"], ["c"], [""]).total == [1.0]  # the runner stays usable


def test_timeouts_work_when_scoring_from_a_non_main_thread():
    out: list = []
    with RewardRunner(f"{MOD}:slow,math", verifier="math", timeout=0.5) as runner:
        t = threading.Thread(target=lambda: out.append(_slow_batch(runner)))
        t.start()
        t.join(60)
    batch = out[0]
    assert batch.components[f"{MOD}:slow"] == [1.0, 0.0, 1.0, 0.0]
    assert batch.timeouts == 1


def test_interrupted_batch_leaves_no_stale_answers_for_the_next():
    with RewardRunner(f"{MOD}:slow", timeout=5) as runner:
        timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT))  # Ctrl-C mid-batch
        timer.start()
        with pytest.raises(KeyboardInterrupt):
            _slow_batch(runner)
        timer.join()
        batch = runner.score(["q", "r"], ["q", "s"], ["", ""])
    assert batch.total == [1.0, 0.0] and batch.timeouts == 0


def test_reward_that_kills_its_process_scores_zero_as_an_error():
    with RewardRunner(f"{MOD}:die", timeout=5) as runner:
        batch = runner.score(["a", "die", "b", "die", "c"], ["a", "", "b", "", "x"], [""] * 5)
    assert batch.total == [1.0, 0.0, 1.0, 0.0, 0.0]
    assert (batch.errors, batch.timeouts) == (2, 0)
    assert "exit code 3" in batch.first_error


def test_close_is_idempotent_and_the_runner_restarts_after_it():
    runner = RewardRunner(f"{MOD}:score", timeout=5)
    assert runner.score(["1"], ["1"], [""]).total == [1.0]
    proc = runner._proc
    runner.close()
    runner.close()
    assert not proc.is_alive()
    assert runner.score(["1"], ["2"], [""]).total == [0.0]
    runner.close()


def test_runner_refuses_bad_arguments():
    with pytest.raises(EntclipError, match="choose one of exact, math"):
        RewardRunner("exact", verifier="format")
    with pytest.raises(EntclipError, match="not negative"):
        RewardRunner("exact", timeout=-1)
    with pytest.raises(ValueError, match="one each"):
        RewardRunner("exact", timeout=0).score(["a", "b"], ["a"], ["", ""])


def test_verify_computes_the_verifier_alone(tmp_path, monkeypatch):
    """Evaluation asks only for verdicts: other terms (a slow or failing custom reward) are not run."""
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "explodes.py").write_text("def f(completion, answer, prompt):\n    raise RuntimeError('ran')\n")
    with RewardRunner("exact,explodes:f", default="exact", verifier="exact", timeout=5.0) as runner:
        assert runner.verify(["46", "47"], ["46", "46"], ["", ""]) == [True, False]
        assert runner._proc is None  # the worker (where explodes:f would run) was never started
        assert runner.score(["46"], ["46"], [""]).errors == 1
