"""Run a function on ``world`` local processes joined in a gloo process group (torch.multiprocessing, spawn):
what the tests, the benchmark and a quick experiment on one machine need.

``run_local(fn, world, *args)`` returns each rank's return value (or raises with the failing ranks' tracebacks).
``fn(rank, world, *args)`` runs after ``dist.init_process_group("gloo")``; it must be importable (defined at
module level), and its arguments and result picklable.
"""

from __future__ import annotations

import os
import tempfile
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ..errors import check_count


def _main(rank, world, init, out_dir, fn, args, threads):
    torch.set_num_threads(threads)
    result = None
    try:
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
        result = {"ok": fn(rank, world, *args)}
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which raises (or returns it)
        result = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()}
    finally:
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001 - a failed peer can leave the group broken
                pass


def run_local(fn, world: int, *args, timeout: float = 300.0, threads: int = 1, allow_errors: bool = False):
    """Each rank's return value, in rank order; ``threads`` torch threads per process. A rank that does not
    finish within ``timeout`` seconds is killed and reported. With ``allow_errors`` a failed rank gives
    ``{"error", "trace"}`` and the others ``{"ok": value}``."""
    check_count("world", world, 1)
    with tempfile.TemporaryDirectory() as tmp:
        init = f"file://{os.path.join(tmp, 'store')}"
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=_main, args=(r, world, init, tmp, fn, args, threads)) for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout)
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
        if hung:
            raise RuntimeError(f"ranks {hung} did not finish within {timeout} s")
        results = []
        for r in range(world):
            path = os.path.join(tmp, f"rank{r}.pt")
            results.append(torch.load(path, weights_only=False) if os.path.exists(path) else {"error": "no result"})
    if allow_errors:
        return results
    failed = [(r, x) for r, x in enumerate(results) if "error" in x]
    if failed:
        raise RuntimeError("\n".join(f"rank {r}: {x.get('trace', x['error'])}" for r, x in failed))
    return [x["ok"] for x in results]
