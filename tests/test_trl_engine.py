"""`entclip train --engine trl` (entclip/training/trl_engine.py): the config on TRL's GRPOTrainer.

The mapping table places every config key; the batch layout makes one TRL generation batch one
entclip step; keys TRL cannot honour and bad pass-through fields are refused by name before anything
is written; a tiny run goes end to end through the CLI and `entclip analyze` / `entclip compare` read
it beside an own-engine run; and under `accelerate launch --num_processes 2` the filter drops the same
tokens of the same completions as in one process (slow). Skipped without trl.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl")

from typer.testing import CliRunner  # noqa: E402

from conftest import TEST_SEED, tiny_sets  # noqa: E402
from entclip.cli import app  # noqa: E402
from entclip.contracts.config import FIELDS, resolve  # noqa: E402
from entclip.training import trl_engine  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()
# 8 prompts x 4 samples, Clip_B with a small mu (the released default barely drops on 32 rows).
RUN = tiny_sets(steps=2, prompts_per_step=8, eval_every=1, eval_n=8, eval_k=2) + [
    "entropy_control=clip_b", "clip_b_mu=0.5", "log_filter=true", "entropy_accounting=false",
    "samples_per_step=3"]


def _cli_sets(sets: list[str]) -> list[str]:
    return [a for s in sets for a in ("--set", s)]


def test_every_config_key_has_one_place_on_engine_trl():
    names = [k.name for k in trl_engine.KEYS]
    assert sorted(names) == sorted(FIELDS), set(names) ^ set(FIELDS)
    assert len(names) == len(set(names))


def test_docs_trl_md_holds_the_mapping_table():
    """docs/trl.md prints trl_engine.mapping_table() (regenerate: python scripts/trl_table.py --write)."""
    assert trl_engine.mapping_table() in (ROOT / "docs" / "trl.md").read_text()


@pytest.mark.parametrize("n_proc,prompts,G,minibatches,micro,epochs", [
    (1, 8, 8, 2, None, 1), (2, 8, 4, 2, 4, 1), (8, 64, 8, 4, 4, 2), (2, 4, 4, 1, 2, 3)])
def test_one_generation_batch_is_one_entclip_step(n_proc, prompts, G, minibatches, micro, epochs):
    cfg = resolve(sets=[f"prompts_per_step={prompts}", f"group_size={G}", f"minibatches={minibatches}",
                        f"micro_batch_size={'null' if micro is None else micro}", f"epochs={epochs}", "steps=5"])
    f = trl_engine.grpo_fields(cfg, n_proc, "fp32", "out", True)
    rows = f["per_device_train_batch_size"] * n_proc * f["steps_per_generation"]  # TRL's generation batch
    assert rows == prompts * G
    optimizer_steps = f["steps_per_generation"] * f["num_iterations"] // f["gradient_accumulation_steps"]
    assert optimizer_steps == epochs * minibatches == f["logging_steps"]
    assert f["max_steps"] == 5 * epochs * minibatches
    assert f["per_device_train_batch_size"] == (micro or prompts * G // n_proc // minibatches)


def test_the_config_reaches_grpo_config(tmp_path):
    cfg = resolve(sets=tiny_sets() + ["kl_coef=0.02", "eps_high=0.28", "loss_agg=seq-mean-token-mean",
                                      "scale_std=false", "lr_schedule=cosine", "entropy_target=0.3",
                                      "trl.log_completions=true"])
    args = trl_engine.grpo_config(cfg, 1, "fp32", str(tmp_path), True)
    assert (args.beta, args.epsilon_high, args.loss_type, args.scale_rewards) == (0.02, 0.28, "grpo", "none")
    assert (args.use_adaptive_entropy, args.entropy_target, args.log_completions) == (True, 0.3, True)
    assert (args.top_k, args.top_p, args.temperature) == (0, 1.0, cfg.temperature)
    assert getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type) == "cosine"


@pytest.mark.parametrize("sets,named", [
    (["dual_clip_c=3.0"], "dual_clip_c"),
    (["max_nonfinite=5"], "max_nonfinite"),
    (["loss_agg=constant", "loss_agg_constant=3"], "loss_agg_constant"),
    (["entropy_control=kl_cov"], "entropy_control=kl_cov"),
    (["entropy_control=high_entropy", "filter_scope=micro"], "filter_scope=micro"),
    (["trl.learning_rate=0.1"], "trl.learning_rate"),
    (["trl.use_vlm=true"], "trl.use_vllm"),
    (["trl.top_k=5"], "trl.top_k"),
    (["trl.loss_type=vespo", "entropy_control=clip_b"], "loss_type=vespo"),
    (["trl.auto_find_batch_size=true"], "; change trl.auto_find_batch_size ("),  # GRPOConfig's own refusal
], ids=["dual_clip", "max_nonfinite", "agg_constant", "kl_cov", "micro", "lr", "typo", "top_k", "vespo", "grpo_config"])
def test_what_trl_cannot_honour_is_refused_by_name_and_writes_nothing(tmp_path, sets, named):
    """A one-line error naming the key (or the close field), exit 2, no traceback, no run directory."""
    res = runner.invoke(app, ["train", "--engine", "trl", "--out-dir", str(tmp_path), "--name", "r",
                              *_cli_sets(tiny_sets() + sets)])
    assert res.exit_code == 2, res.output
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and named in errors[0], res.output
    assert "Traceback" not in res.output
    assert not (tmp_path / "r").exists()


def test_the_dry_run_prints_trls_fields():
    res = runner.invoke(app, ["train", "--engine", "trl", "--dry-run", *_cli_sets(tiny_sets() + [
        "trl.log_completions=true"])])
    assert res.exit_code == 0, res.output
    text = res.output.split("# TRL GRPOConfig", 1)[1]
    assert "max_steps: 4" in text and "num_generations: 4" in text and "log_completions: True" in text


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny engine-trl run and an own-engine run of the same config, through the CLI."""
    root = tmp_path_factory.mktemp("engines")
    for engine in ("trl", "entclip"):
        res = runner.invoke(app, ["train", "--engine", engine, "--out-dir", str(root), "--name", engine, "-q",
                                  *_cli_sets(RUN)])
        assert res.exit_code == 0, res.output
    return root


def test_a_trl_run_writes_the_run_directory(runs):
    from entclip.contracts.rundir import load_run

    run = load_run(runs / "trl")
    assert not run.warnings
    assert [r["step"] for r in run.metrics] == [1, 2]  # one row per entclip step (2 TRL optimizer steps each)
    row = run.metrics[0]
    for key in ("reward/mean", "reward/accuracy", "entropy/mean", "disc/mean", "clip/filter_frac", "loss/total"):
        assert key in row, key
    assert [r["step"] for r in run.evals] == [0, 1, 2]  # entclip's evaluation: step 0, eval_every, the end
    assert "test/greedy_acc" in run.evals[-1] and "test/pass@2" in run.evals[-1]
    summary = json.loads((runs / "trl" / "summary.json").read_text())
    assert summary["engine"] == "trl" and summary["status"] == "completed" and summary["steps"] == 2
    assert (runs / "trl" / summary["checkpoint"] / "model.safetensors").exists()
    samples = [json.loads(line) for line in (runs / "trl" / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [1, 1, 1, 2, 2, 2]
    rows = [json.loads(line) for line in (runs / "trl" / "filter.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 32
    for step in (1, 2):  # filter.jsonl's dropped share is the logged one
        mine = [r for r in rows if r["step"] == step]
        share = sum(len(r["dropped"]) for r in mine) / sum(len(r["tokens"]) for r in mine)
        assert share == pytest.approx(run.metrics[step - 1]["clip/filter_frac"], abs=1e-9)


def test_analyze_and_compare_read_a_trl_run_beside_an_own_engine_run(runs):
    res = runner.invoke(app, ["analyze", str(runs / "trl"), "--json"])
    assert res.exit_code == 0, res.output
    analysis = json.loads(res.output)
    assert (analysis["method"], analysis["steps_logged"], analysis["status"]) == ("clip_b", 2, "completed")
    assert analysis["shares_mean"]["clip/filter_frac"] > 0
    res = runner.invoke(app, ["compare", str(runs / "trl"), str(runs / "entclip"), "--json"])
    assert res.exit_code == 0, res.output
    rows = {r["method"]: r for r in json.loads(res.output)["rows"]}
    assert set(rows) == {"trl", "entclip"}
    for row in rows.values():  # the held-out columns too: both evaluations are entclip's
        for col in ("reward_final", "eval_greedy", "eval_pass", "entropy_final", "filter_frac"):
            assert row[col]["mean"] is not None, col


def test_resume_refuses_a_trl_run(runs):
    res = runner.invoke(app, ["train", "--resume", str(runs / "trl")])
    assert res.exit_code == 2 and "engine trl" in res.output


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_drop_the_same_tokens_as_one(tmp_path):
    """`accelerate launch --num_processes 2`: entclip's seeded sampler draws the same completions for
    the same rows, the statistics are reduced over both processes, so filter.jsonl (every sequence's
    tokens and dropped positions, gathered) and the step's figures equal the one-process run's."""
    from entclip.data.models import load_policy

    load_policy(resolve(sets=RUN), lambda s: None)  # the warm start once, before two processes look for it
    common = ["train", "--engine", "trl", "-q", "--out-dir", str(tmp_path), *_cli_sets(RUN + ["eval_every=0"])]
    res = runner.invoke(app, [*common, "--name", "one"])
    assert res.exit_code == 0, res.output
    launcher = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    cmd = [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
           "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()), "-m", "entclip", *common,
           "--name", "two"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]

    def read(name, file):
        return [json.loads(line) for line in (tmp_path / name / file).read_text().splitlines()]

    one, two = read("one", "filter.jsonl"), read("two", "filter.jsonl")
    step1 = [r for r in one if r["step"] == 1]
    assert len(step1) == 32 and [r for r in two if r["step"] == 1] == step1
    dropped = sum(len(r["dropped"]) for r in step1)
    assert dropped > 0, "nothing dropped: the test has no teeth"
    m1, m2 = read("one", "metrics.jsonl")[0], read("two", "metrics.jsonl")[0]
    for key in ("clip/filter_frac", "disc/mean", "disc/std", "entropy/mean", "reward/mean"):
        assert m2[key] == pytest.approx(m1[key], rel=1e-5, abs=1e-7), key


def test_trl_fields_merge_over_the_layers_and_bad_ones_are_one_line(tmp_path):
    from entclip.contracts.errors import EntclipError

    file = tmp_path / "c.yaml"
    file.write_text("engine: trl\ntrl: {log_completions: true, num_completions_to_print: 2}\n")
    cfg = resolve(config_file=str(file), sets=["trl.num_completions_to_print=4", "trl.use_vllm=true"])
    assert cfg.engine == "trl"
    assert cfg.trl == {"log_completions": True, "num_completions_to_print": 4, "use_vllm": True}
    assert "trl:" in cfg.to_yaml() and resolve(config_file=str(file)).trl["num_completions_to_print"] == 2
    for bad in (["trl=5"], ["trl.1x=2"]):
        with pytest.raises(EntclipError) as err:
            resolve(sets=bad)
        assert "\n" not in str(err.value) and "trl" in str(err.value)


def test_a_grpo_config_refusal_names_the_entclip_key_that_sets_the_field():
    """TRL's message names GRPOConfig fields; where no trl.NAME was given, the fix named is the entclip
    key that sets the field on engine trl (num_generations: group_size), not a field the user never set."""
    from trl import GRPOConfig

    known = {f.name for f in dataclasses.fields(GRPOConfig)}
    msg = trl_engine.refused_by_trl(ValueError("generation_batch_size (6) must be divisible by num_generations "
                                               "(4)."), resolve(sets=tiny_sets()), known)
    assert msg.startswith("TRL refused the configuration: generation_batch_size (6) must be divisible by")
    assert "group_size" in msg.split("; change ", 1)[1] and "\n" not in msg
