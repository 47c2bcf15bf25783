"""The run around the steps: `train` builds a Trainer, takes its steps, evaluates and checkpoints on
the configured cadence, and ends with summary.json (status completed, interrupted or failed).

Checkpoints are checkpoints.save / restore.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import torch

from entclip.contracts.config import Config
from entclip.contracts.errors import FAILED, INTERRUPTED, EntclipError
from entclip.contracts.rundir import RunDir
from entclip.training.checkpoints import restore, save
from entclip.training.engine import NonFiniteStop, Trainer
from entclip.training.parallel import global_max
from entclip.training.session import Log, WrapSampler
from entclip.training.trackers import Trackers

OnStep = Callable[[int, dict[str, float]], None]  # called after each step with its metrics (progress bars)


def train(cfg: Config, run: RunDir, log: Log = print, on_step: OnStep = lambda s, m: None,
          resume_from: Path | None = None, wrap_sampler: WrapSampler | None = None) -> dict[str, Any]:
    """Run GRPO per `cfg` into `run` (or continue it from checkpoint `resume_from`); return the summary.

    `wrap_sampler(sampler) -> Sampler` replaces the default sampler (see Trainer): the same run with
    rollouts post-processed or drawn by another backend.

    Ctrl-C stops after the current step with a checkpoint (EntclipError, exit 130); too many
    non-finite updates in a row stop with a checkpoint of the last good parameters (exit 1).

    Every metrics.jsonl and eval.jsonl row also goes to the trackers of `cfg.report_to` (trackers.py),
    from the main process; a resumed run continues their runs.
    """
    trainer = Trainer(cfg, run, log, model_path=str(resume_from) if resume_from else None,
                      resume=resume_from is not None, wrap_sampler=wrap_sampler)
    t_start, wall_before, start = time.perf_counter(), 0.0, 1
    if resume_from is not None:
        state = restore(trainer, resume_from)
        start, wall_before = state["step"] + 1, state["wall_s"]
        log(f"resuming {run.path} after step {state['step']}")
    trackers = Trackers({}, log)
    if trainer.session.accelerator.is_main_process:
        trackers = Trackers.open(cfg, run.path, log, start_step=start if resume_from is not None else None)
    try:
        return _steps(cfg, run, trainer, trackers, log, on_step, start,
                      lambda: wall_before + time.perf_counter() - t_start, fresh=resume_from is None)
    finally:
        trackers.finish()
        trainer.session.sampler.close()


def _steps(cfg: Config, run: RunDir, trainer: Trainer, trackers: Trackers, log: Log, on_step: OnStep,
           start: int, elapsed, fresh: bool) -> dict[str, Any]:
    """Steps `start`..cfg.steps with their evaluations and checkpoints; the summary at the end."""
    import signal

    if fresh:
        trackers.log(trainer.evaluate(0))

    def request_stop(signum, frame):
        if trainer.state.stop_requested:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        trainer.state.stop_requested = True
        log("Ctrl-C: stopping after this step (press again to abort at once)")

    previous = signal.signal(signal.SIGINT, request_stop) if _main_thread() else None
    step = start - 1
    try:
        for step in range(start, cfg.steps + 1):
            metrics = trainer.step(step)
            trackers.log(metrics)
            if cfg.eval_every and step % cfg.eval_every == 0 and step != cfg.steps:
                trackers.log(trainer.evaluate(step))
            if cfg.save_every and step % cfg.save_every == 0 and step != cfg.steps:
                save(trainer, step, elapsed())
            on_step(step, metrics)
            if trainer.session.accelerator.num_processes > 1:  # every process stops after the same step
                trainer.state.stop_requested = global_max(trainer.session.accelerator, trainer.state.stop_requested) > 0
            if trainer.state.stop_requested and step != cfg.steps:
                ckpt = save(trainer, step, elapsed())
                _finish(trainer, run, "interrupted", step, elapsed(), ckpt)
                raise EntclipError(f"interrupted after step {step}; checkpoint {ckpt} written; continue with: "
                                   f"entclip train --resume {run.path}", INTERRUPTED)
    except NonFiniteStop as stop:
        ckpt = save(trainer, stop.step - 1, elapsed()) if stop.step > 1 else None
        _finish(trainer, run, "failed", stop.step - 1, elapsed(), ckpt)
        raise EntclipError(f"stopped at step {stop.step}: {cfg.max_nonfinite} non-finite updates in a row "
                           f"(loss or gradient); last good parameters in {ckpt or 'the warm start'}; "
                           "lower lr or raise max_grad_norm clipping", FAILED) from None
    except BaseException:
        trainer.session.rewards.close()
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    try:
        trackers.log(trainer.evaluate(cfg.steps))
    finally:
        trainer.session.rewards.close()  # the reward worker's last use
    ckpt = save(trainer, cfg.steps, elapsed())
    return _finish(trainer, run, "completed", cfg.steps, elapsed(), ckpt)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


SUMMARY_KEYS = ["reward/mean", "reward/accuracy", "entropy/mean", "clip/filter_frac", "disc/min_z_b",
                "disc/min_z_v", "train/nonfinite_total"]


def run_figures(path: Path) -> dict[str, Any]:
    """summary.json's figures from a run directory's own files (so a resumed run, or a TRL run,
    summarizes all its steps): the last row's SUMMARY_KEYS, entropy first/last/min, first/last eval."""
    from entclip.contracts.rundir import load_run

    loaded = load_run(path)
    rows, evals = loaded.metrics, loaded.evals
    entropies = [r["entropy/mean"] for r in rows if r.get("entropy/mean") is not None]
    last = rows[-1] if rows else {}
    return {"final": {k: last.get(k) for k in SUMMARY_KEYS},
            "entropy": {"first": entropies[0], "last": entropies[-1], "min": min(entropies)} if entropies else None,
            "eval_first": evals[0] if evals else None, "eval_last": evals[-1] if evals else None}


def library_versions() -> dict[str, str]:
    """The versions summary.json records (trl's too when it is installed, for TRL runs)."""
    import importlib.metadata

    import accelerate
    import transformers

    from entclip import __version__

    out = {"entclip": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
           "accelerate": accelerate.__version__}
    try:
        out["trl"] = importlib.metadata.version("trl")
    except importlib.metadata.PackageNotFoundError:
        pass
    return out


def _finish(trainer: Trainer, run: RunDir, status: str, step: int, wall_s: float,
            ckpt: Path | None) -> dict[str, Any]:
    """summary.json from the run directory's own files, so a resumed run summarizes all its steps."""
    run.close()
    summary = {
        "status": status, "steps": step, "steps_planned": trainer.cfg.steps, "wall_s": wall_s,
        "method": trainer.cfg.entropy_control, "warm_start": trainer.session.warm_start,
        **run_figures(run.path),
        "checkpoint": str(ckpt.relative_to(run.path)) if ckpt else None,
        "versions": library_versions(),
    }
    if trainer.session.accelerator.is_main_process:
        run.write_summary(summary)
    return summary
