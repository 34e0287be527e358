"""The shared shape handling of the family-I vision modules: ``(B, H, W, C)`` in and out.

A module also takes ``(B, N, C)`` when it was built with a ``grid`` of ``N`` cells (the registry's factories
build one for about ``n`` tokens), so the generic layer tests and the gallery's ``(batch, tokens, dim)`` call
run it too; the output then has the input's shape.
"""

from __future__ import annotations

import torch
from torch import nn

from ...errors import DeviceError, DTypeError, ShapeError, bad


def grid_for(n: int) -> tuple[int, int]:
    """The most square ``(h, w)`` grid with ``h * w == n`` and ``h <= w`` (``n >= 1``)."""
    if n < 1:
        raise ShapeError(bad("n", "a positive number of tokens", n))
    h = max(d for d in range(1, int(n**0.5) + 1) if n % d == 0)
    return h, n // h


class VisionMixer(nn.Module):
    """A token mixer over ``(B, H, W, C)`` (channel last, raster order). Subclasses define ``_forward(x4)``
    and ``_reference(x4, dtype)`` over 4-D images."""

    min_side = 1

    def __init__(self, dim: int, grid: tuple[int, int] | None = None):
        super().__init__()
        if not isinstance(dim, int) or dim < 1:
            raise ShapeError(bad("dim", "a positive int", dim))
        self.dim = dim
        self.grid = None if grid is None else tuple(int(g) for g in grid)

    def _image(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise DTypeError(bad("x", "a torch.Tensor", type(x).__name__))
        if not x.is_floating_point():
            raise DTypeError(bad("x", "a floating-point tensor", x.dtype))
        if x.dim() == 3 and self.grid is not None and x.shape[1] == self.grid[0] * self.grid[1]:
            x = x.reshape(x.shape[0], *self.grid, x.shape[2])
        if x.dim() != 4 or x.shape[-1] != self.dim:
            grid = "" if self.grid is None else f", or (B, {self.grid[0] * self.grid[1]}, C)"
            raise ShapeError(bad("x", f"(B, H, W, C) with C = {self.dim}{grid}", tuple(x.shape)))
        if min(x.shape[1], x.shape[2]) < self.min_side or x.shape[0] < 1:
            raise ShapeError(bad("x", f"an image of at least {self.min_side} x {self.min_side}", tuple(x.shape)))
        p = next(self.parameters(), None)
        if p is not None and p.device != x.device:
            raise DeviceError(bad("x", f"a tensor on {p.device} (the module's device)", x.device))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x4 = self._image(x)
        p = next(self.parameters(), None)
        if p is not None and p.dtype != x4.dtype:
            raise DTypeError(bad("x", f"dtype {p.dtype} (the module's parameters)", x4.dtype))
        return self._forward(x4).reshape(x.shape)

    def reference(self, x: torch.Tensor, *, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The float64 oracle (:mod:`attnkit.reference.vision`) on this module's own weights, run in ``dtype``."""
        x4 = self._image(x)
        return self._reference(x4, dtype).reshape(x.shape)
