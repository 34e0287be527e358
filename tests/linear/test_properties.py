"""Property tests: hypothesis draws shapes, forms, normalisers, decays, chunk sizes and padding; the linear
engine matches its float64 oracle, and the normaliser slot of the tiled kernel matches the softmax oracle's."""

from __future__ import annotations

import os

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attnkit as ak
from attnkit import linear as L
from attnkit import reference as R
from tests.helpers import err

SETTINGS = settings(
    max_examples=int(os.environ.get("ATTNKIT_HYPOTHESIS_EXAMPLES", 150)) // 2,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@SETTINGS
@given(
    B=st.integers(1, 2),
    Hkv=st.integers(1, 2),
    g=st.sampled_from([1, 2]),
    N=st.integers(1, 130),
    D=st.sampled_from([2, 8, 16]),
    Dv=st.sampled_from([1, 8]),
    feature_map=st.sampled_from(["elu+1", "relu"]),
    normalize=st.sampled_from([True, False, "rms", "inline", "mala"]),
    decay=st.sampled_from([None, 0.5, 0.97, 1.0]),
    mode=st.sampled_from(["parallel", "chunk", "recurrent"]),
    chunk=st.sampled_from([1, 7, 16, 64]),
    slab=st.sampled_from([16, 2048]),
    pad=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_engine_matches_oracle(B, Hkv, g, N, D, Dv, feature_map, normalize, decay, mode, chunk, slab, pad, seed):
    from attnkit.linear import engine

    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hkv * g, N, D, generator=gen, dtype=torch.float64)
    k = torch.randn(B, Hkv, N, D, generator=gen, dtype=torch.float64)
    v = torch.randn(B, Hkv, N, Dv, generator=gen, dtype=torch.float64)
    kpm = (torch.rand(B, N, generator=gen) > 0.3) if pad else None
    old, engine._SLAB = engine._SLAB, slab
    try:
        out = L.linear_attention(
            q,
            k,
            v,
            feature_map=feature_map,
            normalize=normalize,
            decay=decay,
            mode=mode,
            chunk_size=chunk,
            key_padding_mask=kpm,
        )
    finally:
        engine._SLAB = old
    ref = R.linear_attention(q, k, v, feature_map=feature_map, normalize=normalize, decay=decay, key_padding_mask=kpm)
    assert torch.isfinite(out).all()
    assert err(out, ref) <= 1e-9 * (1 + ref.abs().max().item())


@SETTINGS
@given(
    N=st.integers(1, 120),
    extra=st.integers(0, 40),
    window=st.integers(0, 50),
    norm=st.sampled_from(["sigmoid", "softplus", "softplus-flat"]),
    pad=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_normaliser_slot_matches_oracle(N, extra, window, norm, pad, seed):
    gen = torch.Generator().manual_seed(seed)
    Nk = N + extra
    q = torch.randn(1, 4, N, 8, generator=gen, dtype=torch.float64)
    k = torch.randn(1, 2, Nk, 8, generator=gen, dtype=torch.float64)
    v = torch.randn(1, 2, Nk, 8, generator=gen, dtype=torch.float64)
    kpm = (torch.rand(1, Nk, generator=gen) > 0.3) if pad else None
    normalizer = {
        "sigmoid": ak.scores.Sigmoid(),
        "softplus": ak.scores.Softplus(),
        "softplus-flat": ak.scores.Softplus(False),
    }[norm]
    pat = ak.patterns.SlidingWindow(window, 0)
    kw = dict(pattern=pat, normalizer=normalizer, key_padding_mask=kpm, q_offset=extra)
    out, lse = ak.attention(q, k, v, backend="tiled", return_lse=True, **kw)
    ref, rlse = R.attention(q, k, v, return_lse=True, **kw)
    assert err(out, ref) < 1e-10
    assert (
        torch.equal(torch.isinf(lse), torch.isinf(rlse))
        and err(lse.nan_to_num(0, 0, 0), rlse.nan_to_num(0, 0, 0)) < 1e-10
    )
