"""report_to: what each tracker's own reader finds equals metrics.jsonl and eval.jsonl, step by step.

Readers: TensorBoard's EventAccumulator, trackio's SQLiteStorage (its local store under the session's
TRACKIO_DIR, see conftest), and wandb's offline .wandb file decoded with wandb's own protobuf Record
(the file is LevelDB's log format; wandb ships no Python reader for it any more). Offline throughout.
"""

from __future__ import annotations

import json
import struct
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import tiny_sets
from entclip.cli import app
from entclip.contracts.config import resolve
from entclip.contracts.errors import EntclipError
from entclip.contracts.rundir import RunDir

runner = CliRunner()


def _sets(**overrides) -> list[str]:
    return [a for s in tiny_sets(**overrides) for a in ("--set", s)]


def _train(out: Path, name: str, **overrides):
    return runner.invoke(app, ["train", "--out-dir", str(out), "--name", name, *_sets(**overrides)])


def _expected(run: Path) -> dict[str, list[tuple[int, float]]]:
    """{metric: [(step, value)]} of every number in metrics.jsonl and eval.jsonl (null = not logged)."""
    out: dict[str, list[tuple[int, float]]] = {}
    for name in ("metrics.jsonl", "eval.jsonl"):
        for row in map(json.loads, (run / name).read_text().splitlines()):
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    out.setdefault(key, []).append((row["step"], float(value)))
    return {k: sorted(v) for k, v in out.items()}


def _f32(series):
    return [(step, float(np.float32(v))) for step, v in series]


def _tensorboard(run: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={SCALARS: 0})  # 0 = keep every event
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _wandb_records(path: Path):
    """The protobuf Records of one .wandb file: a 7-byte header, then LevelDB log blocks of 32 KiB
    whose chunks (crc32 4, length 2, type 1: full 1, first 2, middle 3, last 4) join into records."""
    from wandb.proto.wandb_internal_pb2 import Record

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B", f"{path} is not a wandb log"
    pos, parts = 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        parts += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = Record()
            record.ParseFromString(parts)
            parts = b""
            yield record


def _wandb_folder(folder: Path) -> tuple[str, dict[str, list[tuple[int, float]]]]:
    """(run id, {metric: [(step, value)]}) of one offline run folder (wandb's own keys start with _)."""
    out: dict[str, list[tuple[int, float]]] = {}
    run_id = ""
    for record in _wandb_records(next(folder.glob("run-*.wandb"))):
        if record.WhichOneof("record_type") == "run":
            run_id = record.run.run_id
        if record.WhichOneof("record_type") == "history":
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                if not key.startswith("_"):
                    out.setdefault(key, []).append((record.history.step.num, json.loads(item.value_json)))
    return run_id, {k: sorted(v) for k, v in out.items()}


def _wandb_folders(run: Path) -> list[Path]:
    return sorted((run / "wandb").glob("offline-run-*"))  # offline-run-<time>-<id>[-n], oldest first


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    out = tmp_path_factory.mktemp("tracked")
    res = _train(out, "r", report_to="tensorboard,wandb", steps=3, eval_every=2)
    assert res.exit_code == 0, res.output
    assert "warning" not in res.output, res.output
    return out / "r"


def test_tensorboard_scalars_are_every_metrics_and_eval_row_at_its_step(tracked):
    expected = _expected(tracked)
    assert {"entropy/mean", "quad/pos_devpos_share", "test/avg@4", "test/greedy_acc"} <= expected.keys()
    assert expected["test/avg@4"][0][0] == 0 and [s for s, _ in expected["entropy/mean"]] == [1, 2, 3]
    got = _tensorboard(tracked)
    assert got.keys() == expected.keys()
    for key, series in expected.items():
        assert got[key] == _f32(series), key  # event files hold float32


def test_wandb_offline_run_in_the_run_directory_holds_every_row_under_the_stored_id(tracked):
    stored = json.loads((tracked / "trackers.json").read_text())["wandb"]["id"]
    folders = _wandb_folders(tracked)  # offline (no WANDB_MODE set), under <run>/wandb, the id kept
    assert len(folders) == 1
    assert _wandb_folder(folders[0]) == (stored, _expected(tracked))


def test_trackio_local_store_holds_every_row_under_the_run_name(tmp_path):
    from trackio.sqlite_storage import SQLiteStorage

    res = _train(tmp_path / "trk-proj", "r", report_to="trackio", steps=2, eval_every=1)
    assert res.exit_code == 0 and "warning" not in res.output, res.output
    run = tmp_path / "trk-proj" / "r"
    got: dict[str, list[tuple[int, float]]] = {}
    for row in SQLiteStorage.get_logs("trk-proj", "r"):
        for key, value in row.items():
            if key not in ("step", "timestamp") and value is not None:
                got.setdefault(key, []).append((row["step"], value))
    assert {k: sorted(v) for k, v in got.items()} == _expected(run)


def test_a_tracker_that_raises_is_reported_once_and_the_run_completes(tmp_path, monkeypatch):
    from entclip.training import trackers

    calls = []

    def broken(self, metrics, step):
        calls.append(step)
        raise OSError("disk full")

    monkeypatch.setattr(trackers.TensorBoard, "log", broken)
    res = _train(tmp_path, "r", report_to="tensorboard", steps=3, eval_every=1)
    assert res.exit_code == 0, res.output
    assert calls == [0]  # the first row (evaluation at step 0) raised; the tracker got no other
    warnings = [line for line in res.output.splitlines() if "tensorboard tracker" in line]
    assert len(warnings) == 1 and "disk full" in warnings[0] and "dropped" in warnings[0], res.output
    assert len((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()) == 3
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["status"] == "completed"


def test_a_missing_tracker_package_stops_with_one_line_naming_the_extra_before_the_run_exists(
        tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # `import tensorboardX` raises ImportError
    res = _train(tmp_path, "r", report_to="tensorboard")
    assert res.exit_code == 2
    assert res.output.strip().splitlines() == [
        "error: report_to=tensorboard: the tensorboardX package is not installed; "
        "pip install 'entclip[tensorboard]' or drop tensorboard from report_to"]
    assert not (tmp_path / "r").exists()


def test_resume_continues_tensorboard_and_wandb_without_a_repeated_step(tmp_path):
    from entclip.training.loop import train

    cfg = resolve(sets=[*tiny_sets(steps=4, eval_every=2, save_every=2, keep_checkpoints=0),
                        "report_to=tensorboard,wandb", f"out_dir={tmp_path}", "name=r"])
    run = RunDir.create(tmp_path / "r")
    run.write_config(cfg.to_yaml())

    def crash_after_step_3(step, metrics):  # step 3 reached every tracker; the checkpoint is step 2's
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, run, log=lambda s: None, on_step=crash_after_step_3)
    run.close()
    assert [s for s, _ in _tensorboard(tmp_path / "r")["entropy/mean"]] == [1, 2, 3]
    # TensorBoard reads event files in name order, events.out.tfevents.<second>.<host>.<pid>.<n>: a real
    # resume is a later process in a later second; this one is the same process, so wait for the second.
    time.sleep(1.1)
    res = runner.invoke(app, ["train", "--resume", str(tmp_path / "r"), "--quiet"])
    assert res.exit_code == 0, res.output
    expected = _expected(tmp_path / "r")
    assert [s for s, _ in expected["entropy/mean"]] == [1, 2, 3, 4]
    got = _tensorboard(tmp_path / "r")
    assert got.keys() == expected.keys()
    for key, series in expected.items():  # step 3 once, the resumed run's (purge_step hid the first)
        assert got[key] == _f32(series), key
    # wandb: a second offline folder under the same run id, from the step after the checkpoint on
    first, second = _wandb_folders(tmp_path / "r")
    stored = json.loads((tmp_path / "r" / "trackers.json").read_text())["wandb"]["id"]
    assert _wandb_folder(first)[0] == stored
    assert _wandb_folder(second) == (stored, {k: [(s, v) for s, v in series if s > 2]
                                              for k, series in expected.items() if series[-1][0] > 2})


@pytest.mark.parametrize("value, expected", [
    ("none", ()), ("", ()), ("tensorboard", ("tensorboard",)), ("wandb,tensorboard", ("wandb", "tensorboard")),
    ("[trackio, wandb]", ("trackio", "wandb")), ("TensorBoard, tensorboard", ("tensorboard",)),
])
def test_report_to_reads_none_a_name_a_comma_list_or_a_yaml_list(value, expected, tmp_path):
    cfg = resolve(sets=[f"report_to={value}"])
    assert cfg.report_to == expected
    saved = tmp_path / "config.yaml"  # a run's config.yaml (a YAML list) reads back the same
    saved.write_text(cfg.to_yaml())
    assert resolve(config_file=str(saved)).report_to == expected


def test_report_to_rejects_an_unknown_tracker_with_the_choices():
    with pytest.raises(EntclipError, match="unknown tracker 'tensorbord'; choose none or from tensorboard, "
                                           "trackio, wandb"):
        resolve(sets=["report_to=tensorboard,tensorbord"])
