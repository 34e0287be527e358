"""``sdpa``: dense or masked attention through ``torch.nn.functional.scaled_dot_product_attention``.

A pattern becomes a dense boolean mask (cached per pattern and shape); additive score mods become a float
mask. Two fixes over plain SDPA: a query row with no visible key gives 0 (SDPA gives NaN) and ``lse`` is
available (computed in key chunks, never as one ``N x N`` tensor beyond the mask itself). A request whose
dense mask would exceed the memory budget raises :class:`~attnkit.errors.MemoryBudgetError` that names the
``tiled`` backend instead of failing in the allocator.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from ..errors import MemoryBudgetError, UnsupportedError
from ..patterns.base import _cache_get, _cache_put

DEFAULT_BUDGET = int(os.environ.get("ATTNKIT_MEMORY_BUDGET", str(4 << 30)))


def mask_bytes(B, Hq, Nq, Nk, pattern, key_padding_mask, score) -> int:
    """Bytes of the dense mask this backend would build (0 when none is needed)."""
    if pattern is None and key_padding_mask is None and score is None:
        return 0
    hm = Hq if (pattern is not None and pattern.num_heads) or score is not None else 1
    bm = B if key_padding_mask is not None else 1
    per = 4 if score is not None else 1
    return bm * hm * Nq * Nk * per


def why_not(q, k, v, dims, pattern, score, budget: int) -> str | None:
    """Why this backend cannot run the request, or None."""
    if score is not None and not score.additive:
        return f"score {score!r} is not an additive bias; SDPA cannot apply it (use 'tiled' or 'flex')"
    need = mask_bytes(dims.batch, dims.q_heads, dims.q_len, dims.kv_len, pattern, None, score)
    if need > budget:
        return (
            f"the dense mask needs {need / 2**20:.1f} MiB, over the memory budget of {budget / 2**20:.1f} MiB "
            f"(ATTNKIT_MEMORY_BUDGET); use backend='tiled', which never builds an N x N tensor"
        )
    return None


def _dense_mask(pattern, Nq, Nk, q_offset, Hq, device):
    key = ("dense", pattern, Nq, Nk, q_offset, Hq, str(device))
    m = _cache_get(key)
    if m is None:
        m = pattern.dense_mask(Nq, Nk, q_offset, Hq, device=device)
        _cache_put(key, m)
    return m


def attention(
    q,
    k,
    v,
    dims,
    *,
    pattern=None,
    score=None,
    scale=None,
    key_padding_mask=None,
    q_offset=0,
    return_lse=False,
    budget: int = DEFAULT_BUDGET,
):
    reason = why_not(q, k, v, dims, pattern, score, budget)
    if reason:
        cls = MemoryBudgetError if "budget" in reason else UnsupportedError
        raise cls(f"backend='sdpa': {reason}")
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
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale, enable_gqa=g > 1)
    live = None
    if visible is not None:
        live = visible.any(-1, keepdim=True)  # rows with at least one key; SDPA gives NaN elsewhere
        out = torch.where(live, out, torch.zeros((), dtype=out.dtype, device=out.device))
    if not return_lse:
        return out
    return out, _lse(q, k, attn_mask, scale, g)


def _lse(q, k, attn_mask, scale, g, chunk: int = 1024, causal: bool = False):
    """``logsumexp`` of the masked logits, in chunks of queries (float32, ``-inf`` on empty rows).

    ``causal`` applies ``kv <= q`` chunk by chunk instead of a dense mask.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    kk = k.repeat_interleave(g, 1).float() if g > 1 else k.float()
    out = []
    for i in range(0, q.shape[2], chunk):
        s = torch.matmul(q[:, :, i : i + chunk].float(), kk.transpose(-1, -2)) * scale
        if causal:
            qi = torch.arange(i, i + s.shape[2], device=q.device)[:, None]
            s = s.masked_fill(torch.arange(k.shape[2], device=q.device)[None, :] > qi, float("-inf"))
        if attn_mask is not None:
            m = attn_mask[:, :, i : i + chunk]
            s = s.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else s + m.float()
        out.append(torch.logsumexp(s, -1))
    return torch.cat(out, -1)
