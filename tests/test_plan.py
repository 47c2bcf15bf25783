"""Dry-run planning: reachability messages (offline, fast) and the memory estimate, checked against a
real model's parameter count, the bytes autograd saves, the KV cache a forward builds, and the peak
of each phase of a real Trainer step measured with the profiler's memory events."""

from __future__ import annotations

import contextlib
import glob
import shutil
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config

from entclip.training import memory, plan
from entclip.contracts.config import Config
from entclip.contracts.errors import NOT_FOUND, EntclipError


def small_config(**overrides) -> Qwen2Config:
    sizes = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=300, max_position_embeddings=512, tie_word_embeddings=True)
    return Qwen2Config(**{**sizes, **overrides})


def make_cfg(**overrides) -> Config:
    base = dict(model="local-model", precision="fp32", micro_batch_size=2, max_prompt_tokens=48,
                max_new_tokens=16, prompts_per_step=4, group_size=4, minibatches=2)
    return Config(**{**base, **overrides})


def row(est: memory.MemoryEstimate, prefix: str, sharded: bool = False) -> float:
    rows = est.sharded_rows if sharded else est.rows
    return next(gib for label, gib in rows if label.startswith(prefix))


@pytest.fixture
def model_dir(tmp_path):
    path = tmp_path / "qwen-small"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(small_config(tie_word_embeddings=False)).save_pretrained(path)
    return path


@pytest.fixture
def online_lookups(monkeypatch):
    """No offline flag anywhere (the machine still has no network): the probe must keep lookups fast."""
    import datasets.config
    from huggingface_hub import constants

    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    plan._hub_online.cache_clear()
    if plan._hub_online():
        pytest.skip("the Hugging Face hub is reachable from here")
    yield
    plan._hub_online.cache_clear()


@pytest.fixture
def cached_dataset(tmp_path, monkeypatch):
    """A dataset 'acme/toy' (split test) in a fresh datasets cache, as load_dataset would have left it."""
    import datasets.config
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets.packaged_modules.parquet.parquet import Parquet

    data = tmp_path / "test.parquet"
    pq.write_table(pa.table({"prompt": ["1+1"], "answer": ["2"]}), data)
    cache = tmp_path / "datasets-cache"
    Parquet(cache_dir=str(cache), dataset_name="acme___toy", config_name="default", hash="0" * 16,
            data_files={"test": str(data)}).download_and_prepare()
    folder = glob.glob(str(cache / "acme___toy" / "default-*"))[0]  # the hub factory names it "default"
    shutil.move(folder, cache / "acme___toy" / "default")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(cache))
    return "acme/toy"


def problem(check, *args, **kwargs) -> EntclipError:
    with pytest.raises(EntclipError) as info:
        check(*args, **kwargs)
    assert "\n" not in str(info.value)
    return info.value


# ---- model ---------------------------------------------------------------------------------

def test_params_equal_the_real_models_parameter_count(model_dir):
    real = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(model_dir).parameters())
    cfg = make_cfg(model=str(model_dir))
    assert memory.memory_estimate(cfg, plan.model_config(cfg)).params == real
    tied = small_config()
    assert memory.memory_estimate(cfg, tied).params == sum(
        p.numel() for p in AutoModelForCausalLM.from_config(tied).parameters())


def test_missing_model_folder_is_one_line_naming_the_fix(tmp_path):
    err = problem(plan.model_config, make_cfg(model=str(tmp_path / "no" / "such-model")))
    assert err.exit_code == NOT_FOUND and "does not exist" in str(err) and "--set model=PATH" in str(err)


def test_folder_without_config_says_so(tmp_path):
    err = problem(plan.model_config, make_cfg(model=str(tmp_path)))
    assert "no config.json" in str(err)


def test_unreachable_hub_model_offline_names_cache_and_download():
    start = time.perf_counter()
    err = problem(plan.model_config, make_cfg(model="entclip-test/not-a-model"))
    assert time.perf_counter() - start < 5  # the libraries alone retry for ~23 s without the flag
    assert err.exit_code == NOT_FOUND
    assert str(err).startswith("model 'entclip-test/not-a-model' cannot be reached: no network and not in "
                               "the Hugging Face cache")
    assert "`hf download entclip-test/not-a-model`" in str(err) and "--set model=PATH" in str(err)


def test_unreachable_hub_model_without_offline_flag_fails_fast(online_lookups):
    start = time.perf_counter()
    err = problem(plan.model_config, make_cfg(model="entclip-test/not-a-model"))
    assert time.perf_counter() - start < plan.PROBE_TIMEOUT_S + 2  # the libraries alone take ~23 s
    assert "cannot be reached" in str(err)


def test_hub_model_in_the_cache_is_read_offline(tmp_path, monkeypatch):
    from huggingface_hub import constants

    repo = tmp_path / "hub" / "models--acme--small"
    small_config().save_pretrained(repo / "snapshots" / ("a" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert plan.model_config(make_cfg(model="acme/small")).hidden_size == 64


def test_gguf_config_is_read_without_weights(tmp_path):
    gguf = pytest.importorskip("gguf")
    import numpy as np

    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "qwen2")
    for add, value in [(writer.add_context_length, 256), (writer.add_embedding_length, 64),
                       (writer.add_block_count, 2), (writer.add_feed_forward_length, 128),
                       (writer.add_head_count, 4), (writer.add_head_count_kv, 2), (writer.add_vocab_size, 100)]:
        add(value)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_tensor("token_embd.weight", np.zeros((100, 64), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    config = plan.model_config(make_cfg(model=str(path)))
    assert (config.model_type, config.hidden_size, config.num_hidden_layers) == ("qwen2", 64, 2)
    assert "not found" in str(problem(plan.model_config, make_cfg(model=str(tmp_path / "missing.gguf"))))


# ---- datasets ------------------------------------------------------------------------------

def test_missing_dataset_file_names_the_fix(tmp_path):
    err = problem(plan.check_dataset, str(tmp_path / "train.jsonl"), None, "train")
    assert err.exit_code == NOT_FOUND and "file not found" in str(err) and "--set dataset=FILE" in str(err)


def test_local_file_has_only_a_train_split(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"prompt": "1+1", "answer": "2"}\n')
    plan.check_dataset(str(path), None, "train")
    assert "only split is 'train'" in str(problem(plan.check_dataset, str(path), None, "test"))


def test_unreachable_dataset_id_offline_names_local_file_fix():
    start = time.perf_counter()
    err = problem(plan.check_dataset, "entclip-test/not-a-dataset", None, "train")
    assert time.perf_counter() - start < 5  # the libraries alone retry for ~23 s without the flag
    assert str(err).startswith("dataset 'entclip-test/not-a-dataset' cannot be reached: no network and not "
                               "in the datasets cache")
    assert "--set dataset=FILE with a local .jsonl/.parquet file" in str(err)


def test_unreachable_dataset_without_offline_flag_fails_fast(online_lookups):
    start = time.perf_counter()
    err = problem(plan.check_dataset, "entclip-test/not-a-dataset", None, "train")
    assert time.perf_counter() - start < plan.PROBE_TIMEOUT_S + 2
    assert "cannot be reached" in str(err)


def test_cached_dataset_is_reachable_and_its_splits_and_configs_checked(cached_dataset):
    plan.check_dataset(cached_dataset, None, "test")
    plan.check_dataset(cached_dataset, None, "test[:10]")
    assert "no split 'train' (its splits: test); --set dataset_split=test" in str(
        problem(plan.check_dataset, cached_dataset, None, "train"))
    assert "--set dataset_config=NAME" in str(problem(plan.check_dataset, cached_dataset, "other", "test"))


def test_reachability_lists_each_problem_once_and_names_eval_sets(model_dir, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "1+1", "answer": "2"}\n')
    ok = make_cfg(model=str(model_dir), dataset=str(data), eval_sets=[{"name": "held", "source": str(data)}])
    assert plan.reachability(ok) == []
    bad = make_cfg(model="entclip-test/not-a-model", dataset="entclip-test/not-a-dataset",
                   eval_sets=[{"name": "a"}, {"name": "b", "source": "entclip-test/nor-this", "split": "test"}])
    problems = plan.reachability(bad)
    assert len(problems) == 4 and all("\n" not in p for p in problems)
    assert problems[0].startswith("model ") and problems[1].startswith("dataset ")
    assert problems[2].startswith("eval set 'a' (entclip-test/not-a-dataset) cannot be reached")
    assert "set source: FILE in eval set 'b'" in problems[3]
    assert plan.reachability(make_cfg(model="tiny", precision="auto")) == []


# ---- memory --------------------------------------------------------------------------------

def saved_bytes(model, cfg: Config, autocast: bool) -> int:
    """Bytes of the tensors autograd saves in one forward of a micro-batch (parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    shape = (cfg.micro_batch_size, cfg.max_prompt_tokens + cfg.max_new_tokens)
    ids = torch.randint(0, model.config.vocab_size, shape)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), ctx:
        out = model(input_ids=ids, use_cache=False, logits_to_keep=cfg.max_new_tokens + 1)
    del out
    return sum(seen.values())


@pytest.mark.parametrize("precision", ["fp32", "bf16", "bf16-mixed"])
def test_activation_formula_matches_what_autograd_saves(precision):
    # Without a padding mask sdpa keeps K/V at their own width: equal heads make that the formula's width.
    config = small_config(hidden_size=128, intermediate_size=352, num_key_value_heads=4, vocab_size=500)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    if precision == "bf16":
        model = model.to(torch.bfloat16)
    cfg = make_cfg(precision=precision)
    est = memory.memory_estimate(cfg, config)
    expected = row(est, "activations") + (row(est, "bf16 weight casts kept") if precision == "bf16-mixed" else 0)
    measured = saved_bytes(model, cfg, autocast=precision == "bf16-mixed") / memory.GIB
    assert measured == pytest.approx(expected, rel=0.02)


@pytest.fixture(scope="module")
def logits_heavy_model(tmp_path_factory):
    """A Qwen2 model folder whose logits outweigh its activations (V = 32768, h = 64), with the built-in
    character tokenizer; equal heads and KV heads (see the activation test)."""
    from entclip.data.tasks.tiny import build_char_tokenizer

    path = tmp_path_factory.mktemp("logits-heavy")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(small_config(vocab_size=32768, num_key_value_heads=4)).save_pretrained(path)
    build_char_tokenizer().save_pretrained(path)
    return path


PROFILE_BASE = dict(device="cpu", precision="fp32", max_prompt_tokens=16, max_new_tokens=64, prompts_per_step=2,
                    group_size=4, minibatches=2, micro_batch_size=2, entropy_accounting=False, threads=1,
                    accounting_every=1)


def profiled_step(folder, **settings) -> tuple[Config, dict[str, int]]:
    """Peak bytes of each phase of Trainer.step on CPU, above the level at the step's start (weights and
    AdamW moments, after one step), from the profiler's memory events. The rollout is a fixed batch."""
    from torch.profiler import ProfilerActivity, profile

    from entclip.core import losses
    from entclip.training.batch import Batch
    from entclip.training.engine import Trainer
    from entclip.training.rollout import Rollout

    cfg = Config(**{**PROFILE_BASE, "model": str(folder), **settings})
    trainer = Trainer(cfg, None, lambda s: None)
    B, P, T, V = cfg.batch_size, cfg.max_prompt_tokens, cfg.max_new_tokens, trainer.session.policy.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    roll = Rollout(torch.randint(0, V, (B, P), generator=gen), torch.ones(B, P, dtype=torch.long),
                   torch.randint(0, V, (B, T), generator=gen), torch.ones(B, T, dtype=torch.long), [""] * B, [""] * B)
    rewards = torch.arange(B, dtype=torch.float32) % 3

    def fixed(step):  # the same scored batch every step
        return Batch(step, roll, [(i, 0) for i in range(B)]).with_scores(
            rewards, [False] * B, {}, losses.group_advantages(rewards, cfg.group_size, cfg.scale_std))

    # The step marks its phases for the profiler (engine.py): the per-update accounting's pass runs
    # inside the update, so the update phase includes it.
    phases = ("stats pass", "update", "accounting")
    try:
        trainer.step(1, fixed(1))
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            trainer.step(2, fixed(2))
    finally:
        trainer.session.rewards.close()
    events = list(prof.profiler.kineto_results.events())
    allocations = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    peaks = {}
    for e in events:
        if e.name() in phases:
            level, peak = 0, 0
            for t, nbytes in allocations:
                level += nbytes
                if e.start_ns() <= t <= e.end_ns():
                    peak = max(peak, level)
            peaks[e.name()] = peak
    return cfg, peaks


@pytest.mark.parametrize("precision, settings", [
    ("fp32", {}),
    ("bf16", {"entropy_coef": 0.01}),
    ("bf16-mixed", {}),
    ("bf16-mixed", {"entropy_coef": 0.01, "gradient_checkpointing": True}),
    ("fp32", {"entropy_accounting": True, "gradient_checkpointing": True, "micro_batch_size": 1}),
    ("bf16-mixed", {"entropy_accounting": True}),
    ("bf16", {"entropy_accounting": True, "minibatches": 1, "micro_batch_size": None}),
    ("bf16-mixed", {"entropy_accounting": True, "accounting_unit": "step"}),  # one forward after the step
    ("fp32", {"kl_coef": 0.1, "micro_batch_size": 4}),  # (bf16 on CPU: the reference's bmm copies its weight)
])
def test_each_phase_matches_a_profiled_trainer_step(logits_heavy_model, precision, settings):
    # Measured in a fresh process: state left by earlier tests in this one (allocations, autocast)
    # moved a bf16-mixed peak by 20% in a full-suite run.
    import json
    import subprocess
    import sys

    script = ("import json, sys; sys.path.insert(0, sys.argv[1]); from test_plan import profiled_step; "
              "cfg, peaks = profiled_step(sys.argv[2], **json.loads(sys.argv[3])); print(json.dumps(peaks))")
    proc = subprocess.run([sys.executable, "-c", script, str(Path(__file__).parent), str(logits_heavy_model),
                           json.dumps({"precision": precision, **settings})],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    measured = json.loads(proc.stdout.strip().splitlines()[-1])
    cfg = Config(**{**PROFILE_BASE, "model": str(logits_heavy_model), "precision": precision, **settings})
    est = memory.memory_estimate(cfg, plan.model_config(cfg))
    assert set(measured) == {"stats pass", "update"} | ({"accounting"} if cfg.entropy_accounting else set())
    for phase, nbytes in measured.items():
        assert est.phases[phase] * memory.GIB == pytest.approx(nbytes, rel=0.02), phase


def test_doubling_the_micro_batch_doubles_activations_and_logits():
    config = small_config()
    one, two = (memory.memory_estimate(make_cfg(micro_batch_size=b), config) for b in (2, 4))
    for prefix in ("activations", "logits", "their gradients in the update"):
        assert row(two, prefix) == pytest.approx(2 * row(one, prefix))
    assert row(two, "weights") == row(one, "weights")


@pytest.mark.parametrize("precision", ["fp32", "bf16", "bf16-mixed"])
def test_logits_and_their_gradients_stay_in_the_compute_dtype(precision):
    # b=2 sequences, T=16: logits (2, 17, V) and gradients (2, 16, V) then (2, 17, V), e bytes each; no
    # float32 copy. The bonus adds token_entropy's (2, 16, V) gradient and theory's two float32 (5, V)
    # chunk buffers (CPU budget 2**21 floats), which together exceed the slice's gradient.
    V, e = 200_000, 4 if precision == "fp32" else 2
    config = small_config(vocab_size=V)
    plain, bonus = (memory.memory_estimate(make_cfg(precision=precision, device="cpu", entropy_coef=c), config)
                    for c in (0.0, 0.01))
    chunk = 2 * 4 * V * 5
    assert row(plain, "logits") * memory.GIB == 2 * 17 * V * e
    assert row(plain, "their gradients in the update") * memory.GIB == 2 * 16 * V * e + 2 * 17 * V * e
    assert row(bonus, "their gradients in the update") * memory.GIB == 2 * (2 * 16 * V * e) + chunk


def test_gradient_checkpointing_lowers_activations_only():
    config = small_config(num_hidden_layers=8)
    plain, ckpt = (memory.memory_estimate(make_cfg(gradient_checkpointing=g), config) for g in (False, True))
    assert row(ckpt, "activations") < row(plain, "activations") / 3
    assert row(ckpt, "logits") == row(plain, "logits") and ckpt.total_gib < plain.total_gib


def test_sharding_divides_weights_and_lowers_the_peak():
    config = small_config(hidden_size=256, intermediate_size=704, num_hidden_layers=8, vocab_size=1000)
    cfg = make_cfg(precision="bf16-mixed", prompts_per_step=8)
    single, eight = memory.memory_estimate(cfg, config, 1), memory.memory_estimate(cfg, config, 8)
    assert single.sharded_total_gib == single.total_gib and eight.total_gib == single.total_gib
    assert eight.sharded_total_gib < eight.total_gib
    assert row(eight, "AdamW", sharded=True) == pytest.approx(row(eight, "AdamW") / 8)
    assert row(eight, "gathered", sharded=True) > 0


def test_bf16_weights_take_half_the_bytes_of_fp32():
    config = small_config()
    fp32, mixed, bf16 = (memory.memory_estimate(make_cfg(precision=p), config)
                         for p in ("fp32", "bf16-mixed", "bf16"))
    assert row(bf16, "weights") == pytest.approx(row(fp32, "weights") / 2)
    assert row(bf16, "AdamW") == pytest.approx(row(fp32, "AdamW") / 2)  # torch AdamW: moments in param dtype
    assert row(mixed, "weights") == row(fp32, "weights")  # fp32 master weights
    assert row(mixed, "KV cache") == pytest.approx(row(fp32, "KV cache") * 6 / 8)  # fp32 keys, bf16 values


def test_kl_penalty_adds_a_reference_model_in_bf16_unless_fp32():
    config = small_config()
    est = memory.memory_estimate(make_cfg(kl_coef=0.05), config)
    assert row(est, "reference model") == row(est, "weights")
    mixed = memory.memory_estimate(make_cfg(kl_coef=0.05, precision="bf16-mixed"), config)
    assert row(mixed, "reference model") == pytest.approx(row(mixed, "weights") / 2)  # engine: ref in bf16
    assert not any(label.startswith("reference") for label, _ in memory.memory_estimate(make_cfg(), config).rows)


@pytest.mark.parametrize("precision", ["fp32", "bf16", "bf16-mixed"])
def test_kv_cache_formula_matches_the_cache_a_forward_builds(precision):
    config = small_config()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16 if precision == "bf16" else torch.float32)
    cfg = make_cfg(precision=precision, generation_batch_size=3)
    ids = torch.randint(0, config.vocab_size, (3, cfg.max_prompt_tokens + cfg.max_new_tokens))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # left padding, as in a rollout
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16-mixed" else contextlib.nullcontext()
    with torch.no_grad(), ctx:
        cache = model(input_ids=ids, attention_mask=mask, use_cache=True).cache
    measured = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    assert row(memory.memory_estimate(cfg, config), "KV cache") * memory.GIB == measured


def test_resolve_precision_auto_follows_the_gpu(monkeypatch):
    assert plan.resolve_precision(make_cfg(precision="bf16")) == "bf16"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert plan.resolve_precision(make_cfg(precision="auto")) == "fp32"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert plan.resolve_precision(make_cfg(precision="auto")) == "bf16-mixed"


def test_render_shows_both_columns_and_the_peaks():
    est = memory.memory_estimate(make_cfg(precision="bf16-mixed", prompts_per_step=8), small_config(), 4)
    lines = memory.render_memory(est)
    assert "4 GPUs" in lines[1] and "4 GPUs, if sharded" in lines[1]
    peak = next(line for line in lines if line.strip().startswith("peak")).split()
    assert peak[1:] == [f"{est.total_gib:.1f}", f"{est.dp_total_gib:.1f}", f"{est.sharded_total_gib:.1f}"]
    # data parallel: the whole model on every GPU, a quarter of the batch
    assert est.sharded_total_gib < est.dp_total_gib <= est.total_gib
    assert any("note: peak = resident + the largest phase" in line for line in lines)
