"""``sdpa``: dense or masked attention through ``torch.nn.functional.scaled_dot_product_attention``.

A pattern becomes a dense boolean mask (cached per pattern and shape); additive score mods become a float
mask. Two fixes over plain SDPA: a query row with no visible key gives 0 (SDPA gives NaN) and ``lse`` is
available (computed in key chunks, never as one ``N x N`` tensor beyond the mask itself). A request whose
dense mask would exceed the memory budget raises :class:`~attnkit.errors.MemoryBudgetError` that names the
``tiled`` backend instead of failing in the allocator.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F

from .. import layout_cache
from ..errors import memory_budget
from ..layout_cache import Key
from .request import Request, softmax_kernel_why_not


def mask_bytes(B, Hq, Nq, Nk, pattern, key_padding_mask, score) -> int:
    """Bytes of the dense mask this backend would build (0 when none is needed)."""
    if pattern is None and key_padding_mask is None and score is None:
        return 0
    hm = Hq if (pattern is not None and pattern.num_heads) or score is not None else 1
    bm = B if key_padding_mask is not None else 1
    per = 4 if score is not None else 1
    return bm * hm * Nq * Nk * per


def carries_nonfinite(req: Request) -> bool:
    """No: a row whose logits are all NaN comes back 0 (its max is taken as -inf), so attnkit.api checks
    the inputs before the kernel."""
    return False


def why_not(req: Request, budget: int | None = None) -> str | None:
    """Why this backend cannot run the request, or None."""
    budget = memory_budget() if budget is None else budget
    why = softmax_kernel_why_not(req, "SDPA")
    if why:
        return why
    d = req.dims
    need = mask_bytes(d.batch, d.q_heads, d.q_len, d.kv_len, req.pattern, None, req.score)
    if need > budget:
        return (
            f"the dense mask needs {need / 2**20:.1f} MiB, over the memory budget of {budget / 2**20:.1f} MiB "
            f"(ATTNKIT_MEMORY_BUDGET); use backend='tiled', which never builds an N x N tensor"
        )
    return None


def _dense_mask(pattern, Nq, Nk, q_offset, Hq, device):
    key = Key("dense", pattern, Nq, Nk, q_offset, Hq, (str(device),))
    m = layout_cache.get(key)
    if m is None:
        m = pattern.dense_mask(Nq, Nk, q_offset, Hq, device=device)
        layout_cache.put(key, m)
    return m


def _sdpa(q, k, v, scale, **kw):
    """SDPA with the head widths made equal by zero channels. PyTorch's CPU flash kernel needs ``D == Dv``;
    otherwise SDPA takes its math path, which holds the ``(B, H, Nq, Nk)`` weights (24 GB for MLA's naive
    heads at 16k). Zero channels in ``q, k`` add nothing to ``q . k``; zero columns of ``v`` give zero outputs,
    sliced off."""
    D, Dv = q.shape[-1], v.shape[-1]
    if D == Dv:
        return F.scaled_dot_product_attention(q, k, v, scale=scale, **kw)
    scale = D**-0.5 if scale is None else scale
    if D > Dv:
        return F.scaled_dot_product_attention(q, k, F.pad(v, (0, D - Dv)), scale=scale, **kw)[..., :Dv]
    q, k = F.pad(q, (0, Dv - D)), F.pad(k, (0, Dv - D))
    return F.scaled_dot_product_attention(q, k, v, scale=scale, **kw)


def run(req: Request):
    """``(out, lse or None)``; the caller has checked :func:`why_not`."""
    q, k, v, dims = req.q, req.k, req.v, req.dims
    if req.dense_causal and req.score is None:
        out = _sdpa(q, k, v, req.scale, is_causal=True, enable_gqa=dims.group > 1)
        return out, (_lse(q, k, None, req.scale, dims.group, causal=True) if req.return_lse else None)
    pattern, score, scale = (None if req.causal_sees_all else req.pattern), req.score, req.scale
    key_padding_mask, q_offset = req.key_padding_mask, req.q_offset
    Hq, Nq, Nk = dims.q_heads, dims.q_len, dims.kv_len
    visible = None
    if pattern is not None:
        visible = _dense_mask(pattern, Nq, Nk, q_offset, Hq, q.device)[None]  # (1, G, Nq, Nk)
    if key_padding_mask is not None:
        kp = key_padding_mask[:, None, None, :]
        visible = kp if visible is None else visible & kp
    attn_mask = visible
    if score is not None:
        h = torch.arange(Hq, device=q.device)[:, None, None]
        qi = torch.arange(q_offset, q_offset + Nq, device=q.device)[None, :, None]
        ki = torch.arange(Nk, device=q.device)[None, None, :]
        bias = score.score_mod(torch.zeros((), dtype=q.dtype, device=q.device), 0, h, qi, ki)[None]
        attn_mask = bias if visible is None else bias.masked_fill(~visible, float("-inf"))
    g = dims.group
    out = _sdpa(q, k, v, scale, attn_mask=attn_mask, enable_gqa=g > 1)
    live = None
    if visible is not None:
        live = visible.any(-1, keepdim=True)  # rows with at least one key; SDPA gives NaN elsewhere
        out = torch.where(live, out, torch.zeros((), dtype=out.dtype, device=out.device))
    return out, (_lse(q, k, attn_mask, scale, g) if req.return_lse else None)


def _lse(q, k, attn_mask, scale, g, chunk: int = 1024, causal: bool = False):
    """``logsumexp`` of the masked logits, in chunks of queries (float32, float64 for float64 inputs; ``-inf``
    on empty rows).

    ``causal`` applies ``kv <= q`` chunk by chunk instead of a dense mask.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    cd = torch.float64 if q.dtype == torch.float64 else torch.float32
    kk = (k.repeat_interleave(g, 1) if g > 1 else k).to(cd)
    out = []
    for i in range(0, q.shape[2], chunk):
        s = torch.matmul(q[:, :, i : i + chunk].to(cd), kk.transpose(-1, -2)) * scale
        if causal:
            qi = torch.arange(i, i + s.shape[2], device=q.device)[:, None]
            s = s.masked_fill(torch.arange(k.shape[2], device=q.device)[None, :] > qi, float("-inf"))
        if attn_mask is not None:
            m = attn_mask[:, :, i : i + chunk]
            s = s.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else s + m.to(cd)
        out.append(torch.logsumexp(s, -1))
    return torch.cat(out, -1)
