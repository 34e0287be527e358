"""The tiled kernel's native path against its torch-op path, in one process, for the score mods and normalisers
the native kernel computes: a causal window of 256 at N tokens (default 16k), 8 heads of 64, float32, forward
and forward + backward, the best of a few runs. Run: ``.venv/bin/python scripts/native_vs_torch_ops.py [N]``."""

import math
import os
import sys
import time

import torch

import attnkit
from attnkit.patterns import SlidingWindow
from attnkit.scores import ALiBi, Sigmoid, Softcap, Softplus


def best_ms(fn, reps):
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * min(times)


def main(n: int):
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 8, n, 64) for _ in range(3))
    pattern = SlidingWindow(256)
    cases = {
        "softmax": (None, None),
        "softcap 30": (Softcap(30.0), None),
        "ALiBi": (ALiBi(8), None),
        "sigmoid, b = -log n": (None, Sigmoid(-math.log(n))),
        "softplus (LSSA)": (None, Softplus()),
    }
    print(f"| N = {n} | native fwd ms | torch-op fwd ms | native fwd+bwd ms | torch-op fwd+bwd ms |")
    print("|---|---|---|---|---|")
    for name, (score, norm) in cases.items():
        row = {}
        for mode in ("native", "torch"):
            os.environ["ATTNKIT_TILED_KERNEL"] = mode
            kw = {"pattern": pattern, "score": score, "normalizer": norm, "backend": "tiled"}
            grads = [x.clone().requires_grad_() for x in (q, k, v)]
            with torch.no_grad():
                row[mode, "fwd"] = best_ms(lambda kw=kw: attnkit.attention(q, k, v, **kw), 3)
            row[mode, "bwd"] = best_ms(lambda kw=kw, g=grads: attnkit.attention(*g, **kw).sum().backward(), 2)
        cells = [f"{row[m, d]:.0f}" for d in ("fwd", "bwd") for m in ("native", "torch")]
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 16384)
