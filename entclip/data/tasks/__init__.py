"""The built-in offline tasks, chosen by `task` in the config (used when no dataset is set)."""

from __future__ import annotations


def builtin_task(cfg):
    """The built-in task `cfg.task` with its settings: an ArithmeticTask or a CountdownTask.

    Both have `.train`, `.test` (lists of Problem), `n_test`, `max_answer_chars` and `reward_name`.
    Raises EntclipError for settings the task rejects (one line that names the fix).
    """
    if cfg.task == "countdown":
        from entclip.data.tasks.countdown import CountdownTask

        return CountdownTask(numbers=cfg.countdown_numbers, max_number=cfg.countdown_max_number,
                             max_target=cfg.countdown_max_target, n_test=cfg.n_test)
    from entclip.data.tasks.arithmetic import ArithmeticTask

    return ArithmeticTask(max_operand=cfg.max_operand, n_test=cfg.n_test)


def builtin_reward(cfg) -> str:
    """The builtin reward (and verifier) of the built-in task: what `reward: auto` means for it."""
    return "countdown" if cfg.task == "countdown" else "exact"
