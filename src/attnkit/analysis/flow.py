r"""Attention rollout and attention flow (Abnar and Zuidema, *Quantifying Attention Flow in Transformers*, 2020).

Both read a layer's attention as a graph between its input and output tokens. With the residual connection
each layer's head-averaged map becomes :math:`\tilde A_l = \frac12 \bar A_l + \frac12 I`, rows normalised
(``residual=False`` uses :math:`\bar A_l`). Grouped KV heads need nothing special: the maps are per query head.
A causal map is lower-triangular, so neither lets a token draw from later tokens.

- **Rollout**: :math:`R = \tilde A_L \cdots \tilde A_1`; ``R[i, j]`` is how much output token ``i`` draws from
  input token ``j`` when mixing is linear.
- **Flow**: the maximum flow from input node ``j`` (layer 0) to output node ``i`` (layer ``L``) on the layered
  graph whose edge from ``(l, j)`` to ``(l + 1, i)`` has capacity :math:`\tilde A_l[i, j]`. The reference code
  runs one networkx max-flow per pair on the whole ``(L + 1) N``-node graph; here each pair runs Dinic's
  algorithm (exact, float capacities) on the pair's own subgraph: only nodes reachable from ``j`` and reaching
  ``i`` (under a causal mask, tokens between ``j`` and ``i``), found once per source and sink by matrix
  products. The float64 Edmonds-Karp of :mod:`attnkit.reference.analysis` is the oracle.

The maps come from :func:`attention_maps` (exact rows through :func:`~attnkit.analysis.capture`, for short
inputs: this is the one tool here that holds ``N x N`` per head, because rollout is defined on it).
"""

from __future__ import annotations

from collections import deque

import torch

from ..errors import ShapeError, bad
from .observer import Statistics, capture
from .scores import register_tool


def attention_maps(model, ids, attention_mask=None) -> list[torch.Tensor]:
    """Every layer's ``(B, H, N, N)`` probabilities, captured exactly (short inputs; N x N per head)."""
    cfg = model.config.get_text_config()
    L, H = cfg.num_hidden_layers, cfg.num_attention_heads
    maps = {(layer, h): None for layer in range(L) for h in range(H)}
    with capture(model, Statistics(maps=maps)) as cap, torch.no_grad():
        model(input_ids=ids, attention_mask=attention_mask)
    return [torch.stack([cap.map(layer, h) for h in range(H)], 1) for layer in range(L)]


def _mixing(maps, residual: bool) -> list[torch.Tensor]:
    if not maps:
        raise ShapeError(bad("maps", "a non-empty list of (B, H, N, N) maps", "[]"))
    out = []
    for i, A in enumerate(maps):
        if A.dim() != 4 or A.shape[-1] != A.shape[-2]:
            raise ShapeError(bad(f"maps[{i}]", "(B, H, N, N)", tuple(A.shape)))
        a = A.to(torch.float64).mean(1)
        if residual:
            a = 0.5 * a + 0.5 * torch.eye(a.shape[-1], dtype=torch.float64)
            a = a / a.sum(-1, keepdim=True).clamp_min(1e-300)
        out.append(a)
    return out


def rollout(maps, *, residual: bool = True) -> torch.Tensor:
    """``(B, N, N)`` attention rollout of ``maps`` (``L`` tensors ``(B, H, N, N)``, first layer first)."""
    R = None
    for a in _mixing(maps, residual):
        R = a if R is None else a @ R
    return R


def attention_flow(maps, *, residual: bool = True) -> torch.Tensor:
    """``(B, N, N)``: the max-flow from input token ``j`` (column) to output token ``i`` (row) through every layer."""
    mix = _mixing(maps, residual)
    B, N, _ = mix[0].shape
    L = len(mix)
    out = torch.zeros(B, N, N, dtype=torch.float64)
    for b in range(B):
        caps = [a[b].T.contiguous() for a in mix]  # caps[l][j, i]: edge (l, j) -> (l + 1, i)
        pos = [c > 0 for c in caps]
        # fwd[l][j]: tokens of layer l reachable from each input token; back[l][i]: those reaching output i
        fwd = [torch.eye(N, dtype=torch.bool)]
        for p in pos:
            fwd.append((fwd[-1].double() @ p.double()) > 0)
        back = [torch.eye(N, dtype=torch.bool)]
        for p in reversed(pos):
            back.append((back[-1].double() @ p.double().T) > 0)
        back.reverse()
        for j in range(N):
            for i in range(N):
                if not fwd[L][j, i]:
                    continue
                keep = [fwd[layer][j] & back[layer][i] for layer in range(L + 1)]
                out[b, i, j] = _dinic_layered(caps, keep)
    return out


def _dinic_layered(caps, keep) -> float:
    """Max-flow from the single kept node of layer 0 to the single kept node of the last layer."""
    ids, nodes = {}, []
    for layer, k in enumerate(keep):
        for t in k.nonzero().flatten().tolist():
            ids[(layer, t)] = len(nodes)
            nodes.append((layer, t))
    n = len(nodes)
    graph: list[list[int]] = [[] for _ in range(n)]
    to, cap = [], []

    def edge(u, v, c):
        graph[u].append(len(to))
        to.append(v)
        cap.append(c)
        graph[v].append(len(to))
        to.append(u)
        cap.append(0.0)

    for layer in range(len(caps)):
        src = keep[layer].nonzero().flatten().tolist()
        dst = keep[layer + 1].nonzero().flatten().tolist()
        if not src or not dst:
            return 0.0
        sub = caps[layer][src][:, dst].tolist()
        for a, row in zip(src, sub, strict=True):
            for c_, v in zip(dst, row, strict=True):
                if v > 0:
                    edge(ids[(layer, a)], ids[(layer + 1, c_)], v)
    s, t = 0, n - 1
    total = 0.0
    eps = 1e-15
    while True:
        level = [-1] * n
        level[s] = 0
        q = deque([s])
        while q:
            u = q.popleft()
            for e in graph[u]:
                if cap[e] > eps and level[to[e]] < 0:
                    level[to[e]] = level[u] + 1
                    q.append(to[e])
        if level[t] < 0:
            return total
        it = [0] * n

        def push(u, f, it=it, level=level):
            if u == t:
                return f
            while it[u] < len(graph[u]):
                e = graph[u][it[u]]
                v = to[e]
                if cap[e] > eps and level[v] == level[u] + 1:
                    got = push(v, min(f, cap[e]), it, level)
                    if got > 0:
                        cap[e] -= got
                        cap[e ^ 1] += got
                        return got
                it[u] += 1
            return 0.0

        while True:
            f = push(s, float("inf"))
            if f <= 0:
                break
            total += f


for _name, _fn, _summary in (
    ("attention_rollout", rollout, "products of residual-mixed, head-averaged maps across layers"),
    ("attention_flow", attention_flow, "exact max-flow from each input token to each output token"),
):
    register_tool(
        _name, _fn, paper="Quantifying Attention Flow in Transformers (Abnar and Zuidema, 2020)", summary=_summary
    )
