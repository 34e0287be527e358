"""Grid patterns' own token order (``tile_order``) and :class:`InOrder`, the pattern renumbered by it."""

from __future__ import annotations

import pytest
import torch

from attnkit.patterns.base import InOrder
from attnkit.patterns.maxvit import BlockAxis, GridAxis
from attnkit.patterns.neighborhood import Neighborhood
from attnkit.patterns.sliding_window import SlidingWindow
from attnkit.errors import PatternError
from attnkit.patterns._grid import tile_order, unravel


def test_runs_of_sixteen_are_four_by_four_squares_and_of_64_eight_by_eight():
    order = tile_order((32, 32))
    assert torch.equal(order.sort().values, torch.arange(1024))
    y, x = unravel(order, (32, 32))
    for run, side in ((16, 4), (64, 8)):
        ry, rx = y.view(-1, run), x.view(-1, run)
        for r in (ry, rx):
            assert bool(((r.amax(1) - r.amin(1)) == side - 1).all())


def test_three_d_runs_of_64_are_cubes_and_ragged_sides_stay_a_permutation():
    z, y, x = unravel(tile_order((8, 8, 8)), (8, 8, 8))
    for c in (z, y, x):
        c = c.view(-1, 64)
        assert bool(((c.amax(1) - c.amin(1)) == 3).all())
    assert torch.equal(tile_order((12, 10)).sort().values, torch.arange(120))


def test_lattice_classes_come_first():
    # dilation 2: the four (y % 2, x % 2) classes are contiguous quarters, each tiled in its own squares
    y, x = unravel(tile_order((16, 16), (2, 2)), (16, 16))
    cls = (y % 2) * 2 + x % 2
    assert torch.equal(cls, torch.arange(4).repeat_interleave(64))


@pytest.mark.parametrize(
    "pat",
    [
        Neighborhood((12, 10), kernel_size=5),
        Neighborhood((8, 8), kernel_size=3, dilation=2),
        Neighborhood((4, 4, 6), kernel_size=3, is_causal=True),
        Neighborhood((64,), kernel_size=7, dilation=3),
        GridAxis((8, 8), grid=4),
        BlockAxis((8, 8), window=4),
    ],
)
def test_in_order_is_the_same_mask_renumbered(pat):
    n = pat.fixed_length
    ordered = InOrder(pat)
    o = ordered.order
    assert torch.equal(ordered.dense_mask(n, n), pat.dense_mask(n, n)[:, o][:, :, o])
    assert ordered.density(n, n) == pat.density(n, n)
    assert not ordered.causal  # the renumbered pairs are not below the diagonal any more


def test_in_order_computes_fewer_pairs_on_a_2d_neighbourhood():
    pat = Neighborhood((64, 64), kernel_size=7)
    n = pat.fixed_length
    raster, tiled = (p.block_layout(n, n, 16, 16).tile_density for p in (pat, InOrder(pat)))
    assert tiled < 0.6 * raster


def test_in_order_needs_a_token_order():
    assert SlidingWindow(4).token_order() is None and Neighborhood((64,), kernel_size=5).token_order() is None
    with pytest.raises(PatternError, match="token_order"):
        InOrder(SlidingWindow(4))
