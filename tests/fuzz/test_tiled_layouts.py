"""``tiled_attention(q, k, v, layout)`` with hand-made ``BlockLayout`` / ``TokenSelect``: a well-formed layout
gives the reference's attention over the pairs it stands for (painted independently), on both forwards; a
malformed one raises a named error before any kernel reads it."""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from dataclasses import replace

import torch
from hypothesis import given
from hypothesis import strategies as st

import attnkit as ak
from attnkit import reference
from attnkit.layout import BlockLayout, TokenSelect, ceil_div
from tests.fuzz import _check as C
from tests.fuzz._masks import layout_mask
from tests.fuzz.conftest import fuzz_settings
from tests.fuzz.strategies import cases


@contextmanager
def kernel(name: str):
    before = os.environ.get("ATTNKIT_TILED_KERNEL")
    os.environ["ATTNKIT_TILED_KERNEL"] = name
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("ATTNKIT_TILED_KERNEL", None)
        else:
            os.environ["ATTNKIT_TILED_KERNEL"] = before


@st.composite
def layouts(draw, B, Hq, Hkv, Nq, Nk, q_offset):
    """A well-formed layout for these sizes: any tile sizes, per-batch / per-head groups, FULL and partial
    tiles (EMPTY only in holes; a tile of the last, partial key block masked to its real keys), empty rows, and
    maybe a token-grain TokenSelect."""
    bq = draw(st.sampled_from([1, 3, 4, 8, 16, 32, 64]))
    bk = draw(st.sampled_from([1, 3, 4, 8, 16, 32, 64]))
    lb = draw(st.sampled_from([1, B]))
    heads = draw(st.sampled_from(sorted({1, Hkv, Hq})))
    G = lb * heads
    nqb, nkb = ceil_div(Nq, bq), ceil_div(Nk, bk)
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    density = draw(st.sampled_from([0.0, 0.3, 0.7, 1.0]))
    chosen = torch.rand(G, nqb, nkb, generator=gen) < density
    S = max(1, int(chosen.sum(-1).max()))
    n_masks = draw(st.integers(0, 3))
    masks = torch.rand(n_masks, bq, bk, generator=gen) < 0.5
    ids = torch.full((G, nqb, S), -1, dtype=torch.long)
    mids = torch.full((G, nqb, S), -2, dtype=torch.long)
    for g in range(G):
        for i in range(nqb):
            cols = chosen[g, i].nonzero()[:, 0]
            ids[g, i, : len(cols)] = cols
            for s in range(len(cols)):
                r = int(torch.randint(-1, n_masks, (1,), generator=gen))
                mids[g, i, s] = r
    tail = Nk % bk
    if tail:
        extra = []
        for g, i, s in (ids == nkb - 1).nonzero().tolist():
            r = int(mids[g, i, s])
            m = (masks[r] if r >= 0 else torch.ones(bq, bk, dtype=torch.bool)).clone()
            m[:, tail:] = False
            mids[g, i, s] = n_masks + len(extra)
            extra.append(m)
        if extra:
            masks = torch.cat([masks, torch.stack(extra)])
    select = None
    if draw(st.integers(0, 3)) == 0:
        terms = draw(st.sets(st.sampled_from(["rows", "cols", "diags", "labels"]), min_size=1))
        kw = {}
        if "rows" in terms:
            kw["rows"] = torch.rand(G, Nq, nkb, generator=gen) < 0.6
        if "cols" in terms:
            kw["cols"] = torch.rand(G, nqb, Nk, generator=gen) < 0.6
        if "diags" in terms:
            kw["diags"] = torch.rand(G, 2 * Nk, generator=gen) < 0.6
        if "labels" in terms:
            kw["labels"] = (torch.randint(0, 3, (G, Nq), generator=gen), torch.randint(0, 3, (G, Nk), generator=gen))
            if draw(st.booleans()):
                kw["positions"] = (
                    torch.randperm(Nq, generator=gen).expand(G, Nq).contiguous(),
                    torch.randperm(Nk, generator=gen).expand(G, Nk).contiguous(),
                )
        select = TokenSelect(**kw)
    pairs = 0  # only density reads it
    return BlockLayout(Nq, Nk, bq, bk, ids, mids, masks, pairs, batch=lb, select=select, q_offset=q_offset)


@given(cases(dtypes=(torch.float32, torch.float64, torch.bfloat16)), st.data())
@fuzz_settings(300)
@C.counted
def test_hand_made_layouts_match_the_reference(c, data):
    B, Hq, Hkv, Nq, Nk, D, Dv = c.dims
    lay = data.draw(layouts(B, Hq, Hkv, Nq, Nk, c.q_offset))
    mask = layout_mask(lay, B, Hq, Hkv, c.q_offset)
    scale = data.draw(st.sampled_from([None, 0.5]))
    want = reference.attention(
        *c.f64(), mask=mask, key_padding_mask=c.kpm, q_offset=c.q_offset, scale=scale, return_lse=True
    )
    which = data.draw(st.sampled_from(["native", "torch"]))
    label = (
        f"tiled_attention[{which}] layout {lay.block_q}x{lay.block_k} groups={lay.groups} batch={lay.batch} "
        f"select={_terms(lay.select)} kv_ids={lay.kv_ids.tolist()} mask_ids={lay.mask_ids.tolist()} on {c.label()}"
    )
    with kernel(which):
        C.expect_valid(
            label,
            lambda: ak.tiled_attention(c.q, c.k, c.v, lay, scale=scale, key_padding_mask=c.kpm, q_offset=c.q_offset),
            want[0],
            lse_ref=want[1],
            dtype=c.dtype,
            shape=(B, Hq, Nq, Dv),
        )


def _terms(sel):
    if sel is None:
        return None
    return [n for n in ("rows", "cols", "diags", "labels", "positions") if getattr(sel, n) is not None]


BAD_IDS = (2**31, 2**63 - 1, -2, -(2**31), -(2**63))


@st.composite
def malformed(draw, lay: BlockLayout, B, Hq, Hkv):
    """One thing wrong with a well-formed layout; ``(what, layout or other object)``."""
    ids, mids = lay.kv_ids.clone(), lay.mask_ids.clone()
    G, nqb, S = ids.shape
    nkb = lay.num_kv_blocks
    live = (ids >= 0).nonzero().tolist()
    what = draw(
        st.sampled_from(
            [
                "id_out_of_range",
                "id_huge",
                "hole",
                "duplicate",
                "ids_float",
                "ids_2d",
                "ids_rows",
                "ids_list",
                "mids_shape",
                "mid_out_of_range",
                "masks_shape",
                "sizes",
                "block_zero",
                "groups",
                "batch",
                "select_shape",
                "select_offset",
                "not_a_layout",
            ]
        )
    )
    r = lambda **kw: replace(lay, _plans={}, **kw)  # noqa: E731
    if what == "id_out_of_range":
        g, i, s = draw(st.sampled_from(live)) if live else (0, 0, 0)
        ids[g, i, s] = nkb + draw(st.integers(0, 3))
        return what, r(kv_ids=ids, mask_ids=mids.clamp(min=-1))
    if what == "id_huge":
        ids[draw(st.integers(0, G - 1)), draw(st.integers(0, nqb - 1)), 0] = draw(st.sampled_from(BAD_IDS))
        return what, r(kv_ids=ids)
    if what == "hole":
        rows = [(g, i) for g in range(G) for i in range(nqb) if int((ids[g, i] >= 0).sum()) >= 2]
        if rows:
            g, i = draw(st.sampled_from(rows))
            ids[g, i, 0] = -1
        else:
            ids = torch.cat([torch.full((G, nqb, 1), -1), torch.zeros(G, nqb, 1, dtype=torch.long)], 2)
            mids = torch.full_like(ids, -1)
        return what, r(kv_ids=ids, mask_ids=mids)
    if what == "duplicate":
        ids = torch.zeros(G, nqb, 2, dtype=torch.long)
        return what, r(kv_ids=ids, mask_ids=torch.full_like(ids, -1))
    if what == "ids_float":
        return what, r(kv_ids=ids.double())
    if what == "ids_2d":
        return what, r(kv_ids=ids[0], mask_ids=mids[0])
    if what == "ids_rows":
        return what, r(
            kv_ids=ids[:, :-1] if nqb > 1 else torch.cat([ids, ids], 1),
            mask_ids=mids[:, :-1] if nqb > 1 else torch.cat([mids, mids], 1),
        )
    if what == "ids_list":
        return what, r(kv_ids=ids.tolist())
    if what == "mids_shape":
        return what, r(mask_ids=mids[..., :0] if S > 1 else torch.cat([mids, mids], 2))
    if what == "mid_out_of_range":
        g, i, s = draw(st.sampled_from(live)) if live else (0, 0, 0)
        if not live:
            ids[g, i, s] = 0
        mids[g, i, s] = draw(st.sampled_from([lay.tile_masks.shape[0], lay.tile_masks.shape[0] + 7, -3, 2**31]))
        return what, r(kv_ids=ids, mask_ids=mids)
    if what == "masks_shape":
        tm = lay.tile_masks
        return what, r(
            tile_masks=draw(
                st.sampled_from(
                    [
                        tm[..., :-1] if tm.shape[-1] > 1 else torch.ones(1, 1, 2),
                        torch.ones(lay.block_q, lay.block_k, dtype=torch.bool),
                    ]
                )
            )
        )
    if what == "sizes":
        return what, r(q_len=lay.q_len + 1) if draw(st.booleans()) else r(kv_len=lay.kv_len + draw(st.integers(1, 70)))
    if what == "block_zero":
        return what, r(**{draw(st.sampled_from(["block_q", "block_k"])): draw(st.sampled_from([0, -1, -16]))})
    if what == "groups":  # a number of groups that is no head count of the call
        bad = [
            x
            for x in range(1, 8)
            if x not in {1, Hkv, Hq} and x % lay.batch == 0 and x // lay.batch not in {1, Hkv, Hq}
        ]
        n = draw(st.sampled_from(bad)) if bad else Hq + 1
        ids2 = ids[:1].expand(n, nqb, S).contiguous()
        return what, r(kv_ids=ids2, mask_ids=mids[:1].expand(n, nqb, S).contiguous(), batch=1, select=None)
    if what == "batch":
        return what, r(batch=draw(st.sampled_from([0, -1, G + 1, B + 1])))
    if what == "select_shape":
        n = draw(st.sampled_from(["rows", "cols", "diags", "labels"]))
        bad = {
            "rows": TokenSelect(rows=torch.ones(G, lay.q_len + 1, nkb, dtype=torch.bool)),
            "cols": TokenSelect(cols=torch.ones(G, nqb, lay.kv_len + 1, dtype=torch.bool)),
            "diags": TokenSelect(diags=torch.ones(G, lay.kv_len, dtype=torch.bool)),
            "labels": TokenSelect(labels=(torch.zeros(G, lay.q_len, dtype=torch.long),)),
        }[n]
        return what, r(select=bad)
    if what == "select_offset":  # a token-grain layout made for another q_offset
        sel = TokenSelect(diags=torch.ones(G, 2 * lay.kv_len, dtype=torch.bool))
        return what, r(select=sel, q_offset=lay.q_offset + 1)
    return what, draw(st.sampled_from([None, "layout", ak.patterns.Causal(), {}, lay.kv_ids]))


@given(cases(dtypes=(torch.float32,)), st.data())
@fuzz_settings(250)
@C.counted
def test_malformed_layouts_raise_named_errors(c, data):
    B, Hq, Hkv, Nq, Nk, D, Dv = c.dims
    lay = data.draw(layouts(B, Hq, Hkv, Nq, Nk, c.q_offset))
    what, bad = data.draw(malformed(lay, B, Hq, Hkv))
    which = data.draw(st.sampled_from(["native", "torch"]))
    with kernel(which):
        C.expect_invalid(
            f"{what} [{which}]: {getattr(bad, 'kv_ids', bad)!r}"[:300] + f" on {c.label()}",
            lambda: ak.tiled_attention(c.q, c.k, c.v, bad, key_padding_mask=c.kpm, q_offset=c.q_offset),
        )


@given(cases(dtypes=(torch.float32,)), st.data())
@fuzz_settings(100)
@C.counted
def test_layouts_with_nonfinite_inputs(c, data):
    """NaN/inf in q (anywhere) or at a real key of k/v raises NonFiniteError, whatever the layout reads."""
    B, Hq, Hkv, Nq, Nk, D, Dv = c.dims
    lay = data.draw(layouts(B, Hq, Hkv, Nq, Nk, c.q_offset))
    name = data.draw(st.sampled_from(["q", "k", "v"]))
    t = {"q": c.q.clone(), "k": c.k.clone(), "v": c.v.clone()}
    x = t[name]
    real = torch.ones(B, Nk, dtype=torch.bool) if c.kpm is None or name == "q" else c.kpm
    if name != "q" and not bool(real.any()):
        name, x = "q", t["q"]
        real = torch.ones(B, Nk, dtype=torch.bool)
    b = data.draw(st.integers(0, B - 1))
    if name == "q":
        x[b, data.draw(st.integers(0, Hq - 1)), data.draw(st.integers(0, Nq - 1))] = math.nan
    else:
        spots = real.nonzero().tolist()
        b, j = data.draw(st.sampled_from(spots))
        x[b, data.draw(st.integers(0, Hkv - 1)), j, 0] = data.draw(st.sampled_from([math.nan, math.inf, -math.inf]))
    C.expect_nonfinite(
        f"non-finite {name}: tiled_attention kv_ids={lay.kv_ids.tolist()} on {c.label()}",
        lambda: ak.tiled_attention(t["q"], t["k"], t["v"], lay, key_padding_mask=c.kpm, q_offset=c.q_offset),
        {name},
    )
