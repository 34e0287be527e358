"""``tiled``: our block-sparse CPU kernel over a :class:`~attnkit.layout.BlockLayout`.

For each query block ``i`` the kernel visits only the key blocks of its layout row; a chunk of consecutive
query blocks is computed with two batched matrix products:

``S = scale * Q_i K_{T(i)}^T (+ mod) + B_i``, ``lse_i = logsumexp(S)``, ``O_i = exp(S - lse_i) V_{T(i)}``

where ``T(i)`` are the row's key tiles and ``B_i`` the additive mask of the row (0 for full tiles, the stored
element mask for partial tiles, ``-inf`` for empty padding slots and padded keys). A row whose key tiles exceed
``_MAX_KEYS`` is processed in segments merged with the online softmax (log-sum-exp merge), so memory stays
``O(N x keys per query)`` and no ``N x N`` tensor is ever built.

* When a chunk's key tiles are one contiguous run that advances by a fixed step per row (sliding windows,
  neighbourhood interiors), K and V are read through a strided view with no copy; otherwise the tiles are
  gathered.
* Grouped-query attention folds the ``Hq / Hkv`` query heads of one key/value head into the rows of one
  product, so K and V tiles are read once per group.
* The backward recomputes ``P = exp(S - lse)`` per chunk (FlashAttention-2 style): ``dV += P^T dO``,
  ``dS = P * (dO V^T - delta)`` with ``delta = rowsum(dO * O)``, ``dQ = dS K``, ``dK += dS^T Q``; key-side
  gradients are scattered with ``index_add_``.
* Plain softmax (no score mod, no normaliser) in float32 (bf16/fp16 are computed in float32) runs through the
  native C++ forward (:mod:`attnkit.backends.native`) when it is built: one loop over (batch, head unit, query
  block) that copies its tiles' K and V rows into a per-thread buffer, 256 keys at a time, and runs the two
  products as BLAS calls with the online softmax between them, the tile masks and a token-grain selection
  (:class:`~attnkit.layout.TokenSelect`) applied to the scores in between; the longest rows are taken first.
  ``ATTNKIT_TILED_KERNEL=torch`` (or a failed build, which warns) runs the torch-op forward below.
* The torch-op forward of plain softmax without a token-grain refinement runs through PyTorch's fused CPU
  flash-attention op, which returns ``lse`` with the output. Its plan (:func:`_fused_plan`) cuts every row
  into its unmasked *bulk* and its masked *tail* (the causal diagonal): bulks are sorted by width and packed
  into calls of near-equal width, short rows left-padded under a per-key mask (never a per-pair one), so the
  irregular rows of a dynamic selection run in few large calls; tails of the same shape run as one batch per
  unit; the two merge by their lse. Rows with masked tiles inside (neighbourhoods) run whole under their mask.
  The unfused path (``bmm``, ``exp``, ``bmm``) serves the rest and the backward.
* bf16/fp16 inputs are computed in float32 tile by tile and the output is rounded once.
* A query with no visible key gives ``out = 0`` and ``lse = -inf``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import UnsupportedError, bad
from ..layout import FULL, BlockLayout
from . import native

_CHUNK_ELEMS = 1 << 19  # score elements per chunk (2 MiB): fewer ops, still cache-resident (measured 2^17..2^20)
_MAX_KEYS = 2048  # keys per row per segment before the online-softmax merge takes over
_BIAS_CACHE_BYTES = 64 << 20
_NATIVE_KEYS = 256  # keys per chunk of the native forward (its K, V and score buffers stay in L2)
_FUSED_KEYS = 1 << 13  # gathered keys per fused call: 2 MiB of K in fp32 at D = 64 stays in cache between the
# gather and the op (measured on 16k dynamic layouts: 2^13 beat 2^11, 2^12 and 2^14 by 10-40%; 2^16 was 25% slower)
# Fused softmax(Q K^T + mask) V with its logsumexp (the op F.scaled_dot_product_attention dispatches to on CPU);
# torch is pinned, and tests compare both paths against the float64 oracle.
_FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


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
    real: torch.Tensor | None  # (C, 1, 1, s * bk) additive key mask, -inf on left-padding slots; None if unpadded
    bias: torch.Tensor | None  # (C or 1, 1, bq, s * bk) additive tile mask, or None when every tile is full
    dead: torch.Tensor | None  # (C or 1, 1, bq) rows the bias leaves without a key, or None
    stride: tuple | None  # (start, step): K and V read through a strided view, no copy
    merge: bool  # the rows may already hold a partial result: merge by lse instead of writing
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
        runs.append(_Run(torch.tensor(r), _span(r), ids, w, None, bias, dead, None, False))
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
            runs.append(_Run(rt, span, ids.reshape(-1), s, real, None, None, None, False))
        else:
            split = _affine_suffix(ids) if span else s
            if 0 < split < s:  # a gathered prefix (sinks) before a band read through a view
                band = ids[:, split:]
                runs.append(_Run(rt, span, ids[:, :split].reshape(-1), split, None, None, None, None, False))
                runs.append(_Run(rt, span, band.reshape(-1), s - split, None, None, None, _stride(band), True))
            else:
                stride = _stride(ids) if span else None
                runs.append(_Run(rt, span, ids.reshape(-1), s, None, None, None, stride, False))
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
                runs.append(_Run(r, span, tid.reshape(-1), t, None, None, None, stride, True, True))
            else:
                runs.append(_Run(r, span, tid.reshape(-1), t, None, bias, dead, stride, True))
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


def _keys(kb: torch.Tensor, ids: torch.Tensor, stride, C: int, s: int, bk: int) -> torch.Tensor:
    """The chunk's key (or value) tiles as ``(C, s * bk, D)``: a strided view when possible, else a gather."""
    D = kb.shape[-1]
    if stride is not None:
        start, step = stride
        return kb.as_strided((C, s * bk, D), (step * bk * D, D, 1), kb.storage_offset() + start * bk * D)
    # index_select over rows of a 2-D view is a plain row copy, several times faster than over a 3-D view.
    return kb.reshape(-1, bk * D).index_select(0, ids).view(C, s * bk, D)


def _scores(qc, kc, bias, scale, score, pos, kpm_c):
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


def _softmax_v(s: torch.Tensor, vc: torch.Tensor, out: torch.Tensor | None = None):
    """``softmax(s) @ vc`` and ``logsumexp(s)``, in place on ``s``; rows of only ``-inf`` give 0 and ``-inf``."""
    m = s.amax(-1, keepdim=True)
    m = m.masked_fill_(torch.isinf(m), 0.0)
    p = s.sub_(m).exp_()
    denom = p.sum(-1, keepdim=True)
    o = torch.bmm(p, vc, out=out).div_(denom.clamp(min=torch.finfo(s.dtype).tiny))
    return o, (m + denom.log()).squeeze(-1)


def _segment(ch, seg, qc, kb, vb, kpm_b, bk, bq, G, h0, q_offset, scale, score, sel=None):
    """Keys, values and masked logits of one segment of a chunk: ``(s, raw, kc, vc, pos)``.

    ``sel`` is ``(layout, group)`` when the layout carries a token-grain :class:`~attnkit.layout.TokenSelect`."""
    a, e, ids, bias, stride = seg
    C, s_len = ch.r1 - ch.r0, e - a
    kc = _keys(kb, ids, stride, C, s_len, bk)
    vc = _keys(vb, ids, stride, C, s_len, bk)
    pos = _positions(q_offset, ch.r0, ch.r1, G, bq, h0, ids, stride, s_len, bk, qc.device) if score else None
    kpm_c = _keys(kpm_b.view(-1, 1), ids, stride, C, s_len, bk)[..., 0] if kpm_b is not None else None
    s, raw = _scores(qc, kc, bias, scale, score, pos, kpm_c)
    if sel is not None:
        layout, g = sel
        qi = torch.arange(ch.r0 * bq, ch.r1 * bq).view(C, 1, bq, 1)
        kj = (ids.view(C, s_len)[:, :, None] * bk + torch.arange(bk)).view(C, 1, 1, s_len * bk)
        ok = layout.select.allowed(g, qi, kj, block_q=bq, block_k=bk, q_offset=layout.q_offset, kv_len=layout.kv_len)
        s.view(C, G, bq, -1).masked_fill_(~ok, float("-inf"))
    return s, raw, kc, vc, pos


def _flash(qc, kc, vc, mask, dead, G, bq, scale, causal=False):
    """``softmax(scale Q K^T + mask) V`` and its ``lse`` for ``qc (C, G*bq, D)``, ``kc, vc (C, L, D)``.

    ``mask`` is additive, ``(C or 1, 1, bq or 1, L)``, or None. Without a per-query mask the G folded heads stay
    rows of one product; with one, the heads become the op's head axis (K and V broadcast, no copy) so the mask
    broadcasts over them; ``causal`` applies the op's own mask per head, query ``r`` sees key ``c <= r``. The op
    gives rows with no visible key ``out = 0`` but ``lse = 0``: ``dead`` rows (broadcastable to ``(C, 1, bq)``)
    are set to ``-inf``."""
    C, _, D = qc.shape
    L = kc.shape[1]
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


def _merge(acc, lse, o, lse_o):
    """Two partial softmax results over disjoint keys, combined by their log-sum-exps (``-inf`` = no key)."""
    new = torch.logaddexp(lse, lse_o)
    safe = new.masked_fill(torch.isinf(new), float("inf"))
    return acc * (lse - safe).exp().unsqueeze(-1) + o * (lse_o - safe).exp().unsqueeze(-1), new


def _run_fused(runs: list[_Run], qf, kb, vb, kpm_b, out_u, lse_u, bk, bq, G, scale):
    """Every fused call of one unit into ``out_u``, ``lse_u`` (zeros and ``-inf`` before the first)."""
    for run in runs:
        C = run.rows.shape[0]
        qc = qf[run.span[0] : run.span[1]] if run.span else qf.index_select(0, run.rows)
        kc = _keys(kb, run.ids, run.stride, C, run.s, bk)
        vc = _keys(vb, run.ids, run.stride, C, run.s, bk)
        mask, dead = run.bias, run.dead
        if run.real is not None:
            mask = run.real if mask is None else mask + run.real
        if kpm_b is not None:
            keep = _keys(kpm_b.view(-1, 1), run.ids, run.stride, C, run.s, bk)[..., 0]
            pad = torch.zeros(C, 1, 1, run.s * bk).masked_fill_(~keep[:, None, None, :], float("-inf"))
            mask = pad if mask is None else mask + pad
            # Under the op's causal mask query r sees keys c <= r only: it is dead when none of those is real.
            dead = (keep.cumsum(-1) == 0)[:, None, :] if run.causal else ~torch.isfinite(mask).any(-1)
        o, lse = _flash(qc, kc, vc, mask, dead, G, bq, scale, run.causal)
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


def _prepare(q, k, v, layout: BlockLayout, key_padding_mask):
    """Inputs padded to whole blocks in the compute dtype, and the padded key mask (or None)."""
    cd = _compute_dtype(q.dtype)
    nq, nk = layout.num_q_blocks * layout.block_q, layout.num_kv_blocks * layout.block_k
    kpm = None
    if key_padding_mask is not None:
        kpm = torch.zeros(q.shape[0], nk, dtype=torch.bool)
        kpm[:, : k.shape[2]] = key_padding_mask
    return cd, _pad_seq(q, nq, cd), _pad_seq(k, nk, cd), _pad_seq(v, nk, cd), kpm


def _grouping(layout: BlockLayout, B: int, Hq: int, Hkv: int) -> int:
    """Query heads folded into one unit of work: 1 for per-query-head layouts, ``Hq / Hkv`` otherwise."""
    if layout.batch not in (1, B):
        raise UnsupportedError(bad("layout", f"a layout for batch 1 or {B}", f"batch {layout.batch}"))
    if layout.heads == Hq:
        return 1
    if layout.heads in (1, Hkv):
        return Hq // Hkv
    raise UnsupportedError(bad("layout", f"a layout for 1, {Hkv} (kv) or {Hq} (query) heads", layout.heads))


def _units(B: int, Hq: int, Hkv: int, G: int, layout: BlockLayout):
    """(batch, layout group, kv head, first q head) for every unit of work; a unit folds G query heads."""
    g = Hq // Hkv
    LH = layout.heads
    for b in range(B):
        base = b * LH if layout.batch > 1 else 0
        for h0 in range(0, Hq, G):
            lh = 0 if LH == 1 else (h0 if LH == Hq else h0 // g)
            yield b, base + lh, h0 // g, h0


def _fold(x: torch.Tensor, G: int, nqb: int, bq: int) -> torch.Tensor:
    """``(G, nqb * bq, D)`` -> ``(nqb, G * bq, D)``: the G heads of one block become rows of one product."""
    if G == 1:
        return x[0].view(nqb, bq, -1)
    return x.view(G, nqb, bq, -1).transpose(0, 1).reshape(nqb, G * bq, -1)


def _unfold(x: torch.Tensor, G: int, nqb: int, bq: int) -> torch.Tensor:
    if G == 1:
        return x.reshape(1, nqb * bq, -1)
    return x.view(nqb, G, bq, -1).transpose(0, 1).reshape(G, nqb * bq, -1)


def _pad_seq(x: torch.Tensor, n: int, dtype) -> torch.Tensor:
    x = x.to(dtype)
    if x.shape[2] == n:
        return x.contiguous()
    out = x.new_zeros(x.shape[0], x.shape[1], n, x.shape[3])
    out[:, :, : x.shape[2]] = x
    return out


def _positions(q_offset, r0, r1, G, bq, h0, ids, stride, s, bk, device):
    """Broadcast index tensors (h, q_idx, kv_idx) for a score mod on a ``(C, G*bq, L)`` segment."""
    C = r1 - r0
    h = (h0 + torch.arange(G, device=device)).repeat_interleave(bq)[None, :, None]
    qi = (q_offset + torch.arange(r0 * bq, r1 * bq, device=device).view(C, 1, bq).expand(C, G, bq)).reshape(
        C, G * bq, 1
    )
    kv = (ids.view(C, s)[:, :, None] * bk + torch.arange(bk, device=device)).view(C, 1, s * bk)
    if stride is not None:
        kv = ((stride[0] + torch.arange(C) * stride[1])[:, None] * bk + torch.arange(s * bk)).view(C, 1, s * bk)
    return h, qi, kv


def _compute_dtype(dtype):
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def _row_counts(ch, seg_list, kpm_b, bk, bq, G, dtype):
    """Visible keys per row of a chunk, ``(C, G * bq, 1)``: from the tile masks and the key padding alone."""
    C = ch.r1 - ch.r0
    n = torch.zeros(C, 1, bq, dtype=dtype)
    for a, e, ids, bias, stride in seg_list:
        vis = torch.ones(C, 1, 1, (e - a) * bk, dtype=torch.bool) if bias is None else torch.isfinite(bias)
        if kpm_b is not None:
            vis = vis & _keys(kpm_b.view(-1, 1), ids, stride, C, e - a, bk)[..., 0][:, None, None, :]
        n += vis.sum(-1).expand(C, 1, bq)
    return n.expand(C, G, bq).reshape(C, G * bq, 1)


def _probs(normalizer, s, cnt):
    """Elementwise weights of a segment; masked pairs (``-inf``) get 0."""
    fin = torch.isfinite(s)
    return normalizer.weights(s.masked_fill(~fin, 0.0), cnt).mul_(fin)


def _elementwise(ch, qc, kb, vb, kpm_b, bk, bq, G, h0, q_offset, scale, score, normalizer):
    """One chunk under a non-softmax normaliser: ``(out, log sum_j p_ij)``; segments simply add up."""
    if not ch.segments:
        return 0.0, float("-inf")
    cnt = _row_counts(ch, ch.segments, kpm_b, bk, bq, G, qc.dtype) if normalizer.needs_count else None
    acc = den = None
    for seg in ch.segments:
        s, _, _, vc, _ = _segment(ch, seg, qc, kb, vb, kpm_b, bk, bq, G, h0, q_offset, scale, score)
        p = _probs(normalizer, s, cnt)
        o, d = torch.bmm(p, vc), p.sum(-1)
        acc, den = (o, d) if acc is None else (acc + o, den + d)
    if normalizer.l1:
        acc = acc / den.clamp_min(torch.finfo(den.dtype).tiny).unsqueeze(-1)
    return acc, den.log()


def _select_terms(select) -> list[torch.Tensor]:
    """A :class:`~attnkit.layout.TokenSelect` as the native forward takes it: ``[]``, or its seven terms (rows,
    cols, diags, query/key labels, query/key positions), an empty tensor for an absent one."""
    if select is None:
        return []
    none = torch.empty(0)
    labels, positions = select.labels or (None, None), select.positions or (None, None)
    terms = [(select.rows, torch.bool), (select.cols, torch.bool), (select.diags, torch.bool)]
    terms += [(t, torch.long) for t in (*labels, *positions)]
    return [none if t is None else t.to(dtype).contiguous() for t, dtype in terms]


def forward(
    q, k, v, layout: BlockLayout, scale: float, score=None, key_padding_mask=None, q_offset: int = 0, normalizer=None
):
    """Tiled attention forward; ``(out, lse)`` in the compute dtype (float32 for bf16/fp16 inputs)."""
    B, Hq, Nq, _ = q.shape
    Hkv, Dv = k.shape[1], v.shape[3]
    bq, bk = layout.block_q, layout.block_k
    nqb = layout.num_q_blocks
    cd, qp, kp, vp, kpm = _prepare(q, k, v, layout, key_padding_mask)
    G = _grouping(layout, B, Hq, Hkv)
    units = Hq // G
    fused = score is None and normalizer is None and layout.select is None
    if score is None and normalizer is None and cd == torch.float32 and (ext := native.module()) is not None:
        table = torch.tensor(list(_units(B, Hq, Hkv, G, layout)), dtype=torch.long).view(-1, 4)
        out, lse = ext.forward(
            qp,
            kp,
            vp,
            layout.kv_ids.long().contiguous(),
            layout.mask_ids.long().contiguous(),
            layout.tile_masks.bool().contiguous(),
            kpm,
            table,
            G,
            bq,
            bk,
            scale,
            _NATIVE_KEYS,
            _select_terms(layout.select),
            layout.q_offset,
            layout.kv_len,
        )
        return out[:, :, :Nq], lse[:, :, :Nq]
    # The fused runs write only the rows they reach (a row with no tile keeps 0 and -inf).
    out_f = (torch.zeros if fused else torch.empty)(B, units, nqb, G * bq, Dv, dtype=cd)
    lse_f = torch.full((B, units, nqb, G * bq), float("-inf"), dtype=cd)
    for b, lh, hk, h0 in _units(B, Hq, Hkv, G, layout):
        u = h0 // G
        sel = (layout, lh) if layout.select is not None else None
        qf = _fold(qp[b, h0 : h0 + G], G, nqb, bq)
        kb, vb = kp[b, hk], vp[b, hk]
        kpm_b = kpm[b] if kpm is not None else None
        if fused:
            _run_fused(_fused_plan(layout, lh), qf, kb, vb, kpm_b, out_f[b, u], lse_f[b, u], bk, bq, G, scale)
            continue
        for ch in _plan(layout, lh, G * bq):
            qc = qf[ch.r0 : ch.r1]
            if normalizer is not None:
                o, lse = _elementwise(ch, qc, kb, vb, kpm_b, bk, bq, G, h0, q_offset, scale, score, normalizer)
                out_f[b, u, ch.r0 : ch.r1] = o
                lse_f[b, u, ch.r0 : ch.r1] = lse
                continue
            acc = lse = None
            for seg in ch.segments:
                s, _, _, vc, _ = _segment(ch, seg, qc, kb, vb, kpm_b, bk, bq, G, h0, q_offset, scale, score, sel)
                single = len(ch.segments) == 1
                o, lse_s = _softmax_v(s, vc, out_f[b, u, ch.r0 : ch.r1] if single else None)
                acc, lse = (o, lse_s) if acc is None else _merge(acc, lse, o, lse_s)
            if acc is None:
                out_f[b, u, ch.r0 : ch.r1] = 0
            elif acc.data_ptr() != out_f[b, u, ch.r0 : ch.r1].data_ptr():
                out_f[b, u, ch.r0 : ch.r1] = acc
            if lse is not None:
                lse_f[b, u, ch.r0 : ch.r1] = lse
    out = out_f.view(B, units, nqb, G, bq, Dv).transpose(2, 3).reshape(B, Hq, nqb * bq, Dv)
    lse = lse_f.view(B, units, nqb, G, bq).transpose(2, 3).reshape(B, Hq, nqb * bq)
    return out[:, :, :Nq], lse[:, :, :Nq]


def backward(
    dout,
    q,
    k,
    v,
    out,
    lse,
    layout: BlockLayout,
    scale: float,
    score=None,
    key_padding_mask=None,
    q_offset: int = 0,
    normalizer=None,
):
    """Gradients ``(dq, dk, dv)`` of :func:`forward`, recomputing the probabilities tile by tile."""
    B, Hq, Nq, D = q.shape
    Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
    bq, bk = layout.block_q, layout.block_k
    nqb, nkb = layout.num_q_blocks, layout.num_kv_blocks
    cd, qp, kp, vp, kpm = _prepare(q, k, v, layout, key_padding_mask)
    dop = _pad_seq(dout, nqb * bq, cd)
    delta = (dop * _pad_seq(out, nqb * bq, cd)).sum(-1)
    lse_p = torch.full((B, Hq, nqb * bq), float("-inf"), dtype=cd)
    lse_p[:, :, :Nq] = lse
    lse_p = lse_p.masked_fill(torch.isinf(lse_p), float("inf"))  # p = exp(s - inf) = 0 on empty rows
    G = _grouping(layout, B, Hq, Hkv)
    dq = torch.zeros_like(qp)
    dk = torch.zeros_like(kp)
    dv = torch.zeros_like(vp)
    for b, lh, hk, h0 in _units(B, Hq, Hkv, G, layout):
        sel = (layout, lh) if layout.select is not None else None
        qf = _fold(qp[b, h0 : h0 + G], G, nqb, bq)
        dof = _fold(dop[b, h0 : h0 + G], G, nqb, bq)
        lsef = _fold(lse_p[b, h0 : h0 + G, :, None], G, nqb, bq)[..., 0]
        deltaf = _fold(delta[b, h0 : h0 + G, :, None], G, nqb, bq)[..., 0]
        dqf = torch.zeros_like(qf)
        kb, vb = kp[b, hk], vp[b, hk]
        kpm_b = kpm[b] if kpm is not None else None
        dkb, dvb = dk[b, hk].view(nkb, bk, D), dv[b, hk].view(nkb, bk, Dv)
        for ch in _plan(layout, lh, G * bq):
            qc, doc = qf[ch.r0 : ch.r1], dof[ch.r0 : ch.r1]
            lse_c, delta_c = lsef[ch.r0 : ch.r1, :, None], deltaf[ch.r0 : ch.r1, :, None]
            cnt = None
            if normalizer is not None and normalizer.needs_count and ch.segments:
                cnt = _row_counts(ch, ch.segments, kpm_b, bk, bq, G, qc.dtype)
            for seg in ch.segments:
                s, raw, kc, vc, pos = _segment(ch, seg, qc, kb, vb, kpm_b, bk, bq, G, h0, q_offset, scale, score, sel)
                ids = seg[2]
                if normalizer is None:
                    p = s.sub_(lse_c).exp_()
                    dvb.index_add_(0, ids, torch.bmm(p.transpose(1, 2), doc).view(-1, bk, Dv))
                    ds = torch.bmm(doc, vc.transpose(1, 2)).sub_(delta_c).mul_(p)
                else:
                    ds = _elementwise_grad(normalizer, s, cnt, doc, vc, lse_c, delta_c, dvb, ids, bk, Dv)
                if raw is not None:
                    ds.mul_(score.grad(raw, *pos))
                ds.mul_(scale)
                dqf[ch.r0 : ch.r1].add_(torch.bmm(ds, kc))
                dkb.index_add_(0, ids, torch.bmm(ds.transpose(1, 2), qc).view(-1, bk, D))
        dq[b, h0 : h0 + G] = _unfold(dqf, G, nqb, bq)
    return dq[:, :, :Nq].to(q.dtype), dk[:, :, :Nk].to(k.dtype), dv[:, :, :Nk].to(v.dtype)


def _elementwise_grad(normalizer, s, cnt, doc, vc, lse_c, delta_c, dvb, ids, bk, Dv):
    """``dS`` of one segment under a non-softmax normaliser (``dV`` is accumulated here).

    Without ``l1``: ``out = sum p v``, so ``dS = (dO V^T) * p'(s)``. With ``l1`` (``den = exp(lse)``):
    ``dS = (dO V^T - delta) / den * p'(s)``, the softmax rule with ``p'`` in place of ``p``.
    """
    fin = torch.isfinite(s)
    sc = s.masked_fill(~fin, 0.0)
    p = normalizer.weights(sc, cnt).mul_(fin)
    dp = torch.bmm(doc, vc.transpose(1, 2))
    if normalizer.l1:
        den = lse_c.exp()  # rows without keys were given lse = +inf: their weights and gradients are 0
        p = p / den
        dp = dp.sub_(delta_c).div_(den)
    dvb.index_add_(0, ids, torch.bmm(p.transpose(1, 2), doc).view(-1, bk, Dv))
    return dp.mul_(normalizer.grad(sc, cnt)).mul_(fin)


class _TiledFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, layout, scale, score, key_padding_mask, q_offset, normalizer):
        out, lse = forward(q, k, v, layout, scale, score, key_padding_mask, q_offset, normalizer)
        # The backward's delta = rowsum(dO * O) cancels against dO V^T: it needs O before the rounding to
        # bf16, so the compute-dtype output is what is saved.
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (layout, scale, score, key_padding_mask, q_offset, normalizer)
        ctx.mark_non_differentiable(lse)
        return out.to(q.dtype), lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = backward(dout, q, k, v, out, lse, *ctx.args)
        return dq, dk, dv, None, None, None, None, None, None


def tiled_attention(
    q,
    k,
    v,
    layout: BlockLayout,
    *,
    scale: float | None = None,
    score=None,
    key_padding_mask=None,
    q_offset: int = 0,
    normalizer=None,
):
    """Run the tiled kernel on an explicit layout (static pattern or dynamic selector); ``(out, lse)``.

    ``normalizer`` (a bound :class:`~attnkit.scores.Normalizer`) replaces the softmax; ``lse`` is then
    ``log sum_j p_ij``. Differentiable in ``q``, ``k``, ``v`` (not through ``lse``).
    """
    if q.device.type != "cpu":
        raise UnsupportedError(
            bad("q", "tensors on the CPU (tiled is a CPU kernel; on GPU use backend='flex')", q.device)
        )
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if layout.select is not None and normalizer is not None:
        raise UnsupportedError(
            bad("normalizer", "None with a token-grain selection (the row counts ignore it)", normalizer)
        )
    if layout.select is not None and layout.q_offset != q_offset:
        raise UnsupportedError(bad("q_offset", f"the layout's q_offset {layout.q_offset}", q_offset))
    return _TiledFunction.apply(q, k, v, layout, scale, score, key_padding_mask, q_offset, normalizer)
