"""Block-sparse selection across ranks: every rank selects with global coordinates from shared block summaries.

A :class:`~attnkit.sparse.BlockTopK` selector (MInference's block-sparse pattern, SeerAttention's training-free
mode) scores query blocks against key blocks by their mean-pooled vectors. Each rank pools the blocks of its own
chunks; one all-gather of the pooled queries and keys (``2 N / b`` vectors per head, not the ``N`` rows) and of
the key padding mask gives every rank the same summaries, so every rank makes the selection that one process
makes over the whole sequence (tested equal), and then fetches only the key/value blocks its queries selected.
"""

from __future__ import annotations

import torch

from ..errors import UnsupportedError, bad
from ..layout import ceil_div, tile
from ..sparse import BlockTopK
from ..sparse._core import pool
from ..sparse.block_topk import block_scores, select_blocks


def global_selection(selector, q, k, key_padding_mask, chunks, group, causal):
    """``(blocks (B * H, nqb, nkb) bool, (block_q, block_k), causal)`` of ``selector`` over the whole sequence."""
    if not isinstance(selector, BlockTopK) or type(selector).select is not BlockTopK.select:
        raise UnsupportedError(
            bad("pattern", "a static Pattern or a BlockTopK selector (pooled block scores)", type(selector).__name__)
        )
    b = selector.block_size
    n = sum(c.length for c in chunks)
    for c in chunks:
        if c.start % b or (c.length % b and c.end != n):
            raise UnsupportedError(
                bad("q", f"shards that start and end on a multiple of the selector's block_size={b}", (c.start, c.end))
            )
    B, Hq, _, D = q.shape
    Hkv = k.shape[1]
    nb = ceil_div(n, b)
    qp = q.new_zeros(B, Hq, nb, D)
    kp = k.new_zeros(B, Hkv, nb, D)
    kpm = torch.zeros(B, n, dtype=torch.uint8)
    for c in chunks:
        if c.owner != group.rank or not c.length:
            continue
        lo, hi = c.local, c.local + c.length
        valid = None if key_padding_mask is None else key_padding_mask[:, lo:hi]
        qp[:, :, c.start // b : ceil_div(c.end, b)] = pool(q[:, :, lo:hi], b)
        kp[:, :, c.start // b : ceil_div(c.end, b)] = pool(k[:, :, lo:hi], b, valid=valid)
        if valid is not None:
            kpm[:, c.start : c.end] = valid.to(torch.uint8)
    what = "the all-gather of the selector's block summaries"
    qp = sum(group.all_gather(qp, what))
    kp = sum(group.all_gather(kp, what))
    full_kpm = None
    if key_padding_mask is not None:
        full_kpm = sum(x.long() for x in group.all_gather(kpm, what)).bool()
    causal = bool(causal) if causal is not None else True
    s = block_scores(qp, kp, Hq // Hkv if selector.share_group else 1)
    sel = select_blocks(s, n, n, b, selector.budget, causal, full_kpm, selector.keep_first, selector.keep_local)
    lay = sel.layout
    G, nqb = lay.kv_ids.shape[0], lay.num_q_blocks
    blocks = torch.zeros(G, nqb, lay.num_kv_blocks + 1, dtype=torch.bool)
    ids = lay.kv_ids.long().clamp(min=-1)
    blocks.scatter_(2, torch.where(ids < 0, lay.num_kv_blocks, ids), True)
    blocks = blocks[:, :, :-1]
    if G != B * Hq:  # one layout shared by the batch or the heads: expand it
        blocks = blocks.reshape(-1, 1, nqb, lay.num_kv_blocks).expand(-1, (B * Hq) // G, -1, -1)
        blocks = blocks.reshape(B * Hq, nqb, lay.num_kv_blocks)
    return blocks, tile(b), causal
