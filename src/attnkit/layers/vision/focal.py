"""FocalNets' focal modulation (Yang et al., 2022)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from ... import reference
from ...errors import ShapeError, bad
from ...records import register
from ._base import VisionMixer, grid_for

__all__ = ["FocalModulation"]


class FocalModulation(VisionMixer):
    r"""Focal modulation, an attention-free token mixer.

    .. math::

        [q, z^0, g] = x W_f \quad (g \in \mathbb{R}^{L+1}),\qquad
        z^\ell = \operatorname{GELU}(\operatorname{DWConv}_{k_\ell}(z^{\ell-1})),\ \ell = 1..L,\qquad
        z^{L+1} = \operatorname{GELU}(\operatorname{mean}_{hw} z^L)

        y = \Big(q \odot h\big(\textstyle\sum_{\ell=1}^{L+1} g_\ell\, z^\ell\big)\Big) W_o

    with ``k_l = kernel + 2 (l - 1)`` (the paper's focal kernels 3, 5, ... for ``L = focal_level``), bias-free
    depthwise convolutions with zero padding, ``h`` a 1x1 convolution (a linear map). As in the authors' code
    the modulator is not divided by ``L + 1`` (their ``normalize_modulator=False`` default), and there is no
    post-modulation LayerNorm.
    """

    def __init__(self, dim: int, *, focal_level: int = 2, kernel: int = 3, grid=None):
        super().__init__(dim, grid)
        if focal_level < 1:
            raise ShapeError(bad("focal_level", "a positive int", focal_level))
        if kernel < 1 or kernel % 2 == 0:
            raise ShapeError(bad("kernel", "an odd positive int", kernel))
        self.focal_level = focal_level
        self.f = nn.Linear(dim, 2 * dim + focal_level + 1)
        self.convs = nn.ModuleList(
            nn.Conv2d(dim, dim, kernel + 2 * i, padding=(kernel + 2 * i) // 2, groups=dim, bias=False)
            for i in range(focal_level)
        )
        self.h = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def _forward(self, x):
        C, L = self.dim, self.focal_level
        t = self.f(x)
        q, ctx, gates = t[..., :C], t[..., C : 2 * C].permute(0, 3, 1, 2), t[..., 2 * C :].permute(0, 3, 1, 2)
        agg = 0
        for lvl, conv in enumerate(self.convs):
            ctx = F.gelu(conv(ctx))
            agg = agg + ctx * gates[:, lvl : lvl + 1]
        agg = agg + F.gelu(ctx.mean((2, 3), keepdim=True)) * gates[:, L:]
        return self.proj(q * self.h(agg.permute(0, 2, 3, 1)))

    def _reference(self, x, dtype):
        convs = [c.weight[:, 0] for c in self.convs]
        w = (self.f.weight, self.f.bias, convs, self.h.weight, self.h.bias, self.proj.weight, self.proj.bias)
        return reference.vision.focal_modulation(x, *w, dtype=dtype)


register(
    "focal_modulation",
    family="I",
    kind="layer",
    paper="Focal Modulation Networks (Yang et al., 2022)",
    exact=True,
    supports={"spatial", "backward", "trainable"},
    factory=lambda n, *, dim=64, heads=4: FocalModulation(dim, focal_level=2, grid=grid_for(n)),
    summary="hierarchical depthwise-conv contexts, gated per query, modulating q element-wise (no attention)",
    source=FocalModulation,
)
