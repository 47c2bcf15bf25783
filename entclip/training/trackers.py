"""Experiment trackers (`report_to`): a copy of every metrics.jsonl and eval.jsonl row for dashboards.

The run directory stays the record. Each row goes to every tracker at its own step, under entclip's
metric names (`entropy/mean`, `test/avg@8`); non-finite values, which the JSONL files write as null,
are left out. A tracker that raises is reported once through the run's `log` and dropped: a
dashboard never stops a run. Each backend is imported only when it is asked for; `check_installed`
runs before the run directory exists, so a missing package leaves nothing behind.

- tensorboard: tensorboardX event files in `<run>/tensorboard/`; a resumed run purges the steps
  after its checkpoint (purge_step), so a step logged before a crash is not shown twice.
- trackio: trackio's local store (TRACKIO_DIR, default ~/.cache/huggingface/trackio); project =
  the out_dir folder's name ("entclip" for the default `runs`), run = the run directory's name; a
  resumed run continues it (resume="allow").
- wandb: offline unless WANDB_MODE is set, files under `<run>/wandb/`; the run id is kept in
  `<run>/trackers.json`, so a resumed run continues the same W&B run (resume="allow").
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import math
import os
import re
import secrets
from pathlib import Path
from typing import Any, Callable, Protocol

from entclip.contracts.errors import EntclipError

MODULES = {"tensorboard": "tensorboardX", "trackio": "trackio", "wandb": "wandb"}  # report_to -> import
STATE = "trackers.json"  # per-tracker ids a resumed run needs (wandb's run id)


class Tracker(Protocol):
    def log(self, metrics: dict[str, float], step: int) -> None: ...

    def finish(self) -> None: ...


def check_installed(names: tuple[str, ...]) -> None:
    """Every tracker's package imports, or one line naming the pip extra that installs it."""
    for name in names:
        try:
            importlib.import_module(MODULES[name])
        except ImportError:
            raise EntclipError(f"report_to={name}: the {MODULES[name]} package is not installed; "
                               f"pip install 'entclip[{name}]' or drop {name} from report_to") from None


def project_name(out_dir: str) -> str:
    name = Path(out_dir).resolve().name
    return "entclip" if out_dir == "runs" or not name else name


class TensorBoard:
    def __init__(self, run_path: Path, start_step: int | None):
        from tensorboardX import SummaryWriter

        # purge_step: events at or after it (written before a crash) are hidden by TensorBoard's reader.
        self.writer = SummaryWriter(logdir=str(run_path / "tensorboard"), purge_step=start_step)

    def log(self, metrics: dict[str, float], step: int) -> None:
        from tensorboardX.proto.summary_pb2 import Summary

        # One event per row, tags as entclip names them: add_scalar would rename test/avg@8 to test/avg_8.
        values = [Summary.Value(tag=key, simple_value=value) for key, value in metrics.items()]
        self.writer.file_writer.add_summary(Summary(value=values), global_step=step)
        self.writer.flush()  # a step is seconds or more: keep the files as current as metrics.jsonl

    def finish(self) -> None:
        self.writer.close()


class Trackio:
    def __init__(self, project: str, run_name: str, config: dict[str, Any], resumed: bool,
                 log: Callable[[str], None]):
        import trackio

        self._log, self._trackio = log, trackio
        with self._quiet():  # trackio prints its notices to stdout; they go through the run's log
            self.run = trackio.init(project=project, name=run_name, config=config,
                                    resume="allow" if resumed else "never", embed=False,
                                    auto_log_gpu=False, auto_log_cpu=False)

    @contextlib.contextmanager
    def _quiet(self):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            yield
        for line in out.getvalue().splitlines():
            if line.strip():
                self._log("trackio: " + re.sub(r"\x1b\[[0-9;]*m", "", line).strip().lstrip("* "))

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def finish(self) -> None:
        with self._quiet():
            self._trackio.finish()  # the module's finish also forgets the run (no second finish at exit)


class Wandb:
    def __init__(self, project: str, run_path: Path, config: dict[str, Any], log: Callable[[str], None]):
        import wandb

        state = _read_state(run_path)
        run_id = state.get("wandb", {}).get("id") or secrets.token_hex(4)  # W&B ids: [a-z0-9]
        if state.get("wandb", {}).get("id") != run_id:
            state["wandb"] = {"id": run_id}
            from entclip.contracts.rundir import write_json_atomic

            write_json_atomic(run_path / STATE, state)
        mode = None if os.environ.get("WANDB_MODE") else "offline"  # the user's WANDB_MODE wins
        self.run = wandb.init(project=project, name=run_path.name, dir=str(run_path), id=run_id,
                              resume="allow", mode=mode, config=config,
                              settings=wandb.Settings(console="off", silent=True))
        if self.run.settings.mode == "offline":
            log(f"wandb: offline run {run_id} in {self.run.settings.sync_dir} (`wandb sync` uploads it)")

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def finish(self) -> None:
        self.run.finish()


def _read_state(run_path: Path) -> dict[str, Any]:
    try:
        return json.loads((run_path / STATE).read_text())
    except (OSError, ValueError):
        return {}


class Trackers:
    """The run's trackers behind one `log(row)`; a tracker that raises is warned about once and dropped."""

    def __init__(self, trackers: dict[str, Tracker], log: Callable[[str], None]):
        self.trackers, self._log = trackers, log

    @classmethod
    def open(cls, cfg, run_path: Path, log: Callable[[str], None], start_step: int | None) -> "Trackers":
        """The trackers of `cfg.report_to` for the run in `run_path`; `start_step` is the first step a
        resumed run logs (None for a new run)."""
        out = cls({}, log)
        resumed = start_step is not None
        makers = {
            "tensorboard": lambda: TensorBoard(run_path, start_step),
            "trackio": lambda: Trackio(project_name(cfg.out_dir), run_path.name, cfg.to_dict(), resumed, log),
            "wandb": lambda: Wandb(project_name(cfg.out_dir), run_path, cfg.to_dict(), log),
        }
        for name in cfg.report_to:
            try:
                out.trackers[name] = makers[name]()
            except Exception as exc:  # noqa: BLE001 - any failure of a dashboard is only a warning
                out._drop(name, "could not start", exc)
        return out

    def log(self, row: dict[str, Any]) -> None:
        """One metrics.jsonl or eval.jsonl row: every finite number except `step`, at `step`."""
        if not self.trackers:
            return
        step = int(row["step"])
        metrics = {k: float(v) for k, v in row.items()
                   if k != "step" and isinstance(v, (int, float)) and math.isfinite(v)}
        for name, tracker in list(self.trackers.items()):
            try:
                tracker.log(metrics, step)
            except Exception as exc:  # noqa: BLE001
                self._drop(name, f"failed at step {step}", exc)

    def finish(self) -> None:
        for name, tracker in list(self.trackers.items()):
            try:
                tracker.finish()
            except Exception as exc:  # noqa: BLE001
                self._log(f"warning: the {name} tracker failed to finish ({type(exc).__name__}: {exc})")
        self.trackers.clear()

    def _drop(self, name: str, what: str, exc: Exception) -> None:
        tracker = self.trackers.pop(name, None)
        if tracker is not None:
            with contextlib.suppress(Exception):  # release its files and threads if it still can
                tracker.finish()
        self._log(f"warning: the {name} tracker {what} ({type(exc).__name__}: {exc}); it is dropped and "
                  "the run goes on (metrics.jsonl and eval.jsonl have every row)")
