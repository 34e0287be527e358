"""Float64 references of the family-G interventions (attnkit.hf.steer), on the full probability matrix.

``attention(q, k, v, ...)`` builds the ``(B, Hq, Q, K)`` map with per-head temperatures and biases, applies the
probability edits by their formulas, and multiplies by ``v``. Positions are indices; the last ``Q`` of ``K``
positions are the queries.
"""

from __future__ import annotations

import torch


def probabilities(q, k, *, scale=None, causal=True, valid=None, temps=None, bias=None):
    q, k = q.double(), k.double()
    B, Hq, Q, D = q.shape
    G = Hq // k.shape[1]
    k = k.repeat_interleave(G, 1)
    K = k.shape[2]
    scale = D**-0.5 if scale is None else scale
    s = (q @ k.transpose(-1, -2)) * scale
    if temps is not None:
        t = temps.double()
        s = s * (t.view(1, Hq, 1, 1) if t.dim() == 1 else t.view(1, Hq, Q, 1))
    if bias is not None:
        s = s + bias.double()[None, :, None, :]
    allowed = torch.ones(B, 1, Q, K, dtype=torch.bool)
    if valid is not None:
        allowed = allowed & valid[:, None, None, :]
    if causal:
        allowed = allowed & torch.ones(Q, K, dtype=torch.bool).tril(K - Q)
    s = s.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(s, -1)
    return torch.nan_to_num(p, nan=0.0)


def act(p, heads_mask, *, beta, alpha, valid):
    """ACT on heads where ``heads_mask`` ``(Hq,)`` is True: columns above alpha / N (not the first real token)."""
    B, H, Q, K = p.shape
    out = p.clone()
    for b in range(B):
        n = int(valid[b].sum())
        first = int(valid[b].nonzero()[0])
        for h in range(H):
            if not heads_mask[h]:
                continue
            col = p[b, h].mean(0)
            sinks = [j for j in range(K) if col[j] > alpha / n and j != first]
            for i in range(Q):
                m = sum(float(p[b, h, i, s]) for s in sinks)
                for j in range(K):
                    if j in sinks:
                        out[b, h, i, j] = beta * p[b, h, i, j]
                    else:
                        out[b, h, i, j] = p[b, h, i, j] + (1 - beta) * m / max(1 - m, 1e-12) * p[b, h, i, j]
    return out


def var(p, heads_mask, *, span, rho, valid):
    B, H, Q, K = p.shape
    out = p.clone()
    for b in range(B):
        first = int(valid[b].nonzero()[0])
        for h in range(H):
            if not heads_mask[h]:
                continue
            for i in range(Q):
                tot = float(p[b, h, i, span[0] : span[1]].sum())
                if tot <= 0:
                    continue
                moved = rho * float(p[b, h, i, first])
                out[b, h, i, first] = p[b, h, i, first] - moved
                for j in range(span[0], min(span[1], K)):
                    out[b, h, i, j] = p[b, h, i, j] + moved * float(p[b, h, i, j]) / tot
    return out


def perturb(p, heads_mask, *, alpha):
    B, H, Q, K = p.shape
    eye = torch.zeros(Q, K, dtype=torch.float64)
    eye[torch.arange(Q), torch.arange(K - Q, K)] = 1
    a = alpha * heads_mask.double().view(1, H, 1, 1)
    return (1 - a) * p + a * eye


def knockout(p, *, span):
    """Queries outside ``span`` lose their attention to it; rows renormalised."""
    B, H, Q, K = p.shape
    out = p.clone()
    for i in range(Q):
        pos = K - Q + i
        if span[0] <= pos < span[1]:
            continue
        out[:, :, i, span[0] : span[1]] = 0
        out[:, :, i] = out[:, :, i] / out[:, :, i].sum(-1, keepdim=True)
    return out


def scale_heads(p, factors):
    """VHR: head ``h``'s probabilities (so its output) times ``factors[h]`` ``(Hq,)``."""
    return p * factors.double().view(1, -1, 1, 1)


def mask_tokens(p, *, span, drop):
    """CARVE: queries outside ``span`` lose their attention to the ``drop`` tokens; rows renormalised."""
    B, H, Q, K = p.shape
    out = p.clone()
    for i in range(Q):
        pos = K - Q + i
        if span[0] <= pos < span[1]:
            continue
        for t in drop:
            out[:, :, i, t] = 0
        tot = out[:, :, i].sum(-1, keepdim=True)
        out[:, :, i] = torch.where(tot > 0, out[:, :, i] / tot.clamp_min(1e-300), out[:, :, i])
    return out


def output(p, v):
    G = p.shape[1] // v.shape[1]
    return p @ v.double().repeat_interleave(G, 1)
