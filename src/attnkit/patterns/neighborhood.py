"""Neighborhood attention in 1-D, 2-D and 3-D (NA, DiNAT's dilated NA, Generalized NA).

Papers: "Faster Neighborhood Attention" (Hassani et al., 2024); "Dilated Neighborhood Attention
Transformer" (DiNAT, Hassani & Shi, 2022); "Generalized Neighborhood Attention" (GNA, 2025).

Tokens lie on a grid ``shape`` in row-major order (last dim fastest); the sequence length is
``prod(shape)``. Per dimension, with size ``n``, ``kernel_size`` ``k``, ``dilation`` ``d`` and
``stride`` ``s`` (NATTEN's rule, which this module re-derives and the tests compare with ``natten``):

* dilation splits the axis into ``d`` interleaved groups (``x % d``); a query sees keys of its own group
  only, and inside the group works on the coordinate ``x' = x // d`` over a group of length
  ``n_g = ceil((n - g) / d)``;
* stride groups ``s`` consecutive queries; they all use the window of the group's *leader*: the centre
  query ``(x' // s) * s + s // 2`` (the right one of the two centres when ``s`` is even), clipped to
  ``n_g - 1``;
* non-causal: the window is centred on the leader and *shifted inward at the borders*, so every query
  sees exactly ``k`` keys per dim: ``c = clamp(leader, k // 2, n_g - 1 - r)`` with ``r = k // 2`` for odd
  ``k`` and ``k // 2 - 1`` for even ``k``; keys ``c - k // 2 <= y' <= c + r``;
* causal: the leader is the *last* query of the stride group (clipped); keys ``y' <= x'`` and
  ``leader - y' < k``.

A key is visible when the rule holds in every dimension. ``stride == kernel_size`` gives blocked
(Swin-like) windows; ``stride == 1`` the sliding neighbourhood.

Picture, 1-D ``Neighborhood((8,), kernel_size=3)``::

    ###.....
    ###.....
    .###....
    ..###...
    ...###..
    ....###.
    .....###
    .....###
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import PatternError, bad
from ..records import SPATIAL, grid_side, register, window_size
from ._grid import GridPattern, every_dim, grid_shape
from .base import as_tuple

__all__ = ["Neighborhood"]

@dataclass(frozen=True)
class Neighborhood(GridPattern):
    """NATTEN-compatible neighbourhood attention on a 1-, 2- or 3-D token grid."""

    shape: tuple
    kernel_size: object = 7
    dilation: object = 1
    stride: object = 1
    is_causal: object = False

    def __post_init__(self):
        shape = grid_shape(self.shape)
        dims = len(shape)
        ks = as_tuple("kernel_size", self.kernel_size, dims, 2)
        dil = as_tuple("dilation", self.dilation, dims)
        st = as_tuple("stride", self.stride, dims)
        causal = (self.is_causal,) * dims if isinstance(self.is_causal, bool) else tuple(self.is_causal)
        if len(causal) != dims or not all(isinstance(c, bool) for c in causal):
            raise PatternError(bad("is_causal", f"a bool or a tuple of {dims} bools", repr(self.is_causal)))
        for i in range(dims):
            if ks[i] * dil[i] > shape[i]:
                raise PatternError(
                    bad("kernel_size * dilation", f"<= the input size {shape[i]} in dim {i}", f"{ks[i]} * {dil[i]}")
                )
            if st[i] > ks[i]:
                raise PatternError(bad("stride", f"<= kernel_size ({ks[i]}) in dim {i}", st[i]))
        for name, val in (
            ("shape", shape),
            ("kernel_size", ks),
            ("dilation", dil),
            ("stride", st),
            ("is_causal", causal),
        ):
            object.__setattr__(self, name, val)
        object.__setattr__(self, "causal", all(causal))

    def mask_mod(self, b, h, q_idx, kv_idx):
        return every_dim(q_idx, kv_idx, self.shape, self._rule)

    def _lattice(self):
        return self.dilation

    def _rule(self, i, xq_full, xk_full):
        n, k, d, s = self.shape[i], self.kernel_size[i], self.dilation[i], self.stride[i]
        gq, gk = xq_full % d, xk_full % d
        xq, xk = xq_full // d, xk_full // d
        n_g = (n - gq + d - 1) // d  # length of the query's dilation group
        if self.is_causal[i]:
            leader = torch.minimum((xq // s) * s + s - 1, n_g - 1)
            m = (xk <= xq) & (leader - xk < k)
        else:
            left, right = k // 2, k // 2 + (k % 2) - 1
            leader = torch.minimum((xq // s) * s + s // 2, n_g - 1)
            centre = torch.maximum(torch.minimum(leader, n_g - 1 - right), torch.full_like(leader, left))
            m = (xk >= centre - left) & (xk <= centre + right)
        return m & (gq == gk)


register(
    "neighborhood_1d",
    family="A",
    kind="pattern",
    paper="Faster Neighborhood Attention (Hassani et al., 2024)",
    exact=True,
    supports=SPATIAL,
    factory=lambda n: Neighborhood((n,), kernel_size=max(3, window_size(n, 8, 256) - 1) | 1),
    summary="NATTEN 1-D neighbourhood, kernel min(n/8, 255)",
    source=Neighborhood,
)

register(
    "neighborhood_2d",
    family="A",
    kind="pattern",
    paper="Faster Neighborhood Attention (Hassani et al., 2024)",
    exact=True,
    supports=SPATIAL,
    factory=lambda n: Neighborhood((grid_side(n, 2, 8),) * 2, kernel_size=7),
    summary="NATTEN 2-D neighbourhood, kernel 7x7",
    source=Neighborhood,
)

register(
    "dilated_neighborhood_2d",
    family="A",
    kind="pattern",
    paper="Dilated Neighborhood Attention Transformer (DiNAT, 2022)",
    exact=True,
    supports=SPATIAL,
    factory=lambda n: Neighborhood((grid_side(n, 2, 10),) * 2, kernel_size=5, dilation=2),
    summary="2-D neighbourhood 5x5, dilation 2",
    source=Neighborhood,
)

register(
    "strided_neighborhood_2d",
    family="A",
    kind="pattern",
    paper="Generalized Neighborhood Attention (GNA, 2025)",
    exact=True,
    supports=SPATIAL,
    factory=lambda n: Neighborhood((grid_side(n, 2, 8),) * 2, kernel_size=7, stride=4),
    summary="2-D neighbourhood 7x7, stride 4 (GNA)",
    source=Neighborhood,
)

register(
    "neighborhood_3d_causal",
    family="A",
    kind="pattern",
    paper="Generalized Neighborhood Attention (GNA, 2025)",
    exact=True,
    supports=SPATIAL | {"causal"},
    factory=lambda n: Neighborhood((grid_side(n, 3, 4),) * 3, kernel_size=3, is_causal=True),
    summary="3-D (video) neighbourhood 3x3x3, causal in every dim",
    source=Neighborhood,
)
