"""A TRL run writes an entclip run directory (entclip/training/trl_rundir.py, the `trl` extra).

On the tiny warm-started model, offline: two steps of EntclipGRPOTrainer with Clip_B (a small mu, so
tokens drop) and one evaluation, with RunDirCallback; `load_run` reads the directory, `entclip analyze`
summarizes it and `entclip compare` puts it beside a two-step own-engine run of the same config.
Skipped without trl.
"""

from __future__ import annotations

import json
import math
import types

import pytest

pytest.importorskip("trl")

from typer.testing import CliRunner  # noqa: E402

from conftest import TEST_SEED, tiny_sets  # noqa: E402
from mixed_groups import mixed_rewards  # noqa: E402
from entclip.cli import app  # noqa: E402
from entclip.contracts.config import resolve  # noqa: E402
from entclip.contracts.rundir import RunDir, load_run  # noqa: E402

PROMPTS, G, T_MAX, STEPS = 8, 4, 6, 2  # 32 completions of at most 6 tokens per step
CLIP_B = ["entropy_control=clip_b", "clip_b_mu=0.3"]  # drops tokens on 32 rows (the default barely does)
runner = CliRunner()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A TRL run and an own-engine run of the same tiny Clip_B config, side by side in one folder."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback
    from trl import GRPOConfig

    from entclip.data.models import load_policy
    from entclip.data.tasks.arithmetic import ArithmeticTask
    from entclip.training.loop import train
    from entclip.training.trl_adapter import EntclipGRPOTrainer
    from entclip.training.trl_rundir import RunDirCallback

    root = tmp_path_factory.mktemp("runs")
    cfg = resolve(sets=tiny_sets(steps=STEPS) + CLIP_B)
    _, _, ws = load_policy(cfg, log=lambda s: None)
    task = ArithmeticTask(max_operand=cfg.max_operand, n_test=cfg.n_test)

    def rows(problems):
        return Dataset.from_list([{"prompt": p.prompt, "answer": p.answer} for p in problems])

    reward = mixed_rewards(G)  # every group's rewards differ, whatever was sampled: tokens to drop

    args = GRPOConfig(output_dir=str(root / "trl-out"), use_cpu=True, bf16=False, fp16=False, report_to="none",
                      disable_tqdm=True, save_strategy="no", logging_steps=1, seed=TEST_SEED, max_steps=STEPS,
                      dataloader_num_workers=0, per_device_train_batch_size=PROMPTS * G, num_generations=G,
                      per_device_eval_batch_size=PROMPTS * G, eval_strategy="steps", eval_steps=STEPS,
                      max_completion_length=T_MAX, temperature=1.0, top_k=0, top_p=1.0, beta=0.0,
                      learning_rate=1e-4, lr_scheduler_type="constant")
    trl_run = RunDir.create(root / "trl-clip-b")
    trainer = EntclipGRPOTrainer(model=AutoModelForCausalLM.from_pretrained(ws["path"]), reward_funcs=reward,
                                 args=args, train_dataset=rows(task.train), eval_dataset=rows(task.test[:PROMPTS]),
                                 processing_class=AutoTokenizer.from_pretrained(ws["path"]), config=cfg,
                                 callbacks=[RunDirCallback(trl_run, cfg)])
    trainer.remove_callback(PrinterCallback)
    trainer.train()

    own_run = RunDir.create(root / "own-clip-b")
    own_run.write_config(cfg.to_yaml())
    train(cfg, own_run, log=lambda s: None)
    return types.SimpleNamespace(cfg=cfg, trainer=trainer, trl=trl_run.path, own=own_run.path)


def test_a_trl_run_writes_a_run_directory_load_run_reads(runs):
    run = load_run(runs.trl)
    assert not run.warnings
    assert [r["step"] for r in run.metrics] == list(range(1, STEPS + 1))
    entclip_keys = {"reward/mean", "reward/std", "reward/zero_var_frac", "entropy/mean", "length/mean",
                    "length/max", "loss/total", "grad/norm", "lr", "perf/step_s", "disc/mean", "disc/dev_mean",
                    "disc/min_z_b", "disc/min_z_v", "clip/filter_frac", "clip/filter_frac_pos",
                    "clip/filter_frac_neg", "clip/mu"}
    for row in run.metrics:
        assert entclip_keys <= row.keys(), entclip_keys - row.keys()
        # Under a filter TRL's loss-mask means (the kept tokens) are TRL's, not entclip's figures.
        assert {"trl/entropy", "trl/clip_ratio/low_mean", "trl/learning_rate", "trl/step_time"} <= row.keys()
        assert not {"kl/ref", "clip/ratio_low_frac", "clip/ratio_high_frac"} & row.keys()
        assert not {"reward", "entropy", "loss", "grad_norm", "learning_rate", "epoch"} & row.keys()  # mapped or trl/
        assert row["lr"] == pytest.approx(1e-4) and math.isfinite(row["loss/total"]) and row["perf/step_s"] > 0
    assert [e["step"] for e in run.evals] == [STEPS]
    assert {"trl/reward", "trl/loss"} <= run.evals[0].keys()
    assert run.config == runs.cfg.to_dict() and run.config["steps"] == STEPS
    assert resolve(config_file=str(runs.trl / "config.yaml")) == runs.cfg
    trl_args = json.loads((runs.trl / "trl_args.json").read_text())
    assert trl_args["max_steps"] == STEPS and trl_args["num_generations"] == G
    s = run.summary
    assert s["status"] == "completed" and s["engine"] == "trl" and s["method"] == "clip_b"
    assert s["steps"] == s["steps_planned"] == STEPS and s["format"] == 1 and s["wall_s"] > 0
    assert s["final"]["clip/filter_frac"] == run.metrics[-1]["clip/filter_frac"]
    assert s["eval_last"]["step"] == STEPS and "trl" in s["versions"]


def test_the_rows_hold_what_the_adapter_decided(runs):
    """The last step's row: clip/filter_frac is the share of valid tokens the adapter dropped on that
    step's generation batch (one process, one generation per step) and entropy/mean their statistics'
    mean over every valid token, not TRL's over the kept ones."""
    fb = runs.trainer.last_filtered
    row = load_run(runs.trl).metrics[-1]
    assert row["step"] == fb.step + 1 == STEPS
    valid = fb.mask.bool()
    dropped = 1 - float(fb.keep.sum()) / float(valid.sum())
    assert dropped > 0.02, f"the filter dropped {dropped:.3f} of the tokens: the test has no teeth"
    assert row["clip/filter_frac"] == pytest.approx(dropped, abs=1e-6)
    assert row["entropy/mean"] == pytest.approx(float(fb.stats.entropy[valid].mean()), rel=1e-5)
    kept = float(fb.stats.entropy[fb.keep].mean())
    assert row["trl/entropy"] == pytest.approx(kept, rel=1e-4) and abs(kept - row["entropy/mean"]) > 1e-3
    for name in ("disc/min_z_b", "clip/filter_frac_pos", "clip/filter_frac_neg", "clip/mu"):
        assert row[name] == pytest.approx(fb.figures[name], abs=1e-6), name


def test_analyze_reads_a_trl_run(runs):
    res = runner.invoke(app, ["analyze", str(runs.trl), "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["method"] == "clip_b" and data["status"] == "completed" and data["steps_logged"] == STEPS
    assert set(data["entropy"]) >= {"first", "last", "min"} and data["reward"]["end_mean"] is not None
    assert data["shares_mean"]["clip/filter_frac"] > 0 and "disc/min_z_b" in data["min_z"]
    assert data["eval"]["last"]["step"] == STEPS and data["perf"]["step_s_mean"] > 0
    res = runner.invoke(app, ["analyze", str(runs.trl)])
    assert res.exit_code == 0 and "entropy first / last / min" in res.output


def test_compare_puts_a_trl_run_beside_an_own_engine_run(runs):
    res = runner.invoke(app, ["compare", str(runs.trl), str(runs.own), "--json"])
    assert res.exit_code == 0, res.output
    rows = {r["method"]: r for r in json.loads(res.stdout)["rows"]}
    assert set(rows) == {"trl-clip-b", "own-clip-b"}
    for row in rows.values():
        for key in ("reward_final", "entropy_final", "filter_frac", "step_s"):
            assert row[key]["mean"] is not None, (row["method"], key)
    assert rows["trl-clip-b"]["eval_greedy"]["mean"] is None  # TRL's eval reward is not greedy accuracy
    res = runner.invoke(app, ["compare", str(runs.trl), str(runs.own), "--markdown"])
    assert res.exit_code == 0 and "trl-clip-b" in res.output and "own-clip-b" in res.output


def test_trl_keys_map_by_meaning():
    """The module's table: same meaning -> entclip's name; loss-mask means only without a filter; the
    rest under trl/, nothing dropped."""
    from entclip.training.trl_rundir import entclip_row

    logs = {"reward": 0.5, "reward_std": 0.1, "frac_reward_zero_std": 0.25, "completions/mean_length": 4.0,
            "completions/max_length": 6.0, "loss": 0.01, "grad_norm": 1.5, "learning_rate": 1e-4, "entropy": 1.2,
            "kl": 0.02, "clip_ratio/low_mean": 0.0, "clip_ratio/high_mean": 0.1, "entropy_coef": 0.01,
            "clip/filter_frac": 0.2, "disc/min_z_b": -3.0, "rewards/reward/mean": 0.5, "epoch": 0.1}
    plain = entclip_row(logs, filtered=False, group_zero_std=True)
    assert plain == {"reward/mean": 0.5, "reward/std": 0.1, "reward/zero_var_frac": 0.25, "length/mean": 4.0,
                     "length/max": 6.0, "loss/total": 0.01, "grad/norm": 1.5, "entropy/mean": 1.2, "kl/ref": 0.02,
                     "clip/ratio_low_frac": 0.0, "clip/ratio_high_frac": 0.1, "entropy/bonus_coef": 0.01,
                     "clip/filter_frac": 0.2, "disc/min_z_b": -3.0, "trl/learning_rate": 1e-4,
                     "trl/entropy": 1.2, "trl/rewards/reward/mean": 0.5, "trl/epoch": 0.1}
    filtered = entclip_row({**logs, "entropy/mean": 1.3}, filtered=True, group_zero_std=False)
    assert filtered["entropy/mean"] == 1.3 and filtered["trl/entropy"] == 1.2
    assert {"trl/kl", "trl/clip_ratio/low_mean", "trl/clip_ratio/high_mean",
            "trl/frac_reward_zero_std"} <= filtered.keys()
    assert not {"kl/ref", "clip/ratio_low_frac", "reward/zero_var_frac"} & filtered.keys()
    assert len(filtered) == len(logs) + 1  # nothing dropped
