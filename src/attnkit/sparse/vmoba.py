"""VMoBA: MoBA for video tokens, with 1-D/2-D/3-D key blocks and top-k, global or threshold selection."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import PatternError, ShapeError, bad
from ..records import register
from ._core import Selection, Selector, check_budget, expand_kv, layout_from_rows, pool, top_blocks
from .block_topk import _check_qk, region_order

MODES = ("topk", "global", "threshold")



@dataclass(frozen=True)
class VMoBA(Selector):
    r"""VMoBA (Mixture of Block Attention for video diffusion): per-query-token block gating as in MoBA, over
    blocks of a ``(T, H, W)`` token grid.

    ``block`` is the block shape on ``grid``: ``(1, 1, w)`` is a 1-D block of ``w`` tokens of one row,
    ``(1, h, w)`` a 2-D patch, ``(t, h, w)`` a 3-D cube. Tokens are permuted so each block is contiguous
    (exact for bidirectional attention, which is what video DiTs use: not causal). The gate is
    ``g_{iJ} = q_i . mean_{j in J} k_j``; selection ``mode``:

    * ``"topk"``: each query keeps its ``budget`` best blocks (fraction or int);
    * ``"global"``: each head keeps the ``budget`` fraction of *all* (query, block) pairs with the highest gate,
      so salient queries get more blocks; every query keeps at least its best block (our choice: no empty row);
    * ``"threshold"``: each query adds blocks in decreasing ``softmax_J(g_{iJ})`` until their cumulative sum
      reaches ``budget`` (a float in ``(0, 1]``), so the count varies per query.

    :meth:`for_layer` gives the paper's layer-wise recurrent partition (1-D, 2-D, 3-D, 1-D, ...).
    """

    grid: tuple = (1, 16, 16)
    block: tuple = (1, 4, 4)
    mode: str = "topk"
    budget: float | int = 0.125
    granularity = "token-block"
    causal_ok = False
    paper = "VMoBA: Mixture-of-Block Attention for Video Diffusion Models"

    def __post_init__(self):
        if (
            len(self.grid) != 3
            or len(self.block) != 3
            or any(g % b for g, b in zip(self.grid, self.block, strict=True))
        ):  # noqa: E501
            raise PatternError(bad("block", f"three sizes dividing grid {self.grid}", self.block))
        if self.mode not in MODES:
            raise PatternError(bad("mode", f"one of {MODES}", repr(self.mode)))
        check_budget(self.budget)
        if self.mode != "topk" and not isinstance(self.budget, float):
            raise PatternError(bad("budget", f"a fraction in (0, 1] for mode={self.mode!r}", self.budget))

    @classmethod
    def for_layer(cls, layer: int, grid: tuple, sizes: tuple = (64, (8, 8), (4, 4, 4)), **kw) -> VMoBA:
        """The block shape of ``layer`` in the 1-D -> 2-D -> 3-D cycle; ``sizes`` gives each shape's extent."""
        kind = layer % 3
        if kind == 0:
            block = (1, 1, sizes[0])
        elif kind == 1:
            block = (1, *sizes[1])
        else:
            block = tuple(sizes[2])
        return cls(grid=tuple(grid), block=block, **kw)

    def select(self, q, k, v=None, *, causal=False, key_padding_mask=None) -> Selection:
        _check_qk(q, k)
        B, H, N, D = q.shape
        n = self.grid[0] * self.grid[1] * self.grid[2]
        if N != n or k.shape[2] != n:
            raise ShapeError(bad("q, k", f"{n} tokens (grid {self.grid})", (N, k.shape[2])))
        order = region_order(self.grid, self.block)
        bs = self.block[0] * self.block[1] * self.block[2]
        kp = pool(k[:, :, order], bs)
        qo = q[:, :, order]
        gate = qo.float() @ expand_kv(kp, H).float().transpose(-1, -2)  # (B, H, N, nkb)
        nkb = gate.shape[-1]
        allowed = torch.ones_like(gate, dtype=torch.bool)
        if self.mode == "topk":
            rows = top_blocks(gate, allowed, None, self.budget)
        elif self.mode == "global":
            keep = max(1, int(round(self.budget * N * nkb)))
            flat = gate.reshape(B, H, -1)
            thr = flat.topk(keep, -1).values[..., -1:]
            rows = (flat >= thr).view_as(gate) | top_blocks(gate, allowed, None, 1)
        else:
            p = gate.softmax(-1)
            ps, idx = p.sort(-1, descending=True)
            before = ps.cumsum(-1) - ps  # mass of the better blocks: keep while it is below the threshold
            keep = before < self.budget - 1e-6
            rows = torch.zeros_like(keep).scatter_(-1, idx, keep)
        layout = layout_from_rows(rows, N, N, bs, False, 0)
        qord = order.expand(B, H, N).contiguous()
        sel = Selection(layout=layout, q_order=qord, k_order=qord, q_len=N, kv_len=N)
        sel.stats["blocks_per_query"] = float(rows.sum(-1).float().mean())
        return sel


register(
    "vmoba",
    family="B",
    kind="selector",
    paper=VMoBA.paper,
    exact=False,
    supports={"gqa", "backward", "bf16", "grid"},
    # A (1, 16, n / 16) grid in (1, 4, 4) blocks: n must be a multiple of 16.
    factory=lambda n, *, budget=0.125, heads=4, kv_heads=2, head_dim=16, block=64: VMoBA(
        grid=(1, 16, n // 16), block=(1, 4, 4), budget=budget
    ),
    summary="MoBA over 1-D/2-D/3-D blocks of a (T, H, W) grid, top-k / global / threshold",
    source=VMoBA,
)
