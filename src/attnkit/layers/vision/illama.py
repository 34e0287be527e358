"""iLLaMA's causal self-attention with a post-sequence class token (Wang et al., 2024)."""

from __future__ import annotations

import torch
from torch import nn

from ... import reference
from ...api import attention
from ...errors import ShapeError, bad
from ...records import register
from ._base import VisionMixer, grid_for

__all__ = ["CausalClassTokenAttention"]


class CausalClassTokenAttention(VisionMixer):
    r"""iLLaMA's attention: causal self-attention over the raster-ordered image tokens followed by a learned
    class token, which (being last) sees every image token.

    .. math::

        t = [x_1, \dots, x_N, c],\qquad
        \operatorname{out} = \operatorname{softmax}\Big(\frac{Q K^\top}{\sqrt d} + M\Big) V,\qquad
        M_{ij} = 0 \text{ if } j \le i \text{ else } -\infty

    ``forward`` returns the ``N`` image-token outputs as ``(B, H, W, C)``; :meth:`pool` returns the class
    token's output ``(B, C)`` (the readout a classifier uses). ``mix`` is the soft mask of the paper's
    training schedule, written as ``mix * causal + (1 - mix) * bidirectional`` attention outputs (our
    reading: the paper anneals from bidirectional to causal early in training; set ``mix`` from the trainer,
    ``1.0``, fully causal, is the default and the inference form). Attention runs through
    :func:`attnkit.attention` (``causal=True``).
    """

    def __init__(self, dim: int, heads: int = 4, *, grid=None, mix: float = 1.0):
        super().__init__(dim, grid)
        if heads < 1 or dim % heads:
            raise ShapeError(bad("heads", f"a divisor of dim = {dim}", heads))
        if not 0.0 <= mix <= 1.0:
            raise ShapeError(bad("mix", "a float in [0, 1]", mix))
        self.heads, self.mix = heads, float(mix)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def _tokens(self, x):
        B, H, W, C = x.shape
        t = torch.cat([x.reshape(B, H * W, C), self.cls.expand(B, 1, C)], 1)
        q, k, v = self.qkv(t).reshape(B, H * W + 1, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        out = attention(q, k, v, causal=True)
        if self.mix < 1.0:
            out = self.mix * out + (1 - self.mix) * attention(q, k, v, causal=False)
        return self.proj(out.transpose(1, 2).reshape(B, H * W + 1, C))

    def _forward(self, x):
        return self._tokens(x)[:, :-1].reshape(x.shape)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """The post-sequence class token's output, ``(B, C)``."""
        x4 = self._image(x)
        return self._tokens(x4)[:, -1]

    def _reference(self, x, dtype):
        return self.reference_tokens(x, dtype=dtype)[0]

    def reference_tokens(self, x, *, dtype=torch.float64):
        """The float64 oracle's ``(image tokens (B, H, W, C), class token (B, C))``."""
        w = (self.cls, self.qkv.weight, self.qkv.bias, self.proj.weight, self.proj.bias)
        return reference.vision.illama(self._image(x), *w, heads=self.heads, mix=self.mix, dtype=dtype)


register(
    "illama_causal_cls",
    family="I",
    kind="layer",
    paper="Adapting LLaMA Decoder to Vision Transformer (Wang et al., 2024)",
    exact=True,
    supports={"spatial", "backward", "trainable", "causal"},
    factory=lambda n, *, dim=64, heads=4: CausalClassTokenAttention(dim, heads, grid=grid_for(n)),
    summary="causal attention over raster tokens with a post-sequence class token (pool() reads it out)",
    source=CausalClassTokenAttention,
)
