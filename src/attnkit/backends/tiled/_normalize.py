"""Non-softmax normalisers (:class:`~attnkit.scores.Normalizer`) in the tiled kernel: elementwise weights
``p(s_ij)`` of the unfused path's logits, summed over segments (no lse merge), and their gradient."""

from __future__ import annotations

import torch

from ._common import _keys, _Unit
from ._plan import _Chunk
from ._unfused import _segment


def _row_counts(ch: _Chunk, unit: _Unit, dtype):
    """Visible keys per row of a chunk, ``(C, G * bq, 1)``: from the tile masks and the key padding alone."""
    C = ch.r1 - ch.r0
    bq, bk, kpm_b = unit.bq, unit.bk, unit.kpm_b
    n = torch.zeros(C, 1, bq, dtype=dtype)
    for a, e, ids, bias, stride in ch.segments:
        vis = torch.ones(C, 1, 1, (e - a) * bk, dtype=torch.bool) if bias is None else torch.isfinite(bias)
        if kpm_b is not None:
            vis = vis & _keys(kpm_b.view(-1, 1), ids, stride, C, e - a, bk)[..., 0][:, None, None, :]
        n += vis.sum(-1).expand(C, 1, bq)
    return n.expand(C, unit.G, bq).reshape(C, unit.G * bq, 1)


def _probs(normalizer, s, cnt):
    """Elementwise weights of a segment; masked pairs (``-inf``) get 0."""
    fin = torch.isfinite(s)
    return normalizer.weights(s.masked_fill(~fin, 0.0), cnt).mul_(fin)


def _elementwise(ch: _Chunk, qc, unit: _Unit, normalizer):
    """One chunk under a non-softmax normaliser: ``(out, log sum_j p_ij)``; segments simply add up."""
    if not ch.segments:
        return 0.0, float("-inf")
    cnt = _row_counts(ch, unit, qc.dtype) if normalizer.needs_count else None
    acc = den = None
    for seg in ch.segments:
        s, _, _, vc, _ = _segment(ch, seg, qc, unit)
        p = _probs(normalizer, s, cnt)
        o, d = torch.bmm(p, vc), p.sum(-1)
        acc, den = (o, d) if acc is None else (acc + o, den + d)
    if normalizer.l1:
        acc = acc / den.clamp_min(torch.finfo(den.dtype).tiny).unsqueeze(-1)
    return acc, den.log()


def _elementwise_grad(normalizer, s, cnt, doc, vc, *, lse_c, delta_c, dvb, ids, bk, Dv):
    """``dS`` of one segment under a non-softmax normaliser (``dV`` is accumulated here).

    Without ``l1``: ``out = sum p v``, so ``dS = (dO V^T) * p'(s)``. With ``l1`` (``den = exp(lse)``):
    ``dS = (dO V^T - delta) / den * p'(s)``, the softmax rule with ``p'`` in place of ``p``.
    """
    fin = torch.isfinite(s)
    sc = s.masked_fill(~fin, 0.0)
    p = normalizer.weights(sc, cnt).mul_(fin)
    dp = torch.bmm(doc, vc.transpose(1, 2))
    if normalizer.l1:
        den = lse_c.exp()  # rows without keys were given lse = +inf: their weights and gradients are 0
        p = p / den
        dp = dp.sub_(delta_c).div_(den)
    dvb.index_add_(0, ids, torch.bmm(p.transpose(1, 2), doc).view(-1, bk, Dv))
    return dp.mul_(normalizer.grad(sc, cnt)).mul_(fin)
