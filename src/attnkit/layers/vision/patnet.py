"""PATNet's partial attention: a partial convolution on some channels, attention on the rest."""

from __future__ import annotations

import torch
from torch import nn

from ... import reference
from ...errors import ShapeError, bad
from ...records import register
from ._base import VisionMixer, grid_for

__all__ = ["PartialAttention"]


class PartialAttention(VisionMixer):
    r"""PATNet's partial attention: the channels are split, one part convolved, the other attended.

    With ``c_p = dim // n_div`` channels ``x_p`` and the remaining ``c_r = dim - c_p`` channels ``x_r``,

    .. math::

        y = \big[\, \operatorname{conv}_{k\times k}(x_p)\ ;\ \operatorname{MHSA}(x_r)\,\big]

    where ``conv`` is FasterNet's partial convolution (PConv: a dense ``k x k`` convolution over the ``c_p``
    channels, zero padding, no bias) and ``MHSA`` is ``heads``-head softmax self-attention over all ``H W``
    tokens of the untouched channels (``Q, K, V = x_r W_{qkv}``, scale ``d^{-1/2}``, output projection
    ``W_o`` on ``c_r`` channels). The channels are kept in that order (convolved first).

    Choices where the abstract is silent: the paper's PAT_ch puts an "enhanced Gaussian channel attention" on
    the untouched channels, whose formula the abstract does not give, so it is not implemented; this layer is
    the PAT_sf form (self-attention on the untouched channels), with FasterNet's ``n_div = 4`` and ``k = 3``
    as defaults. ``heads`` must divide ``c_r``. The cost is ``O(N c_p^2 k^2 + N^2 c_r)``: attention runs on
    ``(n_div - 1) / n_div`` of the channels.
    """

    def __init__(self, dim: int, heads: int = 4, *, n_div: int = 4, kernel: int = 3, grid=None):
        super().__init__(dim, grid)
        if not isinstance(n_div, int) or n_div < 2 or dim // n_div < 1:
            raise ShapeError(bad("n_div", f"an int >= 2 with dim // n_div >= 1 (dim = {dim})", n_div))
        if kernel < 1 or kernel % 2 == 0:
            raise ShapeError(bad("kernel", "an odd positive int", kernel))
        cp = dim // n_div
        cr = dim - cp
        if heads < 1 or cr % heads:
            raise ShapeError(bad("heads", f"a divisor of the {cr} attended channels (dim - dim // n_div)", heads))
        self.heads, self.n_div, self.kernel, self.cp = heads, n_div, kernel, cp
        self.conv = nn.Conv2d(cp, cp, kernel, padding=kernel // 2, bias=False)
        self.qkv = nn.Linear(cr, 3 * cr)
        self.proj = nn.Linear(cr, cr)

    def _forward(self, x):
        B, H, W, C = x.shape
        xp, xr = x[..., : self.cp], x[..., self.cp :]
        yp = self.conv(xp.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        cr, h = C - self.cp, self.heads
        q, k, v = self.qkv(xr.reshape(B, H * W, cr)).reshape(B, H * W, 3, h, cr // h).permute(2, 0, 3, 1, 4)
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        yr = self.proj(o.transpose(1, 2).reshape(B, H * W, cr)).reshape(B, H, W, cr)
        return torch.cat([yp, yr], -1)

    def _reference(self, x, dtype):
        return reference.vision.partial_attention(
            x,
            self.conv.weight,
            self.qkv.weight,
            self.qkv.bias,
            self.proj.weight,
            self.proj.bias,
            heads=self.heads,
            cp=self.cp,
            dtype=dtype,
        )


register(
    "patnet_partial",
    family="I",
    kind="layer",
    paper="Partial Convolution Meets Visual Attention (PATNet)",
    exact=True,
    supports={"spatial", "backward", "trainable"},
    factory=lambda n, *, dim=64, heads=4: PartialAttention(dim, heads, grid=grid_for(n)),
    summary="partial attention: k x k conv on dim // 4 channels, multi-head self-attention on the rest",
    source=PartialAttention,
)
