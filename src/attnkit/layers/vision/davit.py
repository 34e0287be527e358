"""DaViT's channel group attention (Ding et al., 2022)."""

from __future__ import annotations

from torch import nn

from ... import reference
from ...errors import ShapeError, bad
from ...records import register
from ._base import VisionMixer, grid_for

__all__ = ["ChannelGroupAttention"]


class ChannelGroupAttention(VisionMixer):
    r"""DaViT's channel group attention: the channels are the tokens, the positions the features.

    With ``Q, K, V = x W_{qkv}`` split into ``heads`` groups of ``C_g = C / heads`` channels, each
    ``(N, C_g)`` with ``N = H W``,

    .. math::

        A = \operatorname{softmax}\Big(\frac{Q^\top K}{\sqrt{C_g}}\Big) \in \mathbb{R}^{C_g\times C_g},\qquad
        \operatorname{out} = V A^\top,\qquad y = \operatorname{out}\, W_o

    a global interaction of cost ``O(N C_g^2)``, linear in the tokens. The scale is ``C_g^{-1/2}`` as in the
    authors' code (the abstract does not give one; the contraction is over the ``N`` tokens). The paper's code
    names the projections differently (its map is ``K^T V`` applied to ``Q``): the three are learned linear
    maps of ``x``, so the forms are the same family. The spatial window attention DaViT alternates it with is
    :class:`attnkit.layers.Attention2d` over a window pattern.
    """

    def __init__(self, dim: int, heads: int = 4, *, grid=None):
        super().__init__(dim, grid)
        if heads < 1 or dim % heads:
            raise ShapeError(bad("heads", f"a divisor of dim = {dim}", heads))
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def _forward(self, x):
        B, H, W, C = x.shape
        h, cg = self.heads, C // self.heads
        q, k, v = self.qkv(x.reshape(B, H * W, C)).reshape(B, H * W, 3, h, cg).permute(2, 0, 3, 1, 4)
        a = (q.transpose(-1, -2) @ k * cg**-0.5).softmax(-1)
        out = (v @ a.transpose(-1, -2)).transpose(1, 2).reshape(B, H * W, C)
        return self.proj(out).reshape(B, H, W, C)

    def _reference(self, x, dtype):
        return reference.vision.channel_group_attention(
            x, self.qkv.weight, self.qkv.bias, self.proj.weight, self.proj.bias, heads=self.heads, dtype=dtype
        )


register(
    "davit_channel",
    family="I",
    kind="layer",
    paper="DaViT: Dual Attention Vision Transformers (Ding et al., 2022)",
    exact=True,
    supports={"spatial", "backward", "trainable"},
    factory=lambda n, *, dim=64, heads=4: ChannelGroupAttention(dim, heads, grid=grid_for(n)),
    summary="channel group attention: a C_g x C_g softmax map per head, contracted over the tokens",
    source=ChannelGroupAttention,
)
