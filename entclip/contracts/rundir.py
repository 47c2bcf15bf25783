"""The run directory: the contract between `train` and `analyze` / `compare`.

Layout (DESIGN.md): config.yaml (written first), metrics.jsonl, eval.jsonl, samples.jsonl,
summary.json, checkpoints/step_NNNNNN/. Whole files are written atomically (temporary name, then
rename); JSONL files are appended one complete line at a time and flushed.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from entclip.contracts.errors import BAD_DATA, EXISTS, NOT_FOUND, EntclipError

FORMAT = 1
CONFIG, METRICS, EVAL, SAMPLES, SUMMARY = (
    "config.yaml", "metrics.jsonl", "eval.jsonl", "samples.jsonl", "summary.json")
FILTER = "filter.jsonl"  # optional (log_filter): per-sequence dropped positions


def _clean(value: Any) -> Any:
    """JSON has no NaN/inf: write them as null so every line parses everywhere."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write text or bytes under a temporary name, fsync, rename into place: never a torn file; a
    failed write leaves no temporary file behind."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb" if isinstance(data, bytes) else "w") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, obj: Any) -> None:
    write_atomic(path, json.dumps(_clean(obj), indent=2) + "\n")


class RunDir:
    """A run directory being written by `train`."""

    def __init__(self, path: Path):
        self.path = path
        self._files: dict[str, Any] = {}

    @classmethod
    def create(cls, path: Path, overwrite: bool = False) -> "RunDir":
        """Make an empty run directory; refuse to touch a non-empty one unless `overwrite`."""
        if path.exists() and not path.is_dir():
            raise EntclipError(f"{path} exists and is not a directory; choose another --name or --out-dir", EXISTS)
        if path.is_dir() and any(path.iterdir()):
            if not overwrite:
                raise EntclipError(f"run directory {path} already exists and is not empty; "
                                   "pass --overwrite to replace it, --resume to continue it, or --name to choose another", EXISTS)
            if not (path / CONFIG).exists():
                raise EntclipError(f"{path} is not an entclip run directory (no {CONFIG}); "
                                   "--overwrite only replaces run directories: choose another --name", EXISTS)
            shutil.rmtree(path)
        path.mkdir(parents=True, exist_ok=True)
        return cls(path)

    def write_config(self, config_yaml: str) -> None:
        write_atomic(self.path / CONFIG, config_yaml)

    def append(self, name: str, row: dict[str, Any]) -> None:
        fh = self._files.get(name)
        if fh is None:
            fh = self._files[name] = open(self.path / name, "a")
        fh.write(json.dumps(_clean(row)) + "\n")
        fh.flush()

    def write_summary(self, summary: dict[str, Any]) -> None:
        write_json_atomic(self.path / SUMMARY, {"format": FORMAT, **summary})

    def checkpoint_dir(self, step: int) -> Path:
        return self.path / "checkpoints" / f"step_{step:06d}"

    @classmethod
    def reopen(cls, path: Path) -> tuple["RunDir", Path]:
        """An existing run to continue: its latest complete checkpoint, JSONL rows after it removed.

        A kill can leave rows past the checkpoint (and a torn last line) in the JSONL files and a
        temporary checkpoint folder; both are cleaned so the resumed run appends exactly once.
        """
        if not path.is_dir():
            raise EntclipError(f"--resume {path}: no such run directory; give the path of a run "
                               "started by `entclip train`", NOT_FOUND)
        if not (path / CONFIG).exists():
            raise EntclipError(f"--resume {path}: not an entclip run directory (no {CONFIG})", NOT_FOUND)
        ckpt = latest_checkpoint(path)
        if ckpt is None:
            raise EntclipError(f"--resume {path}: the run has no complete checkpoint to continue from; "
                               "start it again with --overwrite (set save_every to checkpoint often)",
                               NOT_FOUND)
        step = checkpoint_step(ckpt)
        for name in (METRICS, EVAL, SAMPLES, FILTER):
            _truncate_jsonl(path / name, step)
        for leftover in (path / "checkpoints").glob(".step_*.tmp"):
            shutil.rmtree(leftover, ignore_errors=True)
        return cls(path), ckpt

    def close(self) -> None:
        for fh in self._files.values():
            fh.close()
        self._files.clear()


@dataclass
class LoadedRun:
    """A run directory read back for analysis. Missing files give empty lists / None."""

    path: Path
    config: dict[str, Any]
    metrics: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] | None = None
    warnings: list[str] = field(default_factory=list)


def _read_jsonl(path: Path, warnings: list[str]) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    rows: list[dict[str, Any]] = []
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines):  # a torn last line from a killed writer: skip it, say so
                warnings.append(f"{path.name}: skipped a torn last line ({i})")
                continue
            raise EntclipError(f"{path} line {i} is not valid JSON; the file is corrupted: "
                               "restore it or delete that line", BAD_DATA) from None
        if not isinstance(row, dict):
            raise EntclipError(f"{path} line {i} is not a JSON object; the file is corrupted", BAD_DATA)
        rows.append(row)
    return rows


def load_run(path: Path) -> LoadedRun:
    if not path.exists():
        raise EntclipError(f"run directory {path} does not exist; give the path printed by `entclip train`", NOT_FOUND)
    if not path.is_dir() or not (path / CONFIG).exists():
        raise EntclipError(f"{path} is not an entclip run directory (no {CONFIG}); "
                           "give a directory written by `entclip train`", NOT_FOUND)
    try:
        config = yaml.safe_load((path / CONFIG).read_text()) or {}
    except yaml.YAMLError:
        raise EntclipError(f"{path / CONFIG} is not valid YAML; the run directory is corrupted", BAD_DATA) from None
    run = LoadedRun(path=path, config=config)
    run.metrics = _read_jsonl(path / METRICS, run.warnings)
    run.evals = _read_jsonl(path / EVAL, run.warnings)
    if (path / SUMMARY).exists():
        try:
            run.summary = json.loads((path / SUMMARY).read_text())
        except json.JSONDecodeError:
            run.warnings.append(f"{SUMMARY} is not valid JSON; ignored")
    return run


# ---- checkpoints ---------------------------------------------------------------------------
CKPT_MARKER = "entclip_checkpoint.json"  # written last inside the temporary folder


def checkpoint_step(path: Path) -> int:
    return int(path.name.split("_")[1])


def latest_checkpoint(run_path: Path) -> Path | None:
    """The newest complete checkpoint (its folder was renamed into place after the marker)."""
    root = run_path / "checkpoints"
    done = [p for p in root.glob("step_*") if (p / CKPT_MARKER).exists()] if root.is_dir() else []
    return max(done, key=checkpoint_step, default=None)


def save_checkpoint(final: Path, model, tokenizer, state: dict[str, Any], keep: int) -> Path:
    """save_pretrained (safetensors) + tokenizer + trainer_state.pt, renamed into place at once.

    A kill at any moment leaves either no folder for this step or a complete one. Then only the
    newest `keep` checkpoints are kept (0 = all).
    """
    import torch

    tmp = final.with_name(f".{final.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    torch.save(state, tmp / "trainer_state.pt")
    write_json_atomic(tmp / CKPT_MARKER, {"step": state["step"], "format": FORMAT})
    if final.exists():  # a resumed run re-reaching a step it had saved before the kill
        shutil.rmtree(final)
    os.replace(tmp, final)
    if keep > 0:
        done = sorted((p for p in final.parent.glob("step_*") if (p / CKPT_MARKER).exists()),
                      key=checkpoint_step)
        for old in done[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_trainer_state(ckpt: Path) -> dict[str, Any]:
    import torch

    try:  # weights_only: never unpickle arbitrary objects from a file
        return torch.load(ckpt / "trainer_state.pt", weights_only=True, map_location="cpu")
    except Exception as exc:
        raise EntclipError(f"{ckpt / 'trainer_state.pt'} cannot be read ({type(exc).__name__}); "
                           "the checkpoint is damaged: delete that folder to resume from an older one",
                           BAD_DATA) from None


def _truncate_jsonl(path: Path, step: int) -> None:
    """Keep the complete rows with row["step"] <= step, rewritten atomically."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn line from the kill
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
            keep.append(line + "\n")
    write_atomic(path, "".join(keep))


def eval_set_names(row: dict[str, Any]) -> list[str]:
    """The eval sets of one eval.jsonl row, in their order: "test" for the built-in task, else the
    names given in eval_sets (keys are "<set>/<figure>")."""
    names: list[str] = []
    for key in row:
        name, sep, figure = key.partition("/")
        if sep and figure.startswith(("avg@", "greedy_acc")) and name not in names:
            names.append(name)
    return names
