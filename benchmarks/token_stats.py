"""token_stats vs one log_softmax + gather, at a Qwen-sized vocabulary (V = 151,936).

    .venv/bin/python benchmarks/token_stats.py            # 2048 and 8192 rows, fp32 and bf16
    .venv/bin/python benchmarks/token_stats.py --quick    # 256 rows: a smoke run of a few seconds
    .venv/bin/python benchmarks/token_stats.py --rows 2048 --chunks default,16,8,4,2,1 --profile
    .venv/bin/python benchmarks/token_stats.py --rows 2048 --training   # token_logp/entropy, pred_dz

Why this comparison: every GRPO step needs log p_k of the sampled tokens; the cheapest way to get it
is `torch.log_softmax(logits.float(), -1).gather(...)`. entclip also needs H, S* and E_p[S] from the
same logits (the filters and the accounting), and promises all four in one chunked pass.
Targets (issue 7): time <= 1.5x the log_softmax baseline; peak extra memory within one chunk of
float32 full-vocabulary values (token_stats' chunk budget, all its buffers together).

Two baselines. `log_softmax` is the literal one: it allocates a fresh (N, V) float32 output (and,
for bf16 logits, a float32 copy first), gigabytes here, and the kernel's page-fault and zeroing
cost for them varies a lot from run to run on this shared VM. `log_softmax out=` writes into an
output allocated once beforehand: the same arithmetic without that allocation, a steadier
compute-only reference. The target ratio is against the first; both are printed.

`--training` adds the two other full-vocabulary paths, each against the formula entclip used
before (written out below as `plain`): the loss's `token_logp` + `token_entropy`, forward and
backward (autograd), and the accounting's pred_dz (`entropy_delta_between` of old and new logits).

Timing: all variants in this process, repetitions interleaved, medians and their ratios.
Memory: each variant once in a fresh subprocess that builds the inputs (and the out= buffer),
records the resident set size (RSS), resets the kernel's peak-RSS counter (/proc/self/clear_refs)
and reads the peak after the call: peak - RSS before = the most extra memory the call held at once.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _common import interleave, machine, median, set_threads, spread, table  # noqa: E402

from entclip.core import theory  # noqa: E402

V_QWEN = 151_936
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
NAIVE, OUT = "log_softmax", "log_softmax out="
TRAIN = ["logp+entropy fwd+bwd: plain", "logp+entropy fwd+bwd: entclip", "pred_dz: plain", "pred_dz: entclip"]


def make_logits(rows: int, vocab: int, dtype: torch.dtype, seed: int = 0):
    """(rows, V) random logits and (rows,) tokens; filled a slice at a time, never a float32 copy."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.empty(rows, vocab, dtype=dtype)
    step = 64
    for s in range(0, rows, step):
        # std 3: a peaked, LLM-like distribution rather than a near-uniform one (timing barely cares).
        logits[s:s + step] = torch.randn(min(step, rows - s), vocab, generator=gen) * 3.0
    tokens = torch.randint(0, vocab, (rows,), generator=gen)
    return logits, tokens


def plain_logp_entropy(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """The previous token_logp + token_entropy (T = 1): full-size float32 tensors, autograd's own."""
    z = logits.float()
    logp = z.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(z, dim=-1)
    lsm = torch.log_softmax(z, dim=-1).clamp(min=torch.finfo(torch.float32).min)
    return logp - (lsm.exp() * lsm).sum(-1)


def plain_pred_dz(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """The previous StepAccount.finish: entropy_delta_from_logit_change(old, new - old) unchunked."""
    dz = new - old
    logp = torch.log_softmax(old.float(), dim=-1)
    p = logp.exp()
    s = p * (-(p * logp).sum(-1, keepdim=True) + logp)
    return -(s * dz.float()).sum(-1)


def make_variant(name: str, logits: torch.Tensor, tokens: torch.Tensor):
    """A no-argument callable for variant `name` (NAIVE, OUT, "chunk=N" or one of TRAIN)."""
    idx = tokens.unsqueeze(-1)
    if name == NAIVE:
        return lambda: torch.log_softmax(logits.float(), dim=-1).gather(-1, idx)
    if name == OUT:
        buf = torch.zeros(logits.shape, dtype=torch.float32)  # zeros: its pages are resident already
        return lambda: torch.log_softmax(logits, dim=-1, dtype=torch.float32, out=buf).gather(-1, idx)
    if name.startswith("chunk="):
        chunk = int(name.split("=")[1])
        return lambda: theory.token_stats(logits, tokens, chunk_size=chunk)
    if name.startswith("logp+entropy"):
        leaf = logits.detach().requires_grad_(True)
        fn = plain_logp_entropy if name.endswith("plain") else (
            lambda z, k: theory.token_logp(z, k) + theory.token_entropy(z))

        def fwd_bwd():
            leaf.grad = None
            fn(leaf, tokens).sum().backward()
        return fwd_bwd
    # pred_dz: the "new" logits are the old ones nudged (in the logits' dtype, as after a step).
    new = logits + torch.full_like(logits, 0.01)
    fn = plain_pred_dz if name.endswith("plain") else theory.entropy_delta_between
    return lambda: fn(logits, new)


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(next(line.split()[1] for line in f if line.startswith(field + ":")))


def child_memory(args) -> None:
    """In a fresh process: extra peak RSS of one call of one variant; prints one JSON line."""
    torch.set_num_threads(args.threads)
    logits, tokens = make_logits(args.rows, args.vocab, DTYPES[args.dtypes])
    make_variant(args.child_mem, logits[:2], tokens[:2])()  # load kernels, thread pools first
    fn = make_variant(args.child_mem, logits, tokens)
    rss0 = _status_kb("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM (peak RSS) to the current RSS
        exact = True
    except OSError:
        exact = False  # VmHWM then also covers building the logits: an upper bound
    fn()
    print(json.dumps({"extra_bytes": (_status_kb("VmHWM") - rss0) * 1024, "exact": exact}))


def memory(variant: str, rows: int, dtype: str, args) -> tuple[int, bool]:
    cmd = [sys.executable, __file__, "--child-mem", variant, "--rows", str(rows), "--dtypes", dtype,
           "--vocab", str(args.vocab), "--threads", str(args.threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    res = json.loads(out.strip().splitlines()[-1])
    return res["extra_bytes"], res["exact"]


def profile(rows: int, dtype: torch.dtype, chunk: int, vocab: int) -> None:
    """Where token_stats' time goes: torch profiler's operator table for one call."""
    from torch import profiler

    logits, tokens = make_logits(rows, vocab, dtype)
    fn = make_variant(f"chunk={chunk}", logits, tokens)
    fn()
    with profiler.profile(activities=[profiler.ProfilerActivity.CPU]) as prof:
        fn()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=str, default="2048,8192", help="B*T values, comma separated")
    ap.add_argument("--dtypes", type=str, default="float32,bfloat16")
    ap.add_argument("--vocab", type=int, default=V_QWEN)
    ap.add_argument("--reps", type=int, default=3, help="timed repetitions of each variant")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--chunks", type=str, default="default",
                    help="token_stats chunk_size values to compare ('default' = its own)")
    ap.add_argument("--training", action="store_true",
                    help="also token_logp+token_entropy (forward+backward) and pred_dz vs the plain formulas")
    ap.add_argument("--no-memory", action="store_true", help="skip the per-variant memory subprocesses")
    ap.add_argument("--quick", action="store_true", help="256 rows, 2 repetitions")
    ap.add_argument("--profile", action="store_true", help="also print torch.profiler's op table")
    ap.add_argument("--child-mem", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_mem:
        args.rows = int(args.rows)
        child_memory(args)
        return
    if args.quick:
        args.rows, args.reps = "256", 2

    print(f"machine: {machine()}")
    set_threads(args.threads)
    default = theory.default_chunk_rows(args.vocab)
    chunks = list(dict.fromkeys(default if c == "default" else int(c) for c in args.chunks.split(",")))
    row_bytes = args.vocab * 4
    budget = theory._CHUNK_ELEMENTS["cpu"] * 4  # the target's unit: one chunk of float32 values
    print(f"V = {args.vocab}, chunk budget {budget / 2**20:.1f} MiB = token_stats' {theory._BUFFERS} "
          f"buffers of {default} rows (default chunk_size); chunks compared: {chunks}; "
          f"{args.reps} interleaved repetitions")

    out = []
    for rows in [int(r) for r in args.rows.split(",")]:
        for dname in args.dtypes.split(","):
            logits, tokens = make_logits(rows, args.vocab, DTYPES[dname])
            names = [NAIVE, OUT] + [f"chunk={c}" for c in chunks] + (TRAIN if args.training else [])
            fns = {n: make_variant(n, logits, tokens) for n in names}
            times = interleave(fns, args.reps)
            del logits, tokens, fns
            print(f"  {rows} rows {dname}: timed" + ("" if args.no_memory else "; measuring memory"),
                  flush=True)
            t_naive, t_out = median(times[NAIVE]), median(times[OUT])
            for name in names:
                ts = times[name]
                mem, exact = (float("nan"), True) if args.no_memory else memory(name, rows, dname, args)
                is_ts = name.startswith("chunk")
                own = f"{mem / (int(name.split('=')[1]) * row_bytes * theory._BUFFERS):.2f}" if is_ts else "-"
                label = f"token_stats {name}" + (" (default)" if name == f"chunk={default}" else "")
                vs = "-" if name in TRAIN else f"**{median(ts) / t_naive:.2f}x**"
                vs_out = "-" if name in TRAIN else f"{median(ts) / t_out:.2f}x"
                out.append([rows, dname, label if is_ts else name, f"{median(ts):.3f} ({spread(ts)})",
                            vs, vs_out, f"{mem / 2**20:.0f}" + ("" if exact else " (upper bound)"),
                            f"**{mem / budget:.2f}**", own, f"{mem / (rows * row_bytes):.2f}"])
    print()
    table(["rows (B*T)", "logits", "variant", "median s (min..max)", "vs log_softmax (target <= 1.5x)",
           "vs log_softmax out=", "peak extra MiB",
           f"in chunk budgets of {budget / 2**20:.0f} MiB (target <= 1)",
           "in its own buffers", "in (N, V) float32 copies"], out)
    if args.profile:
        for dname in args.dtypes.split(","):
            print(f"\nprofile: token_stats chunk={chunks[0]}, {args.rows.split(',')[0]} rows, {dname}")
            profile(int(args.rows.split(",")[0]), DTYPES[dname], chunks[0], args.vocab)


if __name__ == "__main__":
    main()
