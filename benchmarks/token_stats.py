"""token_stats vs one log_softmax + gather, at a Qwen-sized vocabulary (V = 151,936).

    .venv/bin/python benchmarks/token_stats.py            # 2048 and 8192 rows, fp32 and bf16
    .venv/bin/python benchmarks/token_stats.py --quick    # 256 rows: a smoke run of a few seconds

Why this comparison: every GRPO step needs log p_k of the sampled tokens; the cheapest way to get it
is `torch.log_softmax(logits.float(), -1).gather(...)`. entclip also needs H, S* and E_p[S] from the
same logits (the filters and the accounting), and promises to get all four in one chunked pass.
Targets (issue): time <= 1.5x the log_softmax baseline; peak extra memory within one chunk of
float32 full-vocabulary rows (chunk_size x V x 4 bytes).

Timing: both variants in this process, repetitions interleaved, medians and their ratio.
Memory: each variant once in a fresh subprocess that builds the logits, then records the resident
set size (RSS), resets the kernel's peak-RSS counter (/proc/self/clear_refs) and reads the peak
after the call: peak - RSS before = the extra memory the call needed at its worst moment. A fresh
process keeps one variant's freed-but-cached pages from hiding another's.
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


def default_chunk(vocab: int) -> int:
    # token_stats' documented default: max(1, 2**24 // V) rows.
    return max(1, getattr(theory, "_CHUNK_ELEMENTS", 2**24) // vocab)


def make_logits(rows: int, vocab: int, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random logits filled a slice at a time, so that building them never needs a float32 copy."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.empty(rows, vocab, dtype=dtype)
    step = 64
    for s in range(0, rows, step):
        # std 3: a peaked, LLM-like distribution rather than a near-uniform one (timing barely cares).
        logits[s:s + step] = torch.randn(min(step, rows - s), vocab, generator=gen) * 3.0
    tokens = torch.randint(0, vocab, (rows,), generator=gen)
    return logits, tokens


def run_entclip(logits, tokens, chunk):
    return theory.token_stats(logits, tokens, chunk_size=chunk)


def run_baseline(logits, tokens, chunk=None):
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


VARIANTS = {"entclip": run_entclip, "log_softmax": run_baseline}


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(next(line.split()[1] for line in f if line.startswith(field + ":")))


def child_memory(args) -> None:
    """In a fresh process: extra peak RSS of one call of one variant; prints one JSON line."""
    torch.set_num_threads(args.threads)
    logits, tokens = make_logits(args.rows, args.vocab, DTYPES[args.dtype])
    fn = VARIANTS[args.child_mem]
    fn(logits[:2], tokens[:2], args.chunk)  # load kernels and thread pools before the baseline reading
    rss0 = _status_kb("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM (peak RSS) to the current RSS
        exact = True
    except OSError:
        exact = False  # VmHWM then also covers building the logits: an upper bound
    fn(logits, tokens, args.chunk)
    peak = _status_kb("VmHWM")
    print(json.dumps({"extra_bytes": (peak - rss0) * 1024, "exact": exact}))


def memory(variant: str, rows: int, dtype: str, args) -> tuple[int, bool]:
    cmd = [sys.executable, __file__, "--child-mem", variant, "--rows", str(rows), "--dtypes", dtype,
           "--vocab", str(args.vocab), "--threads", str(args.threads)]
    if args.chunk:
        cmd += ["--chunk", str(args.chunk)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    res = json.loads(out.strip().splitlines()[-1])
    return res["extra_bytes"], res["exact"]


def profile(rows: int, dtype: torch.dtype, args) -> None:
    """Where token_stats' time goes: torch profiler's operator table for one call."""
    from torch.profiler import ProfilerActivity, profile as tprofile

    logits, tokens = make_logits(rows, args.vocab, dtype)
    run_entclip(logits, tokens, args.chunk)
    with tprofile(activities=[ProfilerActivity.CPU]) as prof:
        run_entclip(logits, tokens, args.chunk)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=str, default="2048,8192", help="B*T values, comma separated")
    ap.add_argument("--dtypes", type=str, default="float32,bfloat16")
    ap.add_argument("--vocab", type=int, default=V_QWEN)
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions of each variant")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--chunks", type=str, default="default",
                    help="token_stats chunk_size values to compare, e.g. default,16 ('default' = its own)")
    ap.add_argument("--quick", action="store_true", help="256 rows, 3 repetitions")
    ap.add_argument("--profile", action="store_true", help="also print torch.profiler's op table")
    ap.add_argument("--child-mem", choices=list(VARIANTS), help=argparse.SUPPRESS)
    ap.add_argument("--chunk", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_mem:
        args.rows = int(args.rows)
        args.dtype = args.dtypes
        child_memory(args)
        return
    if args.quick:
        args.rows, args.reps = "256", 3

    print(f"machine: {machine()}")
    set_threads(args.threads)
    default = default_chunk(args.vocab)
    chunks = [default if c == "default" else int(c) for c in args.chunks.split(",")]
    unit = default * args.vocab * 4  # the target's unit: one default chunk of float32 rows
    print(f"V = {args.vocab}, token_stats default chunk = {default} rows "
          f"(one float32 chunk = {unit / 2**20:.1f} MiB), {args.reps} interleaved repetitions")

    out = []
    for rows in [int(r) for r in args.rows.split(",")]:
        for dname in args.dtypes.split(","):
            logits, tokens = make_logits(rows, args.vocab, DTYPES[dname])
            fns = {"log_softmax": lambda: run_baseline(logits, tokens)}
            for c in chunks:
                fns[f"token_stats chunk={c}"] = lambda c=c: run_entclip(logits, tokens, c)
            times = interleave(fns, args.reps)
            del logits, tokens, fns
            t_b = median(times["log_softmax"])
            print(f"  {rows} rows {dname}: timed", flush=True)
            for name, ts in times.items():
                c = int(name.split("=")[1]) if "=" in name else None
                args.chunk = c
                mem, exact = memory("entclip" if c else "log_softmax", rows, dname, args)
                ratio = "1 (baseline)" if c is None else f"**{median(ts) / t_b:.2f}x**"
                out.append([rows, dname, name, f"{median(ts):.3f} ({spread(ts)})", ratio,
                            f"{mem / 2**20:.0f} MiB = **{mem / unit:.2f}**" + ("" if exact else " (upper bound)")])
    print()
    table(["rows (B*T)", "logits", "variant", "median s (min..max)", "time ratio (target <= 1.5x)",
           f"peak extra, in default chunks of {unit / 2**20:.1f} MiB (target <= 1)"], out)
    if args.profile:
        first = int(args.rows.split(",")[0])
        args.chunk = chunks[0]
        for dname in args.dtypes.split(","):
            print(f"\nprofile: token_stats chunk={chunks[0]}, {first} rows, {dname}")
            profile(first, DTYPES[dname], args)


if __name__ == "__main__":
    main()
