r"""Naive differential attention (Diff Transformer, Ye et al., 2024), the oracle of
:class:`attnkit.layers.differential.DifferentialAttention`.

.. math::
    [Q_1; Q_2] = x W_q,\quad [K_1; K_2] = x W_k,\quad V = x W_v,\qquad
    \mathrm{head}_h = \big(\mathrm{softmax}(s Q_1 K_1^\top + M) - \lambda\, \mathrm{softmax}(s Q_2 K_2^\top + M)\big) V,

    \lambda = e^{\lambda_{q1}\cdot\lambda_{k1}} - e^{\lambda_{q2}\cdot\lambda_{k2}} + \lambda_{\mathrm{init}},\qquad
    \mathrm{out} = \mathrm{concat}_h\big((1-\lambda_{\mathrm{init}})\,\mathrm{RMSNorm}(\mathrm{head}_h)\big) W_o

Written for clarity: every map is a full explicit softmax over a ``(B, H, Nq, Nk)`` matrix. It imports only
torch and :mod:`attnkit.errors`; the layer hands it its weights, the RoPE angles and the boolean mask of its
pattern (so the oracle never runs a pattern object of its own).
"""

from __future__ import annotations

import torch

from ..errors import ShapeError, bad


def _rope(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # rotate_half layout on the first R = cos.shape[-1] channels; cos/sin (N, R) or (B, N, R).
    if cos.dim() == 3:
        cos, sin = cos[:, None], sin[:, None]
    r = cos.shape[-1]
    xr, rest = t[..., :r], t[..., r:]
    half = r // 2
    rot = torch.cat((-xr[..., half:], xr[..., :half]), dim=-1)
    return torch.cat((xr * cos.to(t.dtype) + rot * sin.to(t.dtype), rest), dim=-1)


def _softmax_map(q, k, visible, scale):
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    s = s.masked_fill(~visible, float("-inf"))
    live = visible.any(-1, keepdim=True)
    s = s.masked_fill(~live, 0.0)
    return torch.softmax(s, dim=-1) * live


def differential_attention(
    x: torch.Tensor,
    *,
    wq: torch.Tensor,
    wk: torch.Tensor,
    wv: torch.Tensor,
    wo: torch.Tensor,
    heads: int,
    kv_heads: int,
    head_dim: int,
    lambda_q1: torch.Tensor,
    lambda_k1: torch.Tensor,
    lambda_q2: torch.Tensor,
    lambda_k2: torch.Tensor,
    lambda_init: float,
    norm_weight: torch.Tensor | None = None,
    norm: bool = True,
    eps: float = 1e-5,
    biases: tuple | None = None,
    rope: tuple | None = None,
    mask: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    causal: bool = True,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Differential attention of ``x`` ``(B, N, dim)`` in ``dtype``; see the module docstring.

    ``wq`` ``(heads * 2 * head_dim, dim)`` holds, per head, ``Q_1`` then ``Q_2`` (``head_dim`` channels each);
    ``wk`` ``(kv_heads * 2 * head_dim, dim)`` likewise ``K_1, K_2``; ``wv`` ``(kv_heads * 2 * head_dim, dim)``;
    ``wo`` ``(dim, heads * 2 * head_dim)``. Head ``h`` uses key/value head ``h // (heads / kv_heads)``.
    ``biases``: ``(bq, bk, bv, bo)`` or None. ``rope``: ``(cos, sin)`` ``(N, R)`` or ``(B, N, R)`` applied to
    each half of the queries and keys. ``mask``: bool, broadcastable to ``(B, heads, N, N)``, True = visible
    (the pattern); ``causal`` intersects it with ``j <= i``. ``norm=False``: neither the RMSNorm nor the
    ``1 - lambda_init`` factor.
    """
    if x.dim() != 3:
        raise ShapeError(bad("x", "(B, N, dim)", tuple(x.shape)))
    if heads % kv_heads:
        raise ShapeError(bad("kv_heads", f"a divisor of heads={heads}", kv_heads))
    B, N, _ = x.shape
    d = head_dim
    xd = x.to(dtype)
    bq, bk, bv, bo = (None,) * 4 if biases is None else tuple(None if b is None else b.to(dtype) for b in biases)
    q = torch.nn.functional.linear(xd, wq.to(dtype), bq).view(B, N, heads, 2, d).permute(3, 0, 2, 1, 4)
    k = torch.nn.functional.linear(xd, wk.to(dtype), bk).view(B, N, kv_heads, 2, d).permute(3, 0, 2, 1, 4)
    v = torch.nn.functional.linear(xd, wv.to(dtype), bv).view(B, N, kv_heads, 2 * d).transpose(1, 2)
    q1, q2, k1, k2 = q[0], q[1], k[0], k[1]
    if rope is not None:
        cos, sin = rope
        q1, q2, k1, k2 = (_rope(t, cos, sin) for t in (q1, q2, k1, k2))
    g = heads // kv_heads
    k1, k2, v = (t.repeat_interleave(g, 1) for t in (k1, k2, v))
    visible = torch.ones(1, 1, N, N, dtype=torch.bool, device=x.device)
    if causal:
        visible = visible & torch.ones(N, N, dtype=torch.bool, device=x.device).tril()
    if mask is not None:
        visible = visible & mask
    if key_padding_mask is not None:
        visible = visible & key_padding_mask[:, None, None, :]
    scale = d**-0.5
    a1 = _softmax_map(q1, k1, visible, scale)
    a2 = _softmax_map(q2, k2, visible, scale)
    lam = (
        torch.exp((lambda_q1.to(dtype) * lambda_k1.to(dtype)).sum())
        - torch.exp((lambda_q2.to(dtype) * lambda_k2.to(dtype)).sum())
        + lambda_init
    )
    out = torch.matmul(a1 - lam * a2, v)  # (B, heads, N, 2d)
    if norm:
        out = out * torch.rsqrt(out.pow(2).mean(-1, keepdim=True) + eps)
        if norm_weight is not None:
            out = out * norm_weight.to(dtype)
        out = out * (1 - lambda_init)
    out = out.transpose(1, 2).reshape(B, N, heads * 2 * d)
    return torch.nn.functional.linear(out, wo.to(dtype), bo)
