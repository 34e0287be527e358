r"""Naive attentive probes over frozen token features, the oracle of :mod:`attnkit.layers.probe`.

* :func:`efficient_probe` (Efficient Probing, Psomas et al., 2025): ``M`` learned queries ``u_m`` attend to
  the *unprojected* tokens, and each pools its own slice of one value projection,

  .. math::
      a_m = \mathrm{softmax}_j(u_m \cdot x_j / \sqrt{C}),\qquad
      z = \mathrm{concat}_m \textstyle\sum_j a_{mj}\, (x_j W_v)_{[m C'/M,\,(m+1) C'/M)},\qquad
      \mathrm{logits} = \mathrm{LN}(z) W_c + b_c

  (``C' = C / d_{out}``): no query, key or output projection.
* :func:`attentive_probe`: multi-head cross attention of ``M`` learned queries with full ``W_q, W_k, W_v, W_o``,
  averaged over the queries, then the classifier.
* :func:`mean_probe`: the mean of the real tokens, then the classifier.

``LN`` is a layer normalisation without gain or bias (``norm=False``: none). Padded tokens (``key_padding_mask``
False) take no part. Every softmax is explicit over the full ``(B, M, N)`` weights.
"""

from __future__ import annotations

import torch

from ..errors import ShapeError, bad


def _check(x, key_padding_mask):
    if x.dim() != 3:
        raise ShapeError(bad("x", "(B, N, dim)", tuple(x.shape)))
    if key_padding_mask is not None and tuple(key_padding_mask.shape) != tuple(x.shape[:2]):
        raise ShapeError(bad("key_padding_mask", f"(B, N) = {tuple(x.shape[:2])}", tuple(key_padding_mask.shape)))


def _softmax(s, key_padding_mask):
    # s (B, ..., N); a row with no real token gives weights 0
    if key_padding_mask is None:
        return torch.softmax(s, dim=-1)
    vis = key_padding_mask.view(key_padding_mask.shape[0], *([1] * (s.dim() - 2)), key_padding_mask.shape[1])
    s = s.masked_fill(~vis, float("-inf"))
    live = vis.any(-1, keepdim=True)
    return torch.softmax(s.masked_fill(~live, 0.0), dim=-1) * live


def _head(z, wc, bc, norm, dtype):
    if norm:
        z = z - z.mean(-1, keepdim=True)
        z = z * torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + 1e-5)
    return torch.nn.functional.linear(z, wc.to(dtype), None if bc is None else bc.to(dtype))


def efficient_probe(
    x, *, query, wv, bv=None, wc, bc=None, key_padding_mask=None, norm=True, dtype=torch.float64
) -> torch.Tensor:
    """Efficient probing: ``query`` ``(M, C)``, ``wv`` ``(C', C)``; returns logits ``(B, classes)``."""
    _check(x, key_padding_mask)
    B, N, C = x.shape
    M = query.shape[0]
    xd = x.to(dtype)
    s = torch.einsum("mc,bnc->bmn", query.to(dtype), xd) * C**-0.5
    a = _softmax(s, key_padding_mask)  # (B, M, N)
    v = torch.nn.functional.linear(xd, wv.to(dtype), None if bv is None else bv.to(dtype))
    v = v.view(B, N, M, -1)  # query m pools the m-th slice of the values
    z = torch.einsum("bmn,bnmc->bmc", a, v).reshape(B, -1)
    return _head(z, wc, bc, norm, dtype)


def attentive_probe(
    x,
    *,
    query,
    wq,
    wk,
    wv,
    wo,
    heads,
    wc,
    bc=None,
    biases=None,
    key_padding_mask=None,
    norm=True,
    dtype=torch.float64,
) -> torch.Tensor:
    """Full multi-head attentive probe: ``query`` ``(M, C)``, ``w*`` ``(C, C)``, ``biases`` ``(bq, bk, bv, bo)``."""
    _check(x, key_padding_mask)
    B, N, C = x.shape
    M, d = query.shape[0], C // heads
    bq, bk, bv, bo = (None,) * 4 if biases is None else tuple(None if b is None else b.to(dtype) for b in biases)
    xd = x.to(dtype)
    lin = torch.nn.functional.linear
    q = lin(query.to(dtype), wq.to(dtype), bq).view(M, heads, d).transpose(0, 1)  # (H, M, d)
    k = lin(xd, wk.to(dtype), bk).view(B, N, heads, d).transpose(1, 2)  # (B, H, N, d)
    v = lin(xd, wv.to(dtype), bv).view(B, N, heads, d).transpose(1, 2)
    s = torch.matmul(q[None], k.transpose(-1, -2)) * d**-0.5  # (B, H, M, N)
    o = torch.matmul(_softmax(s, key_padding_mask), v)  # (B, H, M, d)
    o = lin(o.transpose(1, 2).reshape(B, M, C), wo.to(dtype), bo)
    return _head(o.mean(1), wc, bc, norm, dtype)


def mean_probe(x, *, wc, bc=None, key_padding_mask=None, norm=True, dtype=torch.float64) -> torch.Tensor:
    """The mean of the real tokens, then the classifier."""
    _check(x, key_padding_mask)
    xd = x.to(dtype)
    if key_padding_mask is None:
        z = xd.mean(1)
    else:
        m = key_padding_mask[..., None].to(dtype)
        z = (xd * m).sum(1) / m.sum(1).clamp_min(1)
    return _head(z, wc, bc, norm, dtype)
