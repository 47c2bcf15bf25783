"""Before a Hugging Face run starts: can the model and datasets be reached, and in which precision.

`entclip train --dry-run` prints `reachability(cfg)`: one line per unreachable model, training
dataset or eval set (an unreachable source is reported, never raised); `model_config` and
`check_dataset` raise one-line EntclipErrors that name the fix. `resolve_precision` turns
precision=auto into what the engine will use. The memory estimate the dry run prints is memory.py.

Offline behaviour, measured (transformers 5.24, datasets 5.2, huggingface_hub 2.4): with HF_HUB_OFFLINE=1
a lookup that misses the cache fails in milliseconds; without it and without network each lookup retries
five times with back-off and fails after about 23 s. So every lookup here tries the local caches first
and goes to the network only when the Hub answers an HTTPS probe within PROBE_TIMEOUT_S.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

from entclip.contracts.errors import BAD_CONFIG, BAD_DATA, NOT_FOUND, EntclipError, first_line

PROBE_TIMEOUT_S = 3.0


def resolve_precision(cfg) -> str:
    """cfg.precision, with auto = bf16-mixed for a Hugging Face model on a CUDA GPU with native bf16
    (Ampere or later), else fp32 (the built-in tiny model, CPU runs).

    Pre-Ampere GPUs only emulate bf16 (slowly), so they count as without it.
    """
    if cfg.precision != "auto":
        return cfg.precision
    if cfg.model == "tiny" or cfg.device == "cpu":
        return "fp32"
    import torch

    native = torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    return "bf16-mixed" if native else "fp32"


# ---- reachability ------------------------------------------------------------------------


def _tilde(path: str | os.PathLike) -> str:
    home = os.path.expanduser("~")
    return "~" + str(path)[len(home):] if str(path).startswith(home + os.sep) else str(path)


def _looks_like_path(source: str) -> bool:
    """A hub id is NAME or ORG/NAME; anything else that is not an existing path is a missing one."""
    return source.startswith(("/", ".", "~")) or source.count("/") > 1 or "\\" in source


def _offline_mode() -> bool:
    from huggingface_hub import constants

    flags = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
    return constants.HF_HUB_OFFLINE or any(os.environ.get(k, "").upper() in ("1", "ON", "YES", "TRUE")
                                           for k in flags)


@functools.lru_cache(maxsize=1)
def _hub_online() -> bool:
    """Whether the Hub answers an HTTPS HEAD request (any status) within PROBE_TIMEOUT_S, through the
    environment's proxies as the libraries would. A TCP connect is not enough: some networks accept
    every connection and fail at TLS. A daemon thread bounds a hanging DNS lookup too.
    """
    if _offline_mode():
        return False
    from huggingface_hub import constants

    answered = []

    def probe() -> None:
        try:
            urllib.request.urlopen(urllib.request.Request(constants.ENDPOINT, method="HEAD"),
                                   timeout=PROBE_TIMEOUT_S).close()
            answered.append(True)
        except urllib.error.HTTPError:
            answered.append(True)  # an error status is still an answer
        except (OSError, ValueError):
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(PROBE_TIMEOUT_S)
    return bool(answered)


@contextlib.contextmanager
def _cache_only():
    """Lookups without any network: huggingface_hub and datasets read HF_HUB_OFFLINE once, at import, so
    flip their copies. (Even a local_files_only lookup otherwise fetches huggingface_hub's agent registry.)
    """
    from huggingface_hub import constants

    modules = [constants] + [m for m in [sys.modules.get("datasets.config")] if m is not None]
    saved = [m.HF_HUB_OFFLINE for m in modules]
    for module in modules:
        module.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        for module, value in zip(modules, saved):
            module.HF_HUB_OFFLINE = value


def offline_if_unreachable() -> bool:
    """When the Hub does not answer, switch the libraries to their caches for the rest of the process
    (they would otherwise retry each lookup for ~20 s). Returns whether the Hub is reachable."""
    if _hub_online():
        return True
    from huggingface_hub import constants

    os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"
    for module in [constants] + [m for m in [sys.modules.get("datasets.config")] if m is not None]:
        module.HF_HUB_OFFLINE = True
    return False


def _config_error(model: str, exc: Exception) -> EntclipError:
    if "trust_remote_code" in str(exc):
        return EntclipError(f"model {model!r} runs its own code; if you trust it, add "
                            "--set trust_remote_code=true", BAD_CONFIG)
    return EntclipError(f"cannot read the config of model {model!r} ({first_line(exc)}); a newer transformers "
                        "may know this architecture (pip install -U transformers)", BAD_DATA)


def model_config(cfg):
    """The transformers config of cfg.model (a folder, a .gguf file or a hub id), or one-line EntclipError.

    A hub id is looked up in the local cache first; the network is tried only when the Hub answers.
    """
    from transformers import AutoConfig

    from entclip.data.libraries import quiet_libraries

    quiet_libraries()
    model, path = cfg.model, Path(cfg.model).expanduser()
    if model.lower().endswith(".gguf"):
        if not path.is_file():
            raise EntclipError(f"model file {model!r} not found; check the path of the .gguf file, or point "
                               "--set model=PATH at a model folder", NOT_FOUND)
        if importlib.util.find_spec("gguf") is None:
            raise EntclipError(f"model {model!r} is a GGUF file; reading it needs the gguf package: "
                               "pip install gguf", BAD_CONFIG)
        try:
            with _cache_only():
                return AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
        except Exception as exc:  # the GGUF reader raises ValueError, KeyError, struct.error, ...
            raise EntclipError(f"cannot read the config in {model!r} ({first_line(exc)}); give a GGUF file "
                               "of an architecture transformers supports, or a model folder",
                               BAD_DATA) from None
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise EntclipError(f"model folder {model!r} has no config.json; point --set model=PATH at a folder "
                               "written by save_pretrained, or at a .gguf file", NOT_FOUND)
        try:
            with _cache_only():
                return AutoConfig.from_pretrained(str(path), trust_remote_code=cfg.trust_remote_code)
        except (OSError, ValueError) as exc:
            raise _config_error(model, exc) from None
    if path.exists() or _looks_like_path(model):
        what = "is a file, not a model folder" if path.exists() else "does not exist"
        raise EntclipError(f"model path {model!r} {what}; point --set model=PATH at a model folder or a .gguf "
                           "file, or give a Hugging Face id such as Qwen/Qwen2.5-Math-1.5B", NOT_FOUND)
    try:
        with _cache_only():
            return AutoConfig.from_pretrained(model, trust_remote_code=cfg.trust_remote_code,
                                              local_files_only=True)
    except ValueError as exc:
        raise _config_error(model, exc) from None
    except OSError:
        pass  # not in the cache
    if not _hub_online():
        from huggingface_hub import constants

        raise EntclipError(
            f"model {model!r} cannot be reached: no network and not in the Hugging Face cache "
            f"({_tilde(constants.HF_HUB_CACHE)}); download it where there is network (`hf download {model}`) "
            "and copy the cache, or point --set model=PATH at a local folder", NOT_FOUND)
    try:
        return AutoConfig.from_pretrained(model, trust_remote_code=cfg.trust_remote_code)
    except ValueError as exc:
        raise _config_error(model, exc) from None
    except OSError as exc:
        raise EntclipError(f"model {model!r} is not on the Hugging Face hub or cannot be read "
                           f"({first_line(exc)}); check the id (a gated model needs `hf auth login`) or point "
                           "--set model=PATH at a local folder", NOT_FOUND) from None


def check_dataset(source: str, config: str | None, split: str, *, eval_set: str | None = None) -> None:
    """Raise a one-line EntclipError unless `source` can be read: a local file exists, or a hub id (and its
    config and split) is in the datasets cache or, with network, on the Hub. Downloads no data.

    eval_set: the name of the eval set being checked, so that messages name its keys, not dataset=.
    """
    from entclip.data.tasks.dataset import is_local_file

    if eval_set is None:
        name = f"dataset {source!r}"
        fix = lambda key, value: f"--set dataset{'' if key == 'source' else '_' + key}={value}"  # noqa: E731
    else:
        name = f"eval set {eval_set!r} ({source})"
        fix = lambda key, value: f"set {key}: {value} in eval set {eval_set!r}"  # noqa: E731
    path = Path(source).expanduser()
    if is_local_file(source) or path.exists() or _looks_like_path(source):
        if not path.exists():
            raise EntclipError(f"{name}: file not found; check the path, or {fix('source', 'FILE')} with a "
                               "local .jsonl/.parquet file", NOT_FOUND)
        if is_local_file(source) and split != "train":
            raise EntclipError(f"{name} is a local file: its only split is 'train', not {split!r}; "
                               f"{fix('split', 'train')}", BAD_CONFIG)
        return
    import datasets

    from entclip.data.libraries import quiet_libraries

    quiet_libraries()
    online = _hub_online()
    try:
        with contextlib.nullcontext() if online else _cache_only():
            builder = datasets.load_dataset_builder(source, config)
    except ConnectionError:  # datasets' report of "offline and not cached" (also when the Hub drops out)
        raise EntclipError(
            f"{name} cannot be reached: no network and not in the datasets cache "
            f"({_tilde(datasets.config.HF_DATASETS_CACHE)}); load it once where there is network "
            f"(datasets.load_dataset({source!r})) and copy that cache, or {fix('source', 'FILE')} with a local "
            ".jsonl/.parquet file", NOT_FOUND) from None
    except datasets.exceptions.DatasetNotFoundError:
        raise EntclipError(f"{name} is not on the Hugging Face hub; check the id (a gated dataset needs "
                           f"`hf auth login`) or {fix('source', 'FILE')} with a local .jsonl/.parquet file",
                           NOT_FOUND) from None
    except ValueError as exc:  # unknown or ambiguous configuration, in the cache or on the Hub
        raise EntclipError(f"{name}: {first_line(exc)}; {fix('config', 'NAME')}", BAD_CONFIG) from None
    except Exception as exc:
        raise EntclipError(f"cannot read {name} ({first_line(exc)}); check the id and its config",
                           BAD_DATA) from None
    splits = list(builder.info.splits or getattr(builder.config, "data_files", None) or {})
    wanted = split.split("[")[0]  # datasets' slicing syntax: train[:100]
    if splits and "+" not in split and wanted not in splits:
        raise EntclipError(f"{name} has no split {wanted!r} (its splits: {', '.join(splits)}); "
                           f"{fix('split', splits[0])}", BAD_CONFIG)


def reachability(cfg) -> list[str]:
    """One line per unreachable model, training dataset or eval set; [] when all can be read."""
    from entclip.data.tasks.dataset import is_local_file

    problems: list[str] = []

    def attempt(check, *args, **kwargs) -> None:
        try:
            check(*args, **kwargs)
        except EntclipError as exc:
            if str(exc) not in problems:
                problems.append(str(exc))

    if cfg.model != "tiny":
        attempt(model_config, cfg)
    if cfg.dataset:
        attempt(check_dataset, cfg.dataset, cfg.dataset_config, cfg.dataset_split)
    for spec in cfg.eval_sets:  # defaults as in tasks.dataset.load_dataset_task
        source = spec.get("source") or cfg.dataset
        if not source:
            problems.append(f"eval set {spec['name']!r} has no source and there is no training dataset; "
                            "give the set a source")
            continue
        split = spec.get("split") or ("train" if is_local_file(source) else "test")
        config = spec.get("config") or (cfg.dataset_config if source == cfg.dataset else None)
        attempt(check_dataset, source, config, split, eval_set=spec["name"])
    last = max((i for i, p in enumerate(problems) if p.startswith("eval set ")), default=None)
    if last is not None:  # the one fix for them all
        problems[last] += "; or train without these evaluation sets: --set eval_sets=[]"
    return problems
