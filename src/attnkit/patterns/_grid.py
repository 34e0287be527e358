"""Helpers for patterns on a 1-, 2- or 3-D token grid laid out row-major (last dim fastest)."""

from __future__ import annotations

import functools

from ..errors import PatternError, bad
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
