"""What the tiled kernel's forwards and backward share: padding to whole blocks, the grouping of query heads into
units of work, the tile gathers, the log-sum-exp merge and :class:`_Unit`."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...errors import ShapeError, bad
from ...layout import BlockLayout


@dataclass(frozen=True, slots=True)
class _Unit:
    """One unit of work (``G`` query heads over one key/value head) as every chunk and segment of it sees it.

    These values are fixed per unit and travel together from the unit loop down to each segment; one bundle
    keeps the ints that look alike (``bq``/``bk``, ``G``/``h0``) from being passed in the wrong order."""

    kb: torch.Tensor  # (nkb * bk, D) keys of the unit's key/value head, padded to whole blocks
    vb: torch.Tensor  # (nkb * bk, Dv) values
    kpm_b: torch.Tensor | None  # (nkb * bk,) bool key padding of the batch row, or None
    bq: int
    bk: int
    G: int  # query heads folded into the rows of one product
    h0: int  # the first of them
    q_offset: int
    scale: float
    score: object  # score mod, or None
    sel: tuple | None  # (layout, group) when the layout carries a token-grain TokenSelect


def _compute_dtype(dtype):
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def _pad_seq(x: torch.Tensor, n: int, dtype) -> torch.Tensor:
    x = x.to(dtype)
    if x.shape[2] == n:
        return x.contiguous()
    out = x.new_zeros(x.shape[0], x.shape[1], n, x.shape[3])
    out[:, :, : x.shape[2]] = x
    return out


def _prepare(q, k, v, layout: BlockLayout, key_padding_mask):
    """Inputs padded to whole blocks in the compute dtype, and the padded key mask (or None)."""
    cd = _compute_dtype(q.dtype)
    nq, nk = layout.num_q_blocks * layout.block_q, layout.num_kv_blocks * layout.block_k
    kpm = _pad_keys_mask(key_padding_mask, q.shape[0], nk)
    return cd, _pad_seq(q, nq, cd), _pad_seq(k, nk, cd), _pad_seq(v, nk, cd), kpm


def _pad_keys_mask(key_padding_mask, batch: int, nk: int):
    """The key padding mask widened to ``nk`` keys (the padding keys are not real), or None."""
    if key_padding_mask is None:
        return None
    kpm = torch.zeros(batch, nk, dtype=torch.bool)
    kpm[:, : key_padding_mask.shape[1]] = key_padding_mask
    return kpm


def _grouping(layout: BlockLayout, B: int, Hq: int, Hkv: int) -> int:
    """Query heads folded into one unit of work: 1 for per-query-head layouts, ``Hq / Hkv`` otherwise."""
    if layout.batch not in (1, B):
        raise ShapeError(bad("layout", f"a layout for batch 1 or {B}", f"batch {layout.batch}"))
    if layout.heads == Hq:
        return 1
    if layout.heads in (1, Hkv):
        return Hq // Hkv
    # Invalid input, not a request this backend cannot run: a ValueError, not UnsupportedError.
    raise ShapeError(bad("layout", f"a layout for 1, {Hkv} (kv) or {Hq} (query) heads", layout.heads))


def _units(B: int, Hq: int, Hkv: int, G: int, layout: BlockLayout):
    """(batch, layout group, kv head, first q head) for every unit of work; a unit folds G query heads."""
    g = Hq // Hkv
    LH = layout.heads
    for b in range(B):
        base = b * LH if layout.batch > 1 else 0
        for h0 in range(0, Hq, G):
            lh = 0 if LH == 1 else (h0 if LH == Hq else h0 // g)
            yield b, base + lh, h0 // g, h0


def _work(layout: BlockLayout, Hq: int, kp, vp, kpm, *, G: int, q_offset: int, scale: float, score):
    """``(b, layout group, kv head, first q head, _Unit)`` for every unit of work (:func:`_units`), its unit
    holding the padded K, V and key padding it reads."""
    B, Hkv = kp.shape[:2]
    for b, lh, hk, h0 in _units(B, Hq, Hkv, G, layout):
        unit = _Unit(
            kb=kp[b, hk],
            vb=vp[b, hk],
            kpm_b=kpm[b] if kpm is not None else None,
            bq=layout.block_q,
            bk=layout.block_k,
            G=G,
            h0=h0,
            q_offset=q_offset,
            scale=scale,
            score=score,
            sel=(layout, lh) if layout.select is not None else None,
        )
        yield b, lh, hk, h0, unit


def _fold(x: torch.Tensor, G: int, nqb: int, bq: int) -> torch.Tensor:
    """``(G, nqb * bq, D)`` -> ``(nqb, G * bq, D)``: the G heads of one block become rows of one product."""
    if G == 1:
        return x[0].view(nqb, bq, -1)
    return x.view(G, nqb, bq, -1).transpose(0, 1).reshape(nqb, G * bq, -1)


def _unfold(x: torch.Tensor, G: int, nqb: int, bq: int) -> torch.Tensor:
    if G == 1:
        return x.reshape(1, nqb * bq, -1)
    return x.view(nqb, G, bq, -1).transpose(0, 1).reshape(G, nqb * bq, -1)


def _keys(kb: torch.Tensor, ids: torch.Tensor, stride, C: int, s: int, bk: int) -> torch.Tensor:
    """The chunk's key (or value) tiles as ``(C, s * bk, D)``: a strided view when possible, else a gather."""
    D = kb.shape[-1]
    if stride is not None:
        start, step = stride
        return kb.as_strided((C, s * bk, D), (step * bk * D, D, 1), kb.storage_offset() + start * bk * D)
    # index_select over rows of a 2-D view is a plain row copy, several times faster than over a 3-D view.
    return kb.reshape(-1, bk * D).index_select(0, ids).view(C, s * bk, D)


def _merge(acc, lse, o, lse_o):
    """Two partial softmax results over disjoint keys, combined by their log-sum-exps (``-inf`` = no key)."""
    new = torch.logaddexp(lse, lse_o)
    safe = new.masked_fill(torch.isinf(new), float("inf"))
    return acc * (lse - safe).exp().unsqueeze(-1) + o * (lse_o - safe).exp().unsqueeze(-1), new


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
