"""The float64 oracle of :class:`attnkit.layers.Attention`: projections, QK-norm, rotary embedding and attention
written out naively (explicit angles, full weight matrices) on the layer's own weights."""

from __future__ import annotations

import torch

from .softmax import attention


def rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, rotated: int, magnitude: float = 1.0):
    """Rotate channel pairs ``(i, i + rotated/2)`` of ``x (B, H, N, D)`` by ``positions * inv_freq[i]``, one
    2x2 rotation per pair (no ``rotate_half`` trick)."""
    out = x.clone()
    half = rotated // 2
    pos = positions.to(x.dtype)
    if pos.dim() == 2:
        pos = pos[:, None]  # (B, 1, N)
    for i in range(half):
        a = pos * inv_freq[i].to(x.dtype)
        c, s = torch.cos(a) * magnitude, torch.sin(a) * magnitude
        x0, x1 = x[..., i], x[..., i + half]
        out[..., i] = c * x0 - s * x1
        out[..., i + half] = s * x0 + c * x1
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float | None):
    eps = torch.finfo(x.dtype).eps if eps is None else eps
    y = x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)
    return y if weight is None else y * weight.to(x.dtype)


def attention_layer(
    x: torch.Tensor,
    weights: dict,
    *,
    heads: int,
    kv_heads: int,
    head_dim: int,
    context: torch.Tensor | None = None,
    positions: torch.Tensor | None = None,
    rotary: tuple | None = None,
    norm_eps: float | None = None,
    attend=None,
    dtype: torch.dtype = torch.float64,
    **attention_kw,
):
    """Multi-head attention in ``dtype``: ``weights`` holds ``q_proj, k_proj, v_proj, o_proj`` (``.weight``
    and optional ``.bias``) and optional ``q_norm, k_norm`` gains; ``rotary = (inv_freq, rotated, magnitude)``;
    ``attend(q, k, v)`` replaces softmax attention (a linear mechanism's own oracle), otherwise
    :func:`attnkit.reference.attention` runs with ``attention_kw`` (mask, score, normalizer, key padding)."""
    w = {name: t.to(dtype) for name, t in weights.items()}
    xd = x.to(dtype)
    c = xd if context is None else context.to(dtype)

    def lin(name, t):
        y = t @ w[f"{name}.weight"].T
        return y + w[f"{name}.bias"] if f"{name}.bias" in w else y

    B, N, Nk = xd.shape[0], xd.shape[1], c.shape[1]
    q = lin("q_proj", xd).reshape(B, N, heads, head_dim).permute(0, 2, 1, 3)
    k = lin("k_proj", c).reshape(B, Nk, kv_heads, head_dim).permute(0, 2, 1, 3)
    v = lin("v_proj", c).reshape(B, Nk, kv_heads, head_dim).permute(0, 2, 1, 3)
    if "q_norm.weight" in w:
        q, k = rms_norm(q, w["q_norm.weight"], norm_eps), rms_norm(k, w["k_norm.weight"], norm_eps)
    if rotary is not None and context is None:
        pos = torch.arange(N, device=x.device) if positions is None else positions
        q, k = rope(q, pos, *rotary), rope(k, pos, *rotary)
    o = attend(q, k, v) if attend is not None else attention(q, k, v, dtype=dtype, **attention_kw)
    o = o.permute(0, 2, 1, 3).reshape(B, N, heads * o.shape[-1])
    return lin("o_proj", o)
