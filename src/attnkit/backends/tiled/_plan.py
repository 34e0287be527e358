"""Planning for the tiled kernel: a layout's rows cut into the chunks of the unfused path and the backward
(:func:`_plan`), and into the calls of the fused op (:func:`_fused_plan`); both cached on the layout."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ...layout import FULL, BlockLayout

_CHUNK_ELEMS = 1 << 19  # score elements per chunk (2 MiB): fewer ops, still cache-resident (measured 2^17..2^20)
_MAX_KEYS = 2048  # keys per row per segment before the online-softmax merge takes over
_BIAS_CACHE_BYTES = 64 << 20
_FUSED_KEYS = 1 << 13  # gathered keys per fused call: 2 MiB of K in fp32 at D = 64 stays in cache between the
# gather and the op (measured on 16k dynamic layouts: 2^13 beat 2^11, 2^12 and 2^14 by 10-40%; 2^16 was 25% slower)


@dataclass
class _Chunk:
    r0: int
    r1: int
    head: int
    segments: list  # [(slot0, slot1, ids (C, s) long, bias (C, 1, bq, s*bk) or None, stride (start, step) or None)]


@dataclass
class _Run:
    """One call of the fused op: the layout rows ``rows`` of a unit, each against ``s`` key tiles."""

    rows: torch.Tensor  # (C,) layout rows (query blocks)
    span: tuple | None  # (r0, r1) when ``rows`` is that range (q is then read through a view)
    ids: torch.Tensor  # (C * s,) key tiles row by row; padding slots point at tile 0
    s: int
    real: torch.Tensor | None = None  # (C, 1, 1, s * bk) additive key mask, -inf on left-padding slots
    bias: torch.Tensor | None = None  # (C or 1, 1, bq, s * bk) additive tile mask; None when every tile is full
    dead: torch.Tensor | None = None  # (C or 1, 1, bq) rows the bias leaves without a key, or None
    stride: tuple | None = None  # (start, step): K and V read through a strided view, no copy
    merge: bool = False  # the rows may already hold a partial result: merge by lse instead of writing
    causal: bool = False  # the op's own causal mask (query r sees key c <= r): a query block's own keys


def _bias_for(layout: BlockLayout, mids: torch.Tensor) -> torch.Tensor | None:
    """Additive mask ``(C, 1, bq, s*bk)`` of a segment; one row broadcast when every row has the same tiles."""
    if bool((mids == -1).all()):
        return None
    if mids.shape[0] > 1 and bool((mids == mids[:1]).all()):
        one = _bias_for(layout, mids[:1])
        return one.expand(mids.shape[0], *one.shape[1:])
    bq, bk = layout.block_q, layout.block_k
    neg = torch.full((1, bq, bk), float("-inf"))
    table = torch.cat(
        [
            neg,
            torch.zeros(1, bq, bk),
            torch.zeros(layout.tile_masks.shape).masked_fill_(~layout.tile_masks, float("-inf")),
        ]
    )
    C, S = mids.shape
    return table[mids + 2].permute(0, 2, 1, 3).reshape(C, 1, bq, S * bk)


def _bias_and_dead(layout: BlockLayout, mids: torch.Tensor):
    """The additive mask of ``mids`` (:func:`_bias_for`) and the ``(C or 1, 1, bq)`` rows it leaves without a
    key (None when every tile is full)."""
    bias = _bias_for(layout, mids)
    return bias, None if bias is None else ~torch.isfinite(bias).any(-1)


def _plan(layout: BlockLayout, head: int, rows: int) -> list[_Chunk]:
    """Cut the layout rows of one head group into chunks of similar width for the unfused path (and the
    backward); cached on the layout."""
    key = (head, rows)
    if key in layout._plans:
        return layout._plans[key]
    bk = layout.block_k
    ids_all, mids_all = layout.kv_ids[head], layout.mask_ids[head]
    counts = (ids_all >= 0).sum(-1).tolist()
    cache: dict = {}
    cached_bytes = 0
    chunks = []
    r0, nqb = 0, len(counts)
    while r0 < nqb:
        width = counts[r0]
        cap = max(1, _CHUNK_ELEMS // max(1, rows * width * bk))
        r1 = r0 + 1
        while r1 < nqb and r1 - r0 < cap and counts[r1] == width:
            r1 += 1
        if r1 - r0 < min(4, cap):
            # A short uniform run (irregular rows): group rows of similar width instead, padding the slots.
            while r1 < nqb:
                c = counts[r1]
                w = max(width, c)
                if (r1 - r0 + 1) * rows * w * bk > _CHUNK_ELEMS or not (width <= 2 * c and c <= 2 * width):
                    break
                width, r1 = w, r1 + 1
        if width == 0:
            chunks.append(_Chunk(r0, r1, head, []))
            r0 = r1
            continue
        seg = max(1, _MAX_KEYS // bk)
        ids_c = ids_all[r0:r1, :width]
        # Sinks, global columns or power-of-two jumps before a sliding band: the band (the longest affine
        # suffix) still reads K and V through a view; only the prefix is gathered. The two merge by lse.
        split = _affine_suffix(ids_c)
        ranges = [(a, min(e, a + seg)) for lo, e in ((0, split), (split, width)) if e > lo for a in range(lo, e, seg)]
        segments = []
        for a, b in ranges:
            ids, mids = ids_all[r0:r1, a:b], mids_all[r0:r1, a:b]
            mkey = (mids.shape, mids.numpy().tobytes())
            bias = cache.get(mkey)
            if bias is None:
                bias = _bias_for(layout, mids)
                nbytes = bias.untyped_storage().nbytes() if bias is not None else 0
                if bias is not None and cached_bytes + nbytes <= _BIAS_CACHE_BYTES:
                    cached_bytes += nbytes
                    cache[mkey] = bias
            segments.append((a, b, ids.clamp(min=0).reshape(-1), bias, _stride(ids)))
        chunks.append(_Chunk(r0, r1, head, segments))
        r0 = r1
    layout._plans[key] = chunks
    return chunks


def _affine_suffix(ids: torch.Tensor) -> int:
    """First column from which ``ids`` advances by a fixed step per row (read through a view); its width if none.

    The suffix where every row runs on by one tile starts after the last column where some row does not; a
    shorter suffix has the same row steps (those of its first column, which differ by a constant), so one check
    on the longest one decides."""
    w = ids.shape[1]
    if w == 0:
        return 0
    a = ids.numpy()  # a few hundred small checks per plan: numpy's per-call cost is a tenth of torch's
    breaks = np.flatnonzero(~(a[:, 1:] == a[:, :-1] + 1).all(0))
    start = int(breaks[-1]) + 1 if breaks.size else 0
    return start if _stride(ids[:, start:]) is not None else w


def _fused_plan(layout: BlockLayout, head: int) -> list[_Run]:
    """The fused path's calls for the layout rows of one head group; cached on the layout.

    Each row's real slots are its *bulk* (up to its last full tile) and its *tail* (the masked tiles after it:
    the causal diagonal, a short last key block). A row with a masked tile inside its bulk is *general*: it runs
    whole under its tile mask, in chunks of consecutive rows of one width (static patterns such as 2-D
    neighbourhoods). Bulks are sorted by width and packed into runs whose widths differ by at most an eighth;
    narrower rows are left-padded, the padding masked per key. Uniform runs of consecutive rows read K and V
    through a strided view where the tiles advance by a fixed step (sliding windows), after a gathered prefix
    (sinks). Tails of one mask pattern run together, after the bulks, and merge into them.
    """
    key = (head, "fused")
    if key in layout._plans:
        return layout._plans[key]
    ids_all, mids_all = layout.kv_ids[head], layout.mask_ids[head]
    valid = ids_all >= 0
    width = valid.sum(-1)
    pos = torch.arange(ids_all.shape[1])
    bulk = torch.where((mids_all == FULL) & valid, pos + 1, 0).amax(-1)
    general = ((mids_all >= 0) & valid & (pos < bulk[:, None])).any(-1)
    tail = torch.where(general, 0, width - bulk)
    bulk = torch.where(general, 0, bulk)
    runs = _general_runs(layout, ids_all, mids_all, general.nonzero()[:, 0].tolist(), width)
    runs += _bulk_runs(ids_all, bulk, layout.block_k)
    runs += _tail_runs(layout, ids_all, mids_all, bulk, tail)
    layout._plans[key] = runs
    return runs


def _span(rows: list[int]):
    """``(r0, r1)`` when ``rows`` is exactly ``r0, r0 + 1, ..., r1 - 1``, else None."""
    return (rows[0], rows[0] + len(rows)) if rows == list(range(rows[0], rows[0] + len(rows))) else None


def _general_runs(layout, ids_all, mids_all, rows: list[int], width) -> list[_Run]:
    """Rows with a masked tile inside: consecutive rows of one width run whole under their tile mask."""
    runs, bk = [], layout.block_k
    i = 0
    while i < len(rows):
        w = int(width[rows[i]])
        cap = max(1, _FUSED_KEYS // max(1, w * bk))
        j = i + 1
        while j < len(rows) and j - i < cap and rows[j] == rows[j - 1] + 1 and int(width[rows[j]]) == w:
            j += 1
        r = rows[i:j]
        bias, dead = _bias_and_dead(layout, mids_all[r[0] : r[-1] + 1, :w])
        ids = ids_all[r[0] : r[-1] + 1, :w].reshape(-1)
        runs.append(_Run(torch.tensor(r), _span(r), ids, w, bias=bias, dead=dead))
        i = j
    return runs


def _bulk_runs(ids_all, bulk, bk) -> list[_Run]:
    """The rows' unmasked bulks, sorted by width and packed (left padding, at most an eighth of a width)."""
    widths, order = torch.sort(bulk, stable=True)
    S = int(widths[-1]) if widths.numel() else 0
    # The bulks right-aligned in S slots, rows in width order: a run is a slice, its last s columns.
    col = torch.arange(S)[None, :] - (S - widths)[:, None]
    right = ids_all[order, :S].gather(1, col.clamp(min=0))
    padded = col < 0
    wl, ol = widths.tolist(), order.tolist()
    runs = []
    i = next((a for a, w in enumerate(wl) if w > 0), len(wl))
    while i < len(wl):
        lo = wl[i]
        j = i + 1
        while j < len(wl) and 8 * (wl[j] - lo) <= lo and (j - i + 1) * wl[j] * bk <= _FUSED_KEYS:
            j += 1
        s = wl[j - 1]
        rt, span, ids = order[i:j], _span(ol[i:j]), right[i:j, S - s :]
        if lo < s:
            # Left padding as an additive per-key mask, made once here rather than on every call of a cached plan.
            real = torch.zeros(j - i, s, bk).masked_fill_(padded[i:j, S - s :, None], float("-inf"))
            real = real.view(j - i, 1, 1, s * bk)
            runs.append(_Run(rt, span, ids.reshape(-1), s, real=real))
        else:
            split = _affine_suffix(ids) if span else s
            if 0 < split < s:  # a gathered prefix (sinks) before a band read through a view
                band = ids[:, split:]
                runs.append(_Run(rt, span, ids[:, :split].reshape(-1), split))
                runs.append(_Run(rt, span, band.reshape(-1), s - split, stride=_stride(band), merge=True))
            else:
                stride = _stride(ids) if span else None
                runs.append(_Run(rt, span, ids.reshape(-1), s, stride=stride))
        i = j
    return runs


def _tail_runs(layout, ids_all, mids_all, bulk, tail) -> list[_Run]:
    """The masked tails, one batch per tail shape (its tile masks); they merge into the bulks' results."""
    T = int(tail.max()) if tail.numel() else 0
    if T == 0:
        return []
    rows = (tail > 0).nonzero()[:, 0]
    inside = torch.arange(T)[None, :] < tail[rows, None]
    col = (bulk[rows, None] + torch.arange(T)[None, :]).clamp(max=ids_all.shape[1] - 1)
    mids = mids_all[rows].gather(1, col).masked_fill_(~inside, -3)
    ids = ids_all[rows].gather(1, col)
    same = (mids == mids[:1]).all(1)
    if bool(same.all()):  # the usual case: every tail is the causal diagonal of an aligned block
        shapes, inverse = mids[:1], torch.zeros(len(rows), dtype=torch.long)
    else:
        shapes, inverse = torch.unique(mids, dim=0, return_inverse=True)
    bq, bk = layout.block_q, layout.block_k
    tril = torch.zeros(bq, bq).masked_fill_(torch.ones(bq, bq, dtype=torch.bool).triu(1), float("-inf"))
    runs = []
    for g in range(shapes.shape[0]):
        sel = (inverse == g).nonzero()[:, 0]
        t = int(inside[sel[0]].sum())
        bias, dead = _bias_and_dead(layout, shapes[g : g + 1, :t])
        # The causal diagonal of aligned blocks (the tail is the query block's own keys): the op masks it itself.
        causal = bias is not None and t * bk == bq and torch.equal(bias[0, 0], tril)
        cap = max(1, _FUSED_KEYS // (t * bk))
        for a in range(0, len(sel), cap):
            part = sel[a : a + cap]
            r, tid = rows[part], ids[part, :t]
            span = _span(r.tolist())
            stride = _stride(tid) if span else None
            if causal:
                runs.append(_Run(r, span, tid.reshape(-1), t, stride=stride, merge=True, causal=True))
            else:
                runs.append(_Run(r, span, tid.reshape(-1), t, bias=bias, dead=dead, stride=stride, merge=True))
    return runs


def _stride(ids: torch.Tensor):
    """``(start, step)`` when row ``i`` of ``ids`` is the run ``start + i * step + [0, s)``, else None."""
    w = ids.shape[1]
    a = ids.numpy()
    if w == 0 or a[0, -1] - a[0, 0] != w - 1:  # the first row is not a run: most dynamic rows
        return None
    base = a[:, 0]
    if (base < 0).any() or not (a == base[:, None] + np.arange(w)).all():
        return None
    steps = np.diff(base)
    step = int(steps[0]) if steps.size else 0
    if step < 0 or not (steps == step).all():
        return None
    return int(base[0]), step
