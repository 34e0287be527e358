"""Float64 references of the encoder token-pruning rules (attnkit.hf.encoder_prune), written from the formulas.

Each takes plain tensors (a BERT layer's weights, hidden states) and builds what it needs explicitly: the full
``softmax(Q K^T / sqrt(d))`` map and its [CLS] row, per-row top-k by sorting, the HiRED budget split by exact
proportions, VMTC's cluster means by loops. It imports no implementation.
"""

from __future__ import annotations

import math

import torch


def attention_map(wq, bq, wk, bk, heads, h, real=None, log_size=None):
    """Full attention (B, H, N, N) in float64 of one BERT self-attention on hidden states ``h`` (B, N, D)."""
    wq, bq, wk, bk, h = (t.detach().double() for t in (wq, bq, wk, bk, h))
    B, N, D = h.shape
    d = D // heads
    q = (h @ wq.T + bq).view(B, N, heads, d).transpose(1, 2)
    k = (h @ wk.T + bk).view(B, N, heads, d).transpose(1, 2)
    s = q @ k.transpose(-1, -2) / math.sqrt(d)
    if log_size is not None:
        s = s + log_size.double()[:, None, None, :]
    if real is not None:
        s = s.masked_fill(~real[:, None, None, :], float("-inf"))
    return torch.softmax(s, -1)


def cls_attention(wq, bq, wk, bk, heads, h, real=None, log_size=None):
    """Row 0 of the full map, averaged over heads (B, N)."""
    return attention_map(wq, bq, wk, bk, heads, h, real, log_size)[:, :, 0, :].mean(1)


def topk_positions(score, candidates, k):
    """The ``k`` candidate positions (a sorted list) with the highest score, by a full descending sort."""
    order = sorted(candidates, key=lambda j: -float(score[j]))
    return sorted(order[:k])


def hired_positions(alloc_score, score, candidates, parts, k):
    """HiRED: ``k`` split over ``parts`` equal contiguous chunks of ``candidates`` in proportion to each chunk's
    summed ``alloc_score`` (largest remainder, capped at chunk sizes), then the top of each chunk by ``score``."""
    n = len(candidates)
    chunks = [[c for i, c in enumerate(candidates) if (i * parts) // n == p] for p in range(parts)]
    w = [sum(float(alloc_score[c]) for c in ch) for ch in chunks]
    caps = [len(ch) for ch in chunks]
    budget = [0] * parts
    free, left = list(range(parts)), min(k, n)
    while left > 0 and free:
        tw = sum(w[i] for i in free)
        share = {i: left * w[i] / tw for i in free}
        over = [i for i in free if share[i] > caps[i] - budget[i]]
        if over:
            for i in over:
                left -= caps[i] - budget[i]
                budget[i] = caps[i]
            free = [i for i in free if budget[i] < caps[i]]
            continue
        base = {i: math.floor(share[i]) for i in free}
        rem = left - sum(base.values())
        for i in sorted(free, key=lambda i: (-(share[i] - base[i]), free.index(i)))[:rem]:
            base[i] += 1
        for i in free:
            budget[i] += base[i]
        left = 0
    out = []
    for ch, kp in zip(chunks, budget, strict=True):
        out += topk_positions(score, ch, kp)
    return sorted(out)


def vmtc_merge(h_out, keys, score, candidates, k):
    """VMTC: the top-``k`` candidates by ``score`` are centres; each other candidate joins the centre with the
    most cosine-similar key; each centre becomes the mean of its cluster's ``h_out`` rows. Returns
    ``{centre position: merged state (float64)}``."""
    centres = topk_positions(score, candidates, k)
    kd = keys.detach().double()
    members = {c: [c] for c in centres}
    for j in candidates:
        if j in members:
            continue
        sims = [float(kd[j] @ kd[c] / (kd[j].norm() * kd[c].norm())) for c in centres]
        members[centres[max(range(len(centres)), key=lambda i: sims[i])]].append(j)
    return {c: h_out.detach().double()[m].mean(0) for c, m in members.items()}


def flowcut_score(cls_att, value_sim, v_mean, candidates):
    """FlowCut's layer score on the candidates: (a / sum a + m / sum m) * ||mean-head value||_1."""
    a = torch.tensor([float(cls_att[j]) for j in candidates], dtype=torch.float64)
    m = torch.tensor([float(value_sim[j]) for j in candidates], dtype=torch.float64)
    n = torch.tensor([float(v_mean[j].double().abs().sum()) for j in candidates], dtype=torch.float64)
    return (a / a.sum() + m / m.sum()) * n


def window_similarity(h, candidates, window):
    """MustDrop: mean pairwise cosine similarity (self-pairs excluded) of each full window of ``window``
    consecutive candidates, in float64."""
    out = []
    for w in range(len(candidates) // window):
        x = h.double()[candidates[w * window : (w + 1) * window]]
        tot = 0.0
        for i in range(window):
            for j in range(window):
                if i != j:
                    tot += float(x[i] @ x[j] / (x[i].norm() * x[j].norm()))
        out.append(tot / (window * (window - 1)))
    return torch.tensor(out, dtype=torch.float64)


def vflowopt_importance(amap, candidates, info, t, alpha):
    """VFlowOpt: from the full (H, N, N) attention of one row, the head-mean map; global queries receive more
    than ``t`` times the mean received attention; importance of each candidate = mean attention the global
    queries give it + ``alpha`` * softmax over the candidates of ``info``. Returns a list over ``candidates``."""
    A = amap.detach().double().mean(0)
    N = A.shape[0]
    received = [float(A[:, j].sum()) / N for j in range(N)]
    mean = sum(received) / N
    glob = [i for i in range(N) if received[i] > t * mean] or list(range(N))
    z = [math.exp(float(info[j])) for j in candidates]
    return [
        sum(float(A[i, j]) for i in glob) / len(glob) + alpha * zj / sum(z) for j, zj in zip(candidates, z, strict=True)
    ]


def vflowopt_recycle(imp, candidates, positions, target, cell):
    """VFlowOpt's recycling, by counting: take the least important candidates one by one until (taken - their
    distinct ``position // cell`` groups) equals ``len(candidates) - target``; each group becomes one token at its
    most important member. Returns ``{head: [members]}``."""
    order = sorted(candidates, key=lambda j: (float(imp[j]), candidates.index(j)))
    need = len(candidates) - target
    taken, groups = [], {}
    for j in order:
        if len(taken) - len(groups) >= need:
            break
        taken.append(j)
        groups.setdefault(int(positions[j]) // cell, []).append(j)
    return {max(m, key=lambda j: float(imp[j])): sorted(m) for m in groups.values()}
