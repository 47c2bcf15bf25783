"""A custom reward for `--set reward=...`: any importable `module:function` with this signature.

    fn(completion: str, answer: str, prompt: str) -> float

It runs in entclip's reward worker process under `reward_timeout`; raising, returning a non-number
or running past the timeout scores 0 and is counted (reward/errors, reward/timeouts).
Use it as, e.g.:  PYTHONPATH=examples entclip train ... --set reward=math,my_reward:brevity=0.1
"""


def brevity(completion: str, answer: str, prompt: str) -> float:
    """1.0 for an empty completion falling linearly to 0.0 at 400 characters: a length penalty."""
    return max(0.0, 1.0 - len(completion) / 400)
