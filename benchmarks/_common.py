"""Helpers shared by the benchmark scripts: threads, interleaved timing, medians, tables.

Every script measures its variants side by side in one process and interleaves their repetitions,
because this is a shared machine: a burst of load from elsewhere then slows all variants alike and
cancels out of the ratios. Absolute seconds are printed for context only.
"""

from __future__ import annotations

import atexit
import os
import platform
import shutil
import statistics
import tempfile
import time
from typing import Callable


def set_threads(n: int) -> None:
    """Fix torch's intra-op thread count (and say so): the default of 2 collapses under load here."""
    import torch

    torch.set_num_threads(n)
    print(f"torch {torch.__version__}, intra-op threads: {torch.get_num_threads()}")


def machine() -> str:
    """One line describing where the numbers come from."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = ""
    try:
        with open("/proc/meminfo") as f:
            kb = int(next(line.split()[1] for line in f if line.startswith("MemTotal")))
        mem = f", {kb / 2**20:.0f} GiB RAM"
    except (OSError, StopIteration):
        pass
    load = "/".join(f"{x:.2f}" for x in os.getloadavg())
    return f"{cpu} ({isa()}), {os.cpu_count()} cores{mem}, load average {load}"


def isa() -> str:
    """'avx512f' or 'avx2 only' (or 'no avx2'): float results, hence run trajectories, differ between them."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next(line for line in f if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return "instruction set unknown"
    return "avx512f" if "avx512f" in flags else "avx2 only" if "avx2" in flags else "no avx2"


def temp_dir(prefix: str) -> str:
    """A temporary folder removed when the script exits."""
    path = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def interleave(fns: dict[str, Callable[[], object]], reps: int, warmup: int = 1) -> dict[str, list[float]]:
    """Time each callable `reps` times, alternating between them (order rotated every round).

    The first `warmup` rounds are run but not kept (first-call allocations, lazy kernel loading).
    Returns name -> list of seconds.
    """
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(warmup + reps):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            t0 = time.perf_counter()
            fns[name]()
            dt = time.perf_counter() - t0
            if r >= warmup:
                times[name].append(dt)
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def spread(xs: list[float]) -> str:
    """min..max, to show how noisy a median is."""
    return f"{min(xs):.3g}..{max(xs):.3g}" if xs else "-"


def table(headers: list[str], rows: list[list[object]]) -> None:
    """Print a Markdown table (pastes straight into BENCHMARKS.md)."""
    cells = [[str(c) for c in r] for r in rows]
    print("| " + " | ".join(headers) + " |")
    print("|" + "|".join("---" for _ in headers) + "|")
    for r in cells:
        print("| " + " | ".join(r) + " |")
