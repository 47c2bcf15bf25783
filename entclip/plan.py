"""Before a Hugging Face run starts: can the model and datasets be reached, and will it fit in memory.

`entclip train --dry-run` prints `reachability` (one line per problem; an unreachable source is reported,
never raised) and `render_memory(memory_estimate(...))`: per-GPU bytes from the model's config alone
(the model is built on the meta device; no weights are read).

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
from dataclasses import dataclass, field
from pathlib import Path

from entclip.errors import BAD_CONFIG, BAD_DATA, NOT_FOUND, EntclipError

PROBE_TIMEOUT_S = 3.0
GIB = 2 ** 30
PRECISIONS = {"fp32": (4, 4), "bf16-mixed": (4, 2), "bf16": (2, 2)}  # -> bytes per weight, per activation
STATS_CHUNK_BYTES = 4 * 2 ** 24 * 4  # theory.token_stats: a few (2**24 // V, V) float32 buffers; 4 counted


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

def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


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
    return EntclipError(f"cannot read the config of model {model!r} ({_first_line(exc)}); a newer transformers "
                        "may know this architecture (pip install -U transformers)", BAD_DATA)


def model_config(cfg):
    """The transformers config of cfg.model (a folder, a .gguf file or a hub id), or one-line EntclipError.

    A hub id is looked up in the local cache first; the network is tried only when the Hub answers.
    """
    from transformers import AutoConfig

    from entclip.models import quiet_libraries

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
            raise EntclipError(f"cannot read the config in {model!r} ({_first_line(exc)}); give a GGUF file "
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
                           f"({_first_line(exc)}); check the id (a gated model needs `hf auth login`) or point "
                           "--set model=PATH at a local folder", NOT_FOUND) from None


def check_dataset(source: str, config: str | None, split: str, *, eval_set: str | None = None) -> None:
    """Raise a one-line EntclipError unless `source` can be read: a local file exists, or a hub id (and its
    config and split) is in the datasets cache or, with network, on the Hub. Downloads no data.

    eval_set: the name of the eval set being checked, so that messages name its keys, not dataset=.
    """
    from entclip.tasks.dataset import is_local_file

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

    from entclip.models import quiet_libraries

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
        raise EntclipError(f"{name}: {_first_line(exc)}; {fix('config', 'NAME')}", BAD_CONFIG) from None
    except Exception as exc:
        raise EntclipError(f"cannot read {name} ({_first_line(exc)}); check the id and its config",
                           BAD_DATA) from None
    splits = list(builder.info.splits or getattr(builder.config, "data_files", None) or {})
    wanted = split.split("[")[0]  # datasets' slicing syntax: train[:100]
    if splits and "+" not in split and wanted not in splits:
        raise EntclipError(f"{name} has no split {wanted!r} (its splits: {', '.join(splits)}); "
                           f"{fix('split', splits[0])}", BAD_CONFIG)


def reachability(cfg) -> list[str]:
    """One line per unreachable model, training dataset or eval set; [] when all can be read."""
    from entclip.tasks.dataset import is_local_file

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
    return problems


# ---- memory ------------------------------------------------------------------------------

@dataclass
class MemoryEstimate:
    """Peak GiB per GPU. rows: the run on one process; sharded_rows: on n_processes, each with its share
    of the batch and weights, gradients and optimizer state sharded (FSDP / ZeRO-3)."""

    params: int
    rows: list[tuple[str, float]]
    total_gib: float
    sharded_total_gib: float
    notes: list[str] = field(default_factory=list)
    n_processes: int = 1
    precision: str = "fp32"
    sharded_rows: list[tuple[str, float]] = field(default_factory=list)


@dataclass(frozen=True)
class _Shape:
    params: int     # all parameters, shared (tied) ones once
    linear: int     # parameters of nn.Linear modules (what autocast casts; a tied lm_head counts)
    layer: int      # parameters of one decoder layer
    h: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    inter: int
    vocab: int


def _shape(cfg, config) -> _Shape:
    """Sizes from the config; parameter counts from the model built on the meta device (no weights)."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.trust_remote_code)
    except ValueError as exc:
        raise EntclipError(f"model {cfg.model!r} is not a causal language model transformers can build "
                           f"({_first_line(exc)})", BAD_CONFIG) from None
    blocks = max((m for m in model.modules() if isinstance(m, torch.nn.ModuleList)), key=len, default=None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    return _Shape(
        params=sum(p.numel() for p in model.parameters()),
        linear=sum(p.numel() for m in model.modules() if isinstance(m, torch.nn.Linear)
                   for p in m.parameters(recurse=False)),
        layer=sum(p.numel() for p in blocks[0].parameters()) if blocks else 0,
        h=text.hidden_size, layers=text.num_hidden_layers, heads=heads,
        kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
        inter=getattr(text, "intermediate_size", None) or 4 * text.hidden_size, vocab=text.vocab_size)


def _items(cfg, m: _Shape, precision: str, n: int) -> tuple[list[tuple[str, float, tuple[str, ...]]], str]:
    """[(label, bytes per GPU, phases)] on n processes (phases () = resident all step), and the batch shapes.

    Labels do not depend on n, so that one table can set the 1-process and n-process columns side by side.
    """
    from entclip.engine import ACCOUNT_LOGITS_MAX

    wb, e = PRECISIONS[precision]
    h, L, V, T = m.h, m.layers, m.vocab, cfg.max_new_tokens
    S = cfg.max_prompt_tokens + T  # tokens per sequence
    B = cfg.batch_size // n  # this process's rollout rows
    mini = B // cfg.minibatches
    b = max(min(cfg.micro_batch_size or mini, mini), 1)
    gen_b = max(min(cfg.generation_batch_size or B, B), 1)

    # Activations kept for backward, bytes per token per decoder layer of a Llama/Qwen2 block (RMSNorm,
    # sdpa attention, SwiGLU MLP), counted with saved-tensor hooks on CPU and matched exactly:
    #   fp32 / bf16: 8h + e(6h + 2w + 4i): each RMSNorm keeps its input in fp32 (4h), its normalized
    #     input and its output (2eh); attention keeps q, k, v and its output (e(2h + 2w)); the MLP keeps
    #     gate, SiLU, up and their product (4ei).
    #   bf16-mixed: 30h + 4w + 8i: the residual stream is fp32, norms keep input and normalized input
    #     (16h), each projection its own bf16 cast of its input (q, k, v, gate, up: 10h), attention
    #     4h + 4w, the MLP 8i.
    # w = heads * head_dim: with a padding mask (left-padded rollouts) sdpa gets K/V repeated to all heads.
    # Cf. Korthikanti et al. 2022, 34sbh per layer for a GPT block (4h MLP, bf16); the wider SwiGLU MLP,
    # fp32 norms and the fp32 residual stream of autocast make it about 2x that here.
    # Gradient checkpointing keeps each layer's input (the residual stream) and recomputes one layer at
    # a time in the backward pass: L*h*resid + one layer.
    w = m.heads * m.head_dim
    if precision == "bf16-mixed":
        per_layer, final_norm, resid = 30 * h + 4 * w + 8 * m.inter, 8 * h, 4
    else:
        per_layer, final_norm, resid = 8 * h + e * (6 * h + 2 * w + 4 * m.inter), 4 * h + 2 * e * h, e
    layers = L * h * resid + per_layer if cfg.gradient_checkpointing else L * per_layer
    activations = b * S * (layers + final_norm)

    # Logits (b, T+1, V) in the compute dtype (completion_logits keeps T+1 positions). The loss keeps
    # float32 copies for backward (measured): token_logp one (none for fp32 logits at T=1), token_entropy
    # three (log-softmax, clamp, exp) when the update differentiates entropy or the accounting's stats
    # pass takes grad H. Backward adds a float32 gradient (and one in the compute dtype); token_stats a chunk.
    grad_entropy = cfg.entropy_coef > 0 or cfg.entropy_target is not None or cfg.entropy_control == "steer"
    copies = max((1 if e < 4 or cfg.temperature != 1.0 else 0) + 3 * grad_entropy, 3 * cfg.entropy_accounting)
    n_logits = b * (T + 1) * V
    logits = n_logits * (e + 4 * copies + 4 + (e if e < 4 else 0)) + STATS_CHUNK_BYTES

    # The engine's stats pass keeps the first micro-batch's graph for the first update. With accounting on
    # one process every micro-batch there has a graph (for grad H): two graphs at once. Otherwise the
    # other micro-batches' forwards are inference, whose logits still take b(T+1)V in the compute dtype.
    if cfg.entropy_accounting and n == 1:
        second = activations + logits
    else:
        second = n_logits * e if B > b else 0

    # KV cache of one generate call: keys and values per token, layer and KV head. Under autocast (fp32
    # weights) keys leave RoPE in fp32 and values stay bf16 (measured): 6 bytes per pair.
    kv_cache = gen_b * S * L * m.kv_heads * m.head_dim * {"fp32": 8, "bf16-mixed": 6, "bf16": 4}[precision]

    wname = "fp32" if wb == 4 else "bf16"
    items = [
        (f"weights ({wname})", m.params * wb / n, ()),
        (f"gradients ({wname})", m.params * wb / n, ()),
        (f"AdamW moments (2 x {wname})", 2 * m.params * wb / n, ()),  # torch AdamW: moments in the param dtype
    ]
    if precision == "bf16-mixed":  # autocast caches a bf16 copy of each matmul weight during the forward
        items.append(("bf16 weight copies (autocast)", 2 * m.linear / n, ()))
    if cfg.kl_coef > 0:  # loaded like the policy; the engine does not prepare (shard) it
        items.append((f"reference model ({wname})", m.params * wb, ()))
    if n > 1:  # FSDP holds the root unit (embeddings, lm_head) and about two layers gathered at once
        items.append(("gathered parameters (root + 2 layers)", (m.params - max(L - 2, 0) * m.layer) * e, ()))
    ckpt = "checkpointed" if cfg.gradient_checkpointing else "not checkpointed"
    items += [
        (f"activations, one micro-batch ({ckpt})", activations, ("training",)),
        ("logits, one micro-batch (+ float32 copies)", logits, ("training",)),
        ("stats pass: the next micro-batch", second, ("training",)),
        ("KV cache, one generate call", kv_cache, ("generation",)),
    ]
    if cfg.entropy_accounting:  # engine: parameter and grad-H snapshots; batch logits only when small
        items.append((f"entropy accounting: parameter + gradient copies ({wname})", 2 * m.params * wb / n,
                      ("training", "accounting")))
        if B * T * V <= ACCOUNT_LOGITS_MAX:
            items += [("entropy accounting: old logits of the batch", B * T * V * e,
                       ("training", "accounting")),
                      ("entropy accounting: new logits (+ parts)", 2 * B * T * V * e, ("accounting",))]
    shapes = f"{B} rollout rows, micro-batch {b} x {S} tokens (logits {b} x {T + 1} x {V}), generate {gen_b}"
    return items, shapes


def _peak(items) -> tuple[float, dict[str, float]]:
    resident = sum(nbytes for _, nbytes, phases in items if not phases)
    phase = {p: sum(nbytes for _, nbytes, phases in items if p in phases)
             for p in ("training", "generation", "accounting")}
    return resident + max(phase.values()), phase


def memory_estimate(cfg, config, n_processes: int = 1) -> MemoryEstimate:
    """Peak per-GPU memory of a run of `cfg` on the model of `config`: on one process, and on n_processes
    each with its share of the batch and FSDP/ZeRO-3-sharded weights, gradients and optimizer state.

    Peak = resident (weights, gradients, AdamW moments, autocast weight copies, reference model) + the
    largest phase: training (one micro-batch's activations and logits, plus what the engine's stats pass
    and entropy accounting hold), generation (KV cache) or the accounting's end-of-step pass.
    """
    precision = resolve_precision(cfg)
    m = _shape(cfg, config)
    (one, shapes), (many, shapes_n) = _items(cfg, m, precision, 1), _items(cfg, m, precision, n_processes)
    total, phases = _peak(one)
    sharded, _ = _peak(many)
    largest = max(phases, key=phases.get)
    notes = [f"per GPU on 1 process: {shapes}"]
    if n_processes > 1:
        notes.append(f"per GPU on {n_processes}: {shapes_n}")
    notes.append("peak = resident + the largest phase (1 process: " + ", ".join(
        f"{p} {v / GIB:.1f}" for p, v in phases.items() if v) + f" GiB; {largest} taken)")
    if cfg.precision == "auto" and precision == "fp32":
        notes.append("precision auto is fp32 on this machine (no bf16 GPU); add --set precision=bf16-mixed "
                     "to estimate a GPU run")
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    limit, S = getattr(text, "max_position_embeddings", None), cfg.max_prompt_tokens + cfg.max_new_tokens
    if limit and S > limit:
        notes.append(f"max_prompt_tokens + max_new_tokens = {S} exceeds the model's max_position_embeddings "
                     f"{limit}")
    if any(getattr(text, k, None) for k in ("num_experts", "num_local_experts", "n_routed_experts")):
        notes.append("mixture-of-experts model: the activation formula assumes a dense MLP; a rough figure")
    gib = lambda items: [(label, nbytes / GIB) for label, nbytes, _ in items if nbytes]  # noqa: E731
    return MemoryEstimate(m.params, gib(one), total / GIB, sharded / GIB, notes, n_processes, precision,
                          gib(many))


def render_memory(est: MemoryEstimate) -> list[str]:
    """Plain lines for the console: GiB per GPU on one process and, for several, on n_processes sharded."""
    n = est.n_processes
    columns = [dict(est.rows)] + ([dict(est.sharded_rows)] if n > 1 else [])
    labels = list(dict.fromkeys([label for label, _ in est.rows + (est.sharded_rows if n > 1 else [])]))
    width = max(len(label) for label in labels + ["peak"]) + 2
    heads = ["1 GPU"] + ([f"{n} GPUs, sharded"] if n > 1 else [])
    size = f"{est.params / 1e9:.2f} B" if est.params >= 1e9 else f"{est.params / 1e6:.1f} M"
    lines = [f"{size} parameters, {est.precision}",
             " " * (width + 2) + "".join(f"{h:>18}" for h in heads)]
    for label in labels:
        lines.append(f"  {label:<{width}}" + "".join(f"{c[label]:>18.1f}" if label in c else f"{'-':>18}"
                                                     for c in columns))
    totals = [est.total_gib] + ([est.sharded_total_gib] if n > 1 else [])
    lines.append(f"  {'peak':<{width}}" + "".join(f"{t:>18.1f}" for t in totals))
    return lines + [f"  note: {note}" for note in est.notes]
