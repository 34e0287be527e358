r"""Naive oracles of the family-D head variants (MoH, SQA, BAM, the Minimal Transformer, RCMHA).

Each takes the layer's input ``x`` ``(B, N, dim)`` and its weights (``nn.Linear`` convention: ``y = x W^T + b``),
casts everything to ``dtype`` and builds the full ``(B, H, N, N)`` weight matrix with an explicit softmax.
Run in float64 they are the truth the layers are compared with; run in the input dtype they are the naive
implementation of the 2x-naive rule. They import no implementation module.

Common conventions: grouped-query attention repeats each key/value head for ``Hq / Hkv`` consecutive query heads;
``causal`` lets query ``i`` see keys ``j <= i``; ``key_padding_mask`` ``(B, N)`` is True where the key is real; a
query row with no visible key gives 0.
"""

from __future__ import annotations

import torch

from ..errors import ShapeError, bad


def _c(t, dtype):
    return None if t is None else t.to(dtype)


def _lin(x, w, b=None):
    y = x @ w.transpose(-1, -2)
    return y if b is None else y + b


def _heads(y, h):
    B, N, _ = y.shape
    return y.view(B, N, h, -1).transpose(1, 2)


def _merge(o):
    B, H, N, D = o.shape
    return o.transpose(1, 2).reshape(B, N, H * D)


def softmax_attention(q, k, v, *, causal=True, key_padding_mask=None, scale=None, bias=None):
    """``softmax(scale q k^T + bias + mask) v`` with full matrices; ``q`` ``(B, Hq, N, D)``, ``k``/``v``
    ``(B, Hkv, N, D)``; ``bias`` broadcastable to ``(B, Hq, N, N)``."""
    Hq, Hkv = q.shape[1], k.shape[1]
    if Hq % Hkv:
        raise ShapeError(bad("k", f"a number of heads dividing {Hq}", Hkv))
    g = Hq // Hkv
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = (q @ k.transpose(-1, -2)) * scale
    if bias is not None:
        s = s + bias
    Nq, Nk = q.shape[2], k.shape[2]
    visible = torch.ones(1, 1, Nq, Nk, dtype=torch.bool, device=q.device)
    if causal:
        visible = visible & torch.ones(Nq, Nk, dtype=torch.bool, device=q.device).tril(Nk - Nq)
    if key_padding_mask is not None:
        visible = visible & key_padding_mask[:, None, None, :].bool()
    s = s.masked_fill(~visible, float("-inf"))
    live = visible.any(-1, keepdim=True)
    s = s.masked_fill(~live, 0.0)
    p = torch.softmax(s, dim=-1) * live
    return p @ v


def mha(
    x,
    *,
    wq,
    wk,
    wv,
    wo,
    heads,
    kv_heads,
    bq=None,
    bk=None,
    bv=None,
    bo=None,
    causal=True,
    key_padding_mask=None,
    dtype=torch.float64,
):
    r"""Grouped-query multi-head attention
    :math:`\mathrm{concat}_h \mathrm{softmax}(Q_h K_{g(h)}^T/\sqrt{d}) V_{g(h)} W_o`,
    with ``heads`` query heads of ``wq.shape[0] / heads`` channels. This is SQA's oracle: SQA is this function
    with fewer query heads (and a correspondingly narrower ``wo``)."""
    x = x.to(dtype)
    q = _heads(_lin(x, _c(wq, dtype), _c(bq, dtype)), heads)
    k = _heads(_lin(x, _c(wk, dtype), _c(bk, dtype)), kv_heads)
    v = _heads(_lin(x, _c(wv, dtype), _c(bv, dtype)), kv_heads)
    o = softmax_attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask)
    return _lin(_merge(o), _c(wo, dtype), _c(bo, dtype))


# -- MoH -------------------------------------------------------------------------------------------------------


def moh_gates(x, *, ws, wr, wh, shared, routed, top_k, dtype=torch.float64):
    r"""MoH's per-token head gates ``(B, N, heads)`` (shared heads first) and the routed softmax ``(B, N, routed)``:

    .. math:: g_i = \alpha_1 \mathrm{softmax}(W_s x)_i \ (i \le h_s),\qquad
              g_i = \alpha_2 \mathrm{softmax}(W_r x)_i\, [i \in \mathrm{topk}(W_r x)] \ (i > h_s),\qquad
              (\alpha_1, \alpha_2) = \mathrm{softmax}(W_h x)
    """
    x = x.to(dtype)
    pr = torch.softmax(_lin(x, _c(wr, dtype)), -1) if routed else x.new_zeros(*x.shape[:-1], 0)
    if routed:
        idx = pr.topk(top_k, dim=-1).indices
        keep = torch.zeros_like(pr).scatter(-1, idx, 1.0)
        gr = pr * keep
    else:
        gr = pr
    if shared == 0:
        return gr, pr
    gs = torch.softmax(_lin(x, _c(ws, dtype)), -1)
    if routed == 0:
        return gs, pr
    a = torch.softmax(_lin(x, _c(wh, dtype)), -1)
    return torch.cat([a[..., :1] * gs, a[..., 1:] * gr], -1), pr


def moh(
    x,
    *,
    wq,
    wk,
    wv,
    wo,
    ws,
    wr,
    wh,
    heads,
    kv_heads,
    shared,
    top_k,
    bq=None,
    bk=None,
    bv=None,
    bo=None,
    causal=True,
    key_padding_mask=None,
    dtype=torch.float64,
):
    r"""Mixture-of-Head attention: :math:`\mathrm{out}_t = \sum_h g_h(x_t)\, \mathrm{head}_h(x)_t W_o^h` with the
    gates of :func:`moh_gates`."""
    x = x.to(dtype)
    q = _heads(_lin(x, _c(wq, dtype), _c(bq, dtype)), heads)
    k = _heads(_lin(x, _c(wk, dtype), _c(bk, dtype)), kv_heads)
    v = _heads(_lin(x, _c(wv, dtype), _c(bv, dtype)), kv_heads)
    o = softmax_attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask)
    g, _ = moh_gates(x, ws=ws, wr=wr, wh=wh, shared=shared, routed=heads - shared, top_k=top_k, dtype=dtype)
    o = o * g.transpose(1, 2)[..., None]
    return _lin(_merge(o), _c(wo, dtype), _c(bo, dtype))


def moh_balance_loss(gates_routed, selected):
    r"""MoH's load-balance loss :math:`L_b = \sum_i f_i P_i` over the routed heads: ``f_i`` the fraction of tokens
    that select head ``i``, ``P_i`` the mean routed softmax probability of head ``i`` (both over the real tokens
    given as rows ``(T, routed)``)."""
    return (selected.to(gates_routed.dtype).mean(0) * gates_routed.mean(0)).sum()


# -- BAM -------------------------------------------------------------------------------------------------------


def bam(
    x,
    *,
    wr,
    wq,
    wk,
    wv,
    wo,
    experts,
    heads,
    shared_kv,
    bo=None,
    causal=True,
    key_padding_mask=None,
    dtype=torch.float64,
):
    r"""BAM's soft mixture of attention experts, one expert at a time:

    .. math:: \mathrm{out}_t = \sum_e p_e(x_t)\, \mathrm{MHA}_e(x)_t,\qquad p(x_t) = \mathrm{softmax}(W_r x_t)

    ``wq`` ``(experts, heads * d, dim)``, ``wo`` ``(experts, dim, heads * d)``; ``wk``/``wv``
    ``(heads * d, dim)`` shared by every expert (``shared_kv``) or ``(experts, heads * d, dim)``; ``bo``
    ``(experts, dim)`` or None.
    """
    x = x.to(dtype)
    p = torch.softmax(_lin(x, _c(wr, dtype)), -1)
    out = 0
    for e in range(experts):
        k_w = wk if shared_kv else wk[e]
        v_w = wv if shared_kv else wv[e]
        q = _heads(_lin(x, _c(wq[e], dtype)), heads)
        k = _heads(_lin(x, _c(k_w, dtype)), heads)
        v = _heads(_lin(x, _c(v_w, dtype)), heads)
        o = _lin(_merge(softmax_attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask)), _c(wo[e], dtype))
        if bo is not None:
            o = o + _c(bo[e], dtype)
        out = out + p[..., e : e + 1] * o
    return out


# -- Minimal Transformer ---------------------------------------------------------------------------------------


def minimal(x, *, mode, heads, w, wv=None, wo=None, causal=True, key_padding_mask=None, dtype=torch.float64):
    r"""Minimal-Transformer attention, each head ``h`` with its slice :math:`x^{(h)}` of the ``d / H`` channels:

    * ``"collapsed"``: :math:`s^h_{ij} = x_i W^h x_j^{(h)\top}` (``w`` ``(H, d, d/H)``);
    * ``"shared"``: :math:`s^h_{ij} = (x_i W^h)(x_j W^h)^\top` (Q = K; ``w`` ``(H, d, d/H)``);
    * ``"symmetric"``: :math:`s^h_{ij} = x^{(h)}_i S^h x_j^{(h)\top}`, ``S^h = S^{h\top}`` (``w`` ``(H, d/H, d/H)``,
      already symmetric);

    scaled by :math:`1/\sqrt{d/H}`; values are the slices :math:`x^{(h)}` (no ``W_v``/``W_o``) or
    ``x wv^T`` then ``wo`` when given.
    """
    x = x.to(dtype)
    B, N, d = x.shape
    dh = d // heads
    xs = x.view(B, N, heads, dh).transpose(1, 2)  # (B, H, N, dh)
    wd = w.to(dtype)
    if mode == "collapsed":
        s = torch.einsum("bnc,hcd,bhmd->bhnm", x, wd, xs)
    elif mode == "shared":
        qk = torch.einsum("bnc,hcd->bhnd", x, wd)
        s = qk @ qk.transpose(-1, -2)
    elif mode == "symmetric":
        s = torch.einsum("bhnc,hcd,bhmd->bhnm", xs, wd, xs)
    else:
        raise ShapeError(bad("mode", "'collapsed', 'shared' or 'symmetric'", repr(mode)))
    v = xs if wv is None else _heads(_lin(x, wv.to(dtype)), heads)
    # The scores are built explicitly; the softmax and weighting follow softmax_attention with q = identity rows.
    o = _softmax_rows(s * dh**-0.5, v, causal, key_padding_mask)
    o = _merge(o)
    return o if wo is None else _lin(o, wo.to(dtype))


def _softmax_rows(s, v, causal, key_padding_mask):
    N = s.shape[-1]
    visible = torch.ones(1, 1, s.shape[-2], N, dtype=torch.bool, device=s.device)
    if causal:
        visible = visible & torch.ones(s.shape[-2], N, dtype=torch.bool, device=s.device).tril(N - s.shape[-2])
    if key_padding_mask is not None:
        visible = visible & key_padding_mask[:, None, None, :].bool()
    s = s.masked_fill(~visible, float("-inf"))
    live = visible.any(-1, keepdim=True)
    p = torch.softmax(s.masked_fill(~live, 0.0), -1) * live
    return p @ v


# -- RCMHA -----------------------------------------------------------------------------------------------------


def causal_depthwise_conv(y, weight, bias=None):
    r"""Causal depthwise convolution over the sequence: :math:`z_{t,c} = b_c + \sum_{m=0}^{K-1} w_{c,m}\, y_{t-K+1+m,c}`
    (zeros before the start); ``y`` ``(B, N, C)``, ``weight`` ``(C, K)``."""
    K = weight.shape[-1]
    N = y.shape[1]
    yp = torch.cat([y.new_zeros(y.shape[0], K - 1, y.shape[2]), y], 1)
    z = sum(weight[:, m] * yp[:, m : m + N] for m in range(K))
    return z if bias is None else z + bias


def sinusoid(pos, dim, dtype):
    r"""Transformer-XL's relative encoding :math:`\phi(r) = [\sin(r\omega_f), \cos(r\omega_f)]_f`,
    :math:`\omega_f = 10000^{-2f/\mathrm{dim}}`, for the (signed) distances ``pos``."""
    f = torch.arange(dim // 2, dtype=dtype, device=pos.device)
    w = 10000.0 ** (-2 * f / dim)
    a = pos.to(dtype)[..., None] * w
    return torch.cat([a.sin(), a.cos()], -1)


def rcmha(
    x,
    *,
    wq,
    wk,
    wv,
    wo,
    cq,
    ck,
    cv,
    wr,
    u,
    vb,
    heads,
    rel_dim,
    bq=None,
    bk=None,
    bv=None,
    causal=True,
    key_padding_mask=None,
    positions=None,
    dtype=torch.float64,
):
    r"""RCMHA: depthwise-convolved projections and Transformer-XL relative scores, with explicit distances:

    .. math::
        Q = \mathrm{dwconv}_q(x W_q),\ K = \mathrm{dwconv}_k(x W_k),\ V = \mathrm{dwconv}_v(x W_v),\qquad
        s^h_{ij} = \tfrac{1}{\sqrt d}\big[(Q^h_i + u^h)\cdot K^h_j + (Q^h_i + v^h)\cdot W_R^h\, \phi(i - j)\big]

    ``cq, ck, cv`` are ``(weight (C, K), bias (C,) or None)``; ``wr`` ``(heads * d, rel_dim)``; ``u``/``vb``
    ``(heads, d)``. Inputs at padded positions are zeroed before the convolution.
    """
    x = x.to(dtype)
    B, N, _ = x.shape
    real = None if key_padding_mask is None else key_padding_mask[..., None].to(dtype)
    ys = []
    for w, b, (cw, cb) in ((wq, bq, cq), (wk, bk, ck), (wv, bv, cv)):
        y = _lin(x, _c(w, dtype), _c(b, dtype))
        if real is not None:
            y = y * real
        ys.append(_heads(causal_depthwise_conv(y, cw.to(dtype), _c(cb, dtype)), heads))
    q, k, v = ys
    d = q.shape[-1]
    pos = torch.arange(N, device=x.device) if positions is None else positions
    rel = pos[:, None] - pos[None, :]  # (N, N) i - j
    r = sinusoid(rel, rel_dim, dtype) @ wr.to(dtype).T  # (N, N, heads * d)
    r = r.view(N, N, heads, d).permute(2, 0, 1, 3)  # (H, N, N, d)
    ac = (q + u.to(dtype)[None, :, None, :]) @ k.transpose(-1, -2)
    bd = torch.einsum("bhid,hijd->bhij", q + vb.to(dtype)[None, :, None, :], r)
    o = softmax_attention(
        q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=0.0, bias=(ac + bd) * d**-0.5
    )
    return _lin(_merge(o), wo.to(dtype))


__all__ = [
    "bam",
    "causal_depthwise_conv",
    "mha",
    "minimal",
    "moh",
    "moh_balance_loss",
    "moh_gates",
    "rcmha",
    "sinusoid",
    "softmax_attention",
]
