"""Bounded allocations (issue 16): every path that would build an N x N tensor over the memory budget raises
MemoryBudgetError naming a way out, before it allocates; sizes such as chunk_size clamp to the sequence."""

import pytest
import torch

import attnkit as ak
from attnkit import patterns as P
from attnkit.linear import linear_attention
from attnkit.sparse import BlockTopK

from .helpers import rand_qkv

_SMALL = str(64 * 64 - 1)  # bytes: below one 64 x 64 bool mask


@pytest.fixture
def small_budget(monkeypatch):
    monkeypatch.setenv("ATTNKIT_MEMORY_BUDGET", _SMALL)


def test_dense_paths_refuse_and_name_a_way_out(small_budget):
    q, k, v = rand_qkv(1, 2, 2, 64, 64, 8)
    pat = P.SlidingWindow(7, 0)
    with pytest.raises(ak.MemoryBudgetError, match="backend='tiled'"):
        ak.attention(q, k, v, pattern=pat, backend="sdpa")
    with pytest.raises(ak.MemoryBudgetError, match="float64 oracle.*backend='auto'"):
        ak.attention(q, k, v, pattern=pat, backend="reference")
    with pytest.raises(ak.MemoryBudgetError, match="^dense_mask: .*block_layout"):
        pat.dense_mask(64, 64)
    layout = pat.block_layout(64, 64, 16, 16, 0, 2)
    with pytest.raises(ak.MemoryBudgetError, match="^dense_mask: .*tiled_attention"):
        layout.dense_mask()
    sel = BlockTopK(block_size=16, budget=2).select(q, k, v)
    with pytest.raises(ak.MemoryBudgetError, match="^dense_mask: .*attention instead"):
        sel.dense_mask(2)
    with pytest.raises(ak.MemoryBudgetError, match="mode='chunk'"):
        linear_attention(q, k, v, mode="parallel")
    # the paths that stay within O(N) still run, and auto chooses one of them
    out = ak.attention(q, k, v, pattern=pat)
    assert ak.explain(q, k, v, pattern=pat).backend == "tiled"
    assert torch.isfinite(out).all()
    assert torch.isfinite(linear_attention(q, k, v, mode="chunk", chunk_size=2**62)).all()


def test_flex_refuses_before_building_its_block_mask(small_budget):
    pytest.importorskip("torch.nn.attention.flex_attention")
    q, k, v = rand_qkv(1, 2, 2, 64, 64, 8)
    with pytest.raises(ak.MemoryBudgetError, match="BlockMask.*backend='tiled'"):
        ak.attention(q, k, v, pattern=P.SlidingWindow(7, 0), backend="flex")


def test_budget_error_is_a_memory_error():
    assert issubclass(ak.MemoryBudgetError, MemoryError)


def test_sdpa_with_unequal_head_widths_stays_off_the_quadratic_math_path():
    """D != Dv (MLA's naive heads, Diff Transformer's doubled values): SDPA runs on zero-padded widths, so the
    result is exact and the memory stays linear (the math path would hold the N x N weights)."""
    from attnkit import reference
    from attnkit.bench.timing import peak_memory

    q, k = torch.randn(1, 2, 64, 24, dtype=torch.float64), torch.randn(1, 2, 64, 24, dtype=torch.float64)
    for v in (torch.randn(1, 2, 64, 16, dtype=torch.float64), torch.randn(1, 2, 64, 40, dtype=torch.float64)):
        for pattern in (ak.patterns.Causal(), ak.patterns.SlidingWindow(left=7, right=0)):
            out = ak.attention(q, k, v, pattern=pattern, backend="sdpa")
            want = reference.attention(q, k, v, pattern=pattern)
            assert (out - want).abs().max() < 1e-12
    n = 4096
    q = torch.randn(1, 8, n, 96)
    v = torch.randn(1, 8, n, 64)
    grown = peak_memory(lambda: ak.attention(q, q, v, pattern=ak.patterns.Causal(), backend="sdpa"))
    if grown is None:
        pytest.skip("the kernel does not report the resident high-water mark")
    assert grown < 256 * 2**20, f"{grown / 2**20:.0f} MiB for a causal call at 4k (the N x N weights are 512 MiB)"
