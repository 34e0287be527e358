"""Pattern parameters at and beyond 2^31 behave as their rule says on every backend (issue 16: tile statistics in
32-bit indices used to compare false against them, so SlidingWindow(2**31, 0) computed as an empty pattern)."""

from __future__ import annotations

import pytest
import torch

import attnkit as ak
from tests.helpers import rand_qkv

P = ak.patterns
N = 70


def _cases(n):
    """Each pattern with parameter ``n >= N``, and what its rule then is on N tokens: causal or every key."""
    causal, full = True, False
    return [
        (P.SlidingWindow(n, 0), causal),
        (P.SlidingWindow(n, n), full),
        (P.AShape(n, n), causal),
        (P.Dilated(n, 1), causal),
        (P.Power(n), causal),
        (P.Sinks(n), full),
        (P.GlobalTokens(n), full),
        (P.Sinks(n) | P.SlidingWindow(3, 0), full),
    ]


@pytest.mark.parametrize("n", (2**31, 2**31 + 5, 2**40, 2**62))
def test_huge_parameters_follow_their_rule(n):
    q, k, v = rand_qkv(1, 2, 2, N, N, 16, seed=7)
    for pat, causal in _cases(n):
        mask = torch.ones(N, N, dtype=torch.bool)
        mask = mask.tril() if causal else mask
        assert pat.density(N, N) == pytest.approx(float(mask.double().mean())), repr(pat)
        want = ak.reference.attention(q, k, v, mask=mask)
        for backend in ("tiled", "sdpa", "auto"):
            got = ak.attention(q, k, v, pattern=pat, backend=backend)
            torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5, msg=f"{pat!r} on {backend}")
