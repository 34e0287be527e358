"""Float64 references of the family-E policies that change attention or the cached entries themselves:
TidalDecode's selection and sparse step, LOOK-M's merge, HACK's head classifier and Video-XL-2's chunked
attention. Plain loops and full masks, one batch row at a time; the policies in :mod:`attnkit.hf` are checked
against them.
"""

from __future__ import annotations

import math

import torch


def tidal_select(q, k, n):
    """Per query head: indices of the ``n - 1`` largest logits over the previous keys, plus the current one.

    ``q (Hq, D)`` the decode query, ``k (Hq, T, D)`` its keys (GQA groups repeated)."""
    q, k = q.double(), k.double()
    T = k.shape[1]
    out = []
    for h in range(q.shape[0]):
        logits = k[h, :-1] @ q[h]
        order = sorted(range(T - 1), key=lambda j: -float(logits[j]))[: n - 1]
        out.append(sorted(order) + [T - 1])
    return out


def attention_at(q, k, v, positions, scale):
    """Per query head: softmax attention of ``q[h] (D,)`` over ``k[h], v[h]`` at ``positions[h]`` only."""
    out = []
    for h, pos in enumerate(positions):
        kk, vv = k[h, pos].double(), v[h, pos].double()
        p = torch.softmax(kk @ q[h].double() * scale, 0)
        out.append(p @ vv)
    return torch.stack(out)


def lookm_merge(k, v, valid, keep, how):
    """One KV head and batch row: ``k, v (T, D)``, ``valid (T,)``, sorted kept indices; returns merged kept k, v."""
    k, v = k.double(), v.double()
    keep = [int(i) for i in keep]
    ks, vs = k[keep].clone(), v[keep].clone()
    num_k, num_v = ks.clone(), vs.clone()
    den = [1.0] * len(keep)
    targets = [i for i, j in enumerate(keep) if bool(valid[j])]
    for e in range(k.shape[0]):
        if e in keep or not bool(valid[e]) or not targets:
            continue
        sims = [float(k[e] @ ks[i] / (k[e].norm() * ks[i].norm())) for i in targets]
        i = targets[max(range(len(targets)), key=lambda t: sims[t])]
        best = max(sims)
        if how == "average":
            w, sk, sv = 1.0, k[e], v[e]
        elif how == "pivotal":
            w, sk, sv = 1.0, (k[e] + ks[i]) / 2, (v[e] + vs[i]) / 2
        else:
            w, sk, sv = max(best, 0.0), k[e], v[e]
        num_k[i] += w * sk
        num_v[i] += w * sv
        den[i] += w
    d = torch.tensor(den, dtype=torch.float64)[:, None]
    return num_k / d, num_v / d


def band_share(p, q_pos, k_pos, reach):
    """Share of the attention ``p (Q, T)`` of queries at ``q_pos`` on keys within ``reach`` of the last query."""
    p = p.double()
    last = int(max(q_pos))
    near = torch.tensor([int(j) > last - reach for j in k_pos])
    return float(p[:, near].sum() / p.sum())


def chunked_attention(q, k, v, *, chunk, keep, window, prompt, reload=0, scale=None):
    """Video-XL-2's chunked attention for one batch row and every query at once, with a full ``(T, T)`` mask.

    ``q (Hq, T, D)``, ``k, v (Hkv, T, D)``. Queries before ``prompt`` are prefill (sparse across chunks); the
    queries from ``prompt`` on form one task step, which reloads the ``reload`` chunks most relevant to it."""
    q, k, v = q.double(), k.double(), v.double()
    Hq, T, D = q.shape
    Hkv = k.shape[0]
    G = Hq // Hkv
    scale = D**-0.5 if scale is None else scale
    n_chunks = T // chunk
    sparse = {}  # (h, c) -> set of positions
    mean = {}
    for c in range(n_chunks):
        lo, hi = c * chunk, (c + 1) * chunk
        for h in range(Hkv):
            votes = torch.zeros(chunk, dtype=torch.float64)
            for g in range(G):
                for i in range(hi - min(window, chunk), hi):
                    logits = k[h, lo : i + 1] @ q[h * G + g, i] * scale
                    votes[: i + 1 - lo] += torch.softmax(logits, 0)
            sparse[h, c] = {lo + int(j) for j in votes.topk(keep).indices}
            mean[h, c] = k[h, lo:hi].mean(0)
    out = torch.zeros(Hq, T, v.shape[-1], dtype=torch.float64)
    for h in range(Hkv):
        dense = set()
        if T > prompt and reload:
            first = prompt // chunk  # the chunk the task step starts in
            rel = [
                max(float(q[h * G + g, i] @ mean[h, c]) for g in range(G) for i in range(prompt, T))
                for c in range(first)
            ]
            dense = set(sorted(range(first), key=lambda c: -rel[c])[:reload])
        for g in range(G):
            for i in range(T):
                c = i // chunk
                allowed = torch.zeros(T, dtype=torch.bool)
                allowed[c * chunk : i + 1] = True
                for cc in range(c):
                    if i >= prompt and cc in dense:
                        allowed[cc * chunk : (cc + 1) * chunk] = True
                    else:
                        allowed[list(sparse[h, cc])] = True
                logits = (k[h] @ q[h * G + g, i] * scale).masked_fill(~allowed, -math.inf)
                out[h * G + g, i] = torch.softmax(logits, 0) @ v[h]
    return out
