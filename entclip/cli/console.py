"""Console output for long work: a rich progress bar on a terminal, plain lines otherwise.

On a TTY: a live bar with reward, entropy and filter share. Not a TTY (CI, pipes, log files): one
parseable `key=value` line every `log_every` steps. `--quiet`: nothing until the end.
"""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, quiet: bool = False, log_every: int = 10):
        self.total, self.quiet, self.log_every = total, quiet, log_every
        self.tty = sys.stdout.isatty() and not quiet
        self._bar = None
        self._task = None
        self._t0 = time.perf_counter()

    def __enter__(self) -> "Progress":
        if self.tty:
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                     TimeElapsedColumn(), TextColumn("{task.description}"))
            self._bar.__enter__()
            self._task = self._bar.add_task("warm start / setup", total=self.total)
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)

    def log(self, message: str) -> None:
        if self.quiet:
            return
        if self._bar is not None:
            self._bar.console.print(message, highlight=False)
        else:
            print(message, flush=True)

    def step(self, step: int, m: dict) -> None:
        m = {k: m.get(k, float("nan")) for k in ("reward/mean", "entropy/mean", "clip/filter_frac", "reward/accuracy",
                                                  "perf/step_s")}  # a TRL run's row may lack some
        figures = (f"reward={m['reward/mean']:.3f} entropy={m['entropy/mean']:.4f} "
                   f"filter={m['clip/filter_frac']:.4f}")
        if self._bar is not None:
            self._bar.update(self._task, completed=step, description=figures.replace("=", " "))
        elif not self.quiet and (step % self.log_every == 0 or step == self.total):
            print(f"step={step}/{self.total} {figures} acc={m['reward/accuracy']:.3f} "
                  f"step_s={m['perf/step_s']:.3f} elapsed_s={time.perf_counter() - self._t0:.1f}", flush=True)
