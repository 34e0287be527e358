"""DependencyViT's reversed attention (Ding et al., 2023)."""

from __future__ import annotations

import torch
from torch import nn

from ... import reference
from ...errors import ShapeError, bad
from ...records import register
from ._base import VisionMixer, grid_for

__all__ = ["ReversedAttention"]


class ReversedAttention(VisionMixer):
    r"""DependencyViT's reversed attention: the softmax normalises each *column* (over the receiving tokens),
    so every token sends a unit of information distributed over the tokens that take it.

    .. math::

        A_{ij} = \frac{\exp(q_i\cdot k_j/\sqrt d)}{\sum_{i'} \exp(q_{i'}\cdot k_j/\sqrt d)},\qquad
        m_j = \sigma(w_h\cdot x_j + b_h),\qquad
        \operatorname{out}_i = \sum_j A_{ij}\, m_j\, v_j,\qquad y = \operatorname{out}\, W_o

    ``m_j`` is the per-head message controller (a sigmoid gate on what token ``j`` sends), which the paper
    uses to find and prune leaf tokens (DependencyViT-Lite; the pruning is left out here). Rows of ``A`` do
    not sum to 1: a token that many others send to receives more. ``self.last_attention`` keeps ``A`` (for
    the dependency tree) when ``keep_attention`` is set.
    """

    def __init__(self, dim: int, heads: int = 4, *, grid=None, keep_attention: bool = False):
        super().__init__(dim, grid)
        if heads < 1 or dim % heads:
            raise ShapeError(bad("heads", f"a divisor of dim = {dim}", heads))
        self.heads, self.keep_attention, self.last_attention = heads, keep_attention, None
        self.qkv = nn.Linear(dim, 3 * dim)
        self.msg = nn.Linear(dim, heads)
        self.proj = nn.Linear(dim, dim)

    def _forward(self, x):
        B, H, W, C = x.shape
        h, d = self.heads, C // self.heads
        t = x.reshape(B, H * W, C)
        q, k, v = self.qkv(t).reshape(B, H * W, 3, h, d).permute(2, 0, 3, 1, 4)
        a = (q @ k.transpose(-1, -2) * d**-0.5).softmax(-2)
        if self.keep_attention:
            self.last_attention = a.detach()
        m = torch.sigmoid(self.msg(t)).transpose(1, 2)[..., None]
        out = (a @ (m * v)).transpose(1, 2).reshape(B, H * W, C)
        return self.proj(out).reshape(B, H, W, C)

    def _reference(self, x, dtype):
        w = (self.qkv.weight, self.qkv.bias, self.msg.weight, self.msg.bias, self.proj.weight, self.proj.bias)
        return reference.vision.reversed_attention(x, *w, heads=self.heads, dtype=dtype)


register(
    "dependency_reversed",
    family="I",
    kind="layer",
    paper="Visual Dependency Transformers: Dependency Tree Emerges from Reversed Attention (Ding et al., 2023)",
    exact=True,
    supports={"spatial", "backward", "trainable"},
    factory=lambda n, *, dim=64, heads=4: ReversedAttention(dim, heads, grid=grid_for(n)),
    summary="softmax over the queries (column-normalised), senders gated by a message controller",
    source=ReversedAttention,
)
