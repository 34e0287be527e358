"""Neighborhood results equal NATTEN's (``natten.na1d/na2d/na3d``), which is in the ``peers`` extra.

This test is never skipped: the set-up (scripts/setup.sh) installs natten, and without it the import fails.
"""

from __future__ import annotations

import natten  # noqa: E402 - the peers extra; a missing install must fail, not skip
import pytest
import torch

import attnkit as ak
from attnkit.shapes import bhnd_to_spatial, spatial_to_bhnd

CASES = [
    ((33,), 7, 1, 1, False),
    ((40,), 6, 2, 1, False),  # even kernel
    ((48,), 9, 3, 3, True),
    ((40,), 8, 1, 8, False),  # blocked (stride == kernel)
    ((12, 14), 5, 1, 1, False),
    ((12, 14), (3, 5), (2, 1), (1, 2), (True, False)),
    ((16, 16), 7, 2, 4, False),
    ((6, 7, 8), 3, 1, 1, False),
    ((6, 8, 8), (3, 3, 5), (1, 2, 1), (1, 1, 2), (True, False, False)),
]


@pytest.mark.parametrize("shape,ks,dil,stride,causal", CASES)
def test_neighborhood_equals_natten(shape, ks, dil, stride, causal):
    g = torch.Generator().manual_seed(len(shape) * 100 + sum(shape))
    B, H, D = 2, 2, 16
    q, k, v = (torch.randn(B, *shape, H, D, generator=g) for _ in range(3))
    fn = {1: natten.na1d, 2: natten.na2d, 3: natten.na3d}[len(shape)]
    want = fn(q, k, v, kernel_size=ks, dilation=dil, stride=stride, is_causal=causal)
    pat = ak.patterns.Neighborhood(shape, kernel_size=ks, dilation=dil, stride=stride, is_causal=causal)
    for backend in ("tiled", "sdpa"):
        got = ak.attention(spatial_to_bhnd(q), spatial_to_bhnd(k), spatial_to_bhnd(v), pattern=pat, backend=backend)
        got = bhnd_to_spatial(got, shape)
        assert (got - want).abs().max().item() < 2e-5, backend
