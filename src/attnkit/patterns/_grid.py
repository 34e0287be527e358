"""Helpers for patterns on a 1-, 2- or 3-D token grid laid out row-major (last dim fastest)."""

from __future__ import annotations

import functools

import torch

from .. import layout_cache
from ..errors import PatternError, bad
from ..layout_cache import Key
from .base import Pattern, as_tuple, prod


def unravel(idx, shape: tuple[int, ...]):
    """Row-major coordinates of flat indices (works on tensors under vmap)."""
    coords = []
    for n in reversed(shape):
        coords.append(idx % n)
        idx = idx // n
    return tuple(reversed(coords))


def every_dim(q_idx, kv_idx, shape: tuple[int, ...], rule):
    """``rule(dim, q_coord, kv_coord)`` AND-ed over the grid's dimensions."""
    qc, kc = unravel(q_idx, shape), unravel(kv_idx, shape)
    return functools.reduce(lambda a, b: a & b, [rule(i, qc[i], kc[i]) for i in range(len(shape))])


def grid_shape(shape) -> tuple[int, ...]:
    """Check and normalise a grid shape of 1 to 3 positive sizes."""
    dims = len(shape) if isinstance(shape, (tuple, list)) else 1
    out = as_tuple("shape", shape, dims)
    if not 1 <= len(out) <= 3:
        raise PatternError(bad("shape", "1 to 3 spatial sizes", shape))
    return out


class GridPattern(Pattern):
    """A pattern on a token grid: the sequence length is ``prod(shape)``."""

    @property
    def fixed_length(self) -> int:
        return prod(self.shape)

    def _lattice(self) -> tuple[int, ...] | None:
        """Per dim, the period of the classes of tokens that can interact (dilation, MaxViT's grid); None: 1."""
        return None

    def token_order(self):
        """Tokens tile by tile (:func:`tile_order`); ``None`` on a 1-D grid without classes, whose row-major order
        is already local."""
        lattice = self._lattice()
        if len(self.shape) == 1 and (lattice is None or lattice == (1,)):
            return None
        key = Key("order", self, self.fixed_length, self.fixed_length)
        order = layout_cache.get(key)
        if order is None:
            order = tile_order(self.shape, lattice)
            layout_cache.put(key, order)
        return order


def tile_order(shape: tuple[int, ...], lattice: tuple[int, ...] | None = None):
    """A permutation of the tokens of a row-major grid that keeps spatial neighbours together in 1-D.

    ``order[i]`` is the row-major position of the token placed ``i``-th. Each coordinate ``x`` of dim ``d`` is
    split by ``lattice[d]`` (default 1) into its class ``x % lattice[d]`` and its rank ``x // lattice[d]``:
    tokens are sorted by class (row-major over dims), then by the Morton (Z-order) code of their ranks, which
    interleaves the ranks' bits, the last dim least significant. On a grid of power-of-two sides every aligned
    run of ``2 ** (dims * k)`` placed tokens is then a ``2 ** k`` cube of one class (in 2-D a run of 16 is a 4 x 4
    square, of 64 an 8 x 8 one), so a tile of consecutive tokens covers a compact region and a local pattern
    touches few tiles. Other sides keep the order, with ragged regions at the far edges.
    """
    dims = len(shape)
    lattice = lattice or (1,) * dims
    coords = unravel(torch.arange(prod(shape)), shape)
    classes = torch.zeros(prod(shape), dtype=torch.long)
    code = torch.zeros(prod(shape), dtype=torch.long)
    ranks = [c // m for c, m in zip(coords, lattice, strict=True)]
    bits = max(-(-n // m) - 1 for n, m in zip(shape, lattice, strict=True)).bit_length()
    for bit in range(bits):
        for d, r in enumerate(ranks):
            code |= ((r >> bit) & 1) << (bit * dims + dims - 1 - d)
    for c, m in zip(coords, lattice, strict=True):
        classes = classes * m + c % m
    return torch.argsort(classes * (1 << (bits * dims)) + code, stable=True)
