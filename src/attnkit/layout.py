"""``BlockLayout``: which (query block, key block) tiles a pattern or selector touches.

A static pattern and a dynamic selector meet here: both produce a ``BlockLayout`` and the same kernels
run it. A tile is *empty* (skipped), *full* (every pair interacts: no element mask is applied) or *partial*
(an element mask is applied; partial masks are stored once per distinct mask).

Layout, per head group ``g`` (``heads == 1`` when every head shares the layout):

* ``kv_ids[g, i, s]``: the key block in slot ``s`` of query block ``i``, ascending, ``-1`` past the last;
* ``mask_ids[g, i, s]``: ``-1`` for a full tile, ``-2`` for an empty slot, else a row of ``tile_masks``;
* ``tile_masks[m]``: a ``(block_q, block_k)`` bool mask (True = the pair interacts).

A layout has ``batch * heads`` head groups (row ``b * heads + h``). ``heads`` is 1 (every head shares the
layout), the number of key/value heads (one layout per GQA group; the group's query heads are folded into
one product) or the number of query heads. ``batch`` is 1 (every batch row shares it) or the batch size:
dynamic selectors look at the content, so their layouts differ between batch rows and heads.

A dynamic selector that chooses at a finer grain than a tile adds a :class:`TokenSelect`: inside a tile the
pair ``(i, j)`` interacts only where the tile mask *and* the selection allow it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .errors import ShapeError, bad, check_count, check_memory

FULL = -1
EMPTY = -2


def ceil_div(a: int, b: int) -> int:
    """``ceil(a / b)`` for positive ``b``, in integers."""
    return -(-a // b)


def tile(block) -> tuple[int, int]:
    """``(block_q, block_k)`` of a block given as an int (square) or a pair."""
    return (block, block) if isinstance(block, int) else (int(block[0]), int(block[1]))


def _slots(any_: torch.Tensor, full: torch.Tensor):
    """``(kv_ids, mask_ids, partial)`` from per-tile flags ``(groups, nqb, nkb)``: each row's non-empty key
    blocks ascending in its slots (``-1`` past the last), full tiles marked ``FULL``, the rest ``EMPTY`` until
    their masks are numbered; ``partial`` flags the slots that need a mask."""
    G, nqb, nkb = any_.shape
    counts = any_.count_nonzero(-1)
    S = max(int(counts.max()) if counts.numel() else 0, 1)
    # The chosen tiles in row-major order; each one's slot is its rank within its row.
    row, col = any_.reshape(G * nqb, nkb).nonzero().unbind(1)
    start = torch.cumsum(counts.reshape(-1), 0) - counts.reshape(-1)
    kv_ids = torch.full((G * nqb, S), -1, dtype=torch.long)
    kv_ids[row, torch.arange(row.numel()) - start[row]] = col
    kv_ids = kv_ids.view(G, nqb, S)
    valid = kv_ids >= 0
    is_full = torch.gather(full, -1, kv_ids.clamp(min=0)) & valid
    mask_ids = torch.full_like(kv_ids, EMPTY)
    mask_ids[is_full] = FULL
    return kv_ids, mask_ids, valid & ~is_full


@dataclass(eq=False)
class TokenSelect:
    """Token-grain selection inside the tiles of a layout; a pair interacts where *any* present term allows it.

    * ``rows``: ``(groups, q_len, num_kv_blocks)`` bool: query token ``i`` reads key block ``J``
      (MoBA-style per-token block gating);
    * ``cols``: ``(groups, num_q_blocks, kv_len)`` bool: the queries of block ``I`` read key token ``j``
      (stripes, vertical lines);
    * ``diags``: ``(groups, 2 * kv_len)`` bool: query ``i`` reads key ``j`` when
      ``diags[q_offset + i - j + kv_len - 1]`` (slash lines; index ``kv_len - 1`` is the main diagonal);
    * ``labels``: ``(q_labels (groups, q_len), k_labels (groups, kv_len))``: query ``i`` reads key ``j`` when
      their labels are equal (clusters), and with ``positions`` ``(q_pos, k_pos)`` only when
      ``k_pos[j] <= q_pos[i]`` (causal order of tokens that were permuted).
    """

    rows: torch.Tensor | None = None
    cols: torch.Tensor | None = None
    diags: torch.Tensor | None = None
    labels: tuple | None = None
    positions: tuple | None = None

    def check(self, groups: int, q_len: int, kv_len: int, *, nqb: int, nkb: int) -> None:
        """Raise :class:`~attnkit.errors.ShapeError` unless every present term has its documented shape."""
        want = {
            "rows": (groups, q_len, nkb),
            "cols": (groups, nqb, kv_len),
            "diags": (groups, 2 * kv_len),
        }
        for name, shape in want.items():
            t = getattr(self, name)
            if t is not None and tuple(t.shape) != shape:
                raise ShapeError(bad(f"layout.select.{name}", str(shape), tuple(t.shape)))
        for name, pair in (("labels", self.labels), ("positions", self.positions)):
            if pair is not None and (
                len(pair) != 2 or tuple(pair[0].shape) != (groups, q_len) or tuple(pair[1].shape) != (groups, kv_len)
            ):
                got = tuple(tuple(t.shape) for t in pair)
                raise ShapeError(bad(f"layout.select.{name}", f"((groups, {q_len}), (groups, {kv_len}))", got))

    def allowed(
        self, g: int, qi: torch.Tensor, kj: torch.Tensor, *, block_q: int, block_k: int, q_offset: int, kv_len: int
    ):
        """Bool mask of group ``g`` for query indices ``qi`` (``(..., R, 1)``) and key indices ``kj`` (``(..., 1, L)``)."""  # noqa: E501
        out = None
        if self.rows is not None:
            r = self.rows[g]
            out = r[qi.clamp(max=r.shape[0] - 1), (kj // block_k).clamp(max=r.shape[1] - 1)]
        if self.cols is not None:
            c = self.cols[g]
            t = c[(qi // block_q).clamp(max=c.shape[0] - 1), kj.clamp(max=c.shape[1] - 1)]
            out = t if out is None else out | t
        if self.diags is not None:
            d = self.diags[g]
            idx = (q_offset + qi - kj + kv_len - 1).clamp(0, d.shape[0] - 1)
            out = d[idx] if out is None else out | d[idx]
        if self.labels is not None:
            ql, kl = self.labels[0][g], self.labels[1][g]
            t = ql[qi.clamp(max=ql.shape[0] - 1)] == kl[kj.clamp(max=kl.shape[0] - 1)]
            if self.positions is not None:
                qp, kp = self.positions[0][g], self.positions[1][g]
                t = t & (kp[kj.clamp(max=kp.shape[0] - 1)] <= qp[qi.clamp(max=qp.shape[0] - 1)])
            out = t if out is None else out | t
        return out


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
    batch: int = 1
    select: TokenSelect | None = None
    q_offset: int = 0
    _plans: dict = field(default_factory=dict, repr=False)
    _checked: tuple | None = field(default=None, init=False, repr=False)  # the (q_len, kv_len) check() passed

    def check(self, q_len: int, kv_len: int) -> None:
        """Raise :class:`~attnkit.errors.ShapeError` unless this layout is well formed and made for a
        ``q_len x kv_len`` call: tile ids in range, ``-1`` only as trailing holes, no tile twice in a row, mask
        ids that exist, token-grain terms of the right shapes. Layouts made by attnkit pass; this guards
        hand-made ones before any kernel reads them. Checked once per (layout, sizes)."""
        if self._checked == (q_len, kv_len):
            return
        if (self.q_len, self.kv_len) != (q_len, kv_len):
            raise ShapeError(bad("layout", f"one made for {q_len} x {kv_len}", f"{self.q_len} x {self.kv_len}"))
        for name in ("batch", "block_q", "block_k"):
            check_count(f"layout.{name}", getattr(self, name), 1)
        ids, mids, masks = self.kv_ids, self.mask_ids, self.tile_masks
        nqb, nkb = ceil_div(q_len, self.block_q), self.num_kv_blocks
        if not isinstance(ids, torch.Tensor) or ids.dim() != 3 or ids.shape[1] != nqb or ids.dtype.is_floating_point:
            got = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
            raise ShapeError(bad("layout.kv_ids", f"integer (groups, {nqb}, slots)", got))
        if ids.shape[0] % self.batch:
            raise ShapeError(bad("layout.kv_ids", f"groups a multiple of batch {self.batch}", ids.shape[0]))
        if not isinstance(mids, torch.Tensor) or mids.shape != ids.shape:
            got = getattr(mids, "shape", mids)
            raise ShapeError(bad("layout.mask_ids", f"the shape of kv_ids {tuple(ids.shape)}", got))
        if masks.dim() != 3 or tuple(masks.shape[1:]) != (self.block_q, self.block_k):
            raise ShapeError(bad("layout.tile_masks", f"(n, {self.block_q}, {self.block_k})", tuple(masks.shape)))
        if ids.numel():
            lo, hi = int(ids.min()), int(ids.max())
            if lo < -1 or hi >= nkb:
                want = f"key-block ids in [0, {nkb}) or -1 (empty slot)"
                raise ShapeError(bad("layout.kv_ids", want, f"[{lo}, {hi}]"))
            hole = ids < 0
            if bool((hole[..., :-1] & ~hole[..., 1:]).any()):
                raise ShapeError(bad("layout.kv_ids", "-1 only after a row's last tile", "a -1 before a valid id"))
            srt = ids.sort(-1).values
            if bool(((srt[..., 1:] == srt[..., :-1]) & (srt[..., 1:] >= 0)).any()):
                raise ShapeError(bad("layout.kv_ids", "each key block at most once per row", "a repeated id"))
            live = mids[~hole]
            # EMPTY marks the holes; a tile in a row is FULL or has a mask (an empty tile has no slot).
            if live.numel() and (int(live.min()) < FULL or int(live.max()) >= masks.shape[0]):
                got = f"[{int(live.min())}, {int(live.max())}] at the row's tiles"
                raise ShapeError(bad("layout.mask_ids", f"FULL (-1) or a tile-mask index < {masks.shape[0]}", got))
            tail = kv_len % self.block_k
            if tail:  # the last key block runs past kv_len: its tiles must not count the padding as keys
                edge = mids[ids == nkb - 1]
                if bool((edge == FULL).any()) or (
                    edge.numel() and bool(masks[edge[edge >= 0]][..., tail:].any())
                ):  # fmt: skip
                    want = f"the last key block's tiles masked to its {tail} real keys (not FULL)"
                    raise ShapeError(bad("layout.mask_ids", want, "a tile that counts keys past kv_len"))
        if self.select is not None:
            self.select.check(ids.shape[0], q_len, kv_len, nqb=nqb, nkb=nkb)
        self._checked = (q_len, kv_len)

    def clear_plans(self) -> None:
        """Forget the kernel plans cached on this layout, so the next call plans again (benchmarks time it)."""
        self._plans.clear()

    @property
    def heads(self) -> int:
        return self.kv_ids.shape[0] // self.batch

    @property
    def groups(self) -> int:
        return self.kv_ids.shape[0]

    @property
    def num_q_blocks(self) -> int:
        return self.kv_ids.shape[1]

    @property
    def num_kv_blocks(self) -> int:
        return ceil_div(self.kv_len, self.block_k)

    @property
    def counts(self) -> torch.Tensor:
        """Non-empty tiles per query block, ``(heads, num_q_blocks)``."""
        return (self.kv_ids >= 0).sum(-1)

    @property
    def density(self) -> float:
        """Fraction of the ``q_len x kv_len`` pairs that interact (mean over head groups)."""
        return self.pairs / (self.groups * self.q_len * self.kv_len)

    @property
    def tile_density(self) -> float:
        """Pairs the kernel computes (non-empty tiles, padded keys included) over ``q_len x kv_len``."""
        rows = (self.q_len - torch.arange(self.num_q_blocks) * self.block_q).clamp(max=self.block_q)
        n = ((self.kv_ids >= 0).sum(-1) * rows).sum().item()
        return n * self.block_k / (self.groups * self.q_len * self.kv_len)

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
        kv_ids, mask_ids, partial = _slots(any_, all_)
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

    def dense_mask(self) -> torch.Tensor:
        """The ``(batch, heads, q_len, kv_len)`` bool mask the layout stands for (tests and the oracle: O(N^2);
        over the memory budget, :class:`~attnkit.errors.MemoryBudgetError` before allocating)."""
        G, nqb, _ = self.kv_ids.shape
        check_memory("dense_mask", G * self.q_len * self.kv_len, "run the layout with tiled_attention instead")
        nkb, bq, bk = self.num_kv_blocks, self.block_q, self.block_k
        tilemap = torch.full((G, nqb, nkb + 1), EMPTY, dtype=torch.long)
        ids = torch.where(self.kv_ids >= 0, self.kv_ids, torch.full_like(self.kv_ids, nkb))
        tilemap.scatter_(2, ids, self.mask_ids)
        table = torch.cat(
            [torch.zeros(1, bq, bk, dtype=torch.bool), torch.ones(1, bq, bk, dtype=torch.bool), self.tile_masks]
        )
        m = table[tilemap[..., :nkb] + 2].permute(0, 1, 3, 2, 4).reshape(G, nqb * bq, nkb * bk)
        m = m[:, : self.q_len, : self.kv_len].clone()
        if self.select is not None:
            qi = torch.arange(self.q_len)[:, None]
            kj = torch.arange(self.kv_len)[None, :]
            for g in range(G):
                m[g] &= self.select.allowed(
                    g, qi, kj, block_q=bq, block_k=bk, q_offset=self.q_offset, kv_len=self.kv_len
                )
        return m.view(self.batch, G // self.batch, self.q_len, self.kv_len)

    @classmethod
    def from_blocks(
        cls,
        blocks: torch.Tensor,
        q_len: int,
        kv_len: int,
        block: int | tuple[int, int],
        *,
        causal: bool,
        q_offset: int = 0,
        select: TokenSelect | None = None,
    ) -> BlockLayout:
        """A layout from a block selection ``blocks`` ``(batch, heads, num_q_blocks, num_kv_blocks)`` bool.

        ``block`` is the tile: ``block_q x block_k`` when a pair ``(block_q, block_k)`` (finer key tiles let a
        selector choose keys more precisely while the kernel still reads ``block_q`` queries at a time), square
        when an int. Tiles crossed by the causal diagonal or by the end of the keys get an element mask; with
        ``causal`` a tile wholly in the future is dropped even if selected. ``select`` refines the tiles at token
        grain. ``pairs`` counts the pairs of the tiles (before ``select``), exactly.
        """
        bq, bk = tile(block)
        if blocks.dim() != 4 or blocks.dtype != torch.bool:
            raise ShapeError(
                bad("blocks", "a bool (batch, heads, nqb, nkb) tensor", (blocks.dtype, tuple(blocks.shape)))
            )
        Bt, H, nqb, nkb = blocks.shape
        if nqb != ceil_div(q_len, bq) or nkb != ceil_div(kv_len, bk):
            raise ShapeError(bad("blocks", f"{ceil_div(q_len, bq)} x {ceil_div(kv_len, bk)} blocks", (nqb, nkb)))
        q0 = q_offset + torch.arange(nqb) * bq  # absolute position of each query block's first row
        k0 = torch.arange(nkb) * bk
        rows = (q_len - torch.arange(nqb) * bq).clamp(max=bq)
        cols = (kv_len - k0).clamp(max=bk)
        sel = blocks.reshape(Bt * H, nqb, nkb).clone()
        delta = q0[:, None] - k0[None, :]  # causal: row r of the tile sees column c when c <= r + delta
        if causal:
            sel &= (q0[:, None] + rows[:, None] - 1 >= k0[None, :])[None]  # drop tiles wholly in the future
        partial_t = (cols < bk)[None, :].expand(nqb, nkb)
        if causal:
            partial_t = partial_t | (delta < bk - 1)
        is_full = sel & ~partial_t[None]
        # Pairs: full tiles count rows x cols, partial ones are counted from their masks below.
        pairs = int((is_full.sum((0,)) * (rows[:, None] * cols[None, :])).sum())
        kv_ids, mask_ids, part = _slots(sel, is_full)
        masks = torch.zeros(0, bq, bk, dtype=torch.bool)
        if part.any():
            gg, ii, ss = part.nonzero(as_tuple=True)
            jj = kv_ids[gg, ii, ss]
            # A partial tile's mask depends on its causal offset (clamped) and its number of real columns only.
            d = delta[ii, jj].clamp(-bq, bk) if causal else torch.full_like(ii, bk)
            # One int per (offset, columns): a 1-D unique is several times faster than unique(dim=0).
            uniq, inverse = torch.unique((d + bq) * (bk + 1) + cols[jj], return_inverse=True)
            ud, uc = uniq // (bk + 1) - bq, uniq % (bk + 1)
            r = torch.arange(bq)[:, None]
            c = torch.arange(bk)[None, :]
            masks = (c[None] <= r[None] + ud[:, None, None]) & (c[None] < uc[:, None, None])
            mask_ids[gg, ii, ss] = inverse
            # Pairs of a partial tile: its mask's pairs in the rows the query block really has (the last is short).
            upto = torch.cat([torch.zeros(len(uniq), 1, dtype=torch.long), masks.sum(-1).cumsum(-1)], 1)
            pairs += int(upto[inverse, rows[ii]].sum())
        return cls(
            q_len,
            kv_len,
            bq,
            bk,
            kv_ids.contiguous(),
            mask_ids.contiguous(),
            masks,
            pairs,
            batch=Bt,
            select=select,
            q_offset=q_offset,
        )
