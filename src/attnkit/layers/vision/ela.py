"""ELA, efficient local attention (Xu and Wan, 2024)."""

from __future__ import annotations

import torch
from torch import nn

from ... import reference
from ...errors import ShapeError, bad
from ...records import register
from ._base import VisionMixer, grid_for

__all__ = ["EfficientLocalAttention"]


class EfficientLocalAttention(VisionMixer):
    r"""ELA: coordinate attention without channel reduction or BatchNorm.

    .. math::

        z^h = \operatorname{mean}_w x \in \mathbb{R}^{B\times H\times C},\qquad
        z^w = \operatorname{mean}_h x \in \mathbb{R}^{B\times W\times C}

        a^h = \sigma(\operatorname{GN}(\operatorname{conv}_k(z^h))),\qquad
        a^w = \sigma(\operatorname{GN}(\operatorname{conv}_k(z^w))),\qquad
        y_{hwc} = x_{hwc}\, a^h_{hc}\, a^w_{wc}

    ``conv_k`` is a depthwise 1-D convolution of odd size ``kernel`` (zero padding) and ``GN`` a GroupNorm of
    ``groups`` groups; both are shared by the two directions. The paper's ELA-T/B/S/L differ in the kernel size
    and the number of GroupNorm groups; the defaults here are ``kernel=7`` and ``groups=min(16, dim)`` (it must
    divide ``dim``; the registry's factory uses ``groups=heads``). The depthwise (per-channel) 1-D convolution
    and the sharing between directions are our choices where the abstract is silent; no attention over tokens
    is computed, so the cost is ``O(N C k)``.
    """

    def __init__(self, dim: int, *, kernel: int = 7, groups: int | None = None, grid=None):
        super().__init__(dim, grid)
        if kernel < 1 or kernel % 2 == 0:
            raise ShapeError(bad("kernel", "an odd positive int", kernel))
        groups = min(16, dim) if groups is None else groups
        if groups < 1 or dim % groups:
            raise ShapeError(bad("groups", f"a divisor of dim = {dim}", groups))
        self.kernel, self.groups = kernel, groups
        self.conv = nn.Conv1d(dim, dim, kernel, padding=kernel // 2, groups=dim)
        self.norm = nn.GroupNorm(groups, dim)

    def _gate(self, z):  # (B, L, C) -> (B, L, C)
        return torch.sigmoid(self.norm(self.conv(z.transpose(1, 2)))).transpose(1, 2)

    def _forward(self, x):
        return x * self._gate(x.mean(2))[:, :, None, :] * self._gate(x.mean(1))[:, None, :, :]

    def _reference(self, x, dtype):
        w = (self.conv.weight[:, 0], self.conv.bias, self.norm.weight, self.norm.bias)
        return reference.vision.ela(x, *w, groups=self.groups, eps=self.norm.eps, dtype=dtype)


register(
    "ela",
    family="I",
    kind="layer",
    paper="ELA: Efficient Local Attention for Deep Convolutional Neural Networks (Xu and Wan, 2024)",
    exact=True,
    supports={"spatial", "backward", "trainable"},
    factory=lambda n, *, dim=64, heads=4: EfficientLocalAttention(dim, groups=heads, grid=grid_for(n)),
    summary="1-D conv + GroupNorm + sigmoid gates along H and W, multiplied into the image",
    source=EfficientLocalAttention,
)
