"""``gather``: token-level sparse attention over the keys a selection lists per query (or per query block).

A selection of token indices (Sparsifiner, Dynamic Mask Attention) is not a block layout: each query block
reads its own ``K`` keys. Chunks of rows gather their keys, so memory is ``O(chunk x K x D)``; autograd runs
through the gathers. This backend runs selections only (:class:`~attnkit.sparse.Selection` with ``indices``).
"""

from __future__ import annotations

import torch

from ..errors import ShapeError, bad
from ..layout import ceil_div
from .request import Request

_GATHER_ELEMS = 1 << 22  # gathered key elements per chunk (16 MiB in fp32)


def carries_nonfinite(req: Request) -> bool:
    """No (not shown for every gather order): attnkit.api checks the inputs before the kernel."""
    return False


def why_not(req: Request) -> str | None:
    if req.selection is None or req.selection.indices is None:
        return "gather runs token-index selections (Sparsifiner, Dynamic Mask Attention) only"
    if req.device.type != "cpu":
        return f"gather is a CPU kernel so far, got {req.device.type} tensors"
    return None


def run(req: Request):
    sel, dims = req.selection, req.dims
    return gather_attention(
        req.q,
        req.k,
        req.v,
        sel.indices,
        scale=req.scale_or_default,
        key_padding_mask=req.key_padding_mask,
        query_block=sel.query_block,
        q_offset=dims.kv_len - dims.q_len if req.causal else None,
        key_bias=sel.key_bias,
    )


def gather_attention(
    q,
    k,
    v,
    indices: torch.Tensor,
    *,
    scale: float,
    key_padding_mask=None,
    query_block: int = 1,
    q_offset: int | None = None,
    key_bias: torch.Tensor | None = None,
):
    """Token-level sparse attention over gathered keys; ``(out, lse)``.

    ``indices`` ``(B, Hq, ceil(Nq / query_block), K)``: row ``r`` lists the keys (``-1`` = none) read by the
    ``query_block`` queries ``r * query_block ...``; with ``q_offset`` (causal) query ``i`` drops keys
    ``j > q_offset + i``. ``key_bias`` ``(B, Hq, Nk)`` is added to the logits (Dynamic Mask Attention).
    Chunks of rows gather their keys, so memory is ``O(chunk x K x D)``; autograd runs through the gathers.
    """
    B, Hq, Nq, D = q.shape
    Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
    qb = query_block
    R = ceil_div(Nq, qb)
    if indices.shape[:3] != (B, Hq, R):
        raise ShapeError(bad("indices", f"(B, Hq, ceil(Nq / {qb}), K) = ({B}, {Hq}, {R}, K)", tuple(indices.shape)))
    K = indices.shape[-1]
    cd = torch.float32 if q.dtype in (torch.bfloat16, torch.float16) else q.dtype
    kf = k.to(cd).reshape(B * Hkv * Nk, D)
    vf = v.to(cd).reshape(B * Hkv * Nk, Dv)
    base = ((torch.arange(B)[:, None] * Hkv + torch.arange(Hq)[None, :] // (Hq // Hkv)) * Nk)[..., None, None]
    safe = indices.clamp(min=0)
    live = indices >= 0
    if key_padding_mask is not None:
        live = live & key_padding_mask.gather(1, safe.view(B, -1)).view_as(indices)
    flat = base + safe
    qp = q.to(cd)
    if R * qb != Nq:
        qp = torch.cat([qp, qp.new_zeros(B, Hq, R * qb - Nq, D)], 2)
    qp = qp.view(B, Hq, R, qb, D)
    step = max(1, _GATHER_ELEMS // max(1, B * Hq * K * max(D, qb)))
    outs, lses = [], []
    for r0 in range(0, R, step):
        r1 = min(R, r0 + step)
        idx = flat[:, :, r0:r1].reshape(-1)
        kc = kf.index_select(0, idx).view(B, Hq, r1 - r0, K, D)
        vc = vf.index_select(0, idx).view(B, Hq, r1 - r0, K, Dv)
        s = torch.einsum("bhrqd,bhrkd->bhrqk", qp[:, :, r0:r1], kc) * scale
        if key_bias is not None:
            s = s + key_bias.to(cd).gather(2, safe[:, :, r0:r1].reshape(B, Hq, -1)).view(B, Hq, r1 - r0, 1, K)
        ok = live[:, :, r0:r1, None, :]
        if q_offset is not None:
            qpos = q_offset + torch.arange(r0 * qb, r1 * qb).view(1, 1, r1 - r0, qb, 1)
            ok = ok & (safe[:, :, r0:r1, None, :] <= qpos)
        ok = ok.expand_as(s)
        s = s.masked_fill(~ok, float("-inf"))
        any_ = ok.any(-1, keepdim=True)
        p = torch.softmax(s.masked_fill(~any_, 0.0), -1) * any_
        outs.append(torch.einsum("bhrqk,bhrkd->bhrqd", p, vc).reshape(B, Hq, (r1 - r0) * qb, Dv))
        lses.append(torch.logsumexp(s.detach(), -1).reshape(B, Hq, (r1 - r0) * qb))
    return torch.cat(outs, 2)[:, :, :Nq].to(q.dtype), torch.cat(lses, 2)[:, :, :Nq]


