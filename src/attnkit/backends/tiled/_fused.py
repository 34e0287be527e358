"""The fused path of the tiled kernel's torch-op forward: each call of a :func:`~._plan._fused_plan` through
PyTorch's fused CPU flash-attention op, the calls of one row merged by their lse."""

from __future__ import annotations

import torch

from ._common import _keys, _merge, _Unit
from ._plan import _Run

# Fused softmax(Q K^T + mask) V with its logsumexp (the op F.scaled_dot_product_attention dispatches to on CPU);
# torch is pinned, and tests compare both paths against the float64 oracle.
_FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def _flash(qc, kc, vc, *, mask, dead, G, bq, scale, causal=False):
    """``softmax(scale Q K^T + mask) V`` and its ``lse`` for ``qc (C, G*bq, D)``, ``kc, vc (C, L, D)``.

    ``mask`` is additive, ``(C or 1, 1, bq or 1, L)``, or None. Without a per-query mask the G folded heads stay
    rows of one product; with one, the heads become the op's head axis (K and V broadcast, no copy) so the mask
    broadcasts over them; ``causal`` applies the op's own mask per head, query ``r`` sees key ``c <= r``. The op
    gives rows with no visible key ``out = 0`` but ``lse = 0``: ``dead`` rows (broadcastable to ``(C, 1, bq)``)
    are set to ``-inf``."""
    C, _, D = qc.shape
    L, Dv = kc.shape[1], vc.shape[-1]
    if Dv != D:
        # The op wants one head size: zero columns change neither q.k (on q, k) nor the output's first Dv.
        E = max(D, Dv)
        qc, kc, vc = (torch.nn.functional.pad(t, (0, E - t.shape[-1])) for t in (qc, kc, vc))
        out, lse = _flash(qc, kc, vc, mask=mask, dead=dead, G=G, bq=bq, scale=scale, causal=causal)
        return out[..., :Dv], lse
    mask = None if mask is None else mask.to(qc.dtype)
    kc, vc = kc[:, None], vc[:, None]
    if causal or (mask is not None and mask.shape[2] > 1):
        q4 = qc.view(C, G, bq, D)
        kc, vc = kc.expand(C, G, L, D), vc.expand(C, G, L, vc.shape[-1])
    else:
        q4 = qc.view(C, 1, G * bq, D)
    out, lse = _FLASH(q4, kc, vc, is_causal=causal, attn_mask=mask, scale=scale)
    if dead is not None:
        lse = lse.view(C, -1, bq).masked_fill(dead, float("-inf"))
    return out.reshape(C, G * bq, -1), lse.reshape(C, G * bq)


def _run_fused(runs: list[_Run], qf, unit: _Unit, out_u, lse_u):
    """Every fused call of one unit into ``out_u``, ``lse_u`` (zeros and ``-inf`` before the first)."""
    bk, kpm_b = unit.bk, unit.kpm_b
    for run in runs:
        C = run.rows.shape[0]
        qc = qf[run.span[0] : run.span[1]] if run.span else qf.index_select(0, run.rows)
        kc = _keys(unit.kb, run.ids, run.stride, C, run.s, bk)
        vc = _keys(unit.vb, run.ids, run.stride, C, run.s, bk)
        mask, dead = run.bias, run.dead
        if run.real is not None:
            mask = run.real if mask is None else mask + run.real
        if kpm_b is not None:
            keep = _keys(kpm_b.view(-1, 1), run.ids, run.stride, C, run.s, bk)[..., 0]
            pad = torch.zeros(C, 1, 1, run.s * bk).masked_fill_(~keep[:, None, None, :], float("-inf"))
            mask = pad if mask is None else mask + pad
            # Under the op's causal mask query r sees keys c <= r only: it is dead when none of those is real.
            dead = (keep.cumsum(-1) == 0)[:, None, :] if run.causal else ~torch.isfinite(mask).any(-1)
        o, lse = _flash(qc, kc, vc, mask=mask, dead=dead, G=unit.G, bq=unit.bq, scale=unit.scale, causal=run.causal)
        if run.merge and run.span:
            o, lse = _merge(out_u[run.span[0] : run.span[1]], lse_u[run.span[0] : run.span[1]], o, lse)
        elif run.merge:
            o, lse = _merge(out_u.index_select(0, run.rows), lse_u.index_select(0, run.rows), o, lse)
        if run.span:
            out_u[run.span[0] : run.span[1]] = o
            lse_u[run.span[0] : run.span[1]] = lse
        else:
            out_u.index_copy_(0, run.rows, o)
            lse_u.index_copy_(0, run.rows, lse)
