"""Float64 reference of the Expected Attention scorer (attnkit.hf.ExpectedAttention), with explicit matrices.

The rotation of each future position is built as a ``D x D`` matrix, averaged, and applied to the mean and
covariance of the un-rotated queries, as the formula in the scorer's docstring reads.
"""

from __future__ import annotations

import math

import torch


def rotation(pos: float, inv_freq: torch.Tensor) -> torch.Tensor:
    """The ``D x D`` RoPE matrix of position ``pos`` (transformers' rotate-half layout)."""
    half = len(inv_freq)
    D = 2 * half
    R = torch.zeros(D, D, dtype=torch.float64)
    for i, f in enumerate(inv_freq.double().tolist()):
        c, s = math.cos(pos * f), math.sin(pos * f)
        R[i, i], R[i, i + half] = c, -s
        R[i + half, i], R[i + half, i + half] = s, c
    return R


def scores(q, q_pos, k, v, k_pos, inv_freq, *, future=512, sinks=4, covariance=True, value_norm=True):
    """One batch row and KV head: ``q (G, Q, D)`` rotated at ``q_pos (Q,)``, ``k, v (T, D)``, ``k_pos (T,)``."""
    q, k, v = q.double(), k.double(), v.double()
    G, Q, D = q.shape
    raw = torch.stack(
        [torch.stack([rotation(float(p), inv_freq).T @ q[g, i] for i, p in enumerate(q_pos)]) for g in range(G)]
    )
    raw = raw[:, sinks:] if Q > sinks else raw
    last = float(max(q_pos))
    Rbar = sum(rotation(last + t, inv_freq) for t in range(1, future + 1)) / future
    out = torch.zeros(G, k.shape[0], dtype=torch.float64)
    for g in range(G):
        mu = raw[g].mean(0)
        logit = (k @ (Rbar @ mu)) / math.sqrt(D)
        if covariance and raw.shape[1] > 1:
            c = raw[g] - mu
            S = Rbar @ (c.T @ c / raw.shape[1]) @ Rbar.T
            logit = logit + torch.stack([kj @ S @ kj for kj in k]) / (2 * D)
        out[g] = torch.softmax(logit, 0)
    score = out.mean(0)
    if value_norm:
        score = score * v.norm(dim=-1)
    return score.masked_fill(k_pos < sinks, float("inf"))
