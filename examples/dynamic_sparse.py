"""Dynamic sparse attention on real SmolLM2 q, k, v: select, attend, and measure what the selection kept.

Run: .venv/bin/python examples/dynamic_sparse.py  (the first run captures the tensors, about 20 s)
"""

import torch

from attnkit.bench.dynamic import dense_reference, quality
from attnkit.models import capture_qkv
from attnkit.sparse import HierarchicalPruning, MoBA, VerticalSlash, sparse_attention

q, k, v = capture_qkv(1024)[12]  # (1, 9, 1024, 64) queries, (1, 3, 1024, 64) keys and values: GQA
dense = dense_reference(q, k, v)
for selector in (
    MoBA(block_size=64, budget=0.25, keep_first=1),
    HierarchicalPruning(block_size=64, budget=0.25, keep_first=1),
    VerticalSlash(budget=0.25),
):
    sel = selector.select(q, k, v, causal=True)  # the selector's cost, timed apart from the attention
    out, lse = sparse_attention(q, k, v, sel, causal=True, return_lse=True)
    qual = quality(out, lse, *dense)
    print(
        f"{type(selector).__name__:20s} computes {sel.density(True):.2f} of the causal pairs: "
        f"relative error {qual['rel_error']:.3f}, attention mass kept {qual['recall']:.3f}"
    )
    torch.testing.assert_close(out.isfinite().all(), torch.tensor(True))
