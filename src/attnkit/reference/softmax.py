"""Naive softmax (and re-normalised) attention, the truth every backend is compared with.

Conventions, identical on every backend:

* ``out = softmax(mod(scale * q k^T) + mask) v`` with ``scale = 1 / sqrt(D)`` unless given;
* grouped-query attention repeats each key/value head for ``Hq / Hkv`` consecutive query heads;
* a query row with no visible key gives ``out = 0`` and ``lse = -inf`` (never NaN);
* with a ``normalizer`` (:class:`~attnkit.scores.Sigmoid`, :class:`~attnkit.scores.Softplus`) the softmax is
  replaced by its elementwise weights ``p`` (divided by their row sum when ``l1``) and ``lse = log sum_j p``.
"""

from __future__ import annotations

import torch


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    pattern=None,
    mask: torch.Tensor | None = None,
    score=None,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    q_offset: int = 0,
    return_lse: bool = False,
    normalizer=None,
    dtype: torch.dtype = torch.float64,
):
    """Naive attention in ``dtype`` (float64 by default); returns ``out`` in ``dtype`` (and ``lse``).

    ``pattern`` (a :class:`~attnkit.patterns.Pattern`) or ``mask`` (bool, broadcastable to
    ``(B, Hq, Nq, Nk)``, True = visible) restrict the pairs; both may be given. Differentiable.
    """
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    g = Hq // Hkv
    qd, kd, vd = (t.to(dtype) for t in (q, k, v))
    kd, vd = kd.repeat_interleave(g, 1), vd.repeat_interleave(g, 1)
    scale = D**-0.5 if scale is None else scale
    s = torch.matmul(qd, kd.transpose(-1, -2)) * scale
    if score is not None:
        h = torch.arange(Hq, device=q.device)[None, :, None, None]
        qi = torch.arange(q_offset, q_offset + Nq, device=q.device)[None, None, :, None]
        ki = torch.arange(Nk, device=q.device)[None, None, None, :]
        s = score.score_mod(s, 0, h, qi, ki)
    visible = torch.ones(1, 1, Nq, Nk, dtype=torch.bool, device=q.device)
    if pattern is not None:
        visible = visible & pattern.dense_mask(Nq, Nk, q_offset, Hq, device=q.device)[None]
    if mask is not None:
        visible = visible & mask
    if key_padding_mask is not None:
        visible = visible & key_padding_mask[:, None, None, :]
    if normalizer is not None:
        return _renormalised(s, visible, vd, normalizer.bind(Nk), return_lse)
    s = s.masked_fill(~visible, float("-inf"))
    # Rows with no visible key: softmax over zeros, then zeroed, so neither values nor gradients are NaN.
    live = visible.any(-1, keepdim=True)
    s = s.masked_fill(~live, 0.0)
    p = torch.softmax(s, dim=-1) * live
    lse = torch.logsumexp(s, dim=-1).masked_fill(~live[..., 0], float("-inf"))
    out = torch.matmul(p, vd)
    return (out, lse) if return_lse else out


def _renormalised(s, visible, vd, normalizer, return_lse):
    visible = visible.expand(s.shape)
    n = visible.sum(-1, keepdim=True).to(s.dtype)
    p = normalizer.weights(s.masked_fill(~visible, 0.0), n) * visible
    den = p.sum(-1, keepdim=True)
    w = p / den.clamp_min(torch.finfo(s.dtype).tiny) if normalizer.l1 else p
    out = torch.matmul(w, vd)
    return (out, den[..., 0].log()) if return_lse else out
