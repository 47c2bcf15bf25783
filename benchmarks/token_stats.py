"""token_stats vs one log_softmax + gather, at a Qwen-sized vocabulary (V = 151,936).

    .venv/bin/python benchmarks/token_stats.py            # 2048 and 8192 rows, fp32 and bf16
    .venv/bin/python benchmarks/token_stats.py --quick    # 256 rows: a smoke run of a few seconds
    .venv/bin/python benchmarks/token_stats.py --rows 2048 --chunks default,32,16,8,4 --profile

Why this comparison: every GRPO step needs log p_k of the sampled tokens; the cheapest way to get it
is `torch.log_softmax(logits.float(), -1).gather(...)`. entclip also needs H, S* and E_p[S] from the
same logits (the filters and the accounting), and promises all four in one chunked pass.
Targets (issue): time <= 1.5x the log_softmax baseline; peak extra memory within one chunk of
float32 full-vocabulary rows (chunk_size x V x 4 bytes, at token_stats' default chunk_size).

Two baselines. `log_softmax` is the literal one: it allocates a fresh (N, V) float32 output (and,
for bf16 logits, a float32 copy first), gigabytes here, and the kernel's page-fault and zeroing
cost for them varies a lot from run to run on this shared VM. `log_softmax out=` writes into an
output allocated once beforehand: the same arithmetic without that allocation, a steadier
compute-only reference. The target ratio is against the first; both are printed.

Timing: all variants in this process, repetitions interleaved, medians and their ratios.
Memory: each variant once in a fresh subprocess that builds the logits (and the out= buffer),
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

from entclip import theory  # noqa: E402

V_QWEN = 151_936
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
NAIVE, OUT = "log_softmax", "log_softmax out="


def default_chunk(vocab: int) -> int:
    # token_stats' documented default: max(1, 2**24 // V) rows.
    return max(1, getattr(theory, "_CHUNK_ELEMENTS", 2**24) // vocab)


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


def make_variant(name: str, logits: torch.Tensor, tokens: torch.Tensor):
    """A no-argument callable for variant `name` ("log_softmax", "log_softmax out=", "chunk=N")."""
    idx = tokens.unsqueeze(-1)
    if name == NAIVE:
        return lambda: torch.log_softmax(logits.float(), dim=-1).gather(-1, idx)
    if name == OUT:
        buf = torch.zeros(logits.shape, dtype=torch.float32)  # zeros: its pages are resident already
        return lambda: torch.log_softmax(logits, dim=-1, dtype=torch.float32, out=buf).gather(-1, idx)
    chunk = int(name.split("=")[1])
    return lambda: theory.token_stats(logits, tokens, chunk_size=chunk)


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
    ap.add_argument("--chunks", type=str, default="default,8",
                    help="token_stats chunk_size values to compare ('default' = its own)")
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
    default = default_chunk(args.vocab)
    chunks = list(dict.fromkeys(default if c == "default" else int(c) for c in args.chunks.split(",")))
    row_bytes = args.vocab * 4
    unit = default * row_bytes  # the target's unit: one default chunk of float32 rows
    print(f"V = {args.vocab}, token_stats default chunk = {default} rows (one float32 chunk = "
          f"{unit / 2**20:.1f} MiB); chunks compared: {chunks}; {args.reps} interleaved repetitions")

    out = []
    for rows in [int(r) for r in args.rows.split(",")]:
        for dname in args.dtypes.split(","):
            logits, tokens = make_logits(rows, args.vocab, DTYPES[dname])
            names = [NAIVE, OUT] + [f"chunk={c}" for c in chunks]
            fns = {n: make_variant(n, logits, tokens) for n in names}
            times = interleave(fns, args.reps)
            del logits, tokens, fns
            print(f"  {rows} rows {dname}: timed; measuring memory", flush=True)
            t_naive, t_out = median(times[NAIVE]), median(times[OUT])
            for name in names:
                ts, (mem, exact) = times[name], memory(name, rows, dname, args)
                is_ts = name.startswith("chunk")
                own = f"{mem / (int(name.split('=')[1]) * row_bytes):.2f}" if is_ts else "-"
                label = f"token_stats {name}" + (" (default)" if name == f"chunk={default}" else "")
                out.append([rows, dname, label if is_ts else name, f"{median(ts):.3f} ({spread(ts)})",
                            f"**{median(ts) / t_naive:.2f}x**", f"{median(ts) / t_out:.2f}x",
                            f"{mem / 2**20:.0f}" + ("" if exact else " (upper bound)"),
                            f"**{mem / unit:.2f}**", own])
    print()
    table(["rows (B*T)", "logits", "variant", "median s (min..max)", "vs log_softmax (target <= 1.5x)",
           "vs log_softmax out=", "peak extra MiB",
           f"in default chunks of {unit / 2**20:.1f} MiB (target <= 1)", "in its own chunks"], out)
    if args.profile:
        for dname in args.dtypes.split(","):
            print(f"\nprofile: token_stats chunk={chunks[0]}, {args.rows.split(',')[0]} rows, {dname}")
            profile(int(args.rows.split(",")[0]), DTYPES[dname], chunks[0], args.vocab)


if __name__ == "__main__":
    main()
