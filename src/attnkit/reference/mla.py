r"""The float64 oracle of multi-head latent attention (DeepSeek-V2, 2024): the naive form, everything expanded.

.. math::
    c_j = \mathrm{RMSNorm}(W_{DKV} x_j) \in \mathbb{R}^{r}, \qquad
    k^R_j = \mathrm{rope}_j(W_{KR} x_j) \in \mathbb{R}^{d_R} \ (\text{one for all heads}),\\
    k^C_{h,j} = W_{UK,h}\, c_j, \qquad v_{h,j} = W_{UV,h}\, c_j, \qquad
    q_{h,i} = [q^C_{h,i};\ \mathrm{rope}_i(q^R_{h,i})] \ \text{from } W_Q x_i
    \ (\text{or } W_{UQ}\,\mathrm{RMSNorm}(W_{DQ} x_i)),\\
    s_{h,ij} = \frac{q^C_{h,i}\cdot k^C_{h,j} + \mathrm{rope}_i(q^R_{h,i})\cdot k^R_j}{\sqrt{d_C + d_R}},\qquad
    \mathrm{out}_i = W_O\, \mathrm{concat}_h \sum_j \mathrm{softmax}_j(s_{h,ij})\, v_{h,j}

over the keys ``j`` that are not padding (and ``j <= i`` when causal). A query that sees no key gives 0.
RoPE is the ``rotate_half`` layout of :mod:`attnkit.layers.rope` (channel ``t`` paired with ``t + d_R/2``, angle
``p * inv_freq[t]``), angles computed in float64 for float64 input and in float32 otherwise.

This module imports only torch and the error types (the oracle imports no implementation).
"""

from __future__ import annotations

import math

import torch

from ..errors import ShapeError, bad


def _rms(x, w, eps):
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return y if w is None else y * w


def _rope(x, positions, inv_freq):
    cd = torch.float64 if x.dtype == torch.float64 else torch.float32
    ang = positions.to(cd)[..., None] * inv_freq.to(device=x.device, dtype=cd)
    ang = torch.cat((ang, ang), -1)
    cos, sin = ang.cos(), ang.sin()
    if cos.dim() == 3:  # (B, N, R) -> broadcast over heads
        cos, sin = cos[:, None], sin[:, None]
    half = x.shape[-1] // 2
    xr = x.to(cd)
    rot = torch.cat((-xr[..., half:], xr[..., :half]), -1)
    return (xr * cos + rot * sin).to(x.dtype)


def mla_attention(
    x: torch.Tensor,
    *,
    weights: dict,
    heads: int,
    kv_lora_rank: int,
    qk_nope_dim: int,
    qk_rope_dim: int,
    v_dim: int,
    inv_freq: torch.Tensor,
    positions: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    causal: bool = True,
    kv_norm: bool = True,
    eps: float = 1e-6,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Naive MLA of ``x`` ``(B, N, dim)`` in ``dtype`` (see the module docstring).

    ``weights``: ``q_proj`` or (``q_a_proj``, ``q_a_layernorm``, ``q_b_proj``), ``kv_a_proj_with_mqa``
    (``(r + d_R, dim)``), ``kv_a_layernorm`` (the latent RMSNorm's gain, used when ``kv_norm``), ``kv_b_proj``
    (``(heads * (d_C + d_v), r)``, per head ``[W_UK,h; W_UV,h]``), ``o_proj``; torch ``Linear`` layout
    (``out x in``), no biases.
    """
    if x.dim() != 3:
        raise ShapeError(bad("x", "(B, N, dim)", tuple(x.shape)))
    w = {k: (None if v is None else v.to(dtype)) for k, v in weights.items()}
    x = x.to(dtype)
    B, N, _ = x.shape
    H, r, dn, dr, dv = heads, kv_lora_rank, qk_nope_dim, qk_rope_dim, v_dim
    if positions is None:
        positions = torch.arange(N, device=x.device)
    if w.get("q_proj") is not None:
        q = x @ w["q_proj"].T
    else:
        q = _rms(x @ w["q_a_proj"].T, w["q_a_layernorm"], eps) @ w["q_b_proj"].T
    q = q.view(B, N, H, dn + dr).transpose(1, 2)
    q_nope, q_rope = q[..., :dn], _rope(q[..., dn:], positions, inv_freq)
    kv = x @ w["kv_a_proj_with_mqa"].T
    c = _rms(kv[..., :r], w.get("kv_a_layernorm"), eps) if kv_norm else kv[..., :r]
    k_rope = _rope(kv[..., r:][:, None], positions, inv_freq)  # (B, 1, N, dr)
    up = (c @ w["kv_b_proj"].T).view(B, N, H, dn + dv).transpose(1, 2)
    k_nope, v = up[..., :dn], up[..., dn:]
    s = (q_nope @ k_nope.transpose(-1, -2) + q_rope @ k_rope.transpose(-1, -2)) / math.sqrt(dn + dr)
    allowed = torch.ones(N, N, dtype=torch.bool, device=x.device)
    if causal:
        allowed = torch.tril(allowed)
    allowed = allowed[None, None]
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask.to(torch.bool)[:, None, None, :]
    s = s.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(s, -1)
    p = torch.where(allowed.any(-1, keepdim=True), p, torch.zeros((), dtype=p.dtype, device=p.device))
    out = (p @ v).transpose(1, 2).reshape(B, N, H * dv)
    return out @ w["o_proj"].T


def tpla_attention(
    x: torch.Tensor,
    *,
    weights: dict,
    heads: int,
    kv_lora_rank: int,
    qk_nope_dim: int,
    qk_rope_dim: int,
    v_dim: int,
    shards: int,
    inv_freq: torch.Tensor,
    positions: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    causal: bool = True,
    kv_norm: bool = True,
    eps: float = 1e-6,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    r"""Naive TPLA (:mod:`attnkit.layers.tpla`): shard ``s`` of ``shards`` holds latent channels
    ``[s r/S, (s+1) r/S)`` (RMS-normalised on their own when ``kv_norm``), every head attends on every shard with
    logits :math:`(q^C_h W_{UK,h}^{(s)}) \cdot c^{(s)} + q^R_h \cdot k^R` over its own softmax, and the outputs
    :math:`W_{UV,h}^{(s)} \sum_j p^{(s)}_{hij} c^{(s)}_j` are summed over shards (the all-reduce)."""
    w = {k: (None if v is None else v.to(dtype)) for k, v in weights.items()}
    x = x.to(dtype)
    B, N, _ = x.shape
    H, r, dn, dr, dv, S = heads, kv_lora_rank, qk_nope_dim, qk_rope_dim, v_dim, shards
    if r % S:
        raise ShapeError(bad("shards", f"a divisor of kv_lora_rank={r}", S))
    if positions is None:
        positions = torch.arange(N, device=x.device)
    if w.get("q_proj") is not None:
        q = x @ w["q_proj"].T
    else:
        q = _rms(x @ w["q_a_proj"].T, w["q_a_layernorm"], eps) @ w["q_b_proj"].T
    q = q.view(B, N, H, dn + dr).transpose(1, 2)
    q_nope, q_rope = q[..., :dn], _rope(q[..., dn:], positions, inv_freq)
    kv = x @ w["kv_a_proj_with_mqa"].T
    k_rope = _rope(kv[..., r:][:, None], positions, inv_freq)
    up = w["kv_b_proj"].view(H, dn + dv, r)
    allowed = torch.ones(N, N, dtype=torch.bool, device=x.device)
    if causal:
        allowed = torch.tril(allowed)
    allowed = allowed[None, None]
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask.to(torch.bool)[:, None, None, :]
    out = 0
    n = r // S
    for s in range(S):
        sl = slice(s * n, (s + 1) * n)
        c = kv[..., sl]
        if kv_norm:
            c = _rms(c, None if w.get("kv_a_layernorm") is None else w["kv_a_layernorm"][sl], eps)
        wk, wv = up[:, :dn, sl], up[:, dn:, sl]  # (H, dn, n), (H, dv, n)
        kh = torch.einsum("hdr,bjr->bhjd", wk, c)  # per-head keys from this shard's latent
        vh = torch.einsum("hdr,bjr->bhjd", wv, c)
        logits = (q_nope @ kh.transpose(-1, -2) + q_rope @ k_rope.transpose(-1, -2)) / math.sqrt(dn + dr)
        logits = logits.masked_fill(~allowed, float("-inf"))
        p = torch.softmax(logits, -1)
        p = torch.where(allowed.any(-1, keepdim=True), p, torch.zeros((), dtype=p.dtype, device=p.device))
        out = out + p @ vh
    return out.transpose(1, 2).reshape(B, N, H * dv) @ w["o_proj"].T
