"""TAP (token-aware average pooling) with the attention-diversification loss (Guo et al., 2023)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ... import reference
from ...errors import ShapeError, bad
from ...records import register
from ._base import VisionMixer, grid_for

__all__ = ["TAPAttention", "attention_diversity_loss"]


def attention_diversity_loss(a: torch.Tensor) -> torch.Tensor:
    r"""ADL over attention probabilities ``a`` of shape ``(B, h, N, N)``: the mean cosine similarity between
    the attention rows of different tokens,
    :math:`\frac{1}{N(N-1)}\sum_{i\ne j}\cos(A_i, A_j)`, averaged over batch and heads (a scalar)."""
    if a.dim() != 4 or a.shape[-1] != a.shape[-2] or a.shape[-1] < 2:
        raise ShapeError(bad("a", "attention probabilities (B, h, N, N) with N >= 2", tuple(a.shape)))
    u = a / a.norm(dim=-1, keepdim=True)
    g = u @ u.transpose(-1, -2)
    n = a.shape[-1]
    off = g.sum((-1, -2)) - g.diagonal(dim1=-2, dim2=-1).sum(-1)
    return (off / (n * (n - 1))).mean()


class TAPAttention(VisionMixer):
    r"""Self-attention over token-aware average-pooled tokens, with ADL as an auxiliary loss.

    .. math::

        w = \operatorname{softmax}_r(x W_s) \in \mathbb{R}^{R},\qquad
        \tilde x = \sum_{r} w_r\,\operatorname{AvgPool}_{k_r}(x),\qquad
        y = \operatorname{MHSA}(\tilde x)

        \operatorname{ADL} = \frac{1}{N(N-1)}\sum_{i\ne j}\cos(A_i, A_j)

    Each token chooses (softly) how much of its neighbourhood joins it before attention, so attention cannot
    over-focus on a single token. ``kernels`` are the candidate pooling sizes (``1`` is the token itself);
    windows are centred, stride 1, and average only the positions inside the image. The paper's TAP uses
    dilated poolings selected per token; the softmax selector over plain poolings is our reading of it.
    After each forward, :meth:`aux_loss` returns ADL of that forward's attention (differentiable); a trainer
    adds ``weight * module.aux_loss()`` to its loss (the paper's weight is of order 1; ours is the trainer's).
    """

    def __init__(self, dim: int, heads: int = 4, *, kernels=(1, 3, 5), grid=None):
        super().__init__(dim, grid)
        if heads < 1 or dim % heads:
            raise ShapeError(bad("heads", f"a divisor of dim = {dim}", heads))
        kernels = tuple(int(k) for k in kernels)
        if not kernels or any(k < 1 or k % 2 == 0 for k in kernels):
            raise ShapeError(bad("kernels", "a non-empty tuple of odd positive ints", kernels))
        self.heads, self.kernels = heads, kernels
        self.select = nn.Linear(dim, len(kernels))
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self._attn = None

    def _forward(self, x):
        B, H, W, C = x.shape
        h, d = self.heads, C // self.heads
        w = self.select(x).softmax(-1)
        t = x.permute(0, 3, 1, 2)
        xt = 0
        for i, k in enumerate(self.kernels):
            pooled = t if k == 1 else F.avg_pool2d(t, k, stride=1, padding=k // 2, count_include_pad=False)
            xt = xt + w[..., i : i + 1] * pooled.permute(0, 2, 3, 1)
        q, kk, v = self.qkv(xt.reshape(B, H * W, C)).reshape(B, H * W, 3, h, d).permute(2, 0, 3, 1, 4)
        a = (q @ kk.transpose(-1, -2) * d**-0.5).softmax(-1)
        self._attn = a
        return self.proj((a @ v).transpose(1, 2).reshape(B, H, W, C))

    def aux_loss(self) -> torch.Tensor:
        """ADL of the last forward's attention (raises before any forward)."""
        if self._attn is None:
            raise ShapeError(bad("aux_loss", "a forward first", "no attention recorded"))
        return attention_diversity_loss(self._attn)

    def _reference(self, x, dtype):
        return self.reference_attention(x, dtype=dtype)[0]

    def reference_attention(self, x, *, dtype=torch.float64):
        """The float64 oracle's ``(y, A)``."""
        w = (self.select.weight, self.select.bias, self.qkv.weight, self.qkv.bias, self.proj.weight, self.proj.bias)
        return reference.vision.tap_attention(self._image(x), *w, heads=self.heads, kernels=self.kernels, dtype=dtype)


register(
    "tap_adl",
    family="I",
    kind="layer",
    paper="Robustifying Token Attention for Vision Transformers (Guo et al., 2023)",
    exact=True,
    supports={"spatial", "backward", "trainable"},
    factory=lambda n, *, dim=64, heads=4: TAPAttention(dim, heads, grid=grid_for(n)),
    summary="per-token soft choice of average poolings before attention; aux_loss() is the ADL regulariser",
    source=TAPAttention,
)
