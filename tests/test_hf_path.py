"""The Hugging Face path end to end: `--preset qwen-math` offline (dry run), the same preset on local
stand-ins (a model folder with a chat template, JSONL data, math reward), and SmolLM2-135M-Instruct,
a real pretrained model, trained for 2 GRPO steps with Clip_V (slow)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import TEST_SEED, TINY
from entclip.cli import app

runner = CliRunner()

CHAT = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}")


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _sets(pairs: dict) -> list[str]:
    return [a for k, v in pairs.items() for a in ("--set", f"{k}={v}")]


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    """A local model folder (the warm-started tiny model, with a chat template) and JSONL files
    shaped like DAPO-Math-17k-Processed (prompt / solution) and MATH-500 (problem / answer)."""
    from entclip.contracts.config import resolve
    from entclip.data.models import load_policy

    root = tmp_path_factory.mktemp("standins")
    model, tok, _ = load_policy(resolve(sets=[f"{k}={v}" for k, v in TINY.items()]), lambda s: None)
    tok.chat_template = CHAT
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    train = [{"prompt": f"{a}+{b}=", "solution": str(a + b)} for a in range(6) for b in range(6)]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    test = [{"problem": f"{a}+{b}=", "answer": str(a + b)} for a in range(7, 10) for b in range(2)]
    (root / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in test))
    return root


def _standin_sets(root: Path) -> list[str]:
    return _sets({"model": root / "model", "dataset": root / "train.jsonl",
                  "eval_sets": json.dumps([{"name": "math500", "source": str(root / "test.jsonl"),
                                            "prompt_field": "problem", "answer_field": "answer"}]),
                  "steps": 2, "prompts_per_step": 2, "group_size": 4, "minibatches": 2, "micro_batch_size": 2,
                  "generation_batch_size": 4, "max_new_tokens": 6, "eval_k": 2, "eval_every": 0,
                  "threads": 1, "save_every": 0, "accounting_every": 1})


def test_qwen_math_dry_run_offline_names_the_unreachable_model(tmp_path):
    res = runner.invoke(app, ["train", "--preset", "qwen-math", "--dry-run", "--out-dir", str(tmp_path)])
    assert res.exit_code == 3, res.output
    assert "# plan" in res.output and "Qwen/Qwen2.5-Math-1.5B" in res.output
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert errors and all("cannot be reached" in line for line in errors)
    assert any("Qwen/Qwen2.5-Math-1.5B" in line and "--set model=PATH" in line for line in errors)
    assert "Traceback" not in res.output and list(tmp_path.iterdir()) == []


def test_qwen_math_dry_run_on_stand_ins_checks_and_estimates_memory(stand_ins, tmp_path):
    res = runner.invoke(app, ["train", "--preset", "qwen-math", "--dry-run", "--out-dir", str(tmp_path),
                              *_standin_sets(stand_ins)])
    assert res.exit_code == 0, res.output
    assert "# memory estimate per GPU" in res.output and "GiB" in res.output
    assert "reachable" in res.output and list(tmp_path.iterdir()) == []


def test_qwen_math_preset_trains_on_local_stand_ins(stand_ins, tmp_path):
    res = runner.invoke(app, ["train", "-q", "--preset", "qwen-math", "--out-dir", str(tmp_path), "--name", "r",
                              *_standin_sets(stand_ins)])
    assert res.exit_code == 0, res.output
    run = tmp_path / "r"
    rows = _rows(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("reward/mean", "reward/accuracy", "reward/math_mean", "reward/errors", "reward/timeouts",
                "entropy/mean", "entropy/pred_param", "entropy/measured", "loss/total"):
        assert key in rows[0], key
    assert rows[0]["train/updates"] == 2
    evals = _rows(run / "eval.jsonl")
    assert [e["step"] for e in evals] == [0, 2] and "math500/avg@2" in evals[0]
    samples = _rows(run / "samples.jsonl")
    assert samples[0]["prompt"].startswith("<system>Please reason step by step")  # the chat template
    assert samples[0]["prompt"].endswith("<assistant>")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed"
    ckpt = run / summary["checkpoint"]
    assert (ckpt / "model.safetensors").is_file() and (ckpt / "tokenizer.json").is_file()
    res = runner.invoke(app, ["evaluate", str(run), "--n", "3", "--k", "2", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)  # the run's own eval set, through its chat template and reward
    assert data["problems"] == 3 and {"greedy_acc", "avg@2", "pass@2"} <= data.keys()


@pytest.mark.slow
def test_smollm2_trains_two_clip_v_steps_with_the_chat_template_and_math_reward(tmp_path):
    """In process (the CLI's path is the stand-in test's), so that the run can use mixed groups: in
    each group one row answers right ("7<|im_end|>") and one says "+=+", tokens SmolLM2 gives
    p ~ 1e-7 there. Their S* ~ 0 lies below E_p[S*] >= 0 and their advantage is < 0, so Clip_V's
    released rule may drop them; over 2 steps the lowest of their z_v was -1.4 to -2.5 (seeds 0-2),
    past mu = 1. What SmolLM2 samples in the other rows does not decide the claim."""
    import re

    from mixed_groups import mixed_groups_for
    from smollm2 import smollm2_folder

    from entclip.contracts.config import resolve
    from entclip.training.loop import train
    from entclip.contracts.rundir import RunDir

    folder = smollm2_folder(os.environ["ENTCLIP_CACHE"])
    problems = [{"question": f"What is {a} + {b}?", "answer": str(a + b)}
                for a, b in [(3, 4), (12, 7), (8, 9), (41, 33), (6, 5), (25, 17)]]
    data = tmp_path / "gsm.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in problems))
    settings = {"model": folder, "dataset": data, "prompt_field": "question",
                "prompt_template": "{prompt} Give only the number.",
                "reward": "math", "steps": 2, "prompts_per_step": 2, "group_size": 4,
                "minibatches": 1, "max_new_tokens": 24, "max_prompt_tokens": 128,
                "lr": 1e-5, "clip_v_mu": 1.0, "clip_v_max_frac": 0.05,
                "eval_sets": json.dumps([{"name": "arith", "split": "train", "n": 2}]),
                "eval_k": 2, "eval_every": 0, "threads": 1, "entropy_accounting": False,
                "seed": TEST_SEED}
    cfg = resolve(preset="clip-v", sets=[f"{k}={v}" for k, v in settings.items()])

    def answer_of(prompt: str) -> str:
        a, b = re.search(r"What is (\d+) \+ (\d+)\?", prompt).groups()
        return str(int(a) + int(b))

    run_dir = RunDir.create(tmp_path / "s")
    run_dir.write_config(cfg.to_yaml())
    train(cfg, run_dir, log=lambda s: None, wrap_sampler=mixed_groups_for(answer_of))
    run = tmp_path / "s"
    rows = _rows(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["reward/errors"] == 0 and r["reward/timeouts"] == 0 for r in rows)
    assert all(r["reward/zero_var_frac"] == 0 for r in rows)  # every group mixed: the right row scored 1
    assert all(r["length/mean"] > 1 for r in rows) and rows[0]["entropy/mean"] > 0
    assert any(r["clip/filter_frac"] > 0 for r in rows)  # Clip_V (mu 1, cap 5%) dropped tokens
    samples = _rows(run / "samples.jsonl")
    assert "<|im_start|>user" in samples[0]["prompt"] and samples[0]["prompt"].endswith("<|im_start|>assistant\n")
    evals = _rows(run / "eval.jsonl")
    assert "arith/avg@2" in evals[-1]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 2


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16"])
def test_bf16_precisions_train_on_cpu(stand_ins, tmp_path, precision):
    """The GPU precisions run here too (CPU autocast / bf16 weights): finite figures, a checkpoint."""
    res = runner.invoke(app, ["train", "-q", "--preset", "qwen-math", "--out-dir", str(tmp_path), "--name", "p",
                              *_standin_sets(stand_ins), "--set", f"precision={precision}", "--set", "steps=1",
                              "--set", "kl_coef=0.01"])
    assert res.exit_code == 0, res.output
    row = _rows(tmp_path / "p" / "metrics.jsonl")[0]
    for key in ("loss/total", "grad/norm", "entropy/mean", "kl/ref", "entropy/pred_param"):
        assert row[key] is not None and row[key] == row[key], key
    assert row["train/skipped_updates"] == 0
