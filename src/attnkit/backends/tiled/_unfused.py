"""The unfused path of the tiled kernel: per segment of a :func:`~._plan._plan` chunk, the masked, modified
logits (``bmm``), and for the softmax ``exp`` and a second ``bmm``, segments merged by their lse. It serves score
mods and token-grain selections in the torch-op forward; :mod:`._normalize` and :mod:`._backward` build on its
logits."""

from __future__ import annotations

import torch

from ._common import _keys, _merge, _Unit
from ._plan import _Chunk


def _positions(ch: _Chunk, unit: _Unit, ids, stride, s, device):
    """Broadcast index tensors (h, q_idx, kv_idx) for a score mod on a ``(C, G*bq, L)`` segment."""
    r0, r1, G, bq, bk = ch.r0, ch.r1, unit.G, unit.bq, unit.bk
    C = r1 - r0
    h = (unit.h0 + torch.arange(G, device=device)).repeat_interleave(bq)[None, :, None]
    qi = (unit.q_offset + torch.arange(r0 * bq, r1 * bq, device=device).view(C, 1, bq).expand(C, G, bq)).reshape(
        C, G * bq, 1
    )
    kv = (ids.view(C, s)[:, :, None] * bk + torch.arange(bk, device=device)).view(C, 1, s * bk)
    if stride is not None:
        kv = ((stride[0] + torch.arange(C) * stride[1])[:, None] * bk + torch.arange(s * bk)).view(C, 1, s * bk)
    return h, qi, kv


def _scores(qc, kc, bias, *, scale, score, pos, kpm_c):
    """Masked, modified logits of one segment, ``(C, G * bq, L)``; ``pos`` gives index tensors for mods."""
    C, R, _ = qc.shape
    raw = None
    if bias is not None and bias.dtype != qc.dtype:
        bias = bias.to(qc.dtype)
    if score is None and bias is not None and bias.shape[2] == R:
        s = torch.baddbmm(bias.view(C, R, -1), qc, kc.transpose(1, 2), alpha=scale)
    else:
        s = torch.bmm(qc, kc.transpose(1, 2)).mul_(scale)
        if score is not None:
            raw = s
            s = score.score_mod(s, 0, *pos)
        if bias is not None:
            sv = s.view(C, -1, bias.shape[2], s.shape[-1])
            sv.add_(bias)
    if kpm_c is not None:
        s.masked_fill_(~kpm_c[:, None, :], float("-inf"))
    return s, raw


def _segment(ch: _Chunk, seg, qc, unit: _Unit):
    """Keys, values and masked logits of one segment of a chunk: ``(s, raw, kc, vc, pos)``.

    ``unit.sel`` is ``(layout, group)`` when the layout carries a token-grain
    :class:`~attnkit.layout.TokenSelect`."""
    a, e, ids, bias, stride = seg
    C, s_len = ch.r1 - ch.r0, e - a
    bq, bk, kpm_b = unit.bq, unit.bk, unit.kpm_b
    kc = _keys(unit.kb, ids, stride, C, s_len, bk)
    vc = _keys(unit.vb, ids, stride, C, s_len, bk)
    pos = _positions(ch, unit, ids, stride, s_len, qc.device) if unit.score else None
    kpm_c = _keys(kpm_b.view(-1, 1), ids, stride, C, s_len, bk)[..., 0] if kpm_b is not None else None
    s, raw = _scores(qc, kc, bias, scale=unit.scale, score=unit.score, pos=pos, kpm_c=kpm_c)
    if unit.sel is not None:
        layout, g = unit.sel
        qi = torch.arange(ch.r0 * bq, ch.r1 * bq).view(C, 1, bq, 1)
        kj = (ids.view(C, s_len)[:, :, None] * bk + torch.arange(bk)).view(C, 1, 1, s_len * bk)
        ok = layout.select.allowed(g, qi, kj, block_q=bq, block_k=bk, q_offset=layout.q_offset, kv_len=layout.kv_len)
        s.view(C, unit.G, bq, -1).masked_fill_(~ok, float("-inf"))
    return s, raw, kc, vc, pos


def _softmax_v(s: torch.Tensor, vc: torch.Tensor, out: torch.Tensor | None = None):
    """``softmax(s) @ vc`` and ``logsumexp(s)``, in place on ``s``; rows of only ``-inf`` give 0 and ``-inf``."""
    m = s.amax(-1, keepdim=True)
    m = m.masked_fill_(torch.isinf(m), 0.0)
    p = s.sub_(m).exp_()
    denom = p.sum(-1, keepdim=True)
    o = torch.bmm(p, vc, out=out).div_(denom.clamp(min=torch.finfo(s.dtype).tiny))
    return o, (m + denom.log()).squeeze(-1)


def _softmax(ch: _Chunk, qc, unit: _Unit, *, out, lse_out):
    """One chunk's softmax into ``out`` ``(C, G*bq, Dv)`` and ``lse_out`` ``(C, G*bq)``, segments merged by lse.

    A chunk of one segment (the common case) writes its product straight into ``out``, with no copy."""
    acc = lse = None
    single = len(ch.segments) == 1
    for seg in ch.segments:
        s, _, _, vc, _ = _segment(ch, seg, qc, unit)
        o, lse_s = _softmax_v(s, vc, out if single else None)
        acc, lse = (o, lse_s) if acc is None else _merge(acc, lse, o, lse_s)
    if acc is None:
        out[...] = 0
    elif acc.data_ptr() != out.data_ptr():
        out[...] = acc
    if lse is not None:
        lse_out[...] = lse
