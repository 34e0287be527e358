"""Independent masks: each 1-D pattern's rule in Python ints (exact at 2**63 and beyond, where a tensor rule
would wrap), grid and span patterns through ``tests.patterns.naive_masks``, and a hand-made layout's pairs
painted tile by tile (sharing no code with ``BlockLayout.dense_mask``)."""

from __future__ import annotations

import functools

import torch

import attnkit as ak
from tests.patterns import naive_masks
from tests.patterns.naive_masks import naive_mask

P = ak.patterns
naive_masks._extra_rule("")  # imports the pattern tests that register rules now, not inside a @given test


def _pow2(d: int) -> bool:
    return d > 0 and d & (d - 1) == 0


def rule(p, i: int, j: int, h: int) -> bool:
    """Does query position ``i`` see key ``j`` in head ``h`` (Python ints throughout)."""
    if isinstance(p, P.Causal):
        return j <= i
    if isinstance(p, P.Full):
        return True
    if isinstance(p, P.SlidingWindow):
        return i - p.left <= j <= i + p.right
    if isinstance(p, P.AShape):
        return j <= i and (j < p.sinks or i - j < p.window)
    if isinstance(p, P.Dilated):
        d = i - j if p.is_causal else abs(i - j)
        return d >= 0 and d % p.dilation == 0 and d < p.window * p.dilation
    if isinstance(p, P.Power):
        d = i - j
        return d >= 0 and (d < p.window or _pow2(d))
    if isinstance(p, P.Sinks):
        return j < p.n
    if isinstance(p, P.GlobalTokens):
        return j < p.n or i < p.n
    if isinstance(p, P.StridedShards):
        return j <= i and (i - j < p.local or j % p.shards == h % p.shards)
    if isinstance(p, P.And):
        return all(rule(x, i, j, h) for x in p.parts)
    if isinstance(p, P.Or):
        return any(rule(x, i, j, h) for x in p.parts)
    if isinstance(p, P.PerHead):
        return rule(p.patterns[h], i, j, 0)
    raise KeyError(type(p).__name__)


_SEQ = (P.Causal, P.Full, P.SlidingWindow, P.AShape, P.Dilated, P.Power, P.Sinks, P.GlobalTokens, P.StridedShards)


def _is_seq(p) -> bool:
    if isinstance(p, P.And | P.Or):
        return all(_is_seq(x) for x in p.parts)
    if isinstance(p, P.PerHead):
        return all(_is_seq(x) for x in p.patterns)
    return isinstance(p, _SEQ)


@functools.lru_cache(maxsize=512)
def pattern_mask(p, nq: int, nk: int, q_offset: int, heads: int) -> torch.Tensor:
    """``(G, nq, nk)`` bool, ``G`` = ``heads`` for per-head patterns, else 1."""
    G = heads if p.num_heads is not None else 1
    if _is_seq(p):
        m = torch.tensor(
            [[[rule(p, q_offset + a, j, h) for j in range(nk)] for a in range(nq)] for h in range(G)],
            dtype=torch.bool,
        )
        return m.view(G, nq, nk)
    return torch.stack([naive_mask(p, nq, nk, q_offset, head=h) for h in range(G)])


def layout_mask(layout, B: int, Hq: int, Hkv: int, q_offset: int) -> torch.Tensor:
    """``(B, Hq, Nq, Nk)``: the pairs a (well-formed) hand-made layout stands for, painted tile by tile."""
    nq, nk, bq, bk = layout.q_len, layout.kv_len, layout.block_q, layout.block_k
    ids, mids, masks = layout.kv_ids, layout.mask_ids, layout.tile_masks
    G = ids.shape[0]
    lb = layout.batch
    heads = G // lb
    per = torch.zeros(G, nq, nk, dtype=torch.bool)
    for g in range(G):
        for i in range(ids.shape[1]):
            for s in range(ids.shape[2]):
                j = int(ids[g, i, s])
                if j < 0:
                    continue
                m = int(mids[g, i, s])
                if m == -2:
                    continue
                tile = torch.ones(bq, bk, dtype=torch.bool) if m == -1 else masks[m].bool()
                r0, c0 = i * bq, j * bk
                rows, cols = min(bq, nq - r0), min(bk, nk - c0)
                if rows > 0 and cols > 0:
                    per[g, r0 : r0 + rows, c0 : c0 + cols] |= tile[:rows, :cols]
    sel = layout.select
    if sel is not None:
        qi = torch.arange(nq)[:, None]
        kj = torch.arange(nk)[None, :]
        for g in range(G):
            allow = torch.zeros(nq, nk, dtype=torch.bool)
            if sel.rows is not None:
                allow |= sel.rows[g][qi, kj // bk].bool()
            if sel.cols is not None:
                allow |= sel.cols[g][qi // bq, kj].bool()
            if sel.diags is not None:
                allow |= sel.diags[g][layout.q_offset + qi - kj + nk - 1].bool()
            if sel.labels is not None:
                t = sel.labels[0][g][qi] == sel.labels[1][g][kj]
                if sel.positions is not None:
                    t &= sel.positions[1][g][kj] <= sel.positions[0][g][qi]
                allow |= t
            per[g] &= allow
    out = torch.zeros(B, Hq, nq, nk, dtype=torch.bool)
    for b in range(B):
        for h in range(Hq):
            gb = b if lb == B else 0
            gh = h if heads == Hq else (h // (Hq // Hkv) if heads == Hkv else 0)
            out[b, h] = per[gb * heads + gh]
    return out
