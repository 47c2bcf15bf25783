"""LoRA through peft in entclip's own engine: adapters train and the base does not, the KL reference
is the base with the adapter disabled, accounting over the adapters, exact resume, merged export,
the memory estimate's adapter count, and the errors that name the fix."""

from __future__ import annotations

import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import tiny_sets
from entclip.cli import app
from entclip.contracts.config import resolve
from entclip.contracts.errors import EXISTS, EntclipError
from entclip.contracts.rundir import CKPT_MARKER, RunDir, load_run
from mixed_groups import mixed_groups

LORA = {"lora_r": 4, "lora_alpha": 8, "eval_every": 0}


def _strip(rows):
    return [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in rows]


def _train(path, wrap=mixed_groups, **sets):
    from entclip.training.loop import train

    cfg = resolve(sets=tiny_sets(**{**LORA, **sets}))
    run = RunDir.create(path)
    run.write_config(cfg.to_yaml())
    return cfg, train(cfg, run, log=lambda s: None, wrap_sampler=wrap)


def test_lora_trains_only_the_adapters_and_the_reference_is_the_disabled_adapter(tmp_path, monkeypatch):
    import entclip.training.engine as engine
    import entclip.training.passes as passes

    accounts = []

    class Spy(passes.StepAccount):
        def __post_init__(self):
            accounts.append(self)
            super().__post_init__()

    monkeypatch.setattr(passes, "StepAccount", Spy)
    # one update per step: step 1's only update sees the policy before any change, = its reference
    cfg = resolve(sets=tiny_sets(**LORA, kl_coef=0.1, minibatches=1, entropy_accounting=True, accounting_every=1))
    trainer = engine.Trainer(cfg, None, lambda s: None, wrap_sampler=mixed_groups)
    named = dict(trainer.session.policy.named_parameters())
    adapters = {n for n, p in named.items() if p.requires_grad}
    assert adapters and all("lora_" in n for n in adapters)
    in_opt = {id(p) for group in trainer.learner.opt.param_groups for p in group["params"]}
    assert in_opt == {id(named[n]) for n in adapters}
    assert trainer.learner.ref is None  # no second copy of the model
    before = {n: p.detach().clone() for n, p in named.items()}
    first, second = trainer.step(1), trainer.step(2)
    assert first["kl/ref"] == 0.0 and second["kl/ref"] > 0
    assert all(torch.equal(p, before[n]) for n, p in named.items() if n not in adapters)
    assert any(not torch.equal(named[n], before[n]) for n in adapters if "lora_B" in n)
    for m in (first, second):
        assert torch.isfinite(torch.tensor([m["entropy/pred_param"], m["entropy/measured"]])).all()
    assert second["entropy/pred_param"] != 0.0
    # the accounting snapshots and differentiates the adapters only
    shapes = [tuple(named[n].shape) for n in named if n in adapters]
    assert [[tuple(p.shape) for p in a.params] for a in accounts] == [shapes, shapes]
    assert all(len(a.grad_h) == len(adapters) for a in accounts)
    trainer.session.rewards.close()


def test_gradient_checkpointing_with_lora_still_moves_the_adapters(tmp_path):
    from entclip.training.engine import Trainer

    cfg = resolve(sets=tiny_sets(**LORA, gradient_checkpointing=True, steps=1, entropy_accounting=False))
    trainer = Trainer(cfg, None, lambda s: None, wrap_sampler=mixed_groups)
    b = {n: p.detach().clone() for n, p in trainer.session.policy.named_parameters() if "lora_B" in n}
    trainer.step(1)
    assert any(not torch.equal(p, b[n]) for n, p in trainer.session.policy.named_parameters() if n in b)
    trainer.session.rewards.close()


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """An uninterrupted 2-step LoRA run with checkpoints after steps 1 and 2."""
    path = tmp_path_factory.mktemp("lora") / "run"
    cfg, _ = _train(path, save_every=1, keep_checkpoints=0, kl_coef=0.05)
    return cfg, path


def test_a_lora_checkpoint_is_peft_format_and_resume_is_exact(lora_run, tmp_path):
    from entclip.training.loop import train

    cfg, ref = lora_run
    ckpt = ref / "checkpoints" / "step_000002"
    assert (ckpt / "adapter_config.json").is_file() and (ckpt / "adapter_model.safetensors").is_file()
    assert not (ckpt / "model.safetensors").exists() and (ckpt / "tokenizer.json").is_file()
    # the same run, killed after step 1's checkpoint: its later checkpoint and rows are gone
    cut = tmp_path / "cut"
    _train(cut, save_every=1, keep_checkpoints=0, kl_coef=0.05)
    shutil.rmtree(cut / "checkpoints" / "step_000002")
    run, resume_from = RunDir.reopen(cut)
    assert resume_from.name == "step_000001" and (resume_from / CKPT_MARKER).exists()
    train(cfg, run, log=lambda s: None, resume_from=resume_from, wrap_sampler=mixed_groups)
    assert _strip(load_run(cut).metrics) == _strip(load_run(ref).metrics)
    a = load_file(ckpt / "adapter_model.safetensors")
    b = load_file(cut / "checkpoints" / "step_000002" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    first = load_file(ref / "checkpoints" / "step_000001" / "adapter_model.safetensors")
    assert any(not torch.equal(a[k], first[k]) for k in a)  # step 2 moved them: the check can fail


def test_export_merged_loads_as_a_plain_model_with_the_adapter_models_logits(lora_run, tmp_path):
    from transformers import AutoModelForCausalLM

    from entclip.data.models import load_adapter, load_policy

    cfg, run = lora_run
    out = tmp_path / "merged"
    res = CliRunner().invoke(app, ["export-merged", str(run), str(out)])
    assert res.exit_code == 0, res.output
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    base = load_policy(cfg, lambda s: None)[0]
    adapted = load_adapter(base, run / "checkpoints" / "step_000002", trainable=False).eval()
    ids = torch.tensor([[1, 5, 9, 3, 7, 2]])
    with torch.no_grad():
        want, got = adapted(ids).logits, merged(ids).logits
        plain = load_policy(cfg, lambda s: None)[0].eval()(ids).logits
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, plain, atol=1e-5, rtol=1e-5)  # the adapter is in: not the base model
    again = CliRunner().invoke(app, ["export-merged", str(run), str(out)])
    assert again.exit_code == EXISTS and "already exists" in again.output


def test_export_merged_refuses_a_full_fine_tuning_run(tmp_path):
    path = tmp_path / "full"
    _train(path, lora_r=0, lora_alpha=8, steps=1, wrap=None)
    res = CliRunner().invoke(app, ["export-merged", str(path), str(tmp_path / "out")])
    assert res.exit_code != 0 and "no LoRA adapter" in res.output and not (tmp_path / "out").exists()


def test_memory_estimate_counts_the_adapters_as_peft_does():
    from peft import LoraConfig, get_peft_model

    from entclip.training.memory import lora_params, memory_estimate
    from entclip.data.tasks.tiny import build_char_tokenizer, build_tiny_model

    model = build_tiny_model(build_char_tokenizer(), hidden=64, layers=2, heads=2, kv_heads=1, ffn=128)
    for targets in ("all-linear", "q_proj,v_proj"):
        cfg = resolve(sets=tiny_sets(lora_r=8, lora_target_modules=targets))
        ours = lora_params(cfg, model)
        fresh = build_tiny_model(build_char_tokenizer(), hidden=64, layers=2, heads=2, kv_heads=1, ffn=128)
        peft_model = get_peft_model(fresh, LoraConfig(r=8, target_modules=cfg.lora_target_modules.split(",")
                                                      if targets != "all-linear" else "all-linear"))
        assert ours == peft_model.get_nb_trainable_parameters()[0] > 0
    full, lora = (memory_estimate(resolve(sets=tiny_sets(lora_r=r, kl_coef=0.1)), model.config) for r in (0, 8))
    assert lora.total_gib < full.total_gib
    rows = dict(lora.rows)
    assert "reference model (fp32)" not in rows and "reference model (fp32)" in dict(full.rows)
    adapter = lora_params(resolve(sets=tiny_sets(lora_r=8)), model)  # all-linear
    assert rows["gradients (adapters, fp32)"] == pytest.approx(adapter * 4 / 2 ** 30)
    assert rows["AdamW moments (2 x adapters, fp32)"] == pytest.approx(2 * adapter * 4 / 2 ** 30)


def test_lora_settings_are_validated_with_the_fix():
    for sets, fix in [(["lora_r=-1"], "lora_r=8"), (["lora_alpha=0"], "lora_alpha=8"),
                      (["lora_target_modules=,"], "lora_target_modules=all-linear")]:
        with pytest.raises(EntclipError, match=fix):
            resolve(sets=sets)
    assert resolve(config_file=None, sets=["lora_target_modules=q_proj, v_proj"]).lora_target_modules == \
        "q_proj, v_proj"


def test_yaml_list_of_target_modules(tmp_path):
    (tmp_path / "c.yaml").write_text("lora_r: 8\nlora_target_modules: [q_proj, v_proj]\n")
    assert resolve(config_file=str(tmp_path / "c.yaml")).lora_target_modules == "q_proj,v_proj"


def test_unknown_target_module_names_the_fix():
    from entclip.training.engine import Trainer

    cfg = resolve(sets=tiny_sets(lora_r=4, lora_target_modules="no_such_proj"))
    with pytest.raises(EntclipError, match="lora_target_modules='no_such_proj'"):
        Trainer(cfg, None, lambda s: None)


def test_missing_peft_stops_before_the_run_directory_exists(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft raises ImportError
    res = CliRunner().invoke(app, ["train", "--out-dir", str(tmp_path), "--name", "r",
                                   *[a for s in tiny_sets(lora_r=8) for a in ("--set", s)]])
    assert res.exit_code == 2 and "pip install 'entclip[lora]'" in res.output
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_smollm2_lora_step_moves_only_the_adapters_and_exports_a_loadable_model(tmp_path):
    """A real pretrained model (SmolLM2-135M-Instruct, offline): one LoRA GRPO step with the KL
    reference as the disabled adapter, mixed groups (one right, one "+=+" row per group) so that the
    update has a gradient whatever SmolLM2 samples, then the merged export loads as a plain model."""
    import json
    import os
    import re

    from transformers import AutoModelForCausalLM

    from entclip.training.engine import Trainer
    from mixed_groups import mixed_groups_for
    from smollm2 import smollm2_folder

    folder = smollm2_folder(os.environ["ENTCLIP_CACHE"])
    data = tmp_path / "add.jsonl"
    data.write_text("".join(json.dumps({"question": f"What is {a} + {b}?", "answer": str(a + b)}) + "\n"
                            for a, b in [(3, 4), (12, 7), (8, 9), (6, 5)]))
    settings = {"model": folder, "dataset": data, "prompt_field": "question",
                "prompt_template": "{prompt} Give only the number.", "reward": "math", "steps": 1,
                "prompts_per_step": 2, "group_size": 4, "minibatches": 1, "max_new_tokens": 12,
                "max_prompt_tokens": 128, "lr": 1e-3, "kl_coef": 0.05, "lora_r": 8, "eval_every": 0,
                "threads": 1, "entropy_accounting": True, "accounting_every": 1, "seed": 0}
    cfg = resolve(sets=[f"{k}={v}" for k, v in settings.items()])

    def answer_of(prompt: str) -> str:
        a, b = re.search(r"What is (\d+) \+ (\d+)\?", prompt).groups()
        return str(int(a) + int(b))

    trainer = Trainer(cfg, None, lambda s: None, wrap_sampler=mixed_groups_for(answer_of))
    named = dict(trainer.session.policy.named_parameters())
    adapters = {n for n, p in named.items() if p.requires_grad}
    assert adapters and all("lora_" in n for n in adapters) and trainer.learner.ref is None
    before = {n: p.detach().clone() for n, p in named.items()}
    row = trainer.step(1)
    assert row["kl/ref"] == 0.0 and row["reward/zero_var_frac"] == 0  # first update: policy = reference
    assert torch.isfinite(torch.tensor([row["entropy/pred_param"], row["loss/total"]])).all()
    assert all(torch.equal(p, before[n]) for n, p in named.items() if n not in adapters)
    assert any(not torch.equal(named[n], before[n]) for n in adapters if "lora_B" in n)
    from entclip.data.models import export_merged

    trainer.session.policy.save_pretrained(tmp_path / "adapter")  # a checkpoint's adapter and tokenizer
    trainer.session.tokenizer.save_pretrained(tmp_path / "adapter")
    trainer.session.rewards.close()
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        want = trainer.session.policy.eval()(ids).logits
    export_merged(cfg, tmp_path / "adapter", tmp_path / "merged", lambda s: None)  # the Hugging Face base
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        got = loaded(ids).logits
    # merging reorders 30 layers' float32 sums: logits of magnitude ~20 agree to ~3e-4
    assert torch.allclose(got, want, atol=2e-3, rtol=1e-4)



def test_a_checkpoint_evaluated_on_another_base_is_refused(lora_run):
    """The run trained on its seed's warm start; another seed's config builds another base model."""
    from entclip.data.models import load_adapter, load_policy

    cfg, run = lora_run
    other = resolve(sets=tiny_sets(**LORA, seed=cfg.seed + 1))
    base = load_policy(other, lambda s: None)[0]
    with pytest.raises(EntclipError, match="was trained on .* give the run directory"):
        load_adapter(base, run / "checkpoints" / "step_000002", trainable=False)
