"""Float64 references of the family-I vision modules (:mod:`attnkit.layers.vision`), on explicit weights.

Every function takes an image ``x`` of shape ``(B, H, W, C)`` (channel last, raster order) and returns the
same shape (``illama`` also returns its class-token readout). They are written as loops over kernel offsets,
windows and groups with dense softmaxes, so that they share no code with the layers: no ``conv``, ``unfold``,
pooling or fused attention kernel is used. ``dtype`` is the dtype the computation runs in (float64 for the
oracle, the input's dtype for the naive run of the 2x-naive rule).
"""

from __future__ import annotations

import math

import torch


def _lin(x, w, b=None):
    y = x @ w.transpose(0, 1)
    return y if b is None else y + b


def _conv1d_dw(x, w, b):
    """Depthwise 1-D convolution along dim 1 of ``(B, L, C)``, zero padding ``k // 2`` (odd ``k``)."""
    k = w.shape[1]
    pad = k // 2
    L = x.shape[1]
    out = torch.zeros_like(x) + b
    for j in range(k):
        for t in range(L):
            s = t + j - pad
            if 0 <= s < L:
                out[:, t] = out[:, t] + w[:, j] * x[:, s]
    return out


def _conv2d_dw(x, w):
    """Depthwise 2-D convolution of ``(B, H, W, C)`` with ``w`` of shape ``(C, k, k)``, zero padding, no bias:
    :func:`_conv2d_full` with the diagonal weight ``W[o, i] = w[o] if o == i else 0``."""
    return _conv2d_full(x, torch.diag_embed(w.permute(1, 2, 0)).permute(2, 3, 0, 1))


def _group_norm(x, groups, gamma, beta, eps):
    """GroupNorm of ``(B, L, C)`` over (channels of a group x L), biased variance."""
    B, L, C = x.shape
    out = torch.empty_like(x)
    cg = C // groups
    for g in range(groups):
        part = x[:, :, g * cg : (g + 1) * cg]
        mu = part.mean(dim=(1, 2), keepdim=True)
        var = ((part - mu) ** 2).mean(dim=(1, 2), keepdim=True)
        out[:, :, g * cg : (g + 1) * cg] = (part - mu) / torch.sqrt(var + eps)
    return out * gamma + beta


def _softmax(s, dim):
    s = s - s.amax(dim=dim, keepdim=True)
    e = torch.exp(s)
    return e / e.sum(dim=dim, keepdim=True)


def _heads(t, h):
    B, N, C = t.shape
    return t.reshape(B, N, h, C // h).transpose(1, 2)


def _merge(t):
    B, h, N, d = t.shape
    return t.transpose(1, 2).reshape(B, N, h * d)


def _cast(dtype, *ts):
    return [None if t is None else t.to(dtype) for t in ts]


def ela(x, conv_w, conv_b, gn_w, gn_b, *, groups, eps=1e-5, dtype=torch.float64):
    """ELA: ``y = x * sigma(GN(conv(mean_W x)))[h] * sigma(GN(conv(mean_H x)))[w]`` (shared conv and GN)."""
    x, conv_w, conv_b, gn_w, gn_b = _cast(dtype, x, conv_w, conv_b, gn_w, gn_b)
    xh, xw = x.mean(2), x.mean(1)
    ah = torch.sigmoid(_group_norm(_conv1d_dw(xh, conv_w, conv_b), groups, gn_w, gn_b, eps))
    aw = torch.sigmoid(_group_norm(_conv1d_dw(xw, conv_w, conv_b), groups, gn_w, gn_b, eps))
    return x * ah[:, :, None, :] * aw[:, None, :, :]


def ulsam(x, dw_w, dw_b, pw_w, pw_b, *, groups, dtype=torch.float64):
    """ULSAM: per channel group, ``m = softmax_space(pw(maxpool3(dw(x_g))))`` and ``y_g = x_g * m + x_g``."""
    x, dw_w, dw_b, pw_w, pw_b = _cast(dtype, x, dw_w, dw_b, pw_w, pw_b)
    B, H, W, C = x.shape
    cg = C // groups
    outs = []
    for g in range(groups):
        xg = x[..., g * cg : (g + 1) * cg]
        d = xg * dw_w[g * cg : (g + 1) * cg] + dw_b[g * cg : (g + 1) * cg]
        m = torch.full_like(d, -math.inf)
        for r in range(H):
            for c in range(W):
                win = d[:, max(0, r - 1) : r + 2, max(0, c - 1) : c + 2].reshape(B, -1, cg)
                m[:, r, c] = win.amax(dim=1)
        logit = (m * pw_w[g]).sum(-1) + pw_b[g]  # (B, H, W)
        att = _softmax(logit.reshape(B, H * W), -1).reshape(B, H, W, 1)
        outs.append(xg * att + xg)
    return torch.cat(outs, -1)


def channel_group_attention(x, qkv_w, qkv_b, proj_w, proj_b, *, heads, dtype=torch.float64):
    """DaViT channel group attention: per group of ``C / heads`` channels, ``A = softmax(Q^T K / sqrt(C_g))``
    (a ``C_g x C_g`` map contracted over the tokens) and ``out[n, c] = sum_c' A[c, c'] V[n, c']``."""
    x, qkv_w, qkv_b, proj_w, proj_b = _cast(dtype, x, qkv_w, qkv_b, proj_w, proj_b)
    B, H, W, C = x.shape
    t = x.reshape(B, H * W, C)
    q, k, v = (_heads(p, heads) for p in _lin(t, qkv_w, qkv_b).chunk(3, -1))  # (B, h, N, Cg)
    cg = C // heads
    a = _softmax(q.transpose(-1, -2) @ k / math.sqrt(cg), -1)  # (B, h, Cg, Cg)
    out = v @ a.transpose(-1, -2)
    return _lin(_merge(out), proj_w, proj_b).reshape(B, H, W, C)


def reversed_attention(x, qkv_w, qkv_b, msg_w, msg_b, proj_w, proj_b, *, heads, dtype=torch.float64):
    """DependencyViT reversed attention: ``A = softmax over the queries i`` of ``q_i . k_j / sqrt(d)`` (each
    column sums to 1), each sender gated by ``m_j = sigmoid(w . x_j + b)``: ``out_i = sum_j A_ij m_j v_j``."""
    x, qkv_w, qkv_b, msg_w, msg_b, proj_w, proj_b = _cast(dtype, x, qkv_w, qkv_b, msg_w, msg_b, proj_w, proj_b)
    B, H, W, C = x.shape
    t = x.reshape(B, H * W, C)
    q, k, v = (_heads(p, heads) for p in _lin(t, qkv_w, qkv_b).chunk(3, -1))
    d = C // heads
    a = _softmax(q @ k.transpose(-1, -2) / math.sqrt(d), -2)
    m = torch.sigmoid(_lin(t, msg_w, msg_b)).transpose(1, 2)  # (B, h, N)
    out = a @ (m[..., None] * v)
    return _lin(_merge(out), proj_w, proj_b).reshape(B, H, W, C)


def focal_modulation(x, f_w, f_b, convs, h_w, h_b, proj_w, proj_b, *, dtype=torch.float64):
    """FocalNets: ``q, z_0, g = f(x)``; ``z_l = GELU(dwconv_l(z_{l-1}))``; ``z_{L+1} = GELU(mean_HW z_L)``;
    ``y = proj(q * h(sum_l g_l z_l))``."""
    x, f_w, f_b, h_w, h_b, proj_w, proj_b = _cast(dtype, x, f_w, f_b, h_w, h_b, proj_w, proj_b)
    convs = _cast(dtype, *convs)
    C = x.shape[-1]
    L = len(convs)
    t = _lin(x, f_w, f_b)
    q, ctx, gates = t[..., :C], t[..., C : 2 * C], t[..., 2 * C :]
    agg = torch.zeros_like(ctx)
    for lvl in range(L):
        ctx = torch.nn.functional.gelu(_conv2d_dw(ctx, convs[lvl]))
        agg = agg + ctx * gates[..., lvl : lvl + 1]
    glob = torch.nn.functional.gelu(ctx.mean(dim=(1, 2), keepdim=True))
    agg = agg + glob * gates[..., L : L + 1]
    return _lin(q * _lin(agg, h_w, h_b), proj_w, proj_b)


def illama(x, cls, qkv_w, qkv_b, proj_w, proj_b, *, heads, mix=1.0, dtype=torch.float64):
    """iLLaMA's causal attention with a post-sequence class token: tokens ``[x_1 .. x_N, cls]``, causal softmax
    (the class token, last, sees every image token); with ``mix < 1`` the soft mask
    ``mix * causal + (1 - mix) * bidirectional``. Returns ``(image tokens (B, H, W, C), class token (B, C))``."""
    x, cls, qkv_w, qkv_b, proj_w, proj_b = _cast(dtype, x, cls, qkv_w, qkv_b, proj_w, proj_b)
    B, H, W, C = x.shape
    t = torch.cat([x.reshape(B, H * W, C), cls.expand(B, 1, C)], 1)
    n = t.shape[1]
    q, k, v = (_heads(p, heads) for p in _lin(t, qkv_w, qkv_b).chunk(3, -1))
    s = q @ k.transpose(-1, -2) / math.sqrt(C // heads)
    allowed = torch.tensor([[j <= i for j in range(n)] for i in range(n)], device=x.device)
    causal = _softmax(s.masked_fill(~allowed, -math.inf), -1) @ v
    out = causal if mix == 1.0 else mix * causal + (1 - mix) * (_softmax(s, -1) @ v)
    out = _lin(_merge(out), proj_w, proj_b)
    return out[:, :-1].reshape(B, H, W, C), out[:, -1]


def _adaptive_bins(n, p):
    return [(math.floor(i * n / p), math.ceil((i + 1) * n / p)) for i in range(p)]


def aggregated_attention(x, q_w, q_b, kv_w, kv_b, proj_w, proj_b, *, heads, kernel, pool, dtype=torch.float64):
    """TransNeXt's aggregated attention: each query's keys are its ``kernel x kernel`` neighbourhood of fine
    tokens (positions outside the image are absent) and the ``pool x pool`` average-pooled tokens, in one
    softmax. Built as a dense ``N x (N + pool^2)`` mask over [fine tokens; pooled tokens]."""
    x, q_w, q_b, kv_w, kv_b, proj_w, proj_b = _cast(dtype, x, q_w, q_b, kv_w, kv_b, proj_w, proj_b)
    B, H, W, C = x.shape
    N = H * W
    pooled = []
    for r0, r1 in _adaptive_bins(H, pool):
        for c0, c1 in _adaptive_bins(W, pool):
            pooled.append(x[:, r0:r1, c0:c1].mean(dim=(1, 2)))
    pooled = torch.stack(pooled, 1)  # (B, P, C)
    fine = x.reshape(B, N, C)
    q = _heads(_lin(fine, q_w, q_b), heads)
    k, v = (_heads(t, heads) for t in _lin(torch.cat([fine, pooled], 1), kv_w, kv_b).chunk(2, -1))
    r = kernel // 2
    allowed = torch.zeros(N, N + pool * pool, dtype=torch.bool, device=x.device)
    for i in range(N):
        for j in range(N):
            allowed[i, j] = abs(i // W - j // W) <= r and abs(i % W - j % W) <= r
    allowed[:, N:] = True
    s = q @ k.transpose(-1, -2) / math.sqrt(C // heads)
    out = _softmax(s.masked_fill(~allowed, -math.inf), -1) @ v
    return _lin(_merge(out), proj_w, proj_b).reshape(B, H, W, C)


def coord_se(x, red_w, red_b, h_w, h_b, w_w, w_b, se1_w, se1_b, se2_w, se2_b, alpha, *, dtype=torch.float64):
    """Coordinate attention fused with squeeze-excitation: ``y = a * CA(x) + (1 - a) * SE(x)``, ``a = sigmoid(alpha)``.

    ``CA``: ``f = hardswish([mean_W x ; mean_H x] W_r)``, split into ``f^h, f^w``,
    ``CA(x) = x * sigmoid(f^h W_h)[h] * sigmoid(f^w W_w)[w]``; ``SE(x) = x * sigmoid(relu(mean_HW x W_1) W_2)``."""
    ts = _cast(dtype, x, red_w, red_b, h_w, h_b, w_w, w_b, se1_w, se1_b, se2_w, se2_b, alpha)
    x, red_w, red_b, h_w, h_b, w_w, w_b, se1_w, se1_b, se2_w, se2_b, alpha = ts
    H = x.shape[1]
    z = torch.cat([x.mean(2), x.mean(1)], 1)  # (B, H + W, C)
    r = _lin(z, red_w, red_b)
    f = r * torch.clamp(r + 3, 0, 6) / 6  # hardswish
    gh = torch.sigmoid(_lin(f[:, :H], h_w, h_b))
    gw = torch.sigmoid(_lin(f[:, H:], w_w, w_b))
    ca = x * gh[:, :, None, :] * gw[:, None, :, :]
    s = torch.sigmoid(_lin(torch.relu(_lin(x.mean(dim=(1, 2)), se1_w, se1_b)), se2_w, se2_b))
    se = x * s[:, None, None, :]
    a = torch.sigmoid(alpha)
    return a * ca + (1 - a) * se


def _avg_pool_same(x, k):
    """Average over the ``k x k`` window centred at each position of ``(B, H, W, C)``, counting only the
    positions inside the image."""
    B, H, W, C = x.shape
    r = k // 2
    out = torch.zeros_like(x)
    for i in range(H):
        for j in range(W):
            out[:, i, j] = x[:, max(0, i - r) : i + r + 1, max(0, j - r) : j + r + 1].mean(dim=(1, 2))
    return out


def tap_attention(x, sel_w, sel_b, qkv_w, qkv_b, proj_w, proj_b, *, heads, kernels, dtype=torch.float64):
    """TAP: ``x~ = sum_r w_r(x) avgpool_{k_r}(x)`` with ``w = softmax(x W_s)`` over the pooling sizes (``k = 1`` is
    the token itself), then multi-head softmax attention on ``x~``. Returns ``(y, A)`` with ``A`` the
    ``(B, h, N, N)`` attention probabilities."""
    x, sel_w, sel_b, qkv_w, qkv_b, proj_w, proj_b = _cast(dtype, x, sel_w, sel_b, qkv_w, qkv_b, proj_w, proj_b)
    B, H, W, C = x.shape
    w = _softmax(_lin(x, sel_w, sel_b), -1)  # (B, H, W, R)
    xt = sum(w[..., i : i + 1] * _avg_pool_same(x, k) for i, k in enumerate(kernels))
    t = xt.reshape(B, H * W, C)
    q, k, v = (_heads(p, heads) for p in _lin(t, qkv_w, qkv_b).chunk(3, -1))
    a = _softmax(q @ k.transpose(-1, -2) / math.sqrt(C // heads), -1)
    y = _lin(_merge(a @ v), proj_w, proj_b).reshape(B, H, W, C)
    return y, a


def attention_diversity_loss(a):
    """ADL: the mean cosine similarity of the attention rows of different tokens, over batch and heads:
    ``mean_{b,h} 1/(N(N-1)) sum_{i != j} cos(A_i, A_j)``, as a plain double loop."""
    B, h, N, _ = a.shape
    total = a.new_zeros(())
    for i in range(N):
        for j in range(N):
            if i != j:
                ai, aj = a[:, :, i], a[:, :, j]
                total = total + ((ai * aj).sum(-1) / (ai.norm(dim=-1) * aj.norm(dim=-1))).mean()
    return total / (N * (N - 1))


def _conv2d_full(x, w):
    """Dense 2-D convolution of ``(B, H, W, C_in)`` with ``w`` of shape ``(C_out, C_in, k, k)``, zero padding
    ``k // 2``, no bias; a loop over the kernel offsets of shifted matrix products."""
    B, H, W, _ = x.shape
    k = w.shape[-1]
    p = k // 2
    out = x.new_zeros(B, H, W, w.shape[0])
    for di in range(k):
        for dj in range(k):
            for r in range(H):
                rr = r + di - p
                if not 0 <= rr < H:
                    continue
                lo, hi = max(0, p - dj), min(W, W + p - dj)
                if lo >= hi:
                    continue
                src = x[:, rr, lo + dj - p : hi + dj - p]  # (B, hi - lo, C_in)
                out[:, r, lo:hi] = out[:, r, lo:hi] + src @ w[:, :, di, dj].transpose(0, 1)
    return out


def partial_attention(x, conv_w, qkv_w, qkv_b, proj_w, proj_b, *, heads, cp, dtype=torch.float64):
    """PATNet partial attention: ``[conv(x[..., :cp]) ; MHSA(x[..., cp:])]`` (dense conv, no bias; softmax
    attention over all tokens of the remaining channels with scale ``d^{-1/2}``)."""
    x, conv_w, qkv_w, qkv_b, proj_w, proj_b = _cast(dtype, x, conv_w, qkv_w, qkv_b, proj_w, proj_b)
    B, H, W, C = x.shape
    yp = _conv2d_full(x[..., :cp], conv_w)
    t = x[..., cp:].reshape(B, H * W, C - cp)
    q, k, v = (_heads(p, heads) for p in _lin(t, qkv_w, qkv_b).chunk(3, -1))  # (B, h, N, d)
    a = _softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), -1)
    yr = _lin(_merge(a @ v), proj_w, proj_b).reshape(B, H, W, C - cp)
    return torch.cat([yp, yr], -1)


def polyline_masked_attention(x, qkv_w, qkv_b, proj_w, proj_b, decay_w, dt_bias, A_log, *, heads, dtype=torch.float64):
    """PPMA: ``0.5 softmax(S + M) + 0.5 softmax(S + M^T)`` times ``V``, ``M`` found by walking each polyline.

    For every query cell ``(i, j)`` and key cell ``(k, l)``, ``M`` sums the horizontal log-decays of row ``i``
    over the columns in ``(min(j, l), max(j, l)]`` and the vertical ones of column ``l`` over the rows in
    ``(min(i, k), max(i, k)]``, one cell at a time."""
    x, qkv_w, qkv_b, proj_w, proj_b, decay_w, dt_bias, A_log = _cast(
        dtype, x, qkv_w, qkv_b, proj_w, proj_b, decay_w, dt_bias, A_log
    )
    B, H, W, C = x.shape
    N, d = H * W, C // heads
    xh = x.reshape(B, H, W, heads, d)
    z = torch.stack([xh @ decay_w[0], xh @ decay_w[1]])  # (2, B, H, W, heads)
    z = -torch.log1p(torch.exp(z + dt_bias)) * torch.exp(A_log)
    a, b = z[0], z[1]
    m = torch.zeros(B, heads, N, N, dtype=dtype)
    for i in range(H):
        for j in range(W):
            for k in range(H):
                for l in range(W):
                    s = torch.zeros(B, heads, dtype=dtype)
                    for c in range(min(j, l) + 1, max(j, l) + 1):  # along row i, Mamba2's (lo, hi]
                        s = s + a[:, i, c]
                    for r in range(min(i, k) + 1, max(i, k) + 1):  # then along column l
                        s = s + b[:, r, l]
                    m[:, :, i * W + j, k * W + l] = s
    t = x.reshape(B, N, C)
    q, k_, v = (_heads(p, heads) for p in _lin(t, qkv_w, qkv_b).chunk(3, -1))
    sc = q @ k_.transpose(-1, -2) / math.sqrt(d)
    att = 0.5 * _softmax(sc + m, -1) + 0.5 * _softmax(sc + m.transpose(-1, -2), -1)
    return _lin(_merge(att @ v), proj_w, proj_b).reshape(B, H, W, C)


def dual_branch_attention(x, qkv_w, qkv_b, proj_w, proj_b, mix, *, heads, window, compress, shift, dtype=torch.float64):
    """UltraGen's dual-branch attention: ``(1 - a_h) z_local + a_h z_global``, ``a_h = sigmoid(mix_h)``.

    ``z_local``: softmax attention under a dense mask that lets cell ``(r, c)`` see cell ``(r', c')`` when
    ``(r + shift) // window == (r' + shift) // window`` and the same for the columns. ``z_global``: the
    ``compress x compress`` bin means (border bins average the cells they hold) attend to each other densely,
    and each cell reads the output of its bin ``(r // compress, c // compress)``."""
    x, qkv_w, qkv_b, proj_w, proj_b, mix = _cast(dtype, x, qkv_w, qkv_b, proj_w, proj_b, mix)
    B, H, W, C = x.shape
    N, d, f = H * W, C // heads, compress
    t = x.reshape(B, N, C)
    q, k, v = (_heads(p, heads) for p in _lin(t, qkv_w, qkv_b).chunk(3, -1))
    allowed = torch.zeros(N, N, dtype=torch.bool, device=x.device)
    for i in range(N):
        for j in range(N):
            ri, ci, rj, cj = i // W, i % W, j // W, j % W
            same_row = (ri + shift) // window == (rj + shift) // window
            same_col = (ci + shift) // window == (cj + shift) // window
            allowed[i, j] = same_row and same_col
    s = q @ k.transpose(-1, -2) / math.sqrt(d)
    zl = _softmax(s.masked_fill(~allowed, -math.inf), -1) @ v
    Ph, Pw = -(-H // f), -(-W // f)
    bins = []
    for a in range(Ph):
        for b in range(Pw):
            bins.append(x[:, a * f : min((a + 1) * f, H), b * f : min((b + 1) * f, W)].mean(dim=(1, 2)))
    pooled = torch.stack(bins, 1)  # (B, P, C)
    qg, kg, vg = (_heads(p, heads) for p in _lin(pooled, qkv_w, qkv_b).chunk(3, -1))
    zbar = _softmax(qg @ kg.transpose(-1, -2) / math.sqrt(d), -1) @ vg  # (B, h, P, d)
    zg = torch.stack([zbar[:, :, (i // W) // f * Pw + (i % W) // f] for i in range(N)], 2)
    a = torch.sigmoid(mix)[:, None, None]
    out = (1 - a) * zl + a * zg
    return _lin(_merge(out), proj_w, proj_b).reshape(B, H, W, C)


def _top_indices(scores, k):
    """The ``k`` indices of the largest entries of a 1-D tensor, by a plain sort."""
    vals = scores.detach().tolist()
    return sorted(range(len(vals)), key=lambda j: -vals[j])[:k]


def glca_attention(
    x,
    qkv_w,
    qkv_b,
    proj_w,
    proj_b,
    g_qkv_w,
    g_qkv_b,
    g_proj_w,
    g_proj_b,
    *,
    heads,
    top,
    pair=False,
    dtype=torch.float64,
):
    """DCAL: self-attention (over the keys of the image and, with ``pair``, also of the distractor image
    ``(b + 1) mod B``) plus, at the ``top`` tokens of largest one-layer rollout score, global-local
    cross-attention with its own weights: ``y = proj(SA) + [i in S] g_proj(softmax(q^g_i K^g / sqrt d) V^g)``.

    The score of key ``j`` is ``mean_i R_ij`` with ``R = 0.5 mean_h A + 0.5 I`` and ``A`` the softmax over the
    image's own keys."""
    ts = _cast(dtype, x, qkv_w, qkv_b, proj_w, proj_b, g_qkv_w, g_qkv_b, g_proj_w, g_proj_b)
    x, qkv_w, qkv_b, proj_w, proj_b, g_qkv_w, g_qkv_b, g_proj_w, g_proj_b = ts
    B, H, W, C = x.shape
    N, d = H * W, C // heads
    t = x.reshape(B, N, C)
    q, k, v = (_heads(p, heads) for p in _lin(t, qkv_w, qkv_b).chunk(3, -1))
    qg, kg, vg = (_heads(p, heads) for p in _lin(t, g_qkv_w, g_qkv_b).chunk(3, -1))
    outs = []
    for b in range(B):
        s_own = q[b] @ k[b].transpose(-1, -2) / math.sqrt(d)  # (h, N, N)
        a_own = _softmax(s_own, -1)
        if pair:
            o = (b + 1) % B
            kk, vv = torch.cat([k[b], k[o]], 1), torch.cat([v[b], v[o]], 1)
            sa = _softmax(q[b] @ kk.transpose(-1, -2) / math.sqrt(d), -1) @ vv
        else:
            sa = a_own @ v[b]
        y = _lin(_merge(sa[None]), proj_w, proj_b)[0]  # (N, C)
        rollout = 0.5 * a_own.mean(0) + 0.5 * torch.eye(N, dtype=dtype, device=x.device)
        score = rollout.mean(0)  # attention each token receives, averaged over the queries
        extra = torch.zeros_like(y)
        for i in _top_indices(score, top):
            gi = _softmax(qg[b, :, i : i + 1] @ kg[b].transpose(-1, -2) / math.sqrt(d), -1) @ vg[b]  # (h, 1, d)
            extra[i] = _lin(gi.reshape(1, C), g_proj_w, g_proj_b)[0]
        outs.append(y + extra)
    return torch.stack(outs).reshape(B, H, W, C)


def grid_boxes(H, W, *, dtype=torch.float64, device=None):
    """The ``(H W, 4)`` boxes ``(cx, cy, w, h)`` of the cells of an ``H x W`` grid on the unit square, raster order."""
    rows = []
    for r in range(H):
        for c in range(W):
            rows.append([(c + 0.5) / W, (r + 0.5) / H, 1.0 / W, 1.0 / H])
    return torch.tensor(rows, dtype=dtype, device=device)


def relation_bias(boxes, pos_w, pos_b, *, embed_dim, temperature=10000.0, scale=100.0, eps=1e-5, dtype=torch.float64):
    """Relation-DETR's position relation bias ``(heads, N, N)`` from boxes ``(N, 4)`` as ``(cx, cy, w, h)``.

    For every pair (query box ``i``, key box ``j``), the four log-scaled relations
    ``log(|x_i - x_j| / w_i + 1), log(|y_i - y_j| / h_i + 1), log(w_i / w_j), log(h_i / h_j)`` (with ``eps`` added
    to the sizes) are each encoded with ``embed_dim`` sinusoids (``sin`` at even, ``cos`` at odd features,
    frequency ``temperature^(-2 floor(k/2) / embed_dim)``, times ``scale``), concatenated and projected per head
    with a ReLU: ``relu(pos_w e_ij + pos_b)``. A loop over the pairs and the four relations."""
    boxes, pos_w, pos_b = _cast(dtype, boxes, pos_w, pos_b)
    N = boxes.shape[0]
    heads = pos_w.shape[0]
    out = torch.zeros(heads, N, N, dtype=dtype, device=boxes.device)
    kk = torch.arange(embed_dim, device=boxes.device)
    freq = torch.tensor(temperature, dtype=dtype, device=boxes.device) ** (2 * (kk // 2) / embed_dim).to(dtype)
    even = kk % 2 == 0
    for i in range(N):
        xi, yi, wi, hi = boxes[i]
        for j in range(N):
            xj, yj, wj, hj = boxes[j]
            rel = [
                torch.log((xi - xj).abs() / (wi + eps) + 1.0),
                torch.log((yi - yj).abs() / (hi + eps) + 1.0),
                torch.log((wi + eps) / (wj + eps)),
                torch.log((hi + eps) / (hj + eps)),
            ]
            feats = []
            for e in rel:
                arg = e * scale / freq
                feats.append(torch.where(even, torch.sin(arg), torch.cos(arg)))
            out[:, i, j] = torch.relu(pos_w @ torch.cat(feats) + pos_b)
    return out


def relation_attention(
    x, qkv_w, qkv_b, proj_w, proj_b, pos_w, pos_b, *, heads, embed_dim, boxes=None, dtype=torch.float64
):
    """Multi-head softmax attention with Relation-DETR's pairwise geometry bias added to the logits:
    ``softmax(Q K^T / sqrt d + relation_bias(boxes))``; ``boxes`` default to the cells of the image's grid."""
    x, qkv_w, qkv_b, proj_w, proj_b = _cast(dtype, x, qkv_w, qkv_b, proj_w, proj_b)
    B, H, W, C = x.shape
    if boxes is None:
        boxes = grid_boxes(H, W, dtype=dtype, device=x.device)
    bias = relation_bias(boxes, pos_w, pos_b, embed_dim=embed_dim, dtype=dtype)
    t = x.reshape(B, H * W, C)
    q, k, v = (_heads(p, heads) for p in _lin(t, qkv_w, qkv_b).chunk(3, -1))
    a = _softmax(q @ k.transpose(-1, -2) / math.sqrt(C // heads) + bias, -1)
    return _lin(_merge(a @ v), proj_w, proj_b).reshape(B, H, W, C)


def _unit(t):
    return t / t.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def tcpa_attention(
    x,
    cls,
    keys_c,
    prompts_c,
    keys_i,
    prompts_i,
    qkv_w,
    qkv_b,
    proj_w,
    proj_b,
    *,
    heads,
    topk_c,
    topk_i,
    dtype=torch.float64,
):
    """TCPA: tokens ``[cls, x_1 .. x_N]`` attend to every token and to the prompts matched to them: the class
    token to its ``topk_c`` CLS prompts of largest cosine similarity between the class token and the CLS-prompt
    keys, each image token to its ``topk_i`` image prompts likewise; prompts enter only as keys and values.
    Returns ``(image tokens (B, H, W, C), class token (B, C), matching loss)`` with the matching loss
    ``mean(1 - cos)`` over the CLS choices plus the same over the image-token choices."""
    ts = _cast(dtype, x, cls, keys_c, prompts_c, keys_i, prompts_i, qkv_w, qkv_b, proj_w, proj_b)
    x, cls, keys_c, prompts_c, keys_i, prompts_i, qkv_w, qkv_b, proj_w, proj_b = ts
    B, H, W, C = x.shape
    N, d = H * W, C // heads
    Pc, Pi = prompts_c.shape[0], prompts_i.shape[0]
    t = torch.cat([cls.reshape(1, 1, C).expand(B, 1, C), x.reshape(B, N, C)], 1)  # (B, N + 1, C)
    q = _heads(_lin(t, qkv_w, qkv_b)[..., :C], heads)
    keys_in = torch.cat([t, torch.cat([prompts_c, prompts_i])[None].expand(B, Pc + Pi, C)], 1)
    _, k, v = (_heads(p, heads) for p in _lin(keys_in, qkv_w, qkv_b).chunk(3, -1))
    allowed = torch.zeros(B, N + 1, N + 1 + Pc + Pi, dtype=torch.bool, device=x.device)
    allowed[:, :, : N + 1] = True
    loss_c, loss_i = [], []
    uc, ui = _unit(keys_c), _unit(keys_i)
    for b in range(B):
        sim = torch.stack([(_unit(t[b, 0]) * uc[p]).sum() for p in range(Pc)])
        for p in _top_indices(sim, topk_c):
            allowed[b, 0, N + 1 + p] = True
            loss_c.append(1 - sim[p])
        for n in range(1, N + 1):
            sim = torch.stack([(_unit(t[b, n]) * ui[p]).sum() for p in range(Pi)])
            for p in _top_indices(sim, topk_i):
                allowed[b, n, N + 1 + Pc + p] = True
                loss_i.append(1 - sim[p])
    s = q @ k.transpose(-1, -2) / math.sqrt(d)
    a = _softmax(s.masked_fill(~allowed[:, None], -math.inf), -1)
    out = _lin(_merge(a @ v), proj_w, proj_b)
    loss = torch.stack(loss_c).mean() + torch.stack(loss_i).mean()
    return out[:, 1:].reshape(B, H, W, C), out[:, 0], loss
