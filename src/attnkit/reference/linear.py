"""Naive, quadratic references of the linear / re-normalised family (C).

Each builds the explicit ``N x N`` weight matrix (or loops token by token) in ``dtype`` (float64 by default),
by a route independent of the fast forms in :mod:`attnkit.linear`, so a shared mistake cannot hide.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# The named feature maps, written here so that the oracle never runs the implementation's code.
_NAMED_MAPS = {
    "elu+1": lambda x, is_query: F.elu(x) + 1,
    "relu": lambda x, is_query: F.relu(x),
    "identity": lambda x, is_query: x,
}


def _feature_map(feature_map):
    """A named map's own definition, or the given map object (a learnable map is an argument, not code)."""
    if isinstance(feature_map, str):
        return _NAMED_MAPS[feature_map]
    return feature_map


def _cast(dtype, *ts):
    return [t.to(dtype) for t in ts]


def _expand(g, *ts):
    return [t.repeat_interleave(g, 1) for t in ts]


def _visible(nq, nk, causal, kpm, device):
    keep = torch.ones(nq, nk, dtype=torch.bool, device=device)
    if causal:
        keep = torch.tril(keep)
    keep = keep[None, None]
    if kpm is not None:
        keep = keep & kpm[:, None, None, :]
    return keep


def linear_attention(
    q,
    k,
    v,
    *,
    feature_map="elu+1",
    decay=None,
    normalize=True,
    causal=True,
    key_padding_mask=None,
    scale=None,
    dtype=torch.float64,
):
    """Naive kernelised attention: the weights ``w_ij = gamma^(i-j) c phi(q_i).phi(k_j)`` written out, then the
    normaliser's weights (see :mod:`attnkit.linear.engine`) times ``V``."""
    fmap = _feature_map(feature_map)
    g = q.shape[1] // k.shape[1]
    qd, kd, vd = _cast(dtype, q, k, v)
    kd, vd = _expand(g, kd, vd)
    qf, kf = fmap(qd, True), fmap(kd, False)
    if scale is not None:
        qf = qf * scale
    nq, nk = q.shape[2], k.shape[2]
    keep = _visible(nq, nk, causal, key_padding_mask, q.device).to(dtype)
    if decay is not None:
        gam = torch.as_tensor(decay, dtype=dtype).expand(q.shape[1]).view(-1, 1, 1)
        i = torch.arange(nq, dtype=dtype)[:, None]
        j = torch.arange(nk, dtype=dtype)[None, :]
        keep = keep * torch.pow(gam, (i - j).clamp(min=0))
    w = (qf @ kf.transpose(-1, -2)) * keep
    z = w.sum(-1, keepdim=True)
    n = keep.sum(-1, keepdim=True)
    tiny = torch.finfo(dtype).tiny
    if normalize is True:
        weights = w / z.clamp_min(tiny)
    elif normalize is False or normalize == "rms":
        weights = w
    elif normalize == "inline":
        weights = w - z * keep / n.clamp_min(tiny) + keep / n.clamp_min(tiny)
    else:  # mala
        weights = (1 + 1 / z.clamp_min(tiny)) * w - (z / n.clamp_min(tiny)) * keep
    out = weights @ vd
    if normalize == "rms":
        out = out / torch.sqrt(out.pow(2).mean(-1, keepdim=True) + 1e-6)
    return out


def flow_attention(q, k, v, *, causal=False, key_padding_mask=None, eps=1e-6, dtype=torch.float64):
    """Naive Flowformer: flows, conservation, competition and allocation with explicit masked matrices."""
    g = q.shape[1] // k.shape[1]
    qd, kd, vd = _cast(dtype, q, k, v)
    kd, vd = _expand(g, kd, vd)
    pq, pk = torch.sigmoid(qd), torch.sigmoid(kd)
    nq, nk = q.shape[2], k.shape[2]
    keep = _visible(nq, nk, causal, key_padding_mask, q.device).to(dtype)  # (B?, 1, nq, nk): sink i, source j
    flow = (pq @ pk.transpose(-1, -2)) * keep  # capacity of the edge source j -> sink i
    incoming = flow.sum(-1) + eps  # I_i
    if causal:
        # a source's outgoing flow goes to the sinks up to its own position
        out_flow = (pk @ pq.transpose(-1, -2)) * torch.tril(torch.ones(nk, nq, dtype=dtype))
        outgoing = out_flow.sum(-1) + eps
        pos = torch.arange(1, nq + 1, dtype=dtype)
        c_sink = (flow * (pos / outgoing)[..., None, :]).sum(-1) / pos
        c_source = (out_flow * (pos / incoming)[..., None, :]).sum(-1) / pos
        e = torch.exp(c_source)
        comp = e / torch.cumsum(e, -1) * pos
        alloc = torch.sigmoid(c_sink)
    else:
        outgoing = (pk @ pq.transpose(-1, -2)).sum(-1) + eps  # O_j: to every sink
        kmask = keep[..., 0, :]  # (B?, 1, nk)
        c_sink = (flow / outgoing[..., None, :]).sum(-1)
        c_source = ((pk @ pq.transpose(-1, -2)) / incoming[..., None, :]).sum(-1)
        m = kmask.sum(-1, keepdim=True)
        comp = torch.softmax(c_source.masked_fill(kmask == 0, float("-inf")), -1) * m
        alloc = torch.sigmoid(c_sink * nq / m)
    return (flow / incoming[..., None]) @ (vd * comp[..., None]) * alloc[..., None]


def agent_attention(q, k, v, agents, *, agent_bias=None, query_bias=None, scale=None, dtype=torch.float64):
    """Naive Agent Attention: ``softmax(Q A^T s + bq) softmax(A K^T s + ba) V``."""
    g = q.shape[1] // k.shape[1]
    qd, kd, vd, ad = _cast(dtype, q, k, v, agents)
    kd, vd = _expand(g, kd, vd)
    s = q.shape[-1] ** -0.5 if scale is None else scale
    la = ad @ kd.transpose(-1, -2) * s
    if agent_bias is not None:
        la = la + agent_bias.to(dtype)
    va = torch.softmax(la, -1) @ vd
    lq = qd @ ad.transpose(-1, -2) * s
    if query_bias is not None:
        lq = lq + query_bias.to(dtype)
    return torch.softmax(lq, -1) @ va


def rat_attention(q, k, v, forget, *, chunk_size=16, scale=None, dtype=torch.float64):
    """Naive RAT: the gated recurrence token by token, then each query's softmax over the final states of the
    earlier chunks and its own running state."""
    g = q.shape[1] // k.shape[1]
    qd, kd, vd, fd = _cast(dtype, q, k, v, forget)
    kd, vd, fd = _expand(g, kd, vd, fd)
    n = q.shape[2]
    s = q.shape[-1] ** -0.5 if scale is None else scale
    ks, vs = torch.zeros_like(kd), torch.zeros_like(vd)
    hk, hv = torch.zeros_like(kd[:, :, 0]), torch.zeros_like(vd[:, :, 0])
    for t in range(n):
        if t % chunk_size == 0:
            hk, hv = hk * 0, hv * 0
        f = fd[:, :, t]
        hk = f * hk + (1 - f) * kd[:, :, t]
        hv = f * hv + (1 - f) * vd[:, :, t]
        ks[:, :, t], vs[:, :, t] = hk, hv
    # key j is usable by query i when it is i itself (own running state) or the last token of an earlier chunk
    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    last = (j % chunk_size == chunk_size - 1) & (j // chunk_size < i // chunk_size)
    keep = (i == j) | last
    logits = (qd @ ks.transpose(-1, -2) * s).masked_fill(~keep, float("-inf"))
    return torch.softmax(logits, -1) @ vs


def local_linear_attention(q, k, v, *, causal=True, ridge=1.0, scale=None, dtype=torch.float64):
    """Naive Local Linear Attention: per query, the kernel-weighted ridge regression of ``v`` on ``[1, k - q]``
    solved jointly for intercept and slope (normal equations); the output is the intercept."""
    g = q.shape[1] // k.shape[1]
    qd, kd, vd = _cast(dtype, q, k, v)
    kd, vd = _expand(g, kd, vd)
    D = q.shape[-1]
    s = D**-0.5 if scale is None else scale
    keep = _visible(q.shape[2], k.shape[2], causal, None, q.device)
    w = torch.softmax((qd @ kd.transpose(-1, -2) * s).masked_fill(~keep, float("-inf")), -1)  # (B, H, N, Nk)
    x = torch.cat(
        [torch.ones_like(kd[:, :, None, :, :1]).expand(-1, -1, q.shape[2], -1, -1), kd[:, :, None] - qd[:, :, :, None]],
        -1,
    )  # (B, H, N, Nk, 1 + D)
    xtw = x.transpose(-1, -2) * w[..., None, :]
    lhs = xtw @ x + ridge * torch.diag(torch.cat([torch.zeros(1, dtype=dtype), torch.ones(D, dtype=dtype)]))
    rhs = xtw @ vd[:, :, None]
    # LAPACK has no bf16 solve: a low-precision naive run solves in float32 (everything else stays in dtype)
    sd = torch.promote_types(dtype, torch.float32)
    theta = torch.linalg.solve(lhs.to(sd), rhs.to(sd)).to(dtype)
    return theta[..., 0, :]


def gaussian_adaptive(x, heads, mean_offset, log_scale, *, eps=1e-8, dtype=torch.float64):
    """Naive Gaussian Adaptive Attention: for each head's channel group, the Gaussian density of ``x`` under the
    sequence mean (plus the head's offset) and variance (times the head's scale) re-weights ``x``."""
    xd = x.to(dtype)
    B, N, C = x.shape
    d = C // heads
    outs = []
    for h in range(heads):
        xh = xd[..., h * d : (h + 1) * d]
        mu = xh.mean(1, keepdim=True) + mean_offset[h].to(dtype)
        var = ((xh - xh.mean(1, keepdim=True)) ** 2).mean(1, keepdim=True)
        dens = torch.exp(-((xh - mu) ** 2) / (2 * var * torch.exp(log_scale[h].to(dtype)) + eps))
        outs.append(xh * dens)
    return torch.cat(outs, -1)
