"""Coordinate attention fused with squeeze-excitation by a learned weight (the balanced multi-task attention
of the EuroSAT paper; coordinate attention from Hou et al., 2021)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ... import reference
from ...errors import ShapeError, bad
from ...records import register
from ._base import VisionMixer, grid_for

__all__ = ["CoordSEAttention"]


class CoordSEAttention(VisionMixer):
    r"""Coordinate attention (spatial) and squeeze-excitation (channel), fused by a learned ``alpha``.

    .. math::

        f = \operatorname{hswish}\big([\operatorname{mean}_w x;\ \operatorname{mean}_h x]\, W_r\big)
        = [f^h; f^w],\qquad
        \operatorname{CA}(x)_{hwc} = x_{hwc}\,\sigma(f^h W_h)_{hc}\,\sigma(f^w W_w)_{wc}

        \operatorname{SE}(x)_{hwc} = x_{hwc}\,\sigma\big(\operatorname{relu}(\operatorname{mean}_{hw} x\,W_1)W_2\big)_c,
        \qquad y = a\,\operatorname{CA}(x) + (1-a)\,\operatorname{SE}(x),\quad a = \sigma(\alpha)

    Choices where the abstract is silent: the fusion is the convex combination above with ``a = sigmoid(alpha)``
    (``alpha = 0`` at the start, so ``a = 0.5``; the paper reports ``a`` converging near 0.57), both branches
    reduce the channels by ``reduction`` (at least 8 channels, as in coordinate attention's code), and
    coordinate attention's BatchNorm after ``W_r`` is left out so the module does not depend on batch
    statistics (ELA's argument against BatchNorm in this place).
    """

    def __init__(self, dim: int, *, reduction: int = 4, grid=None):
        super().__init__(dim, grid)
        if reduction < 1:
            raise ShapeError(bad("reduction", "a positive int", reduction))
        mid = max(8, dim // reduction)
        self.reduce = nn.Linear(dim, mid)
        self.to_h, self.to_w = nn.Linear(mid, dim), nn.Linear(mid, dim)
        self.se1, self.se2 = nn.Linear(dim, mid), nn.Linear(mid, dim)
        self.alpha = nn.Parameter(torch.zeros(()))

    def _forward(self, x):
        H = x.shape[1]
        f = F.hardswish(self.reduce(torch.cat([x.mean(2), x.mean(1)], 1)))
        ca = x * torch.sigmoid(self.to_h(f[:, :H]))[:, :, None] * torch.sigmoid(self.to_w(f[:, H:]))[:, None]
        se = x * torch.sigmoid(self.se2(F.relu(self.se1(x.mean((1, 2))))))[:, None, None]
        a = torch.sigmoid(self.alpha)
        return a * ca + (1 - a) * se

    def _reference(self, x, dtype):
        ws = [self.reduce, self.to_h, self.to_w, self.se1, self.se2]
        flat = [t for m in ws for t in (m.weight, m.bias)]
        return reference.vision.coord_se(x, *flat, self.alpha, dtype=dtype)


register(
    "coord_se",
    family="I",
    kind="layer",
    paper="Balanced multi-task attention (CA + SE) for EuroSAT; Coordinate Attention (Hou et al., 2021)",
    exact=True,
    supports={"spatial", "backward", "trainable"},
    factory=lambda n, *, dim=64, heads=4: CoordSEAttention(dim, grid=grid_for(n)),
    summary="coordinate attention and squeeze-excitation, fused as a*CA + (1-a)*SE with a learned a",
    source=CoordSEAttention,
)
