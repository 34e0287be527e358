"""Float64 attention statistics and head scores from full probability maps (family H): the truth for
:mod:`attnkit.analysis`, written on the ``(B, H, N, N)`` map that the analysis itself never builds.

Every function takes ``maps``: a list over layers of ``(B, H, Nq, Nk)`` probabilities (the last ``Nq`` of ``Nk``
positions are the queries), and ``counted`` ``(B, Nq)`` bool, the queries averaged over. Positions are indices.
"""

from __future__ import annotations

import torch


def _mean(x: torch.Tensor, counted: torch.Tensor) -> torch.Tensor:
    """Mean over the query axis (-1 of ``(B, H, Nq)``) of the counted queries: ``(B, H)``."""
    w = counted.to(torch.float64)[:, None, :]
    return (x * w).sum(-1) / w.sum(-1).clamp_min(1)


def statistics(maps, counted, *, first=1, window=16, offsets=(1,), causal=True, groups=None, pooled=0, real=None):
    """``{name: (B, L, H, ...)}`` of :class:`attnkit.analysis.Statistics`, from the full maps, by definition.

    ``real`` ``(B, Nk)`` bool marks the real (unpadded) tokens (None: all)."""
    out: dict = {k: [] for k in ("entropy", "first_mass", "local_mass", "distance", "columns", "group", "pooled")}
    out.update({f"offset_{d}": [] for d in offsets})
    for A in maps:
        A = A.to(torch.float64)
        B, H, Nq, Nk = A.shape
        q0 = Nk - Nq
        real_ = torch.ones(B, Nk, dtype=torch.bool) if real is None else real
        i = torch.arange(q0, Nk)[:, None]
        j = torch.arange(Nk)[None, :]
        d = i - j
        logs = torch.where(A > 0, A.log(), torch.zeros_like(A))
        out["entropy"].append(_mean(-(A * logs).sum(-1), counted))
        firsts = []
        for b in range(B):
            idx = real_[b].nonzero().flatten()[:first]
            firsts.append(A[b][..., idx].sum(-1))
        out["first_mass"].append(_mean(torch.stack(firsts), counted))
        near = (d >= 0) & (d < window) if causal else d.abs() < window
        out["local_mass"].append(_mean((A * near).sum(-1), counted))
        for o in offsets:
            out[f"offset_{o}"].append(_mean((A * (d == o)).sum(-1), counted))
        edges = [0, 1]
        while edges[-1] * 2 < Nk:
            edges.append(edges[-1] * 2)
        his = edges[1:] + [Nk + 1]
        out["distance"].append(
            torch.stack(
                [_mean((A * ((d >= lo) & (d < hi))).sum(-1), counted) for lo, hi in zip(edges, his, strict=True)], -1
            )
        )
        w = counted.to(torch.float64)
        out["columns"].append((A * w[:, None, :, None]).sum(2) / w.sum(-1).clamp_min(1)[:, None, None])
        if groups is not None:
            n_g = int(groups.max()) + 1
            gm = torch.zeros(B, H, n_g, n_g, dtype=torch.float64)
            for a in range(n_g):
                for c in range(n_g):
                    for b in range(B):
                        qs = (groups[b, q0:] == a) & counted[b]
                        ks = groups[b] == c
                        if qs.any():
                            gm[b, :, a, c] = A[b][:, qs][:, :, ks].sum(-1).mean(-1)
            out["group"].append(gm)
        if pooled:
            R = pooled
            pm = torch.zeros(B, H, R, R, dtype=torch.float64)
            for b in range(B):
                pos = real_[b].long().cumsum(0) - 1
                n = int(real_[b].sum())
                kbin = torch.where(real_[b], pos * R // n, torch.full_like(pos, -1))
                qbin = kbin[q0:]
                for a in range(R):
                    qs = (qbin == a) & counted[b]
                    if not qs.any():
                        continue
                    for c in range(R):
                        pm[b, :, a, c] = A[b][:, qs][:, :, kbin == c].sum(-1).mean(-1)
            out["pooled"].append(pm)
    return {k: torch.stack(v, 1) for k, v in out.items() if v and k != "columns"} | {"columns": out["columns"]}


def rollout(maps, *, residual: bool = True) -> torch.Tensor:
    r"""Attention rollout (Abnar and Zuidema, 2020) by its definition: :math:`\tilde A_l = \frac12 (\bar A_l + I)`
    (row-normalised) with :math:`\bar A_l` the head mean, and :math:`R = \tilde A_L \cdots \tilde A_1`.
    ``maps``: ``L`` tensors ``(B, H, N, N)``; returns ``(B, N, N)``."""
    R = None
    for A in maps:
        a = A.to(torch.float64).mean(1)
        if residual:
            a = 0.5 * a + 0.5 * torch.eye(a.shape[-1], dtype=torch.float64)
            a = a / a.sum(-1, keepdim=True)
        R = a if R is None else a @ R
    return R


def attention_flow(maps, *, residual: bool = True) -> torch.Tensor:
    r"""Attention flow (Abnar and Zuidema, 2020) as the reference code computes it: one max-flow per (output,
    input) pair on the layered graph whose edge from node ``(l, j)`` to ``(l + 1, i)`` has capacity
    :math:`\tilde A_l[i, j]`, here with a plain Edmonds-Karp on float capacities (no networkx). ``(B, N, N)``:
    row ``i`` (output token at the last layer), column ``j`` (input token)."""
    L = len(maps)
    B, _, N, _ = maps[0].shape
    out = torch.zeros(B, N, N, dtype=torch.float64)
    for b in range(B):
        caps = []
        for A in maps:
            a = A[b].to(torch.float64).mean(0)
            if residual:
                a = 0.5 * a + 0.5 * torch.eye(N, dtype=torch.float64)
                a = a / a.sum(-1, keepdim=True)
            caps.append(a)
        n_nodes = (L + 1) * N
        cap = torch.zeros(n_nodes, n_nodes, dtype=torch.float64)
        for layer, a in enumerate(caps):
            lo, hi = layer * N, (layer + 1) * N
            cap[lo : lo + N, hi : hi + N] = a.T  # from input j (row) to output i (column)
        for i in range(N):
            for j in range(N):
                out[b, i, j] = _edmonds_karp(cap, j, L * N + i)
    return out


def _edmonds_karp(cap: torch.Tensor, s: int, t: int) -> float:
    c = cap.clone().tolist()
    n = len(c)
    total = 0.0
    while True:
        parent = [-1] * n
        parent[s] = s
        queue = [s]
        for u in queue:
            for v in range(n):
                if parent[v] < 0 and c[u][v] > 1e-15:
                    parent[v] = u
                    queue.append(v)
            if parent[t] >= 0:
                break
        if parent[t] < 0:
            return total
        f, v = float("inf"), t
        while v != s:
            f = min(f, c[parent[v]][v])
            v = parent[v]
        v = t
        while v != s:
            u = parent[v]
            c[u][v] -= f
            c[v][u] += f
            v = u
        total += f
