"""Hand-made layouts are checked before a kernel reads them (issue 16): every malformed layout raises a
ShapeError naming what is wrong, on both forwards."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import attnkit as ak
from attnkit.errors import DTypeError, ShapeError
from attnkit.layout import TokenSelect
from tests.helpers import rand_qkv

N = 96


def _layout():
    return ak.patterns.SlidingWindow(40, 0).block_layout(N, N, 16, 16)


def _with(**changes):
    return dataclasses.replace(_layout(), _plans={}, **changes)


def _ids(edit):
    ids = _layout().kv_ids.clone()
    edit(ids)
    return ids


def _set_out_of_range(ids):
    ids[0, 3, 0] = 99


def _set_negative(ids):
    ids[0, 3, 0] = -5


def _set_hole(ids):
    ids[0, 4, 0] = -1  # row 4 has several tiles: a hole before valid ids


def _set_duplicate(ids):
    ids[0, 4, 1] = ids[0, 4, 0]


@pytest.mark.parametrize("kernel", ["native", "torch"])
@pytest.mark.parametrize(
    "layout, match",
    [
        (lambda: _with(kv_ids=_ids(_set_out_of_range)), "kv_ids: expected key-block ids in"),
        (lambda: _with(kv_ids=_ids(_set_negative)), "kv_ids: expected key-block ids in"),
        (lambda: _with(kv_ids=_ids(_set_hole)), "-1 only after a row's last tile"),
        (lambda: _with(kv_ids=_ids(_set_duplicate)), "each key block at most once"),
        (lambda: ak.patterns.SlidingWindow(40, 0).block_layout(2 * N, 2 * N, 16, 16), f"one made for {N} x {N}"),
        (lambda: _with(mask_ids=_layout().mask_ids[:, :2]), "mask_ids: expected the shape of kv_ids"),
        (lambda: _with(select=TokenSelect(rows=torch.ones(1, N, 3, dtype=torch.bool))), "select.rows"),
    ],
)
def test_malformed_layouts_are_named(layout, match, kernel, monkeypatch):
    monkeypatch.setenv("ATTNKIT_TILED_KERNEL", kernel)
    q, k, v = rand_qkv(1, 2, 2, N, N, 16, seed=1)
    with pytest.raises(ShapeError, match=match):
        ak.tiled_attention(q, k, v, layout())


def test_a_pattern_is_not_a_layout():
    q, k, v = rand_qkv(1, 2, 2, N, N, 16, seed=2)
    with pytest.raises(DTypeError, match="layout: expected an attnkit.BlockLayout"):
        ak.tiled_attention(q, k, v, ak.patterns.SlidingWindow(40, 0))


def test_a_well_formed_layout_still_runs():
    q, k, v = rand_qkv(1, 2, 2, N, N, 16, seed=3)
    out, _ = ak.tiled_attention(q, k, v, _layout())
    torch.testing.assert_close(out, ak.attention(q, k, v, pattern=ak.patterns.SlidingWindow(40, 0), backend="sdpa"))


def test_a_layout_for_other_heads_is_invalid_input():
    """Three head groups for 4 query / 2 kv heads is a ValueError (ShapeError), not an UnsupportedError."""
    q, k, v = rand_qkv(1, 4, 2, N, N, 16, seed=4)
    layout = ak.patterns.PerHead([ak.patterns.SlidingWindow(w, 0) for w in (8, 16, 24)]).block_layout(
        N, N, 16, 16, heads=3
    )
    with pytest.raises(ShapeError, match="layout: expected a layout for 1, 2 .kv. or 4 .query. heads"):
        ak.tiled_attention(q, k, v, layout)
