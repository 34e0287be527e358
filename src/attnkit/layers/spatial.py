"""``Attention2d`` / ``Attention3d``: :class:`~attnkit.layers.Attention` over ``(B, H, W, C)`` and
``(B, T, H, W, C)`` for the spatial patterns (neighbourhoods, halo, MaxViT block and grid, radial) and the 2-D /
3-D selectors (BiFormer's 2-D routing, VMoBA).

Tokens are flattened in raster order (``t, h, w``, the last fastest), the order every spatial pattern and grid
selector of attnkit indexes; the pattern's grid must be the input's. Not causal by default (an image has no
order); ``Attention3d(causal=True)`` with a causal-in-time pattern (``neighborhood_3d_causal``) is a video
layer. A registry name is made for a grid of about ``max_seq_len`` cells, so pass a pattern object built for
your grid (``Neighborhood((H, W), kernel_size=7)``) unless the sizes agree.
"""

from __future__ import annotations

import torch

from ..errors import ShapeError, bad
from .attention import Attention


def _grid_of(mech):
    g = getattr(mech, "grid", None) or getattr(mech, "shape", None)
    return tuple(g) if isinstance(g, (tuple, list)) else None


class _Spatial(Attention):
    dims = 2

    def __init__(self, dim, heads, *, causal: bool = False, **kw):
        super().__init__(dim, heads, causal=causal, **kw)

    def forward(self, x: torch.Tensor, **kw) -> torch.Tensor:
        if x.dim() != self.dims + 2 or x.shape[-1] != self.dim:
            lay = "(B, H, W, C)" if self.dims == 2 else "(B, T, H, W, C)"
            raise ShapeError(bad("x", f"{lay} with C = {self.dim}", tuple(x.shape)))
        grid = tuple(x.shape[1:-1])
        want = _grid_of(self.mechanism)
        if want is not None and want[-len(grid) :] != grid and want != grid:
            raise ShapeError(bad("x", f"the grid {want} of the mechanism", grid))
        out = super().forward(x.reshape(x.shape[0], -1, self.dim), **kw)
        return out.reshape(x.shape)


class Attention2d(_Spatial):
    """:class:`Attention` over ``(B, H, W, C)`` images (raster order); see :mod:`attnkit.layers.spatial`."""

    dims = 2


class Attention3d(_Spatial):
    """:class:`Attention` over ``(B, T, H, W, C)`` videos (raster order); see :mod:`attnkit.layers.spatial`."""

    dims = 3
