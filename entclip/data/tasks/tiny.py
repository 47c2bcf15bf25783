"""The embedded tiny setup: a character tokenizer, a ~1M-parameter Qwen2 and a cached warm start.

GRPO needs a start that is useful but imperfect: a random model never earns a reward (no signal), a
converged one answers every sample of a group alike (no signal either). `warm_start` trains the tiny
model with plain supervised learning on the task's train split until its greedy accuracy first
reaches `target_acc`, then stores it as an ordinary Hugging Face folder under `cache_root/<key>`, so
the rest of entclip loads it like any other model. The test split is never touched here.

transformers is imported inside functions: importing this module must stay cheap (CLI start-up).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from entclip.contracts.errors import EntclipError
from entclip.data.tasks import countdown
from entclip.data.tasks.arithmetic import ArithmeticTask, Problem, verify

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast, Qwen2ForCausalLM

SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")  # ids 0..3, in this order
CHARS = "0123456789+="
# Part of every cache key: bump it whenever the tokenizer, the model defaults or the training
# procedure change, so that old cache entries are no longer found.
FORMAT_VERSION = 1
MARKER = "warmstart.json"  # written last inside the temporary folder: its presence means complete


def build_char_tokenizer(chars: str = CHARS) -> PreTrainedTokenizerFast:
    """A character-level tokenizer over `chars` with <pad>=0, <bos>=1, <eos>=2, <unk>=3.

    Encoding prepends <bos> (no <eos>); padding is on the left, as batched generation needs; the
    outputs are only input_ids and attention_mask. Special tokens written in the text ("46<eos>")
    are recognised. Any other character (a space, a letter) becomes <unk>.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + tuple(chars))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")  # one char per token
    core.decoder = decoders.Fuse()  # join characters back without spaces
    bos = vocab["<bos>"]
    core.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", bos)]
    )
    core.add_special_tokens(list(SPECIALS))
    # padding_side must be a constructor argument: set afterwards, save_pretrained drops it.
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        padding_side="left",
        model_input_names=["input_ids", "attention_mask"],  # no token_type_ids: Qwen2 rejects them
    )


def build_tiny_model(
    tokenizer,
    hidden: int = 128,
    layers: int = 4,
    heads: int = 4,
    kv_heads: int = 2,
    ffn: int = 512,
    max_positions: int = 64,
    seed: int = 0,
) -> Qwen2ForCausalLM:
    """A randomly initialised Qwen2ForCausalLM sized for the tokenizer (~1.0M params at defaults).

    Initialisation uses torch.manual_seed(seed) inside a forked RNG, so the same arguments give the
    same weights and the caller's global RNG state is left as it was.
    """
    from transformers import Qwen2Config, Qwen2ForCausalLM

    _check_heads(hidden, heads, kv_heads)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    return model


def _check_heads(hidden: int, heads: int, kv_heads: int) -> None:
    if min(hidden, heads, kv_heads) < 1 or hidden % heads or heads % kv_heads:
        raise EntclipError(
            f"hidden={hidden}, heads={heads}, kv_heads={kv_heads}: hidden must be a multiple of "
            f"heads and heads a multiple of kv_heads; e.g. hidden=128, heads=4, kv_heads=2"
        )


@dataclass(frozen=True)
class WarmStartSpec:
    """Everything that determines a warm-started tiny model; equal specs give equal weights.

    Bitwise equality holds for one machine, torch version and intra-op thread count (float sums
    may be ordered differently across thread counts). The cache key covers every field.
    """

    # task
    max_operand: int = 99  # operands 0..max_operand
    n_test: int = 500  # held-out problems (never seen here)
    split_seed: int = 1234  # seed of the train/test split
    # model
    hidden: int = 128  # hidden size
    layers: int = 4  # transformer blocks
    heads: int = 4  # attention heads
    kv_heads: int = 2  # key/value heads (grouped-query attention)
    ffn: int = 512  # MLP inner size
    # training
    # Measured on one AMD EPYC (avx512f), seeds 0-4, batch 64, warm-up 100, clip 1.0: lr 3e-3 reached
    # target_acc 0.5 in 350/430/670/570/330 steps; lr 1e-3 in 580-850 (seed 0: 850); lr 2e-3 in 590
    # (seed 0); lr 4e-3 in 950 and > 1500 (seeds 0, 1); batch 32 at lr 2e-3 stalled on seed 0. Samples to
    # the target, not steps, were what larger batches kept constant (batch 256, lr 3e-3: 200 steps).
    # max_steps bounds the time of a slow seed: GRPO starts from wherever the budget ends. A budget of 450
    # stopped seeds 2 and 3 on the plateau before the jump (0.11 / 0.09) and GRPO then gained 0.00 / +0.09.
    # The plateau's length depends on the CPU: on an Intel Xeon (avx512f) seeds 0-4 reached 0.5 after
    # 1120/760/>1500/640/340 steps (a 600-step budget left four seeds on it, at 0.06-0.34), so 1500.
    lr: float = 3e-3  # AdamW learning rate (other AdamW settings are torch's defaults)
    warmup_steps: int = 100  # linear learning-rate warm-up from lr / warmup_steps (1 = none)
    grad_clip: float = 1.0  # max global gradient norm
    batch_size: int = 64  # sequences per step
    max_steps: int = 1500  # stop here if target_acc is not reached (about 0.075 s a step on 2 cores)
    target_acc: float = 0.5  # stop at the first evaluation with greedy train accuracy >= this
    eval_every: int = 10  # steps between greedy evaluations (~0.1 s each; stops nearer target)
    eval_n: int = 256  # train problems per evaluation (a fixed sample)
    seed: int = 0  # model init, batch order and evaluation sample
    # Fields added after the arithmetic cache format was fixed (see ADDED). They enter key() only when
    # they differ from their defaults, so every arithmetic key (and cache entry) stays what it was;
    # never change these defaults, or old keys would name other models.
    task_name: str = "arithmetic"  # which built-in task: arithmetic or countdown
    countdown_numbers: int = 3  # countdown: numbers per problem
    countdown_max_number: int = 9  # countdown: numbers from 1..this
    countdown_max_target: int = 100  # countdown: targets in 1..this

    def __post_init__(self) -> None:
        for name in ("batch_size", "max_steps", "eval_every", "eval_n", "warmup_steps"):
            if getattr(self, name) < 1:
                raise EntclipError(f"warm start {name}={getattr(self, name)}: must be at least 1")
        for name, example in (("lr", "1e-3"), ("grad_clip", "1.0")):
            if not getattr(self, name) > 0:
                value = getattr(self, name)
                raise EntclipError(f"warm start {name}={value}: must be > 0; e.g. {example}")
        if not 0 < self.target_acc <= 1:
            value = self.target_acc
            raise EntclipError(f"warm start target_acc={value}: must be in (0, 1]; e.g. 0.5")
        _check_heads(self.hidden, self.heads, self.kv_heads)
        _ = self.task  # validates the task fields too

    @property
    def task(self) -> ArithmeticTask | countdown.CountdownTask:
        if self.task_name == "countdown":
            return countdown.CountdownTask(self.countdown_numbers, self.countdown_max_number,
                                           self.countdown_max_target, self.n_test, self.split_seed)
        if self.task_name != "arithmetic":
            raise EntclipError(f"task={self.task_name!r}: choose arithmetic or countdown")
        return ArithmeticTask(self.max_operand, self.n_test, self.split_seed)

    @property
    def chars(self) -> str:
        """The tokenizer's characters: arithmetic's, plus countdown's operators and separators."""
        return CHARS + countdown.CHARS if self.task_name == "countdown" else CHARS

    def key(self) -> str:
        """16 hex digits of sha256 over the fields and FORMAT_VERSION; stable across processes.

        Fields in ADDED count only when they differ from their defaults (the arithmetic keys of
        FORMAT_VERSION 1 are unchanged); every other field always counts.
        """
        fields = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in ADDED and value == f.default:
                continue
            fields[f.name] = float(value) if f.type == "float" else value  # lr=1 and lr=1.0 agree
        blob = json.dumps({"format": FORMAT_VERSION, **fields}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


# WarmStartSpec fields added after FORMAT_VERSION 1's arithmetic caches were written.
ADDED = ("task_name", "countdown_numbers", "countdown_max_number", "countdown_max_target")


@dataclass(frozen=True)
class WarmStartResult:
    """Where the warm-started model lies and how it got there (read back from warmstart.json)."""

    path: Path  # save_pretrained folder: model, config, generation config, tokenizer, MARKER
    accuracy: float  # greedy accuracy on the spec's evaluation sample of the train split
    steps: int  # optimizer steps taken
    seconds: float  # wall time of the training loop when it was built
    cached: bool  # True when this call found the folder instead of training


def warm_start(
    spec: WarmStartSpec, cache_root: Path, log: Callable[[str], None] = lambda s: None
) -> WarmStartResult:
    """Return the warm-started model for `spec`, training and caching it on first use.

    If `cache_root/<key>/warmstart.json` exists, nothing is loaded or trained (cached=True).
    Otherwise the model is trained, saved into a temporary sibling folder and renamed into place,
    so an interrupted call never leaves a folder that looks complete; a temporary folder it leaves
    behind (a hidden `.<key>.tmp-*`) is ignored and may be deleted by hand.
    """
    final = Path(cache_root) / spec.key()
    if (final / MARKER).exists():
        return _read_result(final, spec, log)
    if final.exists():
        raise EntclipError(
            f"{final} exists but has no {MARKER} (damaged, or not entclip's); delete it and rerun"
        )

    tokenizer = build_char_tokenizer(spec.chars)
    model = build_tiny_model(
        tokenizer, spec.hidden, spec.layers, spec.heads, spec.kv_heads, spec.ffn, seed=spec.seed
    )
    start = time.perf_counter()
    steps, accuracy, history = _train(model, tokenizer, spec, log)
    seconds = time.perf_counter() - start

    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache entry should read like any folder
        _save_quietly(model, tokenizer, tmp)
        record = {
            "format": FORMAT_VERSION,
            "key": final.name,
            "spec": dataclasses.asdict(spec),
            "accuracy": accuracy,
            "steps": steps,
            "seconds": seconds,
            "reached_target": accuracy >= spec.target_acc,
            "history": history,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
        }
        (tmp / MARKER).write_text(json.dumps(record, indent=2) + "\n")
        try:
            os.replace(tmp, final)  # atomic; fails if another process has put a folder there first
        except OSError:
            if not (final / MARKER).exists():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
            return _read_result(final, spec, log)  # the other process won: use its copy
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"warm start saved to {final}")
    return WarmStartResult(final, accuracy, steps, seconds, cached=False)


def _save_quietly(model, tokenizer, folder: Path) -> None:
    """save_pretrained without transformers' progress bar: library code reports through `log`."""
    from transformers.utils import logging as hf_logging

    bar_was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)
    finally:
        if bar_was_on:
            hf_logging.enable_progress_bar()


def _read_result(folder: Path, spec: WarmStartSpec, log: Callable[[str], None]) -> WarmStartResult:
    record = json.loads((folder / MARKER).read_text())
    # Records written before the ADDED fields existed lack them: they held the defaults.
    defaults = {f.name: f.default for f in dataclasses.fields(spec) if f.name in ADDED}
    if {**defaults, **record.get("spec", {})} != dataclasses.asdict(spec):
        raise EntclipError(f"{folder / MARKER} holds another spec; delete {folder} and rerun")
    log(f"warm start: cached {folder} (greedy accuracy {record['accuracy']:.3f})")
    return WarmStartResult(
        folder, record["accuracy"], record["steps"], record["seconds"], cached=True
    )


def _encode_train(problems: list[Problem], tokenizer) -> tuple[torch.Tensor, ...]:
    """Right-padded `<bos>prompt answer<eos>` ids, attention mask and target mask.

    Returns ids (N, L), attention (N, L) and targets (N, L-1): targets[i, t] says whether token t+1
    is an answer character or <eos>, i.e. whether it is predicted and scored. Right padding keeps
    <bos> at position 0, which is where generation (left padding, positions from the mask) puts it.
    """
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    chars = [tokenizer.convert_tokens_to_ids(list(p.prompt + p.answer)) for p in problems]
    rows = [[bos, *c, eos] for c in chars]
    n_prompt = [1 + len(p.prompt) for p in problems]  # <bos> and the prompt characters
    length = max(map(len, rows))
    input_ids = torch.full((len(rows), length), tokenizer.pad_token_id)  # (N, L)
    attention = torch.zeros((len(rows), length), dtype=torch.long)  # (N, L)
    targets = torch.zeros((len(rows), length - 1), dtype=torch.bool)  # (N, L-1)
    for i, (row, k) in enumerate(zip(rows, n_prompt)):
        input_ids[i, : len(row)] = torch.tensor(row)
        attention[i, : len(row)] = 1
        targets[i, k - 1 : len(row) - 1] = True
    return input_ids, attention, targets


def greedy_accuracy(
    model,
    tokenizer,
    problems: list[Problem],
    max_new_tokens: int,
    batch_size: int = 256,
    check: Callable[[str, Problem], bool] | None = None,
) -> float:
    """Share of problems whose greedy completion (KV-cached generate) passes `check`.

    `check(completion, problem)` defaults to exact match with the problem's answer.
    """
    check = check or (lambda text, p: verify(text, p.answer))
    was_training = model.training
    model.eval()
    right = 0
    with torch.no_grad():
        for i in range(0, len(problems), batch_size):
            chunk = problems[i : i + batch_size]
            enc = tokenizer([p.prompt for p in chunk], padding=True, return_tensors="pt")
            out = model.generate(
                **enc,
                do_sample=False,
                max_new_tokens=max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            new = out[:, enc["input_ids"].shape[1] :]  # (B, <= max_new_tokens), <pad> after <eos>
            texts = tokenizer.batch_decode(new, skip_special_tokens=True)
            right += sum(check(t, p) for t, p in zip(texts, chunk))
    model.train(was_training)
    return right / len(problems)


def _train(model, tokenizer, spec: WarmStartSpec, log: Callable[[str], None]):
    """Supervised steps until greedy accuracy >= target_acc, or max_steps.

    Returns (steps, accuracy, history): the last evaluation is of the final weights.
    """
    task = spec.task
    # Every answer of every train problem is one row; a step trains on one row per problem, drawn
    # anew each time (countdown: a random valid solution, so the policy spreads over them).
    # Arithmetic has one answer per problem: rows are the problems and no draw is made.
    answers = [task.solutions(p) if hasattr(task, "solutions") else (p.answer,) for p in task.train]
    first = torch.tensor([0, *itertools.accumulate(map(len, answers))][:-1])  # (P,) first row of each
    count = torch.tensor([len(a) for a in answers])  # (P,)
    rows = [Problem(p.prompt, a) for p, sols in zip(task.train, answers) for a in sols]
    input_ids, attention, targets = _encode_train(rows, tokenizer)
    pick = torch.Generator().manual_seed(spec.seed + 1) if int(count.max()) > 1 else None
    check = getattr(task, "check", None)
    # A fixed evaluation sample of the train split, so successive evaluations are comparable.
    eval_problems = random.Random(spec.seed).sample(task.train, min(spec.eval_n, len(task.train)))
    max_new = task.max_answer_chars + 1  # the answer and its <eos>
    gen = torch.Generator().manual_seed(spec.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: min(1.0, (i + 1) / spec.warmup_steps)  # linear warm-up, then flat
    )
    model.train()
    order, pos = torch.randperm(len(task.train), generator=gen), 0
    history: list[dict] = []
    accuracy, start = 0.0, time.perf_counter()
    for step in range(1, spec.max_steps + 1):
        if pos + spec.batch_size > len(order):  # a new epoch: a fresh permutation, no partial batch
            order, pos = torch.randperm(len(task.train), generator=gen), 0
        idx = order[pos : pos + spec.batch_size]
        pos += spec.batch_size
        if pick is not None:  # one of each problem's answers, uniformly
            choice = (torch.rand(len(idx), generator=pick) * count[idx]).long()  # (B,)
            idx = first[idx] + torch.minimum(choice, count[idx] - 1)
        length = int(attention[idx].sum(1).max())  # trim the batch to its longest row
        x, m, t = input_ids[idx, :length], attention[idx, :length], targets[idx, : length - 1]
        logits = model(input_ids=x, attention_mask=m).logits[:, :-1]  # (B, L-1, V)
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none")
        loss = (nll * t).sum() / t.sum()  # mean over answer tokens and <eos> only
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), spec.grad_clip)
        optimizer.step()
        schedule.step()
        if step % spec.eval_every == 0 or step == spec.max_steps:
            accuracy = greedy_accuracy(model, tokenizer, eval_problems, max_new, check=check)
            history.append({"step": step, "loss": loss.item(), "accuracy": accuracy})
            log(
                f"warm start step {step}/{spec.max_steps}: loss {loss.item():.3f}, "
                f"greedy train accuracy {accuracy:.3f} ({time.perf_counter() - start:.1f}s)"
            )
            if accuracy >= spec.target_acc:
                break
    model.eval()
    return step, accuracy, history
