"""TransNeXt's aggregated attention (Shi, 2024)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ... import reference
from ...errors import ShapeError, bad
from ...records import register
from ._base import VisionMixer, grid_for

__all__ = ["AggregatedAttention"]


class AggregatedAttention(VisionMixer):
    r"""TransNeXt's aggregated attention: fine sliding-window keys and coarse pooled keys in one softmax.

    For the query at position ``i``, the keys are its ``kernel x kernel`` neighbourhood ``\mathcal{W}(i)``
    (positions outside the image are absent, not zero tokens) and the ``P = pool^2`` tokens ``\bar x_p`` of an
    adaptive average pool of ``x``:

    .. math::

        s_{ij} = \frac{q_i\cdot k_j}{\sqrt d}\ (j \in \mathcal{W}(i)),\qquad
        \bar s_{ip} = \frac{q_i\cdot \bar k_p}{\sqrt d},\qquad
        \operatorname{out}_i = \frac{\sum_{j\in\mathcal{W}(i)} e^{s_{ij}} v_j + \sum_p e^{\bar s_{ip}}\bar v_p}
        {\sum_{j\in\mathcal{W}(i)} e^{s_{ij}} + \sum_p e^{\bar s_{ip}}}

    with one key/value projection for fine and pooled tokens. Left out (documented choices): the paper's
    learnable query embedding and learnable key tokens, its length-scaled cosine attention and relative
    position bias, and the GELU + 1x1 conv + LayerNorm in front of the pool; what remains is the aggregation,
    the mechanism the paper is named for. Cost ``O(N (kernel^2 + P))``.
    """

    def __init__(self, dim: int, heads: int = 4, *, kernel: int = 3, pool: int = 2, grid=None):
        super().__init__(dim, grid)
        if heads < 1 or dim % heads:
            raise ShapeError(bad("heads", f"a divisor of dim = {dim}", heads))
        if kernel < 1 or kernel % 2 == 0:
            raise ShapeError(bad("kernel", "an odd positive int", kernel))
        if pool < 1:
            raise ShapeError(bad("pool", "a positive int", pool))
        self.heads, self.kernel, self.pool_size = heads, kernel, pool
        self.min_side = pool
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def _forward(self, x):
        B, H, W, C = x.shape
        h, d, ks, N = self.heads, C // self.heads, self.kernel, H * W
        q = self.q(x).reshape(B, N, h, d).transpose(1, 2)  # (B, h, N, d)
        k, v = self.kv(x).permute(0, 3, 1, 2).chunk(2, 1)  # (B, C, H, W)

        def unf(t):  # (B, C, H, W) -> (B, h, N, ks^2, d): each query's window
            return F.unfold(t, ks, padding=ks // 2).reshape(B, h, d, ks * ks, N).permute(0, 1, 4, 3, 2)

        kl, vl = unf(k), unf(v)
        inside = F.unfold(x.new_ones(1, 1, H, W), ks, padding=ks // 2).reshape(ks * ks, N).t() > 0
        pooled = F.adaptive_avg_pool2d(x.permute(0, 3, 1, 2), self.pool_size).flatten(2).transpose(1, 2)
        kp, vp = self.kv(pooled).reshape(B, -1, 2, h, d).permute(2, 0, 3, 1, 4)  # (B, h, P, d)
        s_loc = (q[..., None, :] * kl).sum(-1).masked_fill(~inside, float("-inf"))
        s = torch.cat([s_loc, q @ kp.transpose(-1, -2)], -1) * d**-0.5
        p = s.softmax(-1)
        nl = ks * ks
        out = (p[..., :nl, None] * vl).sum(-2) + p[..., nl:] @ vp
        return self.proj(out.transpose(1, 2).reshape(B, H, W, C))

    def _reference(self, x, dtype):
        w = (self.q.weight, self.q.bias, self.kv.weight, self.kv.bias, self.proj.weight, self.proj.bias)
        opts = dict(heads=self.heads, kernel=self.kernel, pool=self.pool_size)
        return reference.vision.aggregated_attention(x, *w, **opts, dtype=dtype)


register(
    "transnext_aggregated",
    family="I",
    kind="layer",
    paper="TransNeXt: Robust Foveal Visual Perception for Vision Transformers (Shi, 2024)",
    exact=True,
    supports={"spatial", "backward", "trainable"},
    factory=lambda n, *, dim=64, heads=4: AggregatedAttention(dim, heads, grid=grid_for(n)),
    summary="3x3 window keys plus 2x2 pooled keys of the whole image in one softmax",
    source=AggregatedAttention,
)
