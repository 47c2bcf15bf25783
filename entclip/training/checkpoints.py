"""Checkpoints of a run: `save` writes the weights, the tokenizer and what `restore` needs for an exact
resume (optimizer, scheduler, every RNG, the TrainState); only the main process writes, all wait for it.
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

import torch

from entclip.contracts.rundir import load_trainer_state, save_checkpoint


def save(trainer, step: int, wall_s: float) -> Path:
    """A complete checkpoint: weights, tokenizer and everything an exact resume needs."""
    session, learner, train_state = trainer.session, trainer.learner, trainer.state
    final = session.run_dir.checkpoint_dir(step)
    if session.accelerator.is_main_process:
        state = {"format": 1, "step": step, "wall_s": wall_s, "optimizer": learner.opt.state_dict(),
                 "scheduler": learner.sched.state_dict(), "rng": _rng_state(),
                 "nonfinite_total": train_state.nonfinite_total, "warm_start": session.warm_start,
                 "entropy_coef": train_state.entropy_coef, "last_entropy": train_state.last_entropy}
        save_checkpoint(final, session.policy, session.tokenizer, state, session.cfg.keep_checkpoints)
    session.accelerator.wait_for_everyone()
    return final


def restore(trainer, ckpt: Path) -> dict[str, Any]:
    """Optimizer, scheduler, RNG and counters from a checkpoint (weights were loaded already).

    The data position needs no state: each step's prompts and samples derive from (seed, step).
    """
    state = load_trainer_state(ckpt)
    trainer.learner.opt.load_state_dict(state["optimizer"])
    trainer.learner.sched.load_state_dict(state["scheduler"])
    _set_rng_state(state["rng"])
    trainer.state.nonfinite_total = state["nonfinite_total"]
    trainer.state.entropy_coef = state["entropy_coef"]
    trainer.state.last_entropy = state.get("last_entropy", math.inf)  # absent in checkpoints before 0.x
    trainer.session.warm_start = state["warm_start"]
    return state


def _rng_state() -> dict[str, Any]:
    """Every RNG a user's code might draw from; stored in weights_only-loadable types."""
    import numpy as np

    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate(),
                             "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
