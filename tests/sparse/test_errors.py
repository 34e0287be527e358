"""Bad input to the selectors gives a clear error naming the argument."""

from __future__ import annotations

import pytest
import torch

from attnkit import sparse_attention
import attnkit as ak
from attnkit.errors import DTypeError, PatternError, ShapeError, UnsupportedError
from attnkit.sparse import (
    BiLevelRouting,
    DynamicMask,
    KMeansRouting,
    MoBA,
    SeerAttention,
    SeerGate,
    VerticalSlash,
    VMoBA,
    fit_gate,
)
from tests.helpers import rand_qkv


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: MoBA(budget=0.0), "budget"),
        (lambda: MoBA(budget=1.5), "budget"),
        (lambda: MoBA(budget=-2), "budget"),
        (lambda: MoBA(block_size=0), "block_size"),
        (lambda: VMoBA(grid=(1, 16, 16), block=(1, 5, 4)), "block"),
        (lambda: VMoBA(mode="best"), "mode"),
        (lambda: VMoBA(mode="threshold", budget=3), "budget"),
        (lambda: BiLevelRouting(grid=(8, 8)), "grid, region"),
        (lambda: KMeansRouting(4, 16, 0), "num_clusters"),
        (lambda: KMeansRouting(4, 16, 2, decay=1.0), "decay"),
        (lambda: DynamicMask(2, 16, query_block=0), "query_block"),
        (lambda: SeerAttention(budget=0.1, threshold=0.01), "budget, threshold"),
        (lambda: SeerAttention(threshold=1.5), "threshold"),
        (lambda: SeerAttention(allocate="global"), "allocate"),
        (lambda: SeerAttention(block_size=(64, 0)), "block_size"),
        (lambda: SeerAttention(block_size=64, query_pool=24), "query_pool"),
        (lambda: SeerAttention(SeerGate(4, 16), query_pool=16), "query_pool"),
        (lambda: SeerAttention(keep_local=-1), "keep_local"),
        (lambda: SeerGate(4, 16, query_pool=0), "query_pool"),
        (
            lambda: fit_gate(SeerGate(4, 16), [(torch.randn(1, 4, 64, 16), torch.randn(1, 2, 64, 16))], target="sum"),
            "target",
        ),
    ],
)
def test_bad_arguments(make, match):
    with pytest.raises(PatternError, match=match):
        make()


def test_bad_calls():
    q, k, v = rand_qkv(1, 4, 2, 64, 64, 16)
    with pytest.raises(DTypeError, match="selector"):
        sparse_attention(q, k, v, "moba")
    with pytest.raises(DTypeError, match="pattern"):
        ak.attention(q, k, v, pattern="moba")
    with pytest.raises(UnsupportedError, match="causal"):
        sparse_attention(q, k, v, VMoBA(grid=(1, 8, 8), block=(1, 4, 4)), causal=True)
    with pytest.raises(PatternError, match="causal"):
        sparse_attention(q, k, v, VerticalSlash(), causal=False)
    with pytest.raises(ShapeError, match="q"):
        sparse_attention(q, k, v, KMeansRouting(8, 16, 2))
    with pytest.raises(ShapeError, match="q, k"):
        sparse_attention(q, k, v, VMoBA(grid=(1, 16, 16), block=(1, 4, 4)), causal=False)
    sel = MoBA(block_size=16).select(q, k, v)
    with pytest.raises(ShapeError, match="selection"):
        sparse_attention(q[:, :, :32], k[:, :, :32], v[:, :, :32], sel)
    with pytest.raises(ShapeError, match=r"^q: expected at most kv_len"):  # not q_offset, which it does not take
        sparse_attention(torch.randn(1, 4, 80, 16), k, v, MoBA(block_size=16))
