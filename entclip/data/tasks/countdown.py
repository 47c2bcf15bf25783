"""The second embedded offline task: countdown, a small search where several answers are right.

A problem gives `numbers` integers from 1..max_number (a sorted multiset) and a target; the answer
combines them with + - * in `numbers - 1` steps, each step written out:

    prompt "3,7,9:30="   answers "7*3=21,21+9=30", "3*7=21,9+21=30", ...

Each step takes two numbers from the pool (the originals plus results not yet used), replaces them
by its result, and the last result must be the target. Results are non-negative integers (the
grammar has no minus sign), so a subtraction needs its larger number first. Operand order,
different operations and different pairings all give valid answers, which is what makes sampling
diversity worth something here. Every (multiset, reachable target in 1..max_target) pair is one
problem; a fixed shuffle seeded by `split_seed` (independent of any training seed) puts `n_test`
problems in `.test` and the rest in `.train`. No files, no network.
"""

from __future__ import annotations

import itertools
import random
import re
from dataclasses import dataclass
from functools import cached_property

from entclip.contracts.errors import EntclipError
from entclip.data.tasks.arithmetic import MIN_TRAIN, Problem

CHARS = "-*,:"  # characters beyond arithmetic's "0123456789+=" (appended, so shared ids agree)
_NUM = r"(0|[1-9][0-9]*)"  # no leading zeros: "07" is not a number a step may write
_STEP = re.compile(_NUM + r"([+\-*])" + _NUM + "=" + _NUM)
_PROMPT = re.compile(r"\s*([0-9]+(?:,[0-9]+)*):([0-9]+)=\s*")
_OPS = {"+": lambda x, y: x + y, "-": lambda x, y: x - y, "*": lambda x, y: x * y}


def parse_prompt(prompt: str) -> tuple[list[int], int]:
    """"3,7,9:30=" -> ([3, 7, 9], 30); ValueError for anything else."""
    m = _PROMPT.fullmatch(prompt)
    if not m:
        raise ValueError(f"countdown prompt {prompt!r} is not of the form 'a,b,c:target='")
    return [int(x) for x in m.group(1).split(",")], int(m.group(2))


def verify(completion: str, prompt: str) -> bool:
    """True iff the completion reaches the prompt's target using each number exactly once.

    The completion is `len(numbers) - 1` comma-separated steps "x op y=z" (op in + - *, no spaces,
    no leading zeros, surrounding whitespace ignored); x and y must be in the pool (the numbers,
    plus earlier results), each use removes one copy, z must equal x op y and joins the pool; after
    the last step the pool must be exactly [target]. Anything else is False.
    """
    numbers, target = parse_prompt(prompt)
    steps = completion.strip().split(",")
    if len(steps) != len(numbers) - 1:
        return False
    pool = list(numbers)
    for step in steps:
        m = _STEP.fullmatch(step)
        if not m:
            return False
        x, op, y, z = int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(4))
        for operand in (x, y):
            if operand not in pool:
                return False
            pool.remove(operand)
        if _OPS[op](x, y) != z:
            return False
        pool.append(z)
    return pool == [target]


def reward(completion: str, answer: str, prompt: str) -> float:
    """1.0 iff `verify(completion, prompt)`; `answer` (one canonical solution) is not needed."""
    return 1.0 if verify(completion, prompt) else 0.0


def _solve(pool: tuple[int, ...]) -> dict[int, list[str]]:
    """Every way to reduce `pool` to one number: final value -> list of step strings (no dupes)."""
    if len(pool) == 1:
        return {pool[0]: [""]}
    out: dict[int, set[str]] = {}
    for i, j in itertools.permutations(range(len(pool)), 2):
        x, y = pool[i], pool[j]
        rest = tuple(v for k, v in enumerate(pool) if k not in (i, j))
        for op, fn in _OPS.items():
            z = fn(x, y)
            if z < 0:
                continue
            step = f"{x}{op}{y}={z}"
            for final, tails in _solve(rest + (z,)).items():
                out.setdefault(final, set()).update(step + ("," + t if t else "") for t in tails)
    return {k: sorted(v) for k, v in out.items()}


@dataclass(frozen=True)
class CountdownTask:
    """Countdown problems over multisets of `numbers` values from 1..max_number, split in two.

    Contract: `.train` and `.test` are disjoint, `len(.test) == n_test`, every problem has at least
    one solution `verify` accepts (`solutions(p)[0] == p.answer`, the canonical one), and both lists
    (contents and order) depend only on the fields.
    """

    numbers: int = 3  # numbers per problem (3 or 4); answers take numbers - 1 steps
    max_number: int = 9  # numbers are drawn from 1..max_number
    max_target: int = 100  # targets are the reachable values in 1..max_target
    n_test: int = 500  # held-out problems, never used for training or warm-start evaluation
    split_seed: int = 1234  # seeds the split only; keep it fixed to compare runs on one test set

    name = "countdown"  # class attribute, not a field: the registry name of the task
    reward_name = "countdown"  # the builtin reward (entclip.data.rewards) that verifies it

    def __post_init__(self) -> None:
        if self.numbers not in (3, 4):
            raise EntclipError(f"countdown_numbers={self.numbers}: must be 3 or 4 (2 gives one step, 5 too "
                               "many problems to list); set --set countdown_numbers=3")
        if not 2 <= self.max_number <= 20:
            raise EntclipError(f"countdown_max_number={self.max_number}: must be in 2..20; "
                               "set --set countdown_max_number=9")
        if self.max_target < 1:
            raise EntclipError(f"countdown_max_target={self.max_target}: must be at least 1; "
                               "set --set countdown_max_target=100")
        if self.n_test < 1:
            raise EntclipError(f"n_test={self.n_test}: the test split needs a problem; e.g. 500")
        total = len(self._shuffled)
        if total - self.n_test < MIN_TRAIN:
            raise EntclipError(
                f"n_test={self.n_test} leaves {total - self.n_test} of {total} countdown problems for "
                f"training (at least {MIN_TRAIN} needed); lower n_test to at most "
                f"{max(total - MIN_TRAIN, 0)} or raise countdown_max_number / countdown_max_target")

    @cached_property
    def _solutions(self) -> dict[str, tuple[str, ...]]:
        """prompt -> every solution, sorted (shortest first, then by text): generation order."""
        out: dict[str, tuple[str, ...]] = {}
        for pool in itertools.combinations_with_replacement(range(1, self.max_number + 1), self.numbers):
            head = ",".join(map(str, pool))
            for target, sols in sorted(_solve(pool).items()):
                if 1 <= target <= self.max_target:
                    out[f"{head}:{target}="] = tuple(sorted(sols, key=lambda s: (len(s), s)))
        return out

    @cached_property
    def _shuffled(self) -> list[Problem]:
        problems = [Problem(prompt, sols[0]) for prompt, sols in self._solutions.items()]
        # A private Random, so the split never depends on (or disturbs) the global RNG state.
        random.Random(self.split_seed).shuffle(problems)
        return problems

    def solutions(self, problem: Problem) -> tuple[str, ...]:
        """Every valid answer to one of this task's problems (the warm start samples among them)."""
        return self._solutions[problem.prompt]

    @cached_property
    def max_answer_chars(self) -> int:
        """Longest valid answer in characters (15 at the defaults): a bound for max_new_tokens."""
        return max(len(s) for sols in self._solutions.values() for s in sols)

    @cached_property
    def test(self) -> list[Problem]:
        """The `n_test` held-out problems, in a fixed shuffled order."""
        return self._shuffled[: self.n_test]

    @cached_property
    def train(self) -> list[Problem]:
        """All other problems, in a fixed shuffled order."""
        return self._shuffled[self.n_test :]

    # Same signature as ArithmeticTask.verify(completion, answer) would not do: this needs the prompt.
    reward = staticmethod(reward)

    @staticmethod
    def check(completion: str, problem: Problem) -> bool:
        """The verifier on one problem (the warm start's accuracy)."""
        return verify(completion, problem.prompt)
