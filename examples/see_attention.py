"""What attnkit shows today: which backend a call runs on and why (``explain``), what a pattern computes (its
mask as a picture, its density), and what the registry holds (what ``attnkit list`` prints).

Run: .venv/bin/python examples/see_attention.py
"""

import torch

import attnkit as ak
from attnkit import registry

q = torch.randn(1, 8, 4096, 64)
k, v = torch.randn(1, 2, 4096, 64), torch.randn(1, 2, 4096, 64)
sinks_and_window = ak.patterns.AShape(sinks=4, window=256)  # StreamingLLM's A-shape

# Inference and training can run on different backends: explain says which, and why not the others.
print(ak.explain(q, k, v, pattern=sinks_and_window))
print(ak.explain(q.requires_grad_(), k, v, pattern=sinks_and_window))

# The same rule on 12 tokens, drawn as text: row = query, column = key, # = attends.
small = ak.patterns.AShape(sinks=2, window=3)
mask = small.dense_mask(12, 12)[0]
print("\n".join("".join("#" if x else "." for x in row) for row in mask.tolist()))
print(f"density at 12 tokens {small.density(12, 12):.3f}, at 4096 {sinks_and_window.density(4096, 4096):.4f}")

# The registry: every mechanism, by family (the gallery of the documentation site is generated from it).
for family in sorted({r.family for r in registry.records()}):
    recs = registry.records(family=family)
    exact = sum(r.exact for r in recs)
    print(f"family {family}: {len(recs)} records ({exact} exact):", ", ".join(r.name for r in recs))
