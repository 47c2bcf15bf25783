"""The embedded task: split, verifier, character tokenizer, tiny model and the cached warm start."""

import dataclasses
import json
import random
import shutil

import pytest
import torch

from conftest import TEST_SEED
from entclip.contracts.errors import EntclipError
from entclip.data.tasks import tiny
from entclip.data.tasks.arithmetic import ArithmeticTask, Problem, reward, verify
from entclip.data.tasks.tiny import (
    WarmStartSpec,
    build_char_tokenizer,
    build_tiny_model,
    greedy_accuracy,
    warm_start,
)

# Small enough for ~1 s a warm start; target_acc 1.0 is never reached, so it runs all 20 steps.
TINY_MODEL = dict(hidden=32, layers=2, heads=2, kv_heads=1, ffn=64)
TINY = WarmStartSpec(
    max_operand=19, n_test=40, **TINY_MODEL, max_steps=20, eval_every=10, eval_n=32, target_acc=1.0,
    seed=TEST_SEED,
)


def state_dict_of(folder):
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


@pytest.fixture(scope="module")
def tiny_entry(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    return root, warm_start(TINY, root)


# ---- split and verifier ----


def test_split_is_deterministic_disjoint_and_sized():
    task = ArithmeticTask()
    assert len(task.test) == 500 and len(task.train) == 100 * 100 - 500
    train, test = {p.prompt for p in task.train}, {p.prompt for p in task.test}
    assert not train & test and len(train | test) == 100 * 100
    again = ArithmeticTask()
    assert again.train == task.train and again.test == task.test
    assert ArithmeticTask(split_seed=1).test != task.test


def test_split_ignores_global_random_state():
    random.seed(0)
    first = ArithmeticTask(max_operand=20, n_test=30).test
    random.seed(1)
    assert ArithmeticTask(max_operand=20, n_test=30).test == first


def test_problems_are_correct_sums():
    for p in ArithmeticTask(max_operand=20, n_test=30).train:
        a, b = p.prompt.removesuffix("=").split("+")
        assert p.answer == str(int(a) + int(b))
    assert ArithmeticTask().max_answer_chars == 3


def test_too_few_training_problems_raise_with_the_fix():
    with pytest.raises(EntclipError, match="lower n_test to at most 241"):
        ArithmeticTask(max_operand=20, n_test=300)
    with pytest.raises(EntclipError, match="raise max_operand to at least 15"):
        ArithmeticTask(max_operand=10, n_test=50)
    with pytest.raises(EntclipError):
        ArithmeticTask(n_test=0)


def test_verify_and_reward_are_exact_match_after_strip():
    assert verify("46", "46") and verify(" 46\n", "46")
    for wrong in ("046", "4 6", "46.0", "", "47", "46=46"):
        assert not verify(wrong, "46")
    assert reward("46", "46") == 1.0 and reward("47", "46") == 0.0
    assert ArithmeticTask.reward(" 46 ", "46") == 1.0 and ArithmeticTask.name == "arithmetic"


# ---- tokenizer and model ----


def test_tokenizer_prepends_bos_and_pads_left():
    tok = build_char_tokenizer()
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    enc = tok(["12+34=", "1+2="], padding=True, return_tensors="pt")
    assert set(enc) == {"input_ids", "attention_mask"}
    assert tok.convert_ids_to_tokens(enc["input_ids"][0]) == ["<bos>", "1", "2", "+", "3", "4", "="]
    padded = ["<pad>", "<pad>", "<bos>", "1", "+", "2", "="]
    assert tok.convert_ids_to_tokens(enc["input_ids"][1]) == padded
    assert enc["attention_mask"][1].tolist() == [0, 0, 1, 1, 1, 1, 1]


def test_tokenizer_round_trips_through_save_pretrained(tmp_path):
    from transformers import AutoTokenizer

    tok = build_char_tokenizer()
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    texts = ["12+34=", "99+0=198<eos>", "5+5=10"]
    assert loaded.padding_side == "left"
    assert loaded(texts, padding=True) == tok(texts, padding=True)
    ids = tok("46<eos>", add_special_tokens=False)["input_ids"]
    assert ids == [tok.convert_tokens_to_ids("4"), tok.convert_tokens_to_ids("6"), tok.eos_token_id]
    assert loaded("46<eos>", add_special_tokens=False)["input_ids"] == ids
    for t in (tok, loaded):
        assert t.decode(ids, skip_special_tokens=True) == "46"
        assert t.decode([1, 8, 10, 2, 0]) == "<bos>46<eos><pad>"


def test_tiny_model_default_size_is_about_one_million_params():
    model = build_tiny_model(build_char_tokenizer())
    assert 0.9e6 < sum(p.numel() for p in model.parameters()) < 1.1e6
    assert model.config.tie_word_embeddings and model.config.pad_token_id == 0


def test_tiny_model_init_is_seeded_and_leaves_global_rng_alone():
    tok = build_char_tokenizer()
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = build_tiny_model(tok, **TINY_MODEL, seed=5)
    assert torch.rand(1) == before
    b = build_tiny_model(tok, **TINY_MODEL, seed=5)
    c = build_tiny_model(tok, **TINY_MODEL, seed=6)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.model.embed_tokens.weight, c.model.embed_tokens.weight)


def test_tiny_model_round_trips_with_identical_logits(tmp_path):
    from transformers import AutoModelForCausalLM

    tok = build_char_tokenizer()
    model = build_tiny_model(tok, **TINY_MODEL).eval()
    model.save_pretrained(tmp_path, safe_serialization=True)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    enc = tok(["12+34=", "1+2="], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(model(**enc).logits, loaded(**enc).logits)


def test_tiny_model_rejects_heads_that_do_not_divide():
    with pytest.raises(EntclipError, match="multiple of heads"):
        build_tiny_model(build_char_tokenizer(), hidden=30, heads=4)


# ---- warm start ----


def test_warm_start_is_deterministic(tiny_entry, tmp_path):
    _, first = tiny_entry
    second = warm_start(TINY, tmp_path)
    assert not first.cached and not second.cached and second.steps == first.steps == 20
    a, b = state_dict_of(first.path), state_dict_of(second.path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert second.accuracy == first.accuracy
    init = build_tiny_model(build_char_tokenizer(), **TINY_MODEL, seed=TINY.seed).state_dict()
    assert not torch.equal(a["model.embed_tokens.weight"], init["model.embed_tokens.weight"])


def test_training_targets_are_the_answer_and_eos_only():
    tok = build_char_tokenizer()
    problems = [Problem("12+34=", "46"), Problem("1+2=", "3")]
    ids, attention, targets = tiny._encode_train(problems, tok)
    assert tok.decode(ids[0]) == "<bos>12+34=46<eos>" and attention[1].tolist() == [1] * 7 + [0] * 3
    # targets[i, t] marks the token at t + 1 as predicted and scored.
    scored = [tok.convert_ids_to_tokens(row[1:][mask]) for row, mask in zip(ids, targets)]
    assert scored == [["4", "6", "<eos>"], ["3", "<eos>"]]


def test_warm_start_second_call_is_cached_without_training(tiny_entry, monkeypatch):
    root, first = tiny_entry

    def no_training(*args, **kwargs):
        raise AssertionError("a cached warm start must not train")

    monkeypatch.setattr(tiny, "_train", no_training)
    monkeypatch.setattr(tiny, "build_tiny_model", no_training)
    again = warm_start(TINY, root)
    assert again.cached and again.path == first.path
    assert again.accuracy == first.accuracy and again.steps == first.steps
    assert again.seconds == first.seconds  # read back, not re-measured


def test_warm_start_folder_loads_and_reproduces_its_accuracy(tiny_entry):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, result = tiny_entry
    names = {p.name for p in result.path.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json"} <= names
    record = json.loads((result.path / "warmstart.json").read_text())
    assert record["spec"] == dataclasses.asdict(TINY) and record["steps"] == 20
    model = AutoModelForCausalLM.from_pretrained(result.path)
    tok = AutoTokenizer.from_pretrained(result.path)
    assert tok.padding_side == "left"
    # The saved weights are the evaluated ones: the same evaluation sample gives the same accuracy.
    sample = random.Random(TINY.seed).sample(TINY.task.train, TINY.eval_n)
    assert greedy_accuracy(model, tok, sample, TINY.task.max_answer_chars + 1) == result.accuracy


def test_warm_start_never_evaluates_on_the_test_split(monkeypatch, tmp_path):
    seen = []
    real = tiny.greedy_accuracy

    def spy(model, tok, problems, *args, **kwargs):
        seen.extend(problems)
        return real(model, tok, problems, *args, **kwargs)

    monkeypatch.setattr(tiny, "greedy_accuracy", spy)
    warm_start(dataclasses.replace(TINY, max_steps=10), tmp_path)
    assert seen and not {p.prompt for p in seen} & {p.prompt for p in TINY.task.test}


def test_warm_start_stops_at_the_first_evaluation_reaching_target(monkeypatch, tmp_path):
    scripted = iter([0.1, 0.4, 0.6, 0.9])
    monkeypatch.setattr(tiny, "greedy_accuracy", lambda *args, **kwargs: next(scripted))
    spec = dataclasses.replace(TINY, max_steps=100, eval_every=5, target_acc=0.5)
    result = warm_start(spec, tmp_path)
    assert (result.steps, result.accuracy) == (15, 0.6)
    history = json.loads((result.path / "warmstart.json").read_text())["history"]
    assert [h["step"] for h in history] == [5, 10, 15]


def test_spec_key_is_stable_and_covers_every_field():
    assert TINY.key() == dataclasses.replace(TINY).key()
    assert WarmStartSpec(lr=0.003).key() == WarmStartSpec(lr=3e-3).key()
    keys = {TINY.key()}
    for f in dataclasses.fields(WarmStartSpec):
        value = getattr(TINY, f.name)
        changed = value / 2 if isinstance(value, float) else (value * 2 or 1)  # stays valid
        changed = "countdown" if f.name == "task_name" else changed
        keys.add(dataclasses.replace(TINY, **{f.name: changed}).key())
    assert len(keys) == 1 + len(dataclasses.fields(WarmStartSpec))


def test_leftover_temporary_folder_is_not_a_cache_entry(tiny_entry, tmp_path):
    _, result = tiny_entry
    # A process killed just before the rename leaves a complete-looking hidden sibling.
    shutil.copytree(result.path, tmp_path / f".{TINY.key()}.tmp-dead")
    fresh = warm_start(TINY, tmp_path)
    assert not fresh.cached and fresh.path == tmp_path / TINY.key()


def test_interrupted_save_leaves_no_entry(monkeypatch, tmp_path):
    def crash(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(tiny.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        warm_start(TINY, tmp_path)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    assert not warm_start(TINY, tmp_path).cached


def test_folder_without_marker_raises_with_the_fix(tmp_path):
    (tmp_path / TINY.key()).mkdir()
    with pytest.raises(EntclipError, match="delete it"):
        warm_start(TINY, tmp_path)


def test_spec_validation_names_the_field():
    with pytest.raises(EntclipError, match="target_acc"):
        WarmStartSpec(target_acc=0.0)
    with pytest.raises(EntclipError, match="eval_every"):
        WarmStartSpec(eval_every=0)
    with pytest.raises(EntclipError, match="n_test"):
        WarmStartSpec(max_operand=10, n_test=50)
    with pytest.raises(EntclipError, match="kv_heads"):
        WarmStartSpec(heads=4, kv_heads=3)
