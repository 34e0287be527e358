"""The ``tiled`` backend's side of the backend interface: when it can run a request, which layout it runs
(the tile size for a static pattern, or a selection's own layout), and the call."""

from __future__ import annotations

import torch

from ... import layout_cache
from ...errors import ShapeError, UnsupportedError, bad
from .. import native
from ...layout import ceil_div
from ...layout_cache import Key
from ...patterns.base import _FINE, Full
from ...sparse._core import expand_kv
from ..request import Request
from . import _tiled


def carries_nonfinite(req: Request) -> bool:
    """Whether every NaN or inf of q, k or v that reaches a row reaches its output (then attnkit.api checks the
    output instead of the inputs): on the native forward, which marks such a row NaN. The torch-op paths
    (score mods, normalisers, float64) treat a non-finite logit as masked, so their inputs are checked first."""
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
    """Tile size for a static pattern: the candidate with the least computed area, weighted by per-tile
    overhead."""
    if pattern is None:
        return 64
    key = Key("block", pattern, dims.q_len, dims.kv_len, dims.q_offset, dims.q_heads, (training,))
    hit = layout_cache.get(key)
    if hit is not None:
        return hit
    any_, _, _ = pattern.tile_stats(dims.q_len, dims.kv_len, dims.q_offset, dims.q_heads)
    # Measured on 2 cores (fwd): time ~ computed area x (1 + 8 / b) across windows, neighbourhoods, grids and
    # power-of-two patterns; the backward's per-tile scatter favours larger tiles (1 + 32 / b).
    overhead = 32 if training else 8
    best, best_cost = _FINE, float("inf")
    for b in (16, 32, 64, 128):
        f = b // _FINE
        G, nqt, nkt = any_.shape
        pad = torch.zeros(G, ceil_div(nqt, f) * f, ceil_div(nkt, f) * f, dtype=torch.bool)
        pad[:, :nqt, :nkt] = any_
        tiles = int(pad.view(G, -1, f, pad.shape[2] // f, f).any(4).any(2).sum())
        cost = tiles * b * b * (1 + overhead / b)
        if cost < best_cost:
            best, best_cost = b, cost
    layout_cache.put(key, best)
    return best


def request_layout(req: Request):
    """The block layout this request runs on: the selection's, or the pattern's at the chosen tile size."""
    if req.selection is not None:
        return req.selection.layout
    return pattern_layout(req.pattern, req.dims, training=req.needs_grad)


def pattern_layout(pattern, dims, *, training: bool):
    """A static pattern's layout (``None``: every key) at the tile size :func:`choose_block` picks (cached)."""
    pat = pattern if pattern is not None else Full()
    b = choose_block(pattern, dims, training)
    return pat.block_layout(dims.q_len, dims.kv_len, b, b, dims.q_offset, dims.q_heads)


def describe(req: Request) -> dict:
    """What this backend computes for the request: the share of pairs in its layout's tiles and the tile size."""
    lay = request_layout(req)
    return {"density": lay.tile_density, "block": (lay.block_q, lay.block_k)}


def run(req: Request):
    bound = req.normalizer.bind(req.dims.kv_len) if req.normalizer is not None else None
    sel = req.selection
    if sel is None or sel.q_order is None:
        q_offset = req.dims.kv_len - req.dims.q_len if sel is not None and req.causal else req.q_offset
        return _tiled(
            req.q, req.k, req.v, request_layout(req), req.scale, req.score, req.key_padding_mask, q_offset, bound
        )
    return _permuted(req, sel)


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

