"""Loading the policy: the built-in tiny model after its cached warm start, or a local folder.

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


def load_folder(path: str):
    """A causal LM and its tokenizer from a local save_pretrained folder (no remote code)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_libraries()
    try:
        model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=False)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EntclipError(f"cannot load model {path!r} ({first}); give a run directory, a checkpoint "
                           "folder or a model folder on this machine (the Hugging Face hub may be "
                           "unreachable offline)", NOT_FOUND) from None
    tokenizer.padding_side = "left"  # generation appends on the right
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer, {"path": str(path)}
