"""The ``tiled`` backend's side of the backend interface: when it can run a request, which layout it runs
(the tile size for a static pattern, or a selection's own layout), and the call."""

from __future__ import annotations

import threading

import torch

from ... import layout_cache
from ...errors import ShapeError, UnsupportedError, bad
from .. import native
from ...layout import ceil_div
from ...layout_cache import Key
from ...patterns.base import _FINE, Full, InOrder
from ...sparse._core import expand_kv
from ..request import Request
from . import _tiled


def carries_nonfinite(req: Request) -> bool:
    """Whether every NaN or inf of q, k or v that reaches a row reaches its output (then attnkit.api checks the
    output instead of the inputs): on the native forward of the softmax, which marks such a row NaN. The torch-op
    paths (float64, any score mod or normaliser there) treat a non-finite logit as masked, so with a score mod
    or a normaliser the inputs are checked first, on either path (a capped logit is never infinite)."""
    return (
        req.score is None and req.normalizer is None and req.q.dtype != torch.float64 and native.module() is not None
    )


def why_not(req: Request) -> str | None:
    if req.device.type != "cpu":
        return f"tiled is a CPU kernel; on {req.device.type} use 'flex' (compiled FlexAttention) or 'sdpa'"
    sel = req.selection
    if sel is not None:
        if sel.layout is None:
            return "this selection lists token indices, not blocks: it runs on 'gather'"
    return None


def choose_block(pattern, dims, training: bool) -> int:
    """Tile size for a static pattern in its own token order: the candidate with the least computed area,
    weighted by per-tile overhead."""
    if pattern is None:
        return 64
    return _cheapest(pattern, dims, training, _SQUARE)[0][0]


_SQUARE = ((16, 16), (32, 32), (64, 64), (128, 128))
# In a 2-D or 3-D tile order a row of query tiles reads a compact region: key tiles of 16 (4 x 4 in 2-D) follow
# its edge closely, and the native kernel gathers key rows into its own buffer, so narrow key tiles cost little.
_IN_ORDER = _SQUARE + ((32, 16), (64, 16), (128, 16), (64, 32))


def _cheapest(pattern, dims, training: bool, shapes) -> tuple[tuple[int, int], float]:
    """``((block_q, block_k), cost)`` of the candidate tile shape with the least cost (cached).

    Measured on 2 cores (fwd): time ~ computed area x (1 + 8 / block_q) across windows, neighbourhoods, grids
    and power-of-two patterns; the backward's per-tile scatter favours larger tiles (1 + 32 / block_q)."""
    key = Key("block", pattern, dims.q_len, dims.kv_len, dims.q_offset, dims.q_heads, (training, shapes))
    hit = layout_cache.get(key)
    if hit is not None:
        return hit
    any_, _, _ = pattern.tile_stats(dims.q_len, dims.kv_len, dims.q_offset, dims.q_heads)
    overhead = 32 if training else 8
    G, nqt, nkt = any_.shape
    best = ((_FINE, _FINE), float("inf"))
    for bq, bk in shapes:
        fq, fk = bq // _FINE, bk // _FINE
        pad = torch.zeros(G, ceil_div(nqt, fq) * fq, ceil_div(nkt, fk) * fk, dtype=torch.bool)
        pad[:, :nqt, :nkt] = any_
        tiles = int(pad.view(G, -1, fq, pad.shape[2] // fk, fk).any(4).any(2).sum())
        cost = tiles * bq * bk * (1 + overhead / bq)
        if cost < best[1]:
            best = ((bq, bk), cost)
    layout_cache.put(key, best)
    return best


def reorders(req: Request) -> bool:
    """Whether the request may run its pattern in the pattern's own token order (:class:`InOrder`): a whole
    spatial sequence (no cache offset) whose rule is the mask alone; a score mod or a normaliser sees positions,
    which the renumbering would change."""
    pat, d = req.pattern, req.dims
    return (
        pat is not None
        and req.selection is None
        and req.score is None
        and req.normalizer is None
        and d.q_offset == 0
        and d.q_len == d.kv_len == pat.fixed_length
        and pat.token_order() is not None
    )


def request_layout(req: Request):
    """The block layout this request runs on: the selection's, or the pattern's at the chosen tile shape (over
    the pattern's token order when :func:`reorders` allows it and that computes less)."""
    if req.selection is not None:
        return req.selection.layout
    return pattern_layout(req.pattern, req.dims, training=req.needs_grad, reorder=reorders(req))


def tiling(pattern, dims, *, training: bool, reorder: bool = False):
    """``(pattern the kernel runs, (block_q, block_k))``: ``pattern`` itself at the cheapest square tile, or,
    with ``reorder``, :class:`InOrder` ``(pattern)`` at its cheapest tile shape when that costs clearly less (the
    gathers before and after are not free)."""
    if pattern is None:
        return Full(), (64, 64)
    shape, cost = _cheapest(pattern, dims, training, _SQUARE)
    if reorder:
        ordered = InOrder(pattern)
        shape2, cost2 = _cheapest(ordered, dims, training, _IN_ORDER)
        if cost2 < 0.9 * cost:
            return ordered, shape2
    return pattern, shape


def pattern_layout(pattern, dims, *, training: bool, reorder: bool = False):
    """A static pattern's layout (``None``: every key) at the tile shape :func:`tiling` picks (cached)."""
    run, (bq, bk) = tiling(pattern, dims, training=training, reorder=reorder)
    return run.block_layout(dims.q_len, dims.kv_len, bq, bk, dims.q_offset, dims.q_heads)


def describe(req: Request) -> dict:
    """What this backend computes for the request: the share of pairs in its layout's tiles and the tile size."""
    lay = request_layout(req)
    return {"density": lay.tile_density, "block": (lay.block_q, lay.block_k)}


def run(req: Request):
    bound = req.normalizer.bind(req.dims.kv_len) if req.normalizer is not None else None
    sel = req.selection
    if sel is None and reorders(req):
        run, (bq, bk) = tiling(req.pattern, req.dims, training=req.needs_grad, reorder=True)
        if isinstance(run, InOrder):
            return _in_order(req, run, run.block_layout(req.dims.q_len, req.dims.kv_len, bq, bk, 0, req.dims.q_heads))
    if sel is None or sel.q_order is None:
        q_offset = req.dims.kv_len - req.dims.q_len if sel is not None and req.causal else req.q_offset
        return _tiled(
            req.q, req.k, req.v, request_layout(req), req.scale, req.score, req.key_padding_mask, q_offset, bound
        )
    return _permuted(req, sel)


def _in_order(req: Request, run: InOrder, layout):
    """A spatial pattern in its own token order: q, k, v (and the key mask) gathered along the sequence, the
    kernel, out and lse gathered back (``inverse[order] = arange``)."""
    order = run.order.to(req.q.device)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    kpm = req.key_padding_mask
    kpm = kpm.index_select(1, order) if kpm is not None else None
    if req.needs_grad:
        q, k, v = (_rows(x, order) for x in (req.q, req.k, req.v))
        out, lse = _tiled(q, k, v, layout, req.scale, None, kpm, 0, None)
        return _rows(out, inverse), lse.index_select(2, inverse)
    # Without autograd the gathered copies are scratch: a fresh tensor of 32 MiB or more is a new mapping from
    # glibc, whose first touch page-faults (12 ms of a 15 ms gather at 16k x 8 heads x 64 here).
    q, k, v = (_rows(x, order, out=_scratch(i, x)) for i, x in enumerate((req.q, req.k, req.v)))
    out, lse = _tiled(q, k, v, layout, req.scale, None, kpm, 0, None)
    # The kernel's output may be a strided view (heads interleaved), which cannot be gathered into in place.
    back = _rows(_scratch(3, out).copy_(out), inverse, out=out if out.is_contiguous() else None)
    return back, lse.index_select(2, inverse)


_SCRATCH = threading.local()


def _scratch(slot: int, like: torch.Tensor) -> torch.Tensor:
    """This thread's reusable buffer ``slot`` shaped like ``like`` (the last shape asked for is kept)."""
    bufs = _SCRATCH.__dict__.setdefault("bufs", {})
    buf = bufs.get(slot)
    if buf is None or buf.shape != like.shape or buf.dtype != like.dtype or buf.device != like.device:
        buf = bufs[slot] = torch.empty(like.shape, dtype=like.dtype, device=like.device)
    return buf


def _rows(x: torch.Tensor, order: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``x[:, :, order]`` for ``x`` ``(B, H, N, D)``, as one gather of rows of the flattened tensor (a third of
    the time of ``index_select`` along dim 2 here)."""
    B, H, N, D = x.shape
    idx = (torch.arange(B * H, device=x.device)[:, None] * N + order).reshape(-1)
    flat = x.reshape(B * H * N, D)
    if out is None:
        return flat.index_select(0, idx).view(B, H, N, D)
    torch.index_select(flat, 0, idx, out=out.view(B * H * N, D))
    return out


def _permuted(req: Request, sel):
    """A layout over permuted tokens (clusters, 2-D regions): gather q, k, v into the selector's order (per
    query head), run, scatter back."""
    q, k, v, kpm = req.q, req.k, req.v, req.key_padding_mask
    B, Hq = q.shape[:2]
    qo, ko = sel.q_order, sel.k_order
    if qo.shape[1] != Hq:
        raise ShapeError(bad("selector", f"orders for {Hq} query heads", qo.shape[1]))
    kk, vv = expand_kv(k, Hq), expand_kv(v, Hq)
    qp = q.gather(2, qo[..., None].expand(-1, -1, -1, q.shape[-1]))
    kp = kk.gather(2, ko[..., None].expand(-1, -1, -1, k.shape[-1]))
    vp = vv.gather(2, ko[..., None].expand(-1, -1, -1, v.shape[-1]))
    kpm_p = None
    if kpm is not None and not sel.padding_applied:
        if ko.shape[0] == B and bool((ko == ko[:, :1]).all()):
            kpm_p = kpm.gather(1, ko[:, 0])
        else:
            raise UnsupportedError(bad("key_padding_mask", "None with a per-head key order", "a mask"))
    out, lse = _tiled(qp, kp, vp, sel.layout, req.scale, None, kpm_p, 0, None)
    out = torch.empty_like(out).scatter_(2, qo[..., None].expand_as(out), out)
    return out, torch.empty_like(lse).scatter_(2, qo, lse)

