"""Property tests: hypothesis draws shapes, patterns, dtypes and padding; tiled and sdpa match the oracle."""

from __future__ import annotations

import os

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attnkit as ak
from tests.helpers import check_against_oracle

P = ak.patterns

patterns_1d = st.one_of(
    st.builds(P.SlidingWindow, st.integers(0, 40), st.integers(0, 40)),
    st.builds(P.Dilated, st.integers(1, 12), st.integers(1, 5), st.booleans()),
    st.builds(P.AShape, st.integers(1, 8), st.integers(1, 40)),
    st.builds(P.Power, st.integers(1, 30)),
    st.just(P.Causal()),
    st.builds(lambda n, w: P.GlobalTokens(n) | P.SlidingWindow(w, w), st.integers(1, 5), st.integers(0, 20)),
)


@settings(
    max_examples=int(os.environ.get("ATTNKIT_HYPOTHESIS_EXAMPLES", 150)),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    pattern=patterns_1d,
    B=st.integers(1, 2),
    Hkv=st.integers(1, 2),
    g=st.sampled_from([1, 2, 3]),
    Nq=st.integers(1, 150),
    extra=st.integers(0, 60),
    D=st.sampled_from([4, 8, 16]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    pad=st.booleans(),
    seed=st.integers(0, 2**16),
    backend=st.sampled_from(["tiled", "sdpa"]),
)
def test_random_shapes_match_oracle(pattern, B, Hkv, g, Nq, extra, D, dtype, pad, seed, backend):
    Nk = Nq + extra
    q_offset = extra  # queries are the last Nq positions: decode / chunked prefill
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hkv * g, Nq, D, generator=gen).to(dtype)
    k = torch.randn(B, Hkv, Nk, D, generator=gen).to(dtype)
    v = torch.randn(B, Hkv, Nk, D, generator=gen).to(dtype)
    kpm = (torch.rand(B, Nk, generator=gen) > 0.3) if pad else None
    check_against_oracle(
        lambda a, b, c: ak.attention(
            a, b, c, pattern=pattern, key_padding_mask=kpm, q_offset=q_offset, backend=backend
        ),
        q,
        k,
        v,
        grads=backend == "tiled" or dtype == torch.float32,
        pattern=pattern,
        key_padding_mask=kpm,
        q_offset=q_offset,
        label=f"{pattern}/{backend}/{dtype}",
    )
