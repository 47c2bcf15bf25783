"""The embedded offline task: two-operand addition with an exact verifier.

Every pair (a, b) with 0 <= a, b <= max_operand is one problem, prompt "a+b=" and answer str(a + b).
A fixed shuffle seeded by `split_seed` (independent of any training seed, so that every run of the
same task is evaluated on the same held-out problems) puts `n_test` problems in `.test` and the rest
in `.train`. The split is a pure function of the three fields: no files, no network.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from functools import cached_property

from entclip.contracts.errors import EntclipError

# Below this the warm start and GRPO would cycle through the same few prompts; the message names it.
MIN_TRAIN = 200


def verify(completion: str, answer: str) -> bool:
    """True iff the completion is exactly the answer, ignoring surrounding whitespace."""
    return completion.strip() == answer.strip()


def reward(completion: str, answer: str) -> float:
    """1.0 for an exactly right completion, else 0.0."""
    return 1.0 if verify(completion, answer) else 0.0


@dataclass(frozen=True)
class Problem:
    """One prompt and its exact answer, e.g. Problem("12+34=", "46")."""

    prompt: str
    answer: str


@dataclass(frozen=True)
class ArithmeticTask:
    """Addition problems a+b= over 0..max_operand, split into disjoint train and test lists.

    Contract: `.train` and `.test` are disjoint, together hold all (max_operand + 1)**2 problems,
    `len(.test) == n_test`, and both lists (contents and order) depend only on the three fields.
    """

    max_operand: int = 99  # largest operand; answers have at most len(str(2 * max_operand)) digits
    n_test: int = 500  # held-out problems, never used for training or warm-start evaluation
    split_seed: int = 1234  # seeds the split only; keep it fixed to compare runs on one test set

    name = "arithmetic"  # class attribute, not a field: the registry name of the task
    reward_name = "exact"  # the builtin reward (entclip.data.rewards) that verifies it

    def __post_init__(self) -> None:
        if self.max_operand < 1:
            raise EntclipError(f"max_operand={self.max_operand}: must be at least 1; e.g. 99")
        total = (self.max_operand + 1) ** 2
        if self.n_test < 1:
            raise EntclipError(f"n_test={self.n_test}: the test split needs a problem; e.g. 500")
        if total - self.n_test < MIN_TRAIN:
            # Smallest max_operand whose (m + 1)**2 problems cover n_test plus MIN_TRAIN.
            need = math.isqrt(self.n_test + MIN_TRAIN - 1)
            fix = f"raise max_operand to at least {need}"
            if total - MIN_TRAIN >= 1:
                fix = f"lower n_test to at most {total - MIN_TRAIN} or " + fix
            raise EntclipError(
                f"n_test={self.n_test} leaves {total - self.n_test} of {total} problems for "
                f"training (at least {MIN_TRAIN} needed); {fix}"
            )

    @property
    def max_answer_chars(self) -> int:
        """Longest answer in characters (3 for max_operand=99): a bound for max_new_tokens."""
        return len(str(2 * self.max_operand))

    @cached_property
    def _shuffled(self) -> list[Problem]:
        pairs = [(a, b) for a in range(self.max_operand + 1) for b in range(self.max_operand + 1)]
        # A private Random, so the split never depends on (or disturbs) the global RNG state.
        random.Random(self.split_seed).shuffle(pairs)
        return [Problem(f"{a}+{b}=", str(a + b)) for a, b in pairs]

    @cached_property
    def test(self) -> list[Problem]:
        """The `n_test` held-out problems, in a fixed shuffled order."""
        return self._shuffled[: self.n_test]

    @cached_property
    def train(self) -> list[Problem]:
        """All other problems, in a fixed shuffled order."""
        return self._shuffled[self.n_test :]

    # The verifier is also a method, so code holding a task object need not know the module.
    verify = staticmethod(verify)
    reward = staticmethod(reward)
