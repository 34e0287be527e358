"""ULSAM, the ultra-lightweight subspace attention module (Saini et al., 2020)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ... import reference
from ...errors import ShapeError, bad
from ...records import register
from ._base import VisionMixer, grid_for

__all__ = ["ULSAM"]


class ULSAM(VisionMixer):
    r"""ULSAM: one spatial attention map per channel subspace.

    The ``C`` channels are split into ``groups`` subspaces ``x_g`` of ``C / groups`` channels; for each,

    .. math::

        m_g = \operatorname{softmax}_{(h,w)}\big(\operatorname{PW}_g(\operatorname{maxpool}_{3\times3}
        (\operatorname{DW}_g(x_g)))\big),\qquad y_g = x_g \odot m_g + x_g

    with ``DW`` a depthwise 1x1 convolution (a per-channel scale and bias), a 3x3 max-pool of stride 1 and
    padding 1, ``PW_g`` a pointwise convolution of the group to one map, and the softmax over the ``H W``
    positions. The outputs of the groups are concatenated in their order (no channel shuffle). ``DW``'s bias
    and ``PW``'s bias shift a map by a constant and so do not change the softmax: kept for the paper's form.
    """

    def __init__(self, dim: int, *, groups: int = 4, grid=None):
        super().__init__(dim, grid)
        if groups < 1 or dim % groups:
            raise ShapeError(bad("groups", f"a divisor of dim = {dim}", groups))
        self.groups = groups
        self.dw = nn.Conv2d(dim, dim, 1, groups=dim)
        self.pw = nn.Conv2d(dim, groups, 1, groups=groups)

    def _forward(self, x):
        B, H, W, C = x.shape
        t = x.permute(0, 3, 1, 2)
        logit = self.pw(F.max_pool2d(self.dw(t), 3, stride=1, padding=1))  # (B, g, H, W)
        att = torch.softmax(logit.reshape(B, self.groups, H * W), -1).reshape(B, self.groups, 1, H, W)
        tg = t.reshape(B, self.groups, C // self.groups, H, W)
        return (tg * att + tg).reshape(B, C, H, W).permute(0, 2, 3, 1)

    def _reference(self, x, dtype):
        w = (self.dw.weight.flatten(), self.dw.bias, self.pw.weight.reshape(self.groups, -1), self.pw.bias)
        return reference.vision.ulsam(x, *w, groups=self.groups, dtype=dtype)


register(
    "ulsam",
    family="I",
    kind="layer",
    paper="ULSAM: Ultra-Lightweight Subspace Attention Module for Compact CNNs (Saini et al., 2020)",
    exact=True,
    supports={"spatial", "backward", "trainable"},
    factory=lambda n, *, dim=64, heads=4: ULSAM(dim, groups=heads, grid=grid_for(n)),
    summary="per channel subspace: depthwise conv, 3x3 max-pool, pointwise conv, softmax over space; x*m + x",
    source=ULSAM,
)
