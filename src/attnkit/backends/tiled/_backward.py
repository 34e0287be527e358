"""The tiled kernel's backward: the probabilities recomputed chunk by chunk from the unfused path's logits and
the saved lse (FlashAttention-2 style), key-side gradients scattered with ``index_add_``."""

from __future__ import annotations

import torch

from ...layout import BlockLayout
from ._common import _fold, _grouping, _pad_seq, _prepare, _unfold, _work
from ._normalize import _elementwise_grad, _row_counts
from ._plan import _plan
from ._unfused import _segment


def backward(
    dout,
    q,
    k,
    v,
    out,
    lse,
    layout: BlockLayout,
    scale: float,
    score=None,
    key_padding_mask=None,
    q_offset: int = 0,
    normalizer=None,
):
    """Gradients ``(dq, dk, dv)`` of :func:`~attnkit.backends.tiled.forward`, recomputing the probabilities tile
    by tile."""
    B, Hq, Nq, D = q.shape
    Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
    bq, bk = layout.block_q, layout.block_k
    nqb, nkb = layout.num_q_blocks, layout.num_kv_blocks
    cd, qp, kp, vp, kpm = _prepare(q, k, v, layout, key_padding_mask)
    dop = _pad_seq(dout, nqb * bq, cd)
    delta = (dop * _pad_seq(out, nqb * bq, cd)).sum(-1)
    lse_p = torch.full((B, Hq, nqb * bq), float("-inf"), dtype=cd)
    lse_p[:, :, :Nq] = lse
    lse_p = lse_p.masked_fill(torch.isinf(lse_p), float("inf"))  # p = exp(s - inf) = 0 on empty rows
    G = _grouping(layout, B, Hq, Hkv)
    dq = torch.zeros_like(qp)
    dk = torch.zeros_like(kp)
    dv = torch.zeros_like(vp)
    for b, lh, hk, h0, unit in _work(layout, Hq, kp, vp, kpm, G=G, q_offset=q_offset, scale=scale, score=score):
        qf = _fold(qp[b, h0 : h0 + G], G, nqb, bq)
        dof = _fold(dop[b, h0 : h0 + G], G, nqb, bq)
        lsef = _fold(lse_p[b, h0 : h0 + G, :, None], G, nqb, bq)[..., 0]
        deltaf = _fold(delta[b, h0 : h0 + G, :, None], G, nqb, bq)[..., 0]
        dqf = torch.zeros_like(qf)
        dkb, dvb = dk[b, hk].view(nkb, bk, D), dv[b, hk].view(nkb, bk, Dv)
        for ch in _plan(layout, lh, G * bq):
            qc, doc = qf[ch.r0 : ch.r1], dof[ch.r0 : ch.r1]
            lse_c, delta_c = lsef[ch.r0 : ch.r1, :, None], deltaf[ch.r0 : ch.r1, :, None]
            cnt = None
            if normalizer is not None and normalizer.needs_count and ch.segments:
                cnt = _row_counts(ch, unit, qc.dtype)
            for seg in ch.segments:
                s, raw, kc, vc, pos = _segment(ch, seg, qc, unit)
                ids = seg[2]
                if normalizer is None:
                    p = s.sub_(lse_c).exp_()
                    dvb.index_add_(0, ids, torch.bmm(p.transpose(1, 2), doc).view(-1, bk, Dv))
                    ds = torch.bmm(doc, vc.transpose(1, 2)).sub_(delta_c).mul_(p)
                else:
                    ds = _elementwise_grad(
                        normalizer, s, cnt, doc, vc, lse_c=lse_c, delta_c=delta_c, dvb=dvb, ids=ids, bk=bk, Dv=Dv
                    )
                if raw is not None:
                    ds.mul_(score.grad(raw, *pos))
                ds.mul_(scale)
                dqf[ch.r0 : ch.r1].add_(torch.bmm(ds, kc))
                dkb.index_add_(0, ids, torch.bmm(ds.transpose(1, 2), qc).view(-1, bk, D))
        dq[b, h0 : h0 + G] = _unfold(dqf, G, nqb, bq)
    return dq[:, :, :Nq].to(q.dtype), dk[:, :, :Nk].to(k.dtype), dv[:, :, :Nk].to(v.dtype)
