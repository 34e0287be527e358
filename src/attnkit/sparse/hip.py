"""HiP: hierarchically pruned attention, a training-free tree search for the top-k key blocks."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..layout import BlockLayout, ceil_div
from ..records import register
from ._core import SELECTOR_SUPPORTS, BlockSelector, Selection, budget_count, expand_kv, pool, query_blocks
from .block_topk import _check_qk


@dataclass(frozen=True)
class HierarchicalPruning(BlockSelector):
    r"""HiP's hierarchical top-k key selection, coarse to fine, for each block of queries.

    For query block ``I`` with ``V`` visible key blocks before its own, the range is cut into ``k`` segments
    (``k`` from ``budget``; the own block is always kept and counts toward it). At every level each segment is
    split in two halves; a half is scored by its representative key (the middle token, our choice where the
    abstract is silent) as ``max_{i in I} q_i . k_rep`` and the ``k`` best halves survive. After
    ``log2(V / k)`` levels every segment is one block: those are selected. Every block lies in some segment at
    the first level, so none is dropped without being scored; the cost is ``O(N k log(N / k) D)`` per head
    instead of ``O(N^2 D)``. With ``budget`` covering every block the search keeps them all (exact).
    ``keep_first`` leading blocks (attention sinks, which HiP's deployments keep) are added to the search's.
    """

    keep_first: int = 0
    paper = "HiP Attention: Sparse Sub-Quadratic Attention with Hierarchical Attention Pruning"

    def select(self, q, k, v=None, *, causal=True, key_padding_mask=None) -> Selection:
        _check_qk(q, k)
        B, H, Nq, D = q.shape
        Nk, b = k.shape[2], self.block_size
        nqb, nkb = ceil_div(Nq, b), ceil_div(Nk, b)
        off = Nk - Nq if causal else 0
        _, last = query_blocks(nqb, b, Nq, off)
        own = last // b if causal else torch.full((nqb,), nkb)
        V = own.clamp(max=nkb)  # searchable blocks: strictly before the own block (all blocks when not causal)
        total = V + (1 if causal else 0)
        kk = budget_count(total, self.budget) - (1 if causal else 0)  # search budget (own block excluded)
        K = max(int(kk.max()), 1)
        # Initial segments: row I has kk[I] segments evenly covering [0, V[I]); extra ones are empty.
        j = torch.arange(K)
        kkc = kk.clamp(min=1)
        start = (j[None, :] * V[:, None]) // kkc[:, None]
        end = ((j[None, :] + 1) * V[:, None]) // kkc[:, None]
        live = j[None, :] < kk[:, None]
        start = torch.where(live, start, 0).expand(B, H, nqb, K).clone()
        end = torch.where(live, end, 0).expand(B, H, nqb, K).clone()
        qb = torch.zeros(B, H, nqb * b, D, dtype=q.dtype)
        qb[:, :, :Nq] = q
        qb = qb.view(B, H, nqb, b, D)
        kx = expand_kv(k, H)
        if key_padding_mask is not None:
            real_blk = pool(key_padding_mask[:, None, :, None].float(), b, "max")[:, 0, :, 0] > 0
        while bool(((end - start) > 1).any()):
            mid = (start + end + 1) // 2
            cand_s = torch.cat([start, mid], -1)
            cand_e = torch.cat([mid, end], -1)
            rep = ((cand_s + cand_e) * b // 2).clamp(max=Nk - 1)  # middle token of each half
            kr = kx.gather(2, rep.view(B, H, -1, 1).expand(-1, -1, -1, D)).view(B, H, nqb, 2 * K, D)
            sc = torch.einsum("bhiqd,bhikd->bhiqk", qb, kr).amax(3)
            sc = sc.masked_fill(cand_e <= cand_s, float("-inf"))
            keep = sc.topk(K, -1).indices
            start, end = cand_s.gather(-1, keep), cand_e.gather(-1, keep)
        sel = torch.zeros(B, H, nqb, nkb + 1, dtype=torch.bool)
        sel.scatter_(-1, torch.where(end > start, start, nkb), True)
        sel = sel[..., :nkb]
        if causal:
            sel[:, :, torch.arange(nqb), own] = True
        sel[..., : self.keep_first] = True  # sinks: on top of the searched blocks
        if causal:
            sel &= (torch.arange(nkb)[None, :] <= own[:, None])[None, None]
        if key_padding_mask is not None:
            sel &= real_blk[:, None, None, :]
        layout = BlockLayout.from_blocks(sel, Nq, Nk, b, causal=causal, q_offset=off)
        return Selection(layout=layout, q_len=Nq, kv_len=Nk)


register(
    "hip",
    family="B",
    kind="selector",
    paper=HierarchicalPruning.paper,
    exact=False,
    supports=SELECTOR_SUPPORTS,
    factory=lambda n, *, budget=0.125, heads=4, kv_heads=2, head_dim=16, block=64: HierarchicalPruning(
        block_size=block, budget=budget, keep_first=1
    ),
    summary="training-free tree search for the top-k key blocks, O(N k log N)",
    source=HierarchicalPruning,
)
