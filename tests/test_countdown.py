"""The countdown task: its step verifier, its generator and split, its warm-start key, and the CLI."""

from __future__ import annotations

import dataclasses
import json
import random

import pytest
from typer.testing import CliRunner

from conftest import TINY
from entclip.cli import app
from entclip.contracts.errors import EntclipError
from entclip.data.rewards import RewardRunner, parse_spec
from entclip.data.tasks import tiny
from entclip.data.tasks.countdown import CountdownTask, parse_prompt, reward, verify
from entclip.data.tasks.tiny import WarmStartSpec, build_char_tokenizer

runner = CliRunner()
# The key of the default arithmetic warm start before the countdown fields existed: existing caches
# (and running sweeps) are found under it, so it must never move.
ARITHMETIC_DEFAULT_KEY = "de47216ffd0051f4"


@pytest.fixture(scope="module")
def task():
    return CountdownTask(n_test=200)


# ---- verifier ----


@pytest.mark.parametrize("completion", [
    "7*3=21,21+9=30",  # the pairing a canonical form would pick
    "3*7=21,9+21=30",  # operand order swapped in both steps
    " 3*7=21,21+9=30\n",  # surrounding whitespace is ignored
])
def test_verifier_accepts_right_answers_in_several_forms(completion):
    assert verify(completion, "3,7,9:30=")


def test_verifier_accepts_other_pairings_and_subtraction():
    assert verify("9-7=2,2*3=6", "3,7,9:6=") and verify("7-3=4,4+9=13", "3,7,9:13=")
    assert verify("3+7=10,10*9=90", "3,7,9:90=") and verify("9*7=63,63-3=60", "3,7,9:60=")
    assert verify("2*2=4,4*2=8", "2,2,2:8=")  # equal numbers: each copy used once
    assert verify("1+2=3,3*3=9,9+4=13", "1,2,3,4:13=") and verify("1+2=3,3+4=7,7*3=21", "1,2,3,4:21=")
    assert reward("7*3=21,21+9=30", "", "3,7,9:30=") == 1.0 and reward("7*3=21", "", "3,7,9:30=") == 0.0


@pytest.mark.parametrize("completion, why", [
    ("7*3=22,22+8=30", "wrong arithmetic in the first step"),
    ("7*3=21,21+9=31", "wrong arithmetic in the last step"),
    ("7*3=21,21+7=28", "7 used twice, 9 missing"),
    ("3*3=9,9+21=30", "3 reused and 21 never produced"),
    ("7*3=21,21+9=30,30-0=30", "a step too many"),
    ("7*3=21", "a number left unused (too few steps)"),
    ("7+9=16,16+3=19", "right arithmetic, wrong target"),
    ("7*3=21,21+21=42", "an intermediate used twice"),
    ("9-7=2,2-3=-1", "a negative result is not in the grammar"),
    ("3-7=-4,9+-4=5", "a negative result is not in the grammar"),
    ("7*3=21;21+9=30", "wrong separator"),
    ("7*3 = 21,21+9=30", "spaces inside a step"),
    ("07*3=21,21+9=30", "a leading zero"),
    ("7x3=21,21+9=30", "an unknown operator"),
    ("7*3=21,21+9=", "a step without its result"),
    ("30", "the bare target"),
    ("", "empty"),
    ("7*3=21,,21+9=30", "an empty step"),
])
def test_verifier_rejects_wrong_and_malformed_answers(completion, why):
    assert not verify(completion, "3,7,9:30="), why


def test_prompts_parse_and_malformed_prompts_raise():
    assert parse_prompt("3,7,9:30=") == ([3, 7, 9], 30)
    for bad in ("3+7=", "3,7,9:30", "3,,9:30=", "3,7,9=30="):
        with pytest.raises(ValueError):
            parse_prompt(bad)


def test_countdown_reward_is_a_local_builtin_verifier():
    assert parse_spec("auto", "countdown") == [("countdown", 1.0)]
    with RewardRunner("auto", default="countdown", verifier="countdown", timeout=10.0) as run:
        assert run.remote == []  # pure and fast: scored in-process, never in the worker
        batch = run.score(["7*3=21,21+9=30", "7*3=21,21+9=31"], ["x", "x"], ["3,7,9:30="] * 2)
    assert batch.total == [1.0, 0.0] and batch.correct == [True, False]


# ---- generator and split ----


def test_every_problem_has_solutions_the_verifier_accepts(task):
    for p in task.train + task.test:
        sols = task.solutions(p)
        assert sols[0] == p.answer and len(set(sols)) == len(sols)
        assert all(verify(s, p.prompt) for s in sols)
        numbers, target = parse_prompt(p.prompt)
        assert len(numbers) == 3 and numbers == sorted(numbers) and 1 <= target <= 100
        assert max(numbers) <= 9 and len(p.answer) >= 8 and len(p.answer) <= task.max_answer_chars


def test_problems_have_several_solutions(task):
    counts = [len(task.solutions(p)) for p in task.train]
    assert sum(c >= 2 for c in counts) / len(counts) > 0.9  # operand order alone doubles most
    assert sum(c >= 4 for c in counts) / len(counts) > 0.5
    # different pairings and operations, not only swapped operands
    assert {s.split(",")[0] for s in task.solutions(next(p for p in task.train + task.test
                                                          if p.prompt == "1,2,3:5="))} >= {"2*1=2", "2+3=5", "3*1=3"}


def test_split_is_deterministic_disjoint_and_sized(task):
    train, test = {p.prompt for p in task.train}, {p.prompt for p in task.test}
    assert len(task.test) == 200 and not train & test and len(train) == len(task.train)
    random.seed(1)
    again = CountdownTask(n_test=200)
    assert again.train == task.train and again.test == task.test
    assert CountdownTask(n_test=200, split_seed=1).test != task.test
    assert task.max_answer_chars == 15 and CountdownTask(numbers=4, max_number=4, n_test=50).max_answer_chars > 15


@pytest.mark.parametrize("kwargs, match", [
    (dict(numbers=2), "countdown_numbers=2: must be 3 or 4"),
    (dict(max_number=1), "countdown_max_number=1"),
    (dict(max_target=0), "countdown_max_target=0"),
    (dict(max_number=3, n_test=50), "lower n_test to at most"),
])
def test_bad_parameters_raise_one_line_naming_the_fix(kwargs, match):
    with pytest.raises(EntclipError, match=match) as err:
        CountdownTask(**kwargs)
    assert "\n" not in str(err.value) and ("set --set" in str(err.value) or "lower" in str(err.value))


# ---- warm-start key and tokenizer ----


def test_arithmetic_default_key_and_tokenizer_are_unchanged():
    assert WarmStartSpec().key() == ARITHMETIC_DEFAULT_KEY
    assert WarmStartSpec(task_name="arithmetic", countdown_max_number=9).key() == ARITHMETIC_DEFAULT_KEY
    assert WarmStartSpec().chars == "0123456789+=" == tiny.CHARS
    assert len(build_char_tokenizer()) == 16


def test_countdown_keys_name_the_task_and_its_parameters():
    keys = {WarmStartSpec(task_name="countdown").key(),
            WarmStartSpec(task_name="countdown", countdown_max_target=50).key(),
            WarmStartSpec(task_name="countdown", countdown_numbers=4).key(), ARITHMETIC_DEFAULT_KEY}
    assert len(keys) == 4
    tok = build_char_tokenizer(WarmStartSpec(task_name="countdown").chars)
    ids = tok("3,7,9:30=7*3=21,21-9=12")["input_ids"]
    assert tok.unk_token_id not in ids and tok.decode(ids, skip_special_tokens=True) == "3,7,9:30=7*3=21,21-9=12"
    arith = build_char_tokenizer()
    assert all(tok.convert_tokens_to_ids(c) == arith.convert_tokens_to_ids(c) for c in tiny.CHARS)


def test_an_arithmetic_cache_record_without_the_new_fields_still_reads(tmp_path):
    spec = WarmStartSpec()
    old = {k: v for k, v in dataclasses.asdict(spec).items() if k not in tiny.ADDED}
    (tmp_path / tiny.MARKER).write_text(json.dumps({"spec": old, "accuracy": 0.5, "steps": 3, "seconds": 1.0}))
    assert tiny._read_result(tmp_path, spec, lambda s: None).steps == 3
    with pytest.raises(EntclipError, match="another spec"):
        tiny._read_result(tmp_path, WarmStartSpec(task_name="countdown"), lambda s: None)


# ---- CLI ----


def _countdown_sets(**overrides) -> list[str]:
    settings = {k: v for k, v in TINY.items() if k != "max_operand"}  # an arithmetic key: inert here
    settings.update(task="countdown", max_new_tokens=16, warmup_max_steps=20, **overrides)
    return [arg for k, v in settings.items() for arg in ("--set", f"{k}={v}")]


def test_train_on_countdown_writes_a_run_with_eval_and_countdown_prompts(tmp_path):
    res = runner.invoke(app, ["train", "--out-dir", str(tmp_path), "--name", "cd", "--quiet", *_countdown_sets()])
    assert res.exit_code == 0, res.output
    run = tmp_path / "cd"
    rows = [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()]
    assert rows[0]["step"] == 0 and {"test/greedy_acc", "test/avg@4", "test/pass@4"} <= set(rows[0])
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert samples and all(parse_prompt(s["prompt"]) for s in samples)  # countdown prompts, not a+b=
    for s in samples:
        assert s["reward"] == reward(s["completion"], "", s["prompt"])  # scored by the step verifier


def test_invalid_countdown_parameter_is_one_line_and_leaves_no_run(tmp_path):
    res = runner.invoke(app, ["train", "--out-dir", str(tmp_path), "--name", "bad",
                              *_countdown_sets(countdown_numbers=5)])
    assert res.exit_code == 2, res.output
    assert "countdown_numbers=5: must be 3 or 4" in res.output and "Traceback" not in res.output
    assert list(tmp_path.iterdir()) == []


def test_countdown_keys_warn_when_the_task_is_arithmetic(tmp_path):
    res = runner.invoke(app, ["train", "--dry-run", "--set", "countdown_max_target=50", "--out-dir", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert "countdown_max_target=50 has no effect with task=arithmetic" in res.output


def test_countdown_preset_layers_under_a_method_preset(tmp_path):
    from importlib import resources

    preset = str(resources.files("entclip.presets").joinpath("countdown.yaml"))
    res = runner.invoke(app, ["train", "--dry-run", "--presets", "none,clip-b-active", "--config", preset,
                              "--out-dir", str(tmp_path), "--name", "sw"])
    assert res.exit_code == 0, res.output
    assert "entropy_control=clip_b" in res.output and "entropy_control=none" in res.output
    res = runner.invoke(app, ["train", "--dry-run", "--preset", "countdown", "--out-dir", str(tmp_path)])
    assert res.exit_code == 0 and "task: countdown" in res.output and "max_new_tokens: 16" in res.output
