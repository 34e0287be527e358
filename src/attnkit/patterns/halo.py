"""Blocked local attention with a halo (HaloNet).

Paper: "Scaling Local Self-Attention for Parameter Efficient Visual Backbones" (Vaswani et al., 2021).
The grid is cut into non-overlapping query blocks of ``block`` tokens per dim; each block attends to its
own block grown by ``halo`` tokens on every side. HaloNet pads the image with zeros; here keys outside
the grid do not exist, so border blocks see a clipped region (padding keys would only add ``exp(0)``
terms to the softmax, which changes the result; we choose the clipped form and document it).

Picture, 1-D ``HaloBlocks((8,), block=2, halo=1)``::

    ###.....
    ###.....
    .####...
    .####...
    ...####.
    ...####.
    .....###
    .....###
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import PatternError, bad
from ..records import SPATIAL, grid_side, register
from ._grid import GridPattern, every_dim, grid_shape
from .base import as_tuple

__all__ = ["HaloBlocks"]

@dataclass(frozen=True)
class HaloBlocks(GridPattern):
    """Query blocks of ``block`` tokens per dim attend to the block plus ``halo`` tokens around it."""

    shape: tuple
    block: object = 8
    halo: object = 2

    def __post_init__(self):
        shape = grid_shape(self.shape)
        dims = len(shape)
        block = as_tuple("block", self.block, dims)
        halo = as_tuple("halo", self.halo, dims, 0)
        for i in range(dims):
            if shape[i] % block[i]:
                raise PatternError(bad("block", f"a divisor of the input size {shape[i]} in dim {i}", block[i]))
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "block", block)
        object.__setattr__(self, "halo", halo)

    def mask_mod(self, b, h, q_idx, kv_idx):
        def rule(i, xq, xk):
            halo = min(self.halo[i], self.shape[i])  # a halo past the input size reaches all of it (no overflow)
            lo = (xq // self.block[i]) * self.block[i] - halo
            return (xk >= lo) & (xk < lo + self.block[i] + 2 * halo)

        return every_dim(q_idx, kv_idx, self.shape, rule)


register(
    "halo_2d",
    family="A",
    kind="pattern",
    paper="Scaling Local Self-Attention for Parameter Efficient Visual Backbones (HaloNet, 2021)",
    exact=True,
    supports=SPATIAL,
    factory=lambda n: HaloBlocks((grid_side(n, 2, 8) // 4 * 4,) * 2, block=4, halo=1),
    summary="4x4 query blocks, halo 1",
    source=HaloBlocks,
)
