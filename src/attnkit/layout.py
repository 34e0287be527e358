"""``BlockLayout``: which (query block, key block) tiles a pattern or selector touches.

A static pattern and a dynamic selector meet here: both produce a ``BlockLayout`` and the same kernels
run it. A tile is *empty* (skipped), *full* (every pair interacts: no element mask is applied) or *partial*
(an element mask is applied; partial masks are stored once per distinct mask).

Layout, per head group ``g`` (``heads == 1`` when every head shares the layout):

* ``kv_ids[g, i, s]``: the key block in slot ``s`` of query block ``i``, ascending, ``-1`` past the last;
* ``mask_ids[g, i, s]``: ``-1`` for a full tile, ``-2`` for an empty slot, else a row of ``tile_masks``;
* ``tile_masks[m]``: a ``(block_q, block_k)`` bool mask (True = the pair interacts).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .errors import ShapeError, bad

FULL = -1
EMPTY = -2


@dataclass(eq=False)
class BlockLayout:
    q_len: int
    kv_len: int
    block_q: int
    block_k: int
    kv_ids: torch.Tensor
    mask_ids: torch.Tensor
    tile_masks: torch.Tensor
    pairs: int
    """Number of interacting (query, key) pairs, summed over head groups."""
    _plans: dict = field(default_factory=dict, repr=False)

    @property
    def heads(self) -> int:
        return self.kv_ids.shape[0]

    @property
    def num_q_blocks(self) -> int:
        return self.kv_ids.shape[1]

    @property
    def num_kv_blocks(self) -> int:
        return -(-self.kv_len // self.block_k)

    @property
    def counts(self) -> torch.Tensor:
        """Non-empty tiles per query block, ``(heads, num_q_blocks)``."""
        return (self.kv_ids >= 0).sum(-1)

    @property
    def density(self) -> float:
        """Fraction of the ``q_len x kv_len`` pairs that interact (mean over head groups)."""
        return self.pairs / (self.heads * self.q_len * self.kv_len)

    @property
    def tile_density(self) -> float:
        """Pairs the kernel computes (non-empty tiles, padded keys included) over ``q_len x kv_len``."""
        rows = (self.q_len - torch.arange(self.num_q_blocks) * self.block_q).clamp(max=self.block_q)
        n = ((self.kv_ids >= 0).sum(-1) * rows).sum().item()
        return n * self.block_k / (self.heads * self.q_len * self.kv_len)

    def summary(self) -> dict:
        full = int((self.mask_ids == FULL).sum())
        partial = int((self.mask_ids >= 0).sum())
        return {
            "block": (self.block_q, self.block_k),
            "tiles_full": full,
            "tiles_partial": partial,
            "distinct_partial_masks": int(self.tile_masks.shape[0]),
            "density": self.density,
            "computed_density": self.tile_density,
        }

    def __str__(self) -> str:
        """An ASCII picture of head group 0: ``#`` full, ``+`` partial, ``.`` empty (at most 64x64)."""
        nqb, nkb = self.num_q_blocks, self.num_kv_blocks
        if nqb > 64 or nkb > 64:
            return f"BlockLayout({nqb}x{nkb} tiles of {self.block_q}x{self.block_k}, {self.summary()})"
        grid = [["."] * nkb for _ in range(nqb)]
        for i in range(nqb):
            for s in range(self.kv_ids.shape[2]):
                j = int(self.kv_ids[0, i, s])
                if j >= 0:
                    grid[i][j] = "#" if int(self.mask_ids[0, i, s]) == FULL else "+"
        return "\n".join("".join(r) for r in grid)

    @classmethod
    def from_tile_stats(
        cls,
        any_: torch.Tensor,
        all_: torch.Tensor,
        tile_mask_fn,
        q_len: int,
        kv_len: int,
        block_q: int,
        block_k: int,
        pairs: int,
    ) -> BlockLayout:
        """Build a layout from per-tile ``any`` / ``all`` flags, shape ``(heads, nqb, nkb)``.

        ``tile_mask_fn(head, qb, kb)`` returns the element masks ``(n, block_q, block_k)`` of the given
        tiles (1-D long tensors ``qb``, ``kb``); it is called for the partial tiles only.
        """
        if any_.shape != all_.shape or any_.dim() != 3:
            raise ShapeError(bad("any_/all_", "two equal (heads, nqb, nkb) tensors", (any_.shape, all_.shape)))
        H, nqb, nkb = any_.shape
        counts = any_.sum(-1)
        S = max(int(counts.max()), 1)
        # Stable sort puts the non-empty key blocks first, in ascending order.
        order = torch.argsort((~any_).to(torch.int8), dim=-1, stable=True)[..., :S]
        valid = torch.arange(S)[None, None, :] < counts[..., None]
        kv_ids = torch.where(valid, order, torch.full_like(order, -1))
        is_full = torch.gather(all_, -1, order) & valid
        mask_ids = torch.full_like(kv_ids, EMPTY)
        mask_ids[is_full] = FULL
        partial = valid & ~is_full
        masks = []
        if partial.any():
            hh, ii, ss = partial.nonzero(as_tuple=True)
            jj = kv_ids[hh, ii, ss]
            raw = torch.cat([tile_mask_fn(int(h), ii[hh == h], jj[hh == h]) for h in range(H) if (hh == h).any()])
            # The rows of `raw` follow (h, i, s) order, which is that of nonzero(): keep the two aligned.
            uniq, inverse = torch.unique(raw.reshape(raw.shape[0], -1), dim=0, return_inverse=True)
            mask_ids[hh, ii, ss] = inverse
            masks = uniq.reshape(-1, block_q, block_k)
        tile_masks = masks if len(masks) else torch.zeros(0, block_q, block_k, dtype=torch.bool)
        return cls(q_len, kv_len, block_q, block_k, kv_ids.contiguous(), mask_ids.contiguous(), tile_masks, pairs)
