"""attnkit's exact attention flow against the reference method (networkx max-flow per pair on the whole
layered graph, as samiraabnar/attention_flow computes it), on MiniLM's real maps.

attnkit does not depend on networkx; this measurement installs it into a side folder first:

    .venv/bin/pip install --target /tmp/nxlib networkx
    .venv/bin/python scripts/flow_vs_networkx.py
"""

import sys
import time

sys.path.insert(0, "/tmp/nxlib")
import networkx as nx  # noqa: E402
import torch  # noqa: E402

from attnkit.analysis import attention_flow, attention_maps  # noqa: E402
from attnkit.models import english_text, load_minilm  # noqa: E402

model, tok = load_minilm()
for n in (12, 24):
    ids = tok(english_text()[:2000], return_tensors="pt", truncation=True, max_length=n).input_ids
    maps = attention_maps(model, ids)
    N, L = ids.shape[1], len(maps)
    t = time.perf_counter()
    ours = attention_flow(maps)[0]
    t_ours = time.perf_counter() - t
    # the reference: Abnar & Zuidema's graph, one nx.maximum_flow_value per (output, input) pair
    G = nx.DiGraph()
    for l, A in enumerate(maps):
        a = 0.5 * A[0].double().mean(0) + 0.5 * torch.eye(N, dtype=torch.float64)
        a = a / a.sum(-1, keepdim=True)
        for i in range(N):
            for j in range(N):
                if a[i, j] > 0:
                    G.add_edge((l, j), (l + 1, i), capacity=float(a[i, j]))
    t = time.perf_counter()
    ref = torch.zeros(N, N, dtype=torch.float64)
    for i in range(N):
        for j in range(N):
            ref[i, j] = nx.maximum_flow_value(G, (0, j), (L, i))
    t_nx = time.perf_counter() - t
    print(
        print(
            f"N={N} L={L}: attnkit {t_ours:.2f} s, networkx {t_nx:.2f} s ({t_nx / t_ours:.1f}x), "
            f"max |diff| {(ours - ref).abs().max().item():.2e}"
        )
    )
