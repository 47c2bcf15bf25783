"""Training and evaluation problems from a Hugging Face dataset or a local file, read through `datasets`.

A row becomes a Problem: its problem (a string, or a list of chat messages as in DAPO-Math-17k's
"prompt" column) goes into `prompt_template` and, when the chat template is on, into the tokenizer's
chat template; its reference answer (dots reach nested fields, e.g. "reward_model.ground_truth")
becomes a string. Rows with an empty problem or answer, and prompts longer than `max_prompt_tokens`
tokens as they will be fed, are dropped and counted. Lists keep the dataset's order; evaluation sets
take their first n problems, so every run of a config is evaluated on the same ones.

`datasets` is imported inside functions: importing this module must stay cheap (CLI start-up).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field as dc_field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from entclip.contracts.errors import BAD_CONFIG, BAD_DATA, NOT_FOUND, EntclipError, first_line
from entclip.data.tasks.arithmetic import Problem

if TYPE_CHECKING:
    import datasets

LOCAL_KINDS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
LOCAL_FIX = "--set dataset=FILE"


def is_local_file(source: str) -> bool:
    """True for a path with a .jsonl/.json/.csv/.parquet suffix (whether or not it exists)."""
    return Path(source).suffix.lower() in LOCAL_KINDS


def read_rows(source: str, split: str = "train", config: str | None = None, *,
              local_fix: str = LOCAL_FIX) -> datasets.Dataset:
    """One split of a local file (its only split is "train") or of a dataset id / local folder.

    Every failure is an EntclipError with one line naming the fix; `local_fix` is how the calling
    command takes a local file instead (predict-entropy: "--prompts FILE").
    """
    import datasets

    from entclip.data.libraries import quiet_libraries

    quiet_libraries()
    path = Path(source).expanduser()
    if is_local_file(source):
        return _read_file(path, split)
    if path.is_file():
        raise EntclipError(f"{path}: unsupported file type {path.suffix!r}; give a .jsonl, .json, .csv or "
                           ".parquet file", BAD_CONFIG)
    if source.startswith(("/", "./", "../", "~")) and not path.exists():
        raise EntclipError(f"dataset path {path} not found; check the path", NOT_FOUND)
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return datasets.load_dataset(source, config, split=split)
    except (ConnectionError, LocalEntryNotFoundError):  # datasets reports offline/unreachable this way
        raise EntclipError(f"dataset {source!r} cannot be reached (no network and not in the local Hugging "
                           f"Face cache); give a local .jsonl/.json/.csv/.parquet file with {local_fix}, "
                           "or run once with network access so that it is cached", NOT_FOUND) from None
    except datasets.exceptions.DatasetNotFoundError:
        raise EntclipError(f"dataset {source!r} not found on the Hugging Face Hub; check the id (a gated "
                           f"dataset needs `hf auth login`) or give a local file with {local_fix}",
                           NOT_FOUND) from None
    except ValueError as exc:
        found = re.match(r'Unknown split "(.*)"\. Should be one of \[(.*)\]', str(exc))
        if found is None:
            raise EntclipError(f"cannot read {source!r} ({first_line(exc)}); check the dataset id and its "
                               "config", BAD_DATA) from None
        names = ", ".join(re.findall(r"'([^']*)'", found.group(2)))
        raise EntclipError(f"{source} has no split {split!r}; its splits are: {names}; pick one of them",
                           BAD_CONFIG) from None
    except Exception as exc:  # datasets raises many types: builder, cast and parse errors
        raise EntclipError(f"cannot read {source!r} ({first_line(exc)}); check the dataset id and its "
                           "config", BAD_DATA) from None


def _read_file(path: Path, split: str) -> datasets.Dataset:
    import datasets

    if not path.is_file():
        raise EntclipError(f"dataset file {path} not found; check the path", NOT_FOUND)
    if split != "train":
        raise EntclipError(f"{path} is a local file: its only split is 'train', not {split!r}; "
                           "set the split to train", BAD_CONFIG)
    kind = LOCAL_KINDS[path.suffix.lower()]
    if kind != "parquet":
        text = path.read_text(errors="replace")
        if not text.strip():  # datasets fails on an empty file with a bare StopIteration
            raise EntclipError(f"{path} is empty; give a file with one row per problem", BAD_DATA)
        if path.suffix.lower() == ".jsonl":  # name the broken line; datasets' own message does not
            for i, line in enumerate(text.splitlines(), 1):
                try:
                    json.loads(line) if line.strip() else None
                except json.JSONDecodeError:
                    raise EntclipError(f"{path} line {i} is not valid JSON; fix or remove that line",
                                       BAD_DATA) from None
    try:
        return datasets.load_dataset(kind, data_files=str(path), split="train")
    except Exception as exc:
        raise EntclipError(f"cannot read {path} as {kind} ({first_line(exc)}); fix the file", BAD_DATA) from None



def field(row: dict, path: str) -> Any:
    """row[path], where dots reach into nested dicts ("reward_model.ground_truth"); KeyError if absent.

    A column whose own name contains dots is found first.
    """
    if path in row:
        return row[path]
    value: Any = row
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            raise KeyError(path)
        value = value[part]
    return value


def missing_field_error(source: str, path: str, columns: list[str], row: dict | None, fix: str) -> EntclipError:
    """The one-line error for a field a dataset lacks: its columns, and a nested dict's keys if one is near."""
    where = f"columns: {', '.join(columns)}"
    head, _, _ = path.rpartition(".")
    try:
        parent = field(row, head) if head and row is not None else None
    except KeyError:
        parent = None
    if isinstance(parent, dict):
        where += f"; {head} has: {', '.join(map(str, parent))}"
    return EntclipError(f"{source} has no column {path!r} ({where}); {fix}", BAD_DATA)


def check_fields(rows: datasets.Dataset, source: str, paths: tuple[str, ...], fix: str) -> list[str]:
    """The columns that hold `paths` (each a column or a dotted path below one); an error naming `fix` if absent."""
    columns = list(rows.column_names)
    tops = []
    for path in paths:
        top = path if path in columns else path.split(".")[0]
        if top not in columns:
            raise missing_field_error(source, path, columns, rows[0] if len(rows) else None, fix)
        tops.append(top)
    return list(dict.fromkeys(tops))


def answer_text(value: Any) -> str:
    """A reference answer as a string: a list gives its first element; integral floats lose ".0".

    (A CSV column with a missing value is read as floats, so 7 arrives as 7.0; NaN means missing.)
    """
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    if value is None or (isinstance(value, float) and value != value):
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def _is_empty(problem: Any) -> bool:
    if problem is None:
        return True
    if isinstance(problem, list):
        return not any(str(m.get("content") or "").strip() for m in problem if isinstance(m, dict))
    return not str(problem).strip()


def _messages(problem: Any) -> list[dict[str, str]]:
    if isinstance(problem, (str, int, float)):
        return [{"role": "user", "content": str(problem)}]
    if isinstance(problem, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in problem):
        return [{"role": str(m["role"]), "content": str(m["content"] or "")} for m in problem]
    raise EntclipError(f"a problem must be a string or a list of {{role, content}} chat messages, not "
                       f"{str(problem)[:80]!r}; check prompt_field", BAD_DATA)


def chat_on(tokenizer, chat_template: str) -> bool:
    """Whether prompts go through the tokenizer's chat template ("auto": when it has one)."""
    has = bool(getattr(tokenizer, "chat_template", None))
    if chat_template == "on" and not has:
        raise EntclipError("chat_template=on but the tokenizer has no chat template; "
                           "set --set chat_template=off (or auto)")
    return has if chat_template == "auto" else chat_template == "on"


def build_prompt(problem: Any, tokenizer, *, template: str, system_prompt: str | None,
                 chat_template: str) -> tuple[str, bool]:
    """The text fed to the model for one problem, and whether to add the tokenizer's special tokens.

    "{prompt}" in `template` is replaced (str.replace: templates hold \\boxed{} braces) by the problem,
    or by the content of the last user message of a message list. `system_prompt` comes first unless
    the conversation has a system message. Chat on: the tokenizer's chat template with the generation
    prompt, add_special_tokens False (the template writes its own). Off: the contents joined by blank
    lines, add_special_tokens True.
    """
    messages = _messages(problem)
    users = [i for i, m in enumerate(messages) if m["role"] == "user"]
    if users:
        last = messages[users[-1]]
        last["content"] = template.replace("{prompt}", last["content"])
    if system_prompt and not any(m["role"] == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": system_prompt})
    if not chat_on(tokenizer, chat_template):
        return "\n\n".join(m["content"] for m in messages), True
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # jinja errors, e.g. a template that refuses a system message
        raise EntclipError(f"the tokenizer's chat template failed ({first_line(exc)}); drop system_prompt "
                           "or set --set chat_template=off", BAD_DATA) from None
    return text, False


def problems_from_rows(rows: datasets.Dataset, source: str, prompt_field: str, answer_field: str, *,
                       fix: str, tokenizer=None, template: str = "{prompt}", system_prompt: str | None = None,
                       chat_template: str = "off", max_tokens: int | None = None,
                       ) -> tuple[list[Problem], dict[str, int]]:
    """Every usable row as a Problem, in order, and the counts dropped: {"too_long": n, "empty": n}.

    A field absent from every row (a column the dataset lacks) is an error naming `fix`; absent from
    some rows (a nested key), it counts as empty there. max_tokens=None: no length filter.
    """
    columns = list(rows.column_names)
    first = rows[0] if len(rows) else None
    paths = (prompt_field, answer_field)
    tops = check_fields(rows, source, paths, fix)
    rows = rows.select_columns(tops)  # skip decoding the columns we do not use
    missing = dict.fromkeys(paths, 0)
    texts, answers, empty, add = [], [], 0, True
    for row in rows:
        values = []
        for path in paths:
            try:
                values.append(field(row, path))
            except KeyError:
                missing[path] += 1
                values.append(None)
        problem, answer = values[0], answer_text(values[1])
        if _is_empty(problem) or not answer:
            empty += 1
            continue
        text, add = build_prompt(problem, tokenizer, template=template, system_prompt=system_prompt,
                                 chat_template=chat_template)
        texts.append(text)
        answers.append(answer)
    for path, n in missing.items():
        if n and n == len(rows):
            raise missing_field_error(source, path, columns, first, fix)
    if max_tokens is None or not texts:
        return [Problem(t, a) for t, a in zip(texts, answers)], {"too_long": 0, "empty": empty}
    ids = tokenizer(texts, add_special_tokens=add)["input_ids"]  # as they will be fed
    kept = [Problem(t, a) for t, a, n in zip(texts, answers, ids) if len(n) <= max_tokens]
    return kept, {"too_long": len(texts) - len(kept), "empty": empty}


@dataclass
class DatasetTask:
    """Problems of a dataset run: training prompts in dataset order and named evaluation sets."""

    train: list[Problem]
    eval_sets: dict[str, list[Problem]]  # name -> its first n usable problems
    add_special_tokens: bool  # tokenize prompts with the tokenizer's special tokens (False: chat template)
    skipped: dict[str, int] = dc_field(default_factory=dict)  # "<train|set name>_too_long" / "_empty" -> rows

    name = "dataset"  # class attribute, not a field: the task's name


def load_dataset_task(cfg, tokenizer) -> DatasetTask:
    """Read cfg.dataset's training split and cfg.eval_sets into problems templated for `tokenizer`."""
    if not cfg.dataset:
        raise EntclipError("no dataset set; give one with --set dataset=ID_OR_FILE")
    fmt = dict(tokenizer=tokenizer, template=cfg.prompt_template, system_prompt=cfg.system_prompt,
               chat_template=cfg.chat_template, max_tokens=cfg.max_prompt_tokens)
    add = not chat_on(tokenizer, cfg.chat_template)
    rows = read_rows(cfg.dataset, cfg.dataset_split, cfg.dataset_config)
    train, dropped = problems_from_rows(rows, cfg.dataset, cfg.prompt_field, cfg.answer_field,
                                        fix="set --set prompt_field=COLUMN / answer_field=COLUMN", **fmt)
    skipped = {"train_too_long": dropped["too_long"], "train_empty": dropped["empty"]}
    if not train:
        raise EntclipError(
            f"{cfg.dataset} ({cfg.dataset_split}): no training prompts left of {len(rows)} rows "
            f"({dropped['too_long']} longer than max_prompt_tokens={cfg.max_prompt_tokens}, {dropped['empty']} "
            "with an empty problem or answer); raise max_prompt_tokens, e.g. --set max_prompt_tokens="
            f"{2 * cfg.max_prompt_tokens}, or check prompt_field / answer_field", BAD_DATA)
    if cfg.max_train_prompts is not None:
        train = train[:cfg.max_train_prompts]
    eval_sets = {}
    for spec in cfg.eval_sets:
        name = spec["name"]
        source = spec.get("source") or cfg.dataset
        split = spec.get("split") or ("train" if is_local_file(source) else "test")
        config = spec.get("config") or (cfg.dataset_config if source == cfg.dataset else None)
        rows = read_rows(source, split, config)
        problems, dropped = problems_from_rows(
            rows, source, spec.get("prompt_field") or cfg.prompt_field, spec.get("answer_field") or cfg.answer_field,
            fix=f"set prompt_field / answer_field in eval set {name!r}", **fmt)
        skipped[f"{name}_too_long"], skipped[f"{name}_empty"] = dropped["too_long"], dropped["empty"]
        if not problems:
            raise EntclipError(
                f"eval set {name!r} ({source}, {split}): no problems left of {len(rows)} rows "
                f"({dropped['too_long']} too long, {dropped['empty']} empty); raise max_prompt_tokens or "
                "check the set's prompt_field / answer_field", BAD_DATA)
        eval_sets[name] = problems[:spec.get("n") or cfg.eval_n]
    return DatasetTask(train, eval_sets, add, skipped)
