"""Timing and memory measurement for the benchmark (never used by tests).

* ``measure`` warms up once, then times until ``min_time`` seconds or ``max_runs`` runs (at least
  ``min_runs``) and reports the median with the 20th and 80th percentiles (anchors_benchmarks.md, section 5).
* ``peak_memory`` reports the peak resident memory a call adds, from the kernel's own high-water mark
  (``/proc/self/clear_refs`` + ``VmHWM``). While it measures, glibc is told to serve every allocation of
  64 KiB or more with its own mapping and to give freed memory back at once, so the resident set follows the
  live tensors; timing runs keep glibc's default (reusing freed memory), since a mapping per temporary adds
  page faults that are not the kernel's cost.
"""

from __future__ import annotations

import ctypes
import re
import statistics
import time

import torch

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def measure(fn, *, min_time: float = 0.6, min_runs: int = 2, max_runs: int = 9, warmup: bool = True) -> dict:
    """Median and 20th/80th percentiles of ``fn``'s wall time. A call whose warm-up takes over 2 s is timed
    once more only (the percentiles then equal the median; ``runs`` says so)."""
    if warmup:
        t = time.perf_counter()
        fn()
        if time.perf_counter() - t > 2.0:
            min_runs = 1
    times = []
    start = time.perf_counter()
    while len(times) < max_runs and (len(times) < min_runs or time.perf_counter() - start < min_time):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    times.sort()
    q = statistics.quantiles(times, n=5, method="inclusive") if len(times) > 1 else [times[0]] * 4
    return {"median": statistics.median(times), "p20": q[0], "p80": q[3], "runs": len(times)}


def _status(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            m = re.search(rf"{key}:\s+(\d+) kB", f.read())
        return int(m.group(1)) * 1024 if m else None
    except OSError:
        return None


def peak_memory(fn) -> float | None:
    """Peak resident bytes added while ``fn`` runs, or None where the kernel does not report it."""
    libc = _libc()
    try:
        if libc is not None:
            libc.mallopt(_M_MMAP_THRESHOLD, 1 << 16)
            libc.mallopt(_M_TRIM_THRESHOLD, 0)
            libc.malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _status("VmRSS")
        fn()
        hwm = _status("VmHWM")
    except OSError:
        return None
    finally:
        if libc is not None:  # back to large, reusable arenas for the timing runs that follow
            libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
            libc.mallopt(_M_TRIM_THRESHOLD, 64 << 20)
    return None if base is None or hwm is None else max(0, hwm - base)


def matmul_rate(n: int = 2048, dtype=torch.float32) -> float:
    """FLOP/s of an ``n x n`` matrix product on this machine, now (the physical reference)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    r = measure(lambda: a @ b, min_time=0.5, min_runs=3)
    return 2 * n**3 / r["median"]
