"""Dataset problems: local files and folders through `datasets`, templates, chat templates, filters, errors.

The character tokenizer turns every character into one token and prepends <bos> when asked for
special tokens, so a prompt's token count is len(text) (+1): length filters are checked exactly.
"""

from __future__ import annotations

import json
import os

import pytest

from entclip.contracts.config import Config
from entclip.contracts.errors import BAD_CONFIG, BAD_DATA, NOT_FOUND, EntclipError
from entclip.data.tasks.arithmetic import Problem
from entclip.data.tasks.dataset import answer_text, build_prompt, field, load_dataset_task, read_rows
from entclip.data.tasks.tiny import build_char_tokenizer

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
DAPO_PROMPT = "Solve the problem. The last line of your response should be of the form Answer: $Answer"


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


@pytest.fixture(scope="module")
def chat_tok():
    tokenizer = build_char_tokenizer()
    tokenizer.chat_template = CHATML
    return tokenizer


@pytest.fixture(autouse=True)
def _private_datasets_cache(tmp_path, monkeypatch):
    """Arrow caches go under tmp_path, never the user's Hugging Face cache."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _dapo(tmp_path):
    rows = [{"data_source": "math_dapo", "ability": "MATH",
             "prompt": [{"role": "user", "content": f"{DAPO_PROMPT}\n\nWhat is {i} + {i}?"}],
             "reward_model": {"ground_truth": str(2 * i), "style": "rule-lighteval/MATH_v2"}} for i in range(1, 4)]
    rows.append({**rows[0], "reward_model": {"style": "rule"}})  # a row without the nested answer
    return _jsonl(tmp_path / "dapo.jsonl", rows)


def _math500(tmp_path, n=3):
    rows = [{"problem": f"Compute ${k}^2$.", "solution": "...", "answer": k * k, "level": 1} for k in range(n)]
    return _jsonl(tmp_path / "math500.jsonl", rows)


def _raises(fn, code: int) -> str:
    with pytest.raises(EntclipError) as info:
        fn()
    assert info.value.exit_code == code, str(info.value)
    assert "\n" not in str(info.value)
    return str(info.value)


# ---- fields and answers -------------------------------------------------------------------

def test_field_reaches_nested_dicts_and_raises_keyerror_when_absent():
    row = {"reward_model": {"ground_truth": "34", "style": "rule"}, "a.b": 1, "n": 5}
    assert field(row, "reward_model.ground_truth") == "34"
    assert field(row, "a.b") == 1  # a column whose name has a dot is found as it is
    for path in ("reward_model.truth", "missing", "n.deeper"):
        with pytest.raises(KeyError):
            field(row, path)


def test_answers_become_strings_lists_give_their_first_element():
    assert [answer_text(v) for v in (7, 7.0, 0.5, [3, 4], ["x"], " 12 ", None, float("nan"), [])] == \
        ["7", "7", "0.5", "3", "x", "12", "", "", ""]


# ---- build_prompt ---------------------------------------------------------------------------

def test_template_replaces_prompt_and_keeps_boxed_braces(tok):
    template = "Q: {prompt}\nPut the final answer in \\boxed{}."
    text, add = build_prompt("1+1", tok, template=template, system_prompt=None, chat_template="off")
    assert (text, add) == ("Q: 1+1\nPut the final answer in \\boxed{}.", True)


def test_template_fills_the_last_user_message_and_chat_off_joins_contents(tok):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "a"},
                {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    text, add = build_prompt(messages, tok, template="<{prompt}>", system_prompt="ignored: has one",
                             chat_template="off")
    assert (text, add) == ("Be brief.\n\na\n\nb\n\n<c>", True)
    assert messages[-1]["content"] == "c"  # the row itself is left as it was


def test_system_prompt_comes_first_in_plain_text_and_in_the_chat_template(tok, chat_tok):
    kw = dict(template="{prompt}", system_prompt="Think step by step.")
    assert build_prompt("2+2=", tok, chat_template="off", **kw) == ("Think step by step.\n\n2+2=", True)
    assert build_prompt("2+2=", chat_tok, chat_template="on", **kw) == (
        "<|im_start|>system\nThink step by step.<|im_end|>\n<|im_start|>user\n2+2=<|im_end|>\n"
        "<|im_start|>assistant\n", False)
    own = [{"role": "system", "content": "Mine."}, {"role": "user", "content": "2+2="}]
    text, _ = build_prompt(own, chat_tok, chat_template="on", **kw)
    assert text.count("<|im_start|>system") == 1 and "Mine." in text and "Think" not in text


def test_chat_template_auto_follows_the_tokenizer_and_on_without_one_names_the_fix(tok, chat_tok):
    kw = dict(template="{prompt}", system_prompt=None)
    assert build_prompt("x", tok, chat_template="auto", **kw) == ("x", True)
    assert build_prompt("x", chat_tok, chat_template="auto", **kw) == (
        "<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\n", False)
    assert build_prompt("x", chat_tok, chat_template="off", **kw) == ("x", True)
    message = _raises(lambda: build_prompt("x", tok, chat_template="on", **kw), BAD_CONFIG)
    assert "no chat template" in message and "--set chat_template=off" in message


# ---- load_dataset_task ----------------------------------------------------------------------

def test_dapo_like_rows_use_the_message_list_and_the_nested_answer(tmp_path, chat_tok):
    cfg = Config(dataset=str(_dapo(tmp_path)), answer_field="reward_model.ground_truth", system_prompt="S")
    task = load_dataset_task(cfg, chat_tok)
    assert task.add_special_tokens is False and task.name == "dataset"
    assert [p.answer for p in task.train] == ["2", "4", "6"]
    assert task.train[0].prompt == (f"<|im_start|>system\nS<|im_end|>\n<|im_start|>user\n{DAPO_PROMPT}\n\n"
                                    "What is 1 + 1?<|im_end|>\n<|im_start|>assistant\n")
    assert task.skipped == {"train_too_long": 0, "train_empty": 1} and task.eval_sets == {}


def test_csv_prompts_are_filtered_by_token_length_as_fed_and_counted(tmp_path, tok, chat_tok):
    # 9-character and 10-character prompts; one row without an answer, one without a problem.
    path = tmp_path / "p.csv"
    path.write_text("question,solution\n123456789,1\n1234567890,2\n12+3=,\n,4\n1+1=,2\n")
    cfg = Config(dataset=str(path), prompt_field="question", answer_field="solution", max_prompt_tokens=10)
    plain = load_dataset_task(cfg, tok)  # <bos> + text: the 10-character prompt is 11 tokens
    assert plain.train == [Problem("123456789", "1"), Problem("1+1=", "2")] and plain.add_special_tokens
    assert plain.skipped == {"train_too_long": 1, "train_empty": 2}
    wrapped = Config(dataset=str(path), prompt_field="question", answer_field="solution",
                     prompt_template="<{prompt}>", chat_template="off", max_prompt_tokens=12)
    assert [p.prompt for p in load_dataset_task(wrapped, chat_tok).train] == ["<123456789>", "<1+1=>"]
    chat = Config(dataset=str(path), prompt_field="question", answer_field="solution",
                  max_prompt_tokens=len("<|im_start|>user\n1234567890<|im_end|>\n<|im_start|>assistant\n"))
    kept = load_dataset_task(chat, chat_tok)  # no <bos>: the chat text alone must fit
    assert [p.answer for p in kept.train] == ["1", "2", "2"] and kept.skipped["train_too_long"] == 0


def test_max_train_prompts_keeps_the_first_n_after_filtering(tmp_path, tok):
    path = _jsonl(tmp_path / "p.jsonl", [{"prompt": "1" * 50, "answer": 0}] +
                  [{"prompt": f"{i}+0=", "answer": i} for i in range(5)])
    task = load_dataset_task(Config(dataset=str(path), max_prompt_tokens=20, max_train_prompts=3), tok)
    assert task.train == [Problem(f"{i}+0=", str(i)) for i in range(3)]
    assert task.skipped["train_too_long"] == 1


def test_parquet_with_a_nested_struct_and_list_answers(tmp_path, tok):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"q": ["1+2=", "3+4="], "meta": [{"answers": ["3", "three"]}, {"answers": ["7"]}]}), path)
    task = load_dataset_task(Config(dataset=str(path), prompt_field="q", answer_field="meta.answers"), tok)
    assert task.train == [Problem("1+2=", "3"), Problem("3+4=", "7")]


def test_eval_sets_default_to_the_training_source_its_fields_and_eval_n(tmp_path, tok):
    train = _jsonl(tmp_path / "train.jsonl", [{"prompt": f"{i}+1=", "answer": i + 1} for i in range(6)])
    math500 = _math500(tmp_path, n=4)
    cfg = Config(dataset=str(train), eval_n=5, max_prompt_tokens=16,
                 eval_sets=({"name": "same"},
                            {"name": "math500", "source": str(math500), "prompt_field": "problem", "n": 2}))
    task = load_dataset_task(cfg, tok)
    assert task.eval_sets["same"] == task.train[:5]  # a local file's only split, its first eval_n rows
    assert task.eval_sets["math500"] == [Problem("Compute $0^2$.", "0"), Problem("Compute $1^2$.", "1")]
    assert task.skipped == {"train_too_long": 0, "train_empty": 0, "same_too_long": 0, "same_empty": 0,
                            "math500_too_long": 0, "math500_empty": 0}


def test_a_folder_source_is_read_by_split_and_eval_defaults_to_test(tmp_path, tok):
    folder = tmp_path / "ds"
    folder.mkdir()
    _jsonl(folder / "train.jsonl", [{"prompt": "1+1=", "answer": 2}])
    _jsonl(folder / "test.jsonl", [{"prompt": "2+2=", "answer": 4}, {"prompt": "3+3=", "answer": 6}])
    task = load_dataset_task(Config(dataset=str(folder), eval_sets=({"name": "held_out"},)), tok)
    assert task.train == [Problem("1+1=", "2")]
    assert task.eval_sets["held_out"] == [Problem("2+2=", "4"), Problem("3+3=", "6")]


# ---- errors: one line each, naming the fix --------------------------------------------------

def test_missing_file_and_unsupported_type(tmp_path):
    assert "not found; check the path" in _raises(lambda: read_rows(str(tmp_path / "no.jsonl")), NOT_FOUND)
    assert "not found" in _raises(lambda: read_rows(str(tmp_path / "no_such_folder") + "/"), NOT_FOUND)
    (tmp_path / "p.txt").write_text("1+1=\n")
    assert "unsupported file type '.txt'" in _raises(lambda: read_rows(str(tmp_path / "p.txt")), BAD_CONFIG)


def test_broken_jsonl_line_and_empty_file_are_named(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "1+1=", "answer": "2"}\n\n{"prompt": oops}\n')
    message = _raises(lambda: read_rows(str(path)), BAD_DATA)
    assert f"{path} line 3 is not valid JSON; fix or remove that line" in message
    path.write_text("\n")
    assert "is empty" in _raises(lambda: read_rows(str(path)), BAD_DATA)


def test_missing_column_lists_the_columns_and_nested_keys(tmp_path, tok):
    path = _dapo(tmp_path)
    message = _raises(lambda: load_dataset_task(Config(dataset=str(path), answer_field="solution"), tok), BAD_DATA)
    assert "no column 'solution' (columns: data_source, ability, prompt, reward_model)" in message
    assert "--set prompt_field=COLUMN / answer_field=COLUMN" in message
    cfg = Config(dataset=str(path), answer_field="reward_model.truth")
    message = _raises(lambda: load_dataset_task(cfg, tok), BAD_DATA)
    assert "'reward_model.truth'" in message and "reward_model has: ground_truth, style" in message
    cfg = Config(dataset=str(path), answer_field="reward_model.ground_truth",
                 eval_sets=({"name": "m", "source": str(_math500(tmp_path)), "answer_field": "final"},))
    assert "set prompt_field / answer_field in eval set 'm'" in _raises(lambda: load_dataset_task(cfg, tok), BAD_DATA)


def test_unknown_split_lists_the_splits(tmp_path):
    folder = tmp_path / "ds"
    folder.mkdir()
    for split in ("train", "test"):
        _jsonl(folder / f"{split}.jsonl", [{"prompt": "1+1=", "answer": 2}])
    message = _raises(lambda: read_rows(str(folder), "validation"), BAD_CONFIG)
    assert f"{folder} has no split 'validation'; its splits are: train, test" in message
    file = folder / "train.jsonl"
    assert "its only split is 'train', not 'test'" in _raises(lambda: read_rows(str(file), "test"), BAD_CONFIG)


def test_unreachable_hub_id_offline_says_so_and_names_a_local_file(monkeypatch):
    import datasets
    import huggingface_hub

    assert os.environ.get("HF_HUB_OFFLINE") == "1" and os.environ.get("HF_DATASETS_OFFLINE") == "1"
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # in case datasets was imported first
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    message = _raises(lambda: read_rows("HuggingFaceH4/MATH-500", "test"), NOT_FOUND)
    assert message == ("dataset 'HuggingFaceH4/MATH-500' cannot be reached (no network and not in the local "
                       "Hugging Face cache); give a local .jsonl/.json/.csv/.parquet file with --set dataset=FILE, "
                       "or run once with network access so that it is cached")


def test_no_training_prompt_left_names_the_fix(tmp_path, tok):
    path = _jsonl(tmp_path / "p.jsonl", [{"prompt": "1" * 30, "answer": 1}, {"prompt": "", "answer": 2}])
    message = _raises(lambda: load_dataset_task(Config(dataset=str(path), max_prompt_tokens=8), tok), BAD_DATA)
    assert "no training prompts left of 2 rows (1 longer than max_prompt_tokens=8, 1 with an empty" in message
    assert "--set max_prompt_tokens=16" in message
    cfg = Config(dataset=str(_math500(tmp_path)), prompt_field="problem", max_prompt_tokens=15,
                 eval_sets=({"name": "long", "source": str(path)},))
    assert "eval set 'long'" in _raises(lambda: load_dataset_task(cfg, tok), BAD_DATA)
