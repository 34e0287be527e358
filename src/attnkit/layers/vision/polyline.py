"""PPMA: polyline path masked attention for vision transformers (Mamba2's structured mask on 2-D paths)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ... import reference
from ...errors import ShapeError, bad
from ...records import register
from ._base import VisionMixer, grid_for

__all__ = ["PolylineMaskedAttention", "polyline_log_mask"]


def polyline_log_mask(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    r"""The log structured mask of PPMA from per-cell log-decays ``a`` (horizontal) and ``b`` (vertical).

    ``a`` and ``b`` have shape ``(..., H, W)`` and are ``<= 0``. The result, ``(..., H W, H W)`` in raster
    order, is the sum of the log-decays along the polyline from query cell ``(i, j)`` to key cell ``(k, l)``
    that first runs along row ``i`` to column ``l``, then down (or up) column ``l`` to row ``k``:

    .. math::

        M_{(i,j),(k,l)} = \sum_{c \in (\min(j,l), \max(j,l)]} a_{i c} + \sum_{r \in (\min(i,k), \max(i,k)]} b_{r l}

    which is Mamba2's 1-D ``segsum`` applied along the row and then along the column, so
    ``exp(M)`` is the product of the decays of the cells the path passes through. Built with cumulative sums:
    since the decays are ``<= 0`` each segment sum is ``-|cumsum[x] - cumsum[y]|``.
    """
    H, W = a.shape[-2:]
    ca, cb = a.cumsum(-1), b.cumsum(-2)
    along_row = -(ca[..., :, :, None] - ca[..., :, None, :]).abs()  # (..., i, j, l)
    along_col = -(cb[..., :, None, :] - cb[..., None, :, :]).abs()  # (..., i, k, l)
    m = along_row[..., :, :, None, :] + along_col[..., :, None, :, :]  # (..., i, j, k, l)
    return m.reshape(*a.shape[:-2], H * W, H * W)


class PolylineMaskedAttention(VisionMixer):
    r"""PPMA: self-attention whose scores carry a Mamba2-style structured mask along 2-D polyline paths.

    Each head ``h`` reads a horizontal and a vertical log-decay from every cell's own slice of channels
    ``x_h`` (the ``head_dim`` channels of head ``h``), as Mamba2 reads its step size:

    .. math::

        a_{h,ij} = -e^{A_h}\, \operatorname{softplus}(w_a^\top x_{h,ij} + \beta_h),\qquad
        b_{h,ij} = -e^{A_h}\, \operatorname{softplus}(w_b^\top x_{h,ij} + \beta_h)

    and the mask ``M_h`` is :func:`polyline_log_mask` of them: the log of the product of the decays along the
    path from the query to the key, first along the query's row, then along the key's column. Its transpose
    is the other polyline (first the query's column, then the key's row). The attention averages the two:

    .. math::

        y = W_o\Big[\tfrac12\operatorname{softmax}\big(\tfrac{Q K^\top}{\sqrt d} + M_h\big)
            + \tfrac12\operatorname{softmax}\big(\tfrac{Q K^\top}{\sqrt d} + M_h^\top\big)\Big] V

    The mask is added to the logits (multiplies the unnormalised weights by ``exp(M) <= 1``), so each row
    still sums to one, and at ``M = 0`` the layer is plain multi-head attention (a test).

    What is taken from the paper's public code (the abstract gives no formula): the per-head linear read of the
    decays from the head's channels, the shared ``beta_h`` and ``A_h`` (initialised as Mamba2 does:
    ``e^{A_h}`` uniform in [1, 1.1], ``softplus(beta_h)`` log-uniform in [0.001, 0.1]), the half-open segment
    sums, and the average of the two path orientations. Left out: the locally-enhanced positional encoding
    (a 5 x 5 depthwise convolution of ``V``) and the rotary embedding of the RMT backbone PPMA is built on,
    since they are positional extras of that backbone rather than the mask, and the paper's decomposed
    (row-then-column) form for early high-resolution stages. The mask is dense, ``(heads, N, N)`` per image.
    """

    def __init__(self, dim: int, heads: int = 4, *, grid=None):
        super().__init__(dim, grid)
        if heads < 1 or dim % heads:
            raise ShapeError(bad("heads", f"a divisor of dim = {dim}", heads))
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.decay = nn.Linear(dim // heads, 2, bias=False)
        self.A_log = nn.Parameter(torch.empty(heads).uniform_(1.0, 1.1).log())
        dt = torch.exp(torch.rand(heads) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # softplus(dt_bias) == dt

    def log_decays(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(a, b)``, each ``(B, heads, H, W)``: the horizontal and vertical log-decays of every cell."""
        B, H, W, C = x.shape
        ab = self.decay(x.reshape(B, H, W, self.heads, C // self.heads))  # (B, H, W, heads, 2)
        ab = -F.softplus(ab + self.dt_bias[:, None]) * self.A_log.exp()[:, None]
        ab = ab.permute(4, 0, 3, 1, 2)
        return ab[0], ab[1]

    def _forward(self, x):
        B, H, W, C = x.shape
        h, d = self.heads, C // self.heads
        q, k, v = self.qkv(x.reshape(B, H * W, C)).reshape(B, H * W, 3, h, d).permute(2, 0, 3, 1, 4)
        m = polyline_log_mask(*self.log_decays(x))
        s = q @ k.transpose(-1, -2) * d**-0.5
        a = 0.5 * (s + m).softmax(-1) + 0.5 * (s + m.transpose(-1, -2)).softmax(-1)
        return self.proj((a @ v).transpose(1, 2).reshape(B, H * W, C)).reshape(B, H, W, C)

    def _reference(self, x, dtype):
        return reference.vision.polyline_masked_attention(
            x,
            self.qkv.weight,
            self.qkv.bias,
            self.proj.weight,
            self.proj.bias,
            self.decay.weight,
            self.dt_bias,
            self.A_log,
            heads=self.heads,
            dtype=dtype,
        )


register(
    "ppma_polyline",
    family="I",
    kind="layer",
    paper="Polyline Path Masked Attention for Vision Transformer (PPMA)",
    exact=True,
    supports={"spatial", "backward", "trainable"},
    factory=lambda n, *, dim=64, heads=4: PolylineMaskedAttention(dim, heads, grid=grid_for(n)),
    summary="attention logits plus the log of input-dependent decays multiplied along row-then-column paths",
    source=PolylineMaskedAttention,
)
