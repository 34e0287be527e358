"""``flex``: compiled FlexAttention driven by a pattern's ``mask_mod`` and ``BlockMask``.

Compiled callables and block masks are cached by (pattern, score, shape, device, dtype, ``q_offset``) so a
second call with the same shape neither rebuilds the mask nor recompiles. On CPU, compiled FlexAttention is
inference-only and cannot return ``lse`` (torch 2.13): such requests raise
:class:`~attnkit.errors.UnsupportedError` that points to ``tiled``. Key padding goes in as a ``score_mod``
reading a captured tensor, so it does not force a new block mask per batch.
"""

from __future__ import annotations

import functools

import torch

from .. import layout_cache
from ..errors import memory_budget
from ..layout_cache import Key
from ..patterns.base import Full
from .request import Request

BLOCK = 128


def available() -> bool:
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def carries_nonfinite(req: Request) -> bool:
    """No: a NaN logit becomes a zero row (measured), so attnkit.api checks the inputs before the kernel."""
    return False


def why_not(req: Request) -> str | None:
    if not available():
        return "torch.nn.attention.flex_attention is not available in this torch build"
    if req.selection is not None:
        return (
            "a dynamic selection is made per call from q and k; a BlockMask per call would recompile on CPU "
            "(use 'tiled' or 'gather')"
        )
    if req.normalizer is not None:
        return f"normalizer {req.normalizer!r} replaces the softmax, which FlexAttention has built in"
    if req.device.type == "meta":
        return "FlexAttention runs on CUDA, CPU, HPU or MPS tensors, not meta"
    d, pat = req.dims, req.pattern
    # create_block_mask evaluates the mask_mod on every (head, query, key) before it keeps the blocks.
    need = (d.q_heads if pat is not None and pat.num_heads else 1) * d.q_len * d.kv_len
    if pat is not None and need > memory_budget():
        return (
            f"building its BlockMask evaluates a {need / 2**20:.1f} MiB dense mask, over the memory budget of "
            f"{memory_budget() / 2**20:.1f} MiB (ATTNKIT_MEMORY_BUDGET); use backend='tiled'"
        )
    if req.device.type == "cpu":
        if req.needs_grad:
            return (
                "compiled FlexAttention on CPU has no backward (torch 2.13); use backend='tiled', our CPU "
                "kernel with a backward, or run flex on a GPU"
            )
        if req.return_lse:
            return "compiled FlexAttention on CPU cannot return lse (torch 2.13); use backend='tiled'"
        if req.q.dtype not in (torch.float32, torch.bfloat16):
            return f"compiled FlexAttention on CPU supports float32 and bfloat16, not {req.q.dtype}"
    return None


@functools.cache
def _compiled():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def block_mask(pattern, B, Hq, Nq, Nk, q_offset, device):
    """The pattern's ``BlockMask`` for these sizes (cached)."""
    from torch.nn.attention.flex_attention import create_block_mask

    key = Key("flex-block-mask", pattern, Nq, Nk, q_offset, Hq if pattern.num_heads else None, (str(device),))
    bm = layout_cache.get(key)
    if bm is None:
        off = q_offset

        def mask_mod(b, h, q_idx, kv_idx):
            return pattern.mask_mod(b, h, q_idx + off, kv_idx)

        H = Hq if pattern.num_heads else None
        bm = create_block_mask(mask_mod, None, H, Nq, Nk, device=device, BLOCK_SIZE=BLOCK)
        layout_cache.put(key, bm)
    return bm


def run(req: Request):
    """``(out, lse or None)``; the caller has checked :func:`why_not`."""
    q, k, v, dims = req.q, req.k, req.v, req.dims
    pattern, score, key_padding_mask, q_offset = req.pattern, req.score, req.key_padding_mask, req.q_offset
    bm = block_mask(
        pattern if pattern is not None else Full(),
        dims.batch,
        dims.q_heads,
        dims.q_len,
        dims.kv_len,
        q_offset,
        q.device,
    )
    score_mod = None
    if score is not None or key_padding_mask is not None:
        off = q_offset
        kpm = key_padding_mask

        def score_mod(s, b, h, q_idx, kv_idx):
            if score is not None:
                s = score.score_mod(s, b, h, q_idx + off, kv_idx)
            if kpm is not None:
                s = torch.where(kpm[b, kv_idx], s, float("-inf"))
            return s

    return_lse = req.return_lse
    kw = {"return_lse": True} if return_lse else {}
    out = _compiled()(
        q, k, v, score_mod=score_mod, block_mask=bm, scale=req.scale, enable_gqa=dims.group > 1, **kw
    )
    lse = None
    if return_lse:
        out, lse = out
    if key_padding_mask is not None:
        # A row whose visible keys are all padding: FlexAttention's own fully-masked-row rule covers only the
        # block mask, so zero these rows here.
        live = _live_rows(pattern, dims, q_offset, key_padding_mask, q.device)
        out = torch.where(live, out, torch.zeros((), dtype=out.dtype))
        if return_lse:
            lse = lse.masked_fill(~live[..., 0], float("-inf"))
    return out, lse


def _live_rows(pattern, dims, q_offset, kpm, device):
    pat = pattern if pattern is not None else Full()
    key = Key("flex-live", pat, dims.q_len, dims.kv_len, q_offset, dims.q_heads)
    m = layout_cache.get(key)
    if m is None:
        m = pat.dense_mask(dims.q_len, dims.kv_len, q_offset, dims.q_heads, device=device)
        layout_cache.put(key, m)
    return (m[None] & kpm[:, None, None, :]).any(-1, keepdim=True)
