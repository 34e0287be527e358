"""Threads calling attnkit.attention on shared patterns get what one thread gets (issue 16): the layout cache
is shared and locked; plans cached on a layout are made twice at worst, never half."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch

import attnkit as ak
from tests.helpers import rand_qkv


def test_threads_share_patterns_and_caches():
    ak.patterns.clear_cache()
    patterns = [ak.patterns.SlidingWindow(31, 0), ak.patterns.AShape(4, 48), ak.patterns.Dilated(16, 2)]
    calls = []
    for i in range(24):
        n = (128, 192, 256)[i % 3]
        q, k, v = rand_qkv(1, 4, 2, n, n, 16, seed=i)
        calls.append((patterns[i % len(patterns)], q, k, v))
    want = [ak.reference.attention(q, k, v, pattern=p).float() for p, q, k, v in calls]
    ak.patterns.clear_cache()
    with ThreadPoolExecutor(max_workers=4) as pool:
        got = list(pool.map(lambda c: ak.attention(c[1], c[2], c[3], pattern=c[0], backend="tiled"), calls))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=2e-5, rtol=2e-5)
