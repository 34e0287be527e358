"""MaxViT's two axes of multi-axis attention: ``BlockAxis`` (local) and ``GridAxis`` (dilated global).

Paper: "MaxViT: Multi-Axis Vision Transformer" (Tu et al., 2022). On a ``(H, W)`` (or 1-/3-D) grid:

* ``BlockAxis(shape, window)``: non-overlapping windows of ``window`` tokens per dim; a token sees the
  tokens of its own window (``x // window`` equal in every dim).
* ``GridAxis(shape, grid)``: the grid is split into ``grid`` cells per dim, each ``n / grid`` tokens wide; a
  token sees the tokens at the same offset inside every cell (``x % (n / grid)`` equal in every dim): a
  sparse, dilated, global mixing over a fixed ``grid x grid`` lattice.

MaxViT applies one then the other in consecutive layers; ``BlockAxis | GridAxis`` is their union in one.

Pictures, 1-D on 8 tokens, ``BlockAxis((8,), 4)`` and ``GridAxis((8,), 2)``::

    ####....        #...#...
    ####....        .#...#..
    ####....        ..#...#.
    ####....        ...#...#
    ....####        #...#...
    ....####        .#...#..
    ....####        ..#...#.
    ....####        ...#...#
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import PatternError, bad
from ..records import SPATIAL, grid_side, register
from ._grid import GridPattern, every_dim, grid_shape
from .base import as_tuple

__all__ = ["BlockAxis", "GridAxis"]

def _spatial(name: str, shape, value, lo: int = 1):
    shape = grid_shape(shape)
    vals = as_tuple(name, value, len(shape), lo)
    for i, (n, w) in enumerate(zip(shape, vals, strict=False)):
        if n % w:
            raise PatternError(bad(name, f"a divisor of the input size {n} in dim {i}", w))
    return shape, vals


@dataclass(frozen=True)
class BlockAxis(GridPattern):
    """MaxViT block attention: tokens attend inside their non-overlapping window."""

    shape: tuple
    window: object = 7

    def __post_init__(self):
        shape, w = _spatial("window", self.shape, self.window)
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "window", w)

    def mask_mod(self, b, h, q_idx, kv_idx):
        return every_dim(q_idx, kv_idx, self.shape, lambda i, xq, xk: xq // self.window[i] == xk // self.window[i])


@dataclass(frozen=True)
class GridAxis(GridPattern):
    """MaxViT grid attention: tokens attend to the same in-cell offset across a ``grid``-per-dim lattice."""

    shape: tuple
    grid: object = 7

    def __post_init__(self):
        shape, g = _spatial("grid", self.shape, self.grid)
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "grid", g)

    def mask_mod(self, b, h, q_idx, kv_idx):
        cells = self._lattice()
        return every_dim(q_idx, kv_idx, self.shape, lambda i, xq, xk: xq % cells[i] == xk % cells[i])

    def _lattice(self):
        return tuple(n // g for n, g in zip(self.shape, self.grid, strict=True))


register(
    "maxvit_block",
    family="A",
    kind="pattern",
    paper="MaxViT: Multi-Axis Vision Transformer (Tu et al., 2022)",
    exact=True,
    supports=SPATIAL,
    factory=lambda n: BlockAxis((grid_side(n, 2, 8) // 4 * 4,) * 2, window=4),
    summary="4x4 non-overlapping windows",
    source=BlockAxis,
)

register(
    "maxvit_grid",
    family="A",
    kind="pattern",
    paper="MaxViT: Multi-Axis Vision Transformer (Tu et al., 2022)",
    exact=True,
    supports=SPATIAL,
    factory=lambda n: GridAxis((grid_side(n, 2, 8) // 4 * 4,) * 2, grid=4),
    summary="4x4 dilated global grid",
    source=GridAxis,
)
