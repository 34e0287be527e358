"""UltraGen's dual-branch attention: windowed local attention plus attention over spatially compressed tokens."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ... import reference
from ...errors import ShapeError, bad
from ...records import register
from ._base import VisionMixer, grid_for

__all__ = ["DualBranchAttention"]


class DualBranchAttention(VisionMixer):
    r"""UltraGen's global-local attention decomposition: a local branch of window attention and a global branch
    of full attention among spatially compressed tokens, fused per head.

    **Local branch.** The image is cut into non-overlapping ``window x window`` windows (offset by ``shift``
    cells, so the first row and column of windows may be smaller; border windows are cut by the image, never
    padded with tokens) and each query attends to the keys of its own window ``\mathcal{W}(i)``:

    .. math::

        z^{l}_i = \sum_{j\in\mathcal{W}(i)} \operatorname{softmax}_j\Big(\frac{q_i\cdot k_j}{\sqrt d}\Big) v_j

    **Global branch (spatially compressed).** ``x`` is average-pooled by ``compress`` in each direction (bins
    ``[a f, \min((a+1) f, H))``, so a border bin averages only the cells it holds) into ``P`` tokens ``\bar x``,
    which attend to each other with full attention, and each cell takes the output of the bin that holds it
    (nearest upsampling):

    .. math::

        \bar z = \operatorname{softmax}\Big(\frac{\bar Q \bar K^\top}{\sqrt d}\Big)\bar V,\qquad
        z^{g}_i = \bar z_{\operatorname{bin}(i)}

    **Fusion.** ``y = W_o[(1 - \alpha_h) z^l + \alpha_h z^g]`` with ``\alpha_h = \sigma(a_h)`` a learned weight per
    head (initialised at 1/2). Both branches use the same ``q, k, v`` projections, as a pretrained model's
    attention would be split into the two branches when it is fine-tuned to a higher resolution.

    Paper: "UltraGen: High-Resolution Video Generation with Hierarchical Attention" (Hu, Zhang, Su, Yi, 2025).
    What the abstract says: full attention is decoupled into a local branch for regional detail and a global
    branch over spatially compressed tokens for semantic consistency, and the local branch is a hierarchical
    cross-window attention. What it does not give, and our choices: the fusion rule (we did not find it in a
    public source; ours is the learned per-head convex weight above), the compression operator (ours: average
    pooling, nearest upsampling), and the cross-window mechanism (ours: ``shift``, a Swin-like offset of the
    window grid that a stack alternates between ``0`` and ``window // 2``; information also crosses windows
    through the global branch). This is a 2-D image substitute for the paper's video DiT tokens (no time axis).
    Cost ``O(N (window^2 + P))`` with ``P = \lceil H/f \rceil \lceil W/f \rceil``; the global branch is
    ``O(P^2)``.
    """

    def __init__(self, dim: int, heads: int = 4, *, window: int = 4, compress: int = 2, shift: int = 0, grid=None):
        super().__init__(dim, grid)
        if heads < 1 or dim % heads:
            raise ShapeError(bad("heads", f"a divisor of dim = {dim}", heads))
        if not isinstance(window, int) or window < 1:
            raise ShapeError(bad("window", "a positive int", window))
        if not isinstance(compress, int) or compress < 1:
            raise ShapeError(bad("compress", "a positive int", compress))
        if not isinstance(shift, int) or not 0 <= shift < window:
            raise ShapeError(bad("shift", f"an int in [0, window = {window})", shift))
        self.heads, self.window, self.compress, self.shift = heads, window, compress, shift
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.mix = nn.Parameter(torch.zeros(heads))

    def _local(self, q, k, v, H, W):
        """Window attention on ``(B, h, H, W, d)`` tensors, computed window by window after padding."""
        B, h, _, _, d = q.shape
        w, s = self.window, self.shift
        Hp, Wp = -(-(H + s) // w) * w, -(-(W + s) // w) * w
        pad = (0, 0, s, Wp - W - s, s, Hp - H - s)  # (d, W, H) from the last dim: cells before and after

        def part(t):  # (B, h, H, W, d) -> (B, h, windows, w*w, d)
            t = F.pad(t, pad)
            t = t.reshape(B, h, Hp // w, w, Wp // w, w, d).permute(0, 1, 2, 4, 3, 5, 6)
            return t.reshape(B, h, -1, w * w, d)

        real = F.pad(q.new_ones(H, W), (s, Wp - W - s, s, Hp - H - s)) > 0
        real = real.reshape(Hp // w, w, Wp // w, w).permute(0, 2, 1, 3).reshape(-1, 1, w * w)
        qs, ks, vs = part(q), part(k), part(v)
        sc = (qs @ ks.transpose(-1, -2)) * d**-0.5
        z = sc.masked_fill(~real, float("-inf")).softmax(-1) @ vs  # every window holds a real cell
        z = z.reshape(B, h, Hp // w, Wp // w, w, w, d).permute(0, 1, 2, 4, 3, 5, 6).reshape(B, h, Hp, Wp, d)
        return z[:, :, s : s + H, s : s + W]

    def _forward(self, x):
        B, H, W, C = x.shape
        h, d, f = self.heads, C // self.heads, self.compress
        q, k, v = self.qkv(x).reshape(B, H, W, 3, h, d).permute(3, 0, 4, 1, 2, 5)  # (B, h, H, W, d)
        zl = self._local(q, k, v, H, W)
        pooled = F.avg_pool2d(x.permute(0, 3, 1, 2), f, stride=f, ceil_mode=True)  # (B, C, Ph, Pw)
        Ph, Pw = pooled.shape[-2:]
        qg, kg, vg = self.qkv(pooled.flatten(2).transpose(1, 2)).reshape(B, -1, 3, h, d).permute(2, 0, 3, 1, 4)
        zg = ((qg @ kg.transpose(-1, -2)) * d**-0.5).softmax(-1) @ vg  # (B, h, P, d)
        zg = zg.reshape(B, h, Ph, Pw, d).repeat_interleave(f, 2).repeat_interleave(f, 3)[:, :, :H, :W]
        a = torch.sigmoid(self.mix)[:, None, None, None]
        z = (1 - a) * zl + a * zg
        return self.proj(z.permute(0, 2, 3, 1, 4).reshape(B, H, W, C))

    def _reference(self, x, dtype):
        w = (self.qkv.weight, self.qkv.bias, self.proj.weight, self.proj.bias, self.mix)
        opts = dict(heads=self.heads, window=self.window, compress=self.compress, shift=self.shift)
        return reference.vision.dual_branch_attention(x, *w, **opts, dtype=dtype)


register(
    "ultragen_dual_branch",
    family="I",
    kind="layer",
    paper="UltraGen: High-Resolution Video Generation with Hierarchical Attention (Hu et al., 2025)",
    exact=True,
    supports={"spatial", "backward", "trainable"},
    factory=lambda n, *, dim=64, heads=4: DualBranchAttention(dim, heads, window=4, compress=2, grid=grid_for(n)),
    summary="4x4 window attention and full attention over 2x2-pooled tokens, mixed by a learned weight per head",
    source=DualBranchAttention,
)
