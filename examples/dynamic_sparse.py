"""Dynamic sparse attention on real SmolLM2 q, k, v: select, attend, and measure what the selection kept.

SeerAttention is shown twice: training-free (pooled queries and keys), and with its gate fitted by
self-distillation on other text (held out: tokens 8192 on) before it is judged here. At 1k tokens the two are
about equal (the fitted gate 0.10 against 0.097 relative error here); the fitted gate pays at long range, where
attention reaches far back: at 16k and a 1/8 budget it takes the error from 5.4% to 4.7% (BENCHMARKS.md).

Run: .venv/bin/python examples/dynamic_sparse.py  (the first run captures the tensors, about 30 s)
"""

import torch

from attnkit import sparse_attention
from attnkit.bench.dynamic import dense_reference, quality
from attnkit.models import capture_qkv
from attnkit.sparse import (
    HierarchicalPruning,
    MoBA,
    SeerAttention,
    SeerGate,
    VerticalSlash,
    fit_gate,
)

q, k, v = capture_qkv(1024)[12]  # (1, 9, 1024, 64) queries, (1, 3, 1024, 64) keys and values: GQA
dense = dense_reference(q, k, v)

# SeerAttention's gate, trained on the model's own attention over other text (the base model is untouched).
q_train, k_train, _ = capture_qkv(1024, start=8192)[12]
gate = SeerGate(heads=9, head_dim=64, query_pool=16)
losses = fit_gate(gate, [(q_train, k_train)], block_size=(64, 16), steps=60, lr=3e-3, target="mass")
print(f"fit_gate: distillation loss {losses[0]:.3f} -> {losses[-1]:.3f}")

# 64-query blocks choosing keys in 16-key tiles; the budget is spent across every head and row of the layer. At
# 1k tokens the registry's forced local window (keep_local=4) would fill most rows' budget by itself; here only the
# first tile and the diagonal are forced, so the gate chooses the rest.
seer = dict(block_size=(64, 16), budget=0.25, allocate="layer", keep_first=1)
for name, selector in (
    ("MoBA", MoBA(block_size=64, budget=0.25, keep_first=1)),
    ("HiP", HierarchicalPruning(block_size=64, budget=0.25, keep_first=1)),
    ("VerticalSlash", VerticalSlash(budget=0.25)),
    ("Seer, training-free", SeerAttention(None, query_pool=16, **seer)),
    ("Seer, fitted gate", SeerAttention(gate, **seer)),
):
    with torch.no_grad():
        sel = selector.select(q, k, v, causal=True)  # the selector's cost, timed apart from the attention
    out, lse = sparse_attention(q, k, v, sel, causal=True, return_lse=True)
    qual = quality(out, lse, *dense)
    print(
        f"{name:20s} computes {sel.density(True):.2f} of the causal pairs: "
        f"relative error {qual['rel_error']:.3f}, attention mass kept {qual['recall']:.3f}"
    )
    torch.testing.assert_close(out.isfinite().all(), torch.tensor(True))
