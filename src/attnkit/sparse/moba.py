"""MoBA: mixture of block attention, each query token gates its own top-k key blocks; and LongHeads."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..records import register
from ._core import (
    SELECTOR_SUPPORTS,
    BlockSelector,
    Selection,
    Selector,
    check_block,
    check_budget,
    expand_kv,
    layout_from_rows,
    pool,
    top_blocks,
)
from .block_topk import _check_qk


def token_block_gate(q, k, block, budget, causal, key_padding_mask, *, keys=None, keep_first: int = 0) -> Selection:
    """Per-token top-k key blocks by ``q_i . keys_J`` (``keys`` default: the mean-pooled key blocks).

    Causal: a block starting after the query is never taken and the query's own block always is (it is
    causally masked inside). The first ``keep_first`` blocks are always kept too."""
    B, Hq, Nq, _ = q.shape
    Nk = k.shape[2]
    kp = pool(k, block, valid=key_padding_mask) if keys is None else keys
    nkb = kp.shape[2]
    gate = q @ expand_kv(kp, Hq).transpose(-1, -2)  # (B, Hq, Nq, nkb)
    off = Nk - Nq if causal else 0
    pos = off + torch.arange(Nq)
    blk = torch.arange(nkb)
    allowed = (blk * block)[None, :] <= pos[:, None] if causal else torch.ones(Nq, nkb, dtype=torch.bool)
    allowed = allowed[None, None]
    if key_padding_mask is not None:
        real = pool(key_padding_mask[:, None, :, None].float(), block, "max")[..., 0] > 0
        allowed = allowed & real[:, :, None, :]
    forced = torch.zeros(Nq, nkb, dtype=torch.bool)
    if causal:
        forced |= blk[None, :] == (pos // block)[:, None]
    forced[:, :keep_first] = True
    allowed = allowed.expand(B, Hq, Nq, nkb)
    rows = top_blocks(gate, allowed, forced[None, None] & allowed, budget)
    layout = layout_from_rows(rows, Nq, Nk, block, causal, off)
    return Selection(layout=layout, q_len=Nq, kv_len=Nk)


@dataclass(frozen=True)
class MoBA(BlockSelector):
    r"""MoBA (Mixture of Block Attention): every query token routes itself to its top-k key blocks.

    .. math:: g_{iJ} = q_i \cdot \mathrm{mean}_{j \in J} k_j, \qquad S(i) = \mathrm{top}_k\{J \le \mathrm{blk}(i)\}

    The gate is parameter-free (mean pooling, as in the paper). Causal: the query's own block is always
    selected (and causally masked inside), future blocks never; the own block counts toward the budget
    ``budget`` (fraction of the visible blocks, or an int number of blocks); ``keep_first`` leading blocks
    (attention sinks) are always kept as well (0, the paper's rule, by default). Each token keeps its own choice
    (a :class:`~attnkit.layout.TokenSelect` over the union of its query block's tiles). Per query head.
    """

    keep_first: int = 0
    granularity = "token-block"
    paper = "MoBA: Mixture of Block Attention for Long-Context LLMs"

    def select(self, q, k, v=None, *, causal=True, key_padding_mask=None) -> Selection:
        _check_qk(q, k)
        return token_block_gate(
            q, k, self.block_size, self.budget, causal, key_padding_mask, keep_first=self.keep_first
        )


@dataclass(frozen=True)
class LongHeads(Selector):
    r"""LongHeads: each head picks, for each query token, the context chunks it attends to.

    A chunk of ``chunk_size`` keys is represented by the mean of its unit-normalised keys (the abstract does not
    give the formula: our choice, so that long chunks are not favoured by norm). Query ``i`` of head ``h`` scores
    chunks by ``q_i . c_J`` and keeps the first chunk (the attention sink), its own chunk (local context) and the
    best others up to ``budget`` chunks, so every head reads a bounded length (within the trained window) while
    the heads together cover the whole context. Training-free.
    """

    chunk_size: int = 64
    budget: float | int = 0.125
    granularity = "token-block"
    paper = "LongHeads: Multi-Head Attention is Secretly a Long Context Processor"

    def __post_init__(self):
        check_block(self.chunk_size, "chunk_size")
        check_budget(self.budget)

    def select(self, q, k, v=None, *, causal=True, key_padding_mask=None) -> Selection:
        _check_qk(q, k)
        kn = torch.nn.functional.normalize(k.float(), dim=-1)
        reps = pool(kn, self.chunk_size, valid=key_padding_mask)
        return token_block_gate(
            q.float(), k, self.chunk_size, self.budget, causal, key_padding_mask, keys=reps, keep_first=1
        )


register(
    "moba",
    family="B",
    kind="selector",
    paper=MoBA.paper,
    exact=False,
    supports=SELECTOR_SUPPORTS,
    factory=lambda n, *, budget=0.125, heads=4, kv_heads=2, head_dim=16, block=64: MoBA(
        block_size=block, budget=budget, keep_first=1
    ),
    summary="per-token top-k key blocks by mean-pooled key gates, own block forced",
    source=MoBA,
)
register(
    "longheads",
    family="B",
    kind="selector",
    paper=LongHeads.paper,
    exact=False,
    supports=SELECTOR_SUPPORTS,
    factory=lambda n, *, budget=0.125, heads=4, kv_heads=2, head_dim=16, block=64: LongHeads(
        chunk_size=block, budget=budget
    ),
    summary="per-head, per-token chunk choice: first + own + best chunks",
    source=LongHeads,
)
