"""Loading the policy: the built-in tiny model after its cached warm start, or any causal LM.

Everything that touches model files lives here, so the loop never deals with paths or caches.
No remote code is ever executed (trust_remote_code=False); weights are safetensors.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from entclip.config import Config
from entclip.errors import NOT_FOUND, EntclipError

Log = Callable[[str], None]


def quiet_libraries() -> None:
    """Our console reports progress; the libraries' own bars and notices would interleave with it."""
    import huggingface_hub
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    huggingface_hub.utils.logging.set_verbosity_error()  # offline retries are reported by our one line
    try:
        import datasets

        datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its failures reach us as exceptions
        datasets.disable_progress_bars()
    except ImportError:
        pass


def cache_root(cfg: Config) -> Path:
    root = cfg.cache_dir or os.environ.get("ENTCLIP_CACHE") or Path.home() / ".cache" / "entclip"
    return Path(root)


def load_policy(cfg: Config, log: Log):
    """The embedded default: the tiny model after its (cached) supervised warm start."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from entclip.tasks.tiny import WarmStartSpec, warm_start

    quiet_libraries()
    heads = cfg.tiny_heads
    spec = WarmStartSpec(max_operand=cfg.max_operand, n_test=cfg.n_test, hidden=cfg.tiny_hidden,
                         layers=cfg.tiny_layers, heads=heads, kv_heads=heads // 2 if heads % 2 == 0 else heads,
                         ffn=cfg.tiny_ffn, lr=cfg.warmup_lr, max_steps=cfg.warmup_max_steps,
                         target_acc=cfg.warmup_target_acc, seed=cfg.seed)
    ws = warm_start(spec, cache_root(cfg) / "warmstart", log=log)
    log(f"warm start: {'cached' if ws.cached else 'trained'} {ws.path} "
        f"(greedy train accuracy {ws.accuracy:.2f} after {ws.steps} steps)")
    model = AutoModelForCausalLM.from_pretrained(ws.path)
    tokenizer = AutoTokenizer.from_pretrained(ws.path)
    return model, tokenizer, {"path": str(ws.path), "accuracy": ws.accuracy, "steps": ws.steps,
                              "seconds": ws.seconds, "cached": ws.cached}


def load_folder(path: str, precision: str = "fp32", trust_remote_code: bool = False):
    """A causal LM and its tokenizer from a local folder, a .gguf file or a Hugging Face id.

    Weights load in float32 (bfloat16 for precision "bf16"); no remote code unless asked for.
    An id that is neither on disk nor in the local Hugging Face cache gives one line naming the fix.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_libraries()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    kw: dict = {"trust_remote_code": trust_remote_code}
    source, where = str(path), Path(str(path)).expanduser()
    if source.endswith(".gguf"):
        from entclip.gguf import load_gguf

        model, tokenizer = load_gguf(where, dtype)
        return model, _for_generation(tokenizer), {"path": str(path)}
    if where.exists():
        source = str(where)
        if not (where / "config.json").is_file():
            raise EntclipError(f"{where} is not a model folder (no config.json); give a folder written by "
                               "save_pretrained, a .gguf file or a Hugging Face id", NOT_FOUND)
    elif str(path).startswith(("/", "./", "../", "~")):
        raise EntclipError(f"model folder {path} does not exist; check the path", NOT_FOUND)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kw)
        tokenizer = AutoTokenizer.from_pretrained(source, **kw)
    except ImportError as exc:
        raise EntclipError(f"cannot load model {path!r}: {str(exc).splitlines()[0][:200]}", NOT_FOUND) from None
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        if not where.exists() and ("offline" in first.lower() or "connect" in first.lower()
                                   or "does not appear to have" in first or "couldn't" in first.lower()
                                   or "not a local folder" in first or "huggingface.co" in first):
            raise EntclipError(f"model {path!r} cannot be reached: no network and not in the Hugging Face "
                               "cache; download it where there is network (hf download "
                               f"{path}) or point --set model=PATH at a local folder", NOT_FOUND) from None
        raise EntclipError(f"cannot load model {path!r} ({first}); give a run directory, a checkpoint, "
                           "a model folder or a reachable Hugging Face id", NOT_FOUND) from None
    return model, _for_generation(tokenizer), {"path": str(path)}


def _for_generation(tokenizer):
    """Left padding (generation appends on the right) and a pad token (EOS when it has none)."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
