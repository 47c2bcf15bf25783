"""Loading the policy: the built-in tiny model after its cached warm start, or any causal LM.

Loading a model lives here (a GGUF file: gguf.py), so the loop never deals with caches.
A model's own code (transformers' trust_remote_code) runs only when the config asks for it
(`trust_remote_code`, off by default: a user's opt-in for a model they trust); a GGUF file never
runs any. The folders entclip writes (the warm start, export-merged, convert-gguf) hold safetensors.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from pathlib import Path
from typing import Callable

from entclip.contracts.config import Config
from entclip.contracts.errors import EXISTS, NOT_FOUND, EntclipError
from entclip.data.libraries import quiet_libraries

Log = Callable[[str], None]


def cache_root(cfg: Config) -> Path:
    root = cfg.cache_dir or os.environ.get("ENTCLIP_CACHE") or Path.home() / ".cache" / "entclip"
    return Path(root)


def load_policy(cfg: Config, log: Log):
    """The embedded default: the tiny model after its (cached) supervised warm start."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from entclip.data.tasks.tiny import WarmStartSpec, warm_start

    quiet_libraries()
    heads = cfg.tiny_heads
    spec = WarmStartSpec(max_operand=cfg.max_operand, n_test=cfg.n_test, hidden=cfg.tiny_hidden,
                         layers=cfg.tiny_layers, heads=heads, kv_heads=heads // 2 if heads % 2 == 0 else heads,
                         ffn=cfg.tiny_ffn, lr=cfg.warmup_lr, max_steps=cfg.warmup_max_steps,
                         target_acc=cfg.warmup_target_acc, seed=cfg.seed, task_name=cfg.task,
                         countdown_numbers=cfg.countdown_numbers, countdown_max_number=cfg.countdown_max_number,
                         countdown_max_target=cfg.countdown_max_target)
    ws = warm_start(spec, cache_root(cfg) / "warmstart", log=log)
    log(f"warm start: {'cached' if ws.cached else 'trained'} {ws.path} "
        f"(greedy train accuracy {ws.accuracy:.2f} after {ws.steps} steps)")
    model = AutoModelForCausalLM.from_pretrained(ws.path)
    tokenizer = AutoTokenizer.from_pretrained(ws.path)
    return model, tokenizer, {"path": str(ws.path), "accuracy": ws.accuracy, "steps": ws.steps,
                              "seconds": ws.seconds, "cached": ws.cached}


def load_folder(path: str, precision: str = "fp32", trust_remote_code: bool = False):
    """A causal LM and its tokenizer from a local folder, a .gguf file or a Hugging Face id.

    Weights load in float32 (bfloat16 for precision "bf16"). The model's own code runs only with
    trust_remote_code=True (the config's opt-in); a .gguf file ignores it and runs none.
    An id that is neither on disk nor in the local Hugging Face cache gives one line naming the fix.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_libraries()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    kw: dict = {"trust_remote_code": trust_remote_code}
    source, where = str(path), Path(str(path)).expanduser()
    if source.endswith(".gguf"):
        from entclip.data.gguf import load_gguf

        model, tokenizer = load_gguf(where, dtype)
        return model, _for_generation(tokenizer), {"path": str(path)}
    if where.exists():
        source = str(where)
        if is_adapter(where) and not (where / "config.json").is_file():
            raise EntclipError(f"{where} is a LoRA adapter checkpoint, not a whole model; evaluate it with its "
                               "run (entclip evaluate RUN) or merge it first: entclip export-merged "
                               f"{where} OUT_DIR", NOT_FOUND)
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


# ---- LoRA (peft) -------------------------------------------------------------------------
ADAPTER_CONFIG = "adapter_config.json"  # what PeftModel.save_pretrained writes beside the adapter weights


def is_adapter(path: str | Path) -> bool:
    """A folder written by PeftModel.save_pretrained (a LoRA run's checkpoint)."""
    return (Path(str(path)).expanduser() / ADAPTER_CONFIG).is_file()


def require_peft() -> None:
    """peft imports, or one line naming the pip extra that installs it."""
    try:
        import peft  # noqa: F401
    except ImportError:
        raise EntclipError("lora_r > 0 trains LoRA adapters with peft, which is not installed; "
                           "pip install 'entclip[lora]' or set --set lora_r=0") from None


def lora_targets(cfg: Config) -> str | list[str]:
    """peft's target_modules: "all-linear" (every nn.Linear but the output head) or module names."""
    names = [t.strip() for t in cfg.lora_target_modules.split(",") if t.strip()]
    return "all-linear" if names == ["all-linear"] else names


def add_lora(model, cfg: Config):
    """The model wrapped by peft with fresh LoRA adapters (B = 0: the wrapped model computes what the
    base does until the first update); only the adapters require grad. LoRA dropout is 0: the engine
    runs without dropout so that old and new log-probs come from one function."""
    require_peft()
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, bias="none",
                      target_modules=lora_targets(cfg), task_type="CAUSAL_LM")
    try:
        with _quiet_peft():
            return get_peft_model(model, lora)
    except ValueError as exc:  # e.g. no module matches lora_target_modules
        first = str(exc).strip().splitlines()[0][:200]
        raise EntclipError(f"lora_target_modules={cfg.lora_target_modules!r}: {first}; use all-linear or "
                           "names of the model's linear layers, e.g. q_proj,v_proj") from None


def load_adapter(base, path: str | Path, trainable: bool):
    """`base` with the LoRA adapter of checkpoint `path` (adapter_config.json + adapter_model.safetensors)."""
    require_peft()
    from peft import PeftModel

    # The adapter only means something on the base it was trained on: a checkpoint evaluated under
    # another config (another seed's warm start, another model) would load without complaint.
    # Compared by last path component, so a base folder that moved still matches.
    trained_on = json.loads((Path(str(path)).expanduser() / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    loaded = getattr(base, "name_or_path", None) or getattr(base.config, "_name_or_path", None)
    if trained_on and loaded and Path(str(trained_on)).name != Path(str(loaded)).name:
        raise EntclipError(f"the adapter in {path} was trained on {trained_on}, but this config's base model is "
                           f"{loaded}; give the run directory (its config.yaml names the base) or "
                           "--config RUN/config.yaml")
    with _quiet_peft():
        return PeftModel.from_pretrained(base, str(path), is_trainable=trainable)


@contextlib.contextmanager
def _quiet_peft():
    """peft asks transformers 5 a deprecated question (is_gradient_checkpointing); not the user's warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        yield


def export_merged(cfg: Config, ckpt: Path, out_dir: Path, log: Log) -> Path:
    """The run's base model with the LoRA adapter of `ckpt` merged in (merge_and_unload), saved with the
    checkpoint's tokenizer as a plain model folder (safetensors) that from_pretrained loads. `cfg` is the
    run's config (it names the base model). Writes a temporary folder, then renames it into place."""
    import shutil

    from transformers import AutoTokenizer

    out_dir = Path(out_dir)
    if out_dir.exists():
        raise EntclipError(f"{out_dir} already exists; export-merged never overwrites: give a new OUT_DIR", EXISTS)
    if not is_adapter(ckpt):
        raise EntclipError(f"{ckpt} holds no LoRA adapter ({ADAPTER_CONFIG}); a full fine-tuning checkpoint is "
                           "a model folder already: load it as it is", NOT_FOUND)
    require_peft()
    base = (load_policy(cfg, log) if cfg.model == "tiny" else
            load_folder(cfg.model, "bf16" if cfg.precision == "bf16" else "fp32", cfg.trust_remote_code))[0]
    merged = load_adapter(base, ckpt, trainable=False).merge_and_unload()
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(tmp, safe_serialization=True)
    AutoTokenizer.from_pretrained(str(ckpt)).save_pretrained(tmp)
    os.replace(tmp, out_dir)
    return out_dir
