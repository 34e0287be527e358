"""The ``Pattern`` protocol: *which* query-key pairs interact, independent of how they are computed.

A pattern is a small frozen dataclass. Its one rule is :meth:`Pattern.mask_mod`, written with tensor
operations only so that the same function serves three consumers:

* FlexAttention (``mask_mod(b, h, q_idx, kv_idx)`` under ``vmap``/``compile``);
* the dense boolean mask of the oracle and the tests (the indices broadcast as ``(Nq, 1)`` and ``(1, Nk)``);
* the tile classifier that builds a :class:`~attnkit.layout.BlockLayout` for the ``tiled`` kernel.

``q_idx`` is always the *absolute* query position: with ``q_offset`` (decode with a KV cache) the first
query is position ``q_offset`` and patterns stay right without knowing about the cache.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from .. import layout_cache
from ..errors import PatternError, bad, check_memory
from ..layout import BlockLayout, ceil_div
from ..layout_cache import Key

_ROW_BUDGET = 1 << 23  # mask elements evaluated at once while building a layout
_FINE = 16  # tile size of the stats that every block size is derived from


@dataclass(frozen=True)
class StridedKeys:
    """What :meth:`Pattern.strided_keys` returns: query head ``h`` sees a key ``j < stop`` exactly when
    ``j % stride == offsets[h]``, from every query at or after the ``q_offset`` it was asked for. ``stop`` is a
    multiple of ``stride``, so every head has ``stop // stride`` of them."""

    stride: int
    offsets: tuple[int, ...]
    stop: int


class Pattern:
    """Base class of static patterns. Subclasses are frozen dataclasses that define :meth:`mask_mod`."""

    #: True when every pair the pattern allows has ``kv_idx <= q_idx``.
    causal: bool = False
    #: Number of heads the pattern is defined for; ``None`` when the mask does not depend on the head.
    num_heads: int | None = None

    # -- the rule -----------------------------------------------------------------------------------
    def mask_mod(self, b, h, q_idx, kv_idx):  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def fixed_length(self) -> int | None:
        """Sequence length the pattern is defined on (spatial patterns), else ``None``."""
        return None

    def token_order(self) -> torch.Tensor | None:
        """A permutation of the ``fixed_length`` tokens under which the pattern's pairs fall in fewer tiles, or
        ``None`` (the given order is the right one). The ``tiled`` backend runs a whole spatial sequence in this
        order when that computes fewer pairs (:class:`InOrder`); grid patterns give their tiles in their own
        dimensions this way (:func:`~attnkit.patterns._grid.tile_order`)."""
        return None

    def strided_keys(self, q_offset: int, kv_len: int) -> StridedKeys | None:
        """For queries at ``q_offset`` and later: the keys below some ``stop`` that each query head sees, when
        they are every ``stride``-th key from a per-head offset (:class:`StridedKeys`); else ``None``. The
        ``decode`` backend reads them as a strided view of the cache instead of evaluating the rule there."""
        return None

    def check(self, q_len: int, kv_len: int, q_offset: int = 0, heads: int | None = None) -> None:
        """Raise :class:`PatternError` when the pattern cannot apply to these sizes."""
        n = self.fixed_length
        if n is not None and (kv_len != n or q_len + q_offset > n):
            raise PatternError(
                bad(
                    f"pattern {self!r}",
                    f"kv_len == {n} (its spatial size) and queries within it",
                    f"q_len={q_len}, kv_len={kv_len}, q_offset={q_offset}",
                )
            )
        if self.num_heads is not None and heads is not None and heads != self.num_heads:
            raise PatternError(bad(f"pattern {self!r}", f"{self.num_heads} query heads", f"{heads} heads"))

    # -- composition --------------------------------------------------------------------------------
    def __and__(self, other: Pattern) -> Pattern:
        return And((self, other))

    def __or__(self, other: Pattern) -> Pattern:
        return Or((self, other))

    # -- derived views ------------------------------------------------------------------------------
    def _eval(self, h: int, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        """Evaluate the rule on broadcastable index tensors (absolute positions)."""
        b = torch.zeros((), dtype=torch.long)
        out = self.mask_mod(b, torch.tensor(h), q, kv)
        # torch.broadcast_shapes is a Python reference costing more than a decode step's whole rule.
        same = q.dim() == kv.dim()
        shape = torch.Size(c if a == 1 else a for a, c in zip(q.shape, kv.shape, strict=True)) if same else None
        return out.expand(shape or torch.broadcast_shapes(q.shape, kv.shape))

    def _head_groups(self, heads: int | None) -> int:
        return 1 if self.num_heads is None else self.num_heads

    def dense_mask(
        self,
        q_len: int,
        kv_len: int,
        q_offset: int = 0,
        heads: int | None = None,
        device: torch.device | str = "cpu",
        *,
        kv_start: int = 0,
    ) -> torch.Tensor:
        """Boolean mask ``(G, q_len, kv_len - kv_start)`` of the keys from ``kv_start`` on; ``G`` is 1 unless the
        pattern depends on the head. ``O(N^2)``: over the memory budget it raises
        :class:`~attnkit.errors.MemoryBudgetError` before allocating."""
        self.check(q_len, kv_len, q_offset, heads)
        if isinstance(kv_start, bool) or not isinstance(kv_start, int) or not 0 <= kv_start <= kv_len:
            raise PatternError(bad("kv_start", f"an int in [0, kv_len={kv_len}]", kv_start))
        check_memory(
            "dense_mask",
            self._head_groups(heads) * q_len * (kv_len - kv_start),
            "use block_layout(...), which stores tiles",
        )
        q = torch.arange(q_offset, q_offset + q_len, device=device)[:, None]
        kv = torch.arange(kv_start, kv_len, device=device)[None, :]
        return torch.stack([self._eval(h, q, kv) for h in range(self._head_groups(heads))])

    def tile_stats(
        self, q_len: int, kv_len: int, q_offset: int = 0, heads: int | None = None, tile: int = _FINE
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Per ``tile x tile`` block: does any / every in-range pair interact; and the exact pair count."""
        key = Key("stats", self, q_len, kv_len, q_offset, heads, (tile,))
        hit = layout_cache.get(key)
        if hit is not None:
            return hit
        self.check(q_len, kv_len, q_offset, heads)
        G = self._head_groups(heads)
        nqt, nkt = ceil_div(q_len, tile), ceil_div(kv_len, tile)
        any_ = torch.zeros(G, nqt, nkt, dtype=torch.bool)
        all_ = torch.zeros(G, nqt, nkt, dtype=torch.bool)
        # int32 halves the cost of the first layout build; a parameter or position near 2^31 needs int64, or
        # comparisons against it wrap (SlidingWindow(2**31, 0) used to compute as empty).
        idx = torch.int32 if _largest_int(self) + q_len + q_offset + kv_len + tile < 2**31 else torch.long
        kv = torch.arange(nkt * tile, dtype=idx)
        kv_ok = kv < kv_len
        rows = max(1, _ROW_BUDGET // (nkt * tile * tile))
        pairs = 0
        for g in range(G):
            for t0 in range(0, nqt, rows):
                t1 = min(nqt, t0 + rows)
                q = torch.arange(t0 * tile, t1 * tile, dtype=idx)
                # Padding positions are clamped into range (rules may index tables), then masked out.
                m = self._eval(g, (q.clamp(max=q_len - 1) + q_offset)[:, None], kv.clamp(max=kv_len - 1)[None, :])
                m = m & kv_ok[None, :] & (q < q_len)[:, None]
                counts = m.view(t1 - t0, tile, nkt, tile).sum(dim=(1, 3), dtype=torch.int32)
                pairs += int(counts.sum())
                any_[g, t0:t1] = counts > 0
                all_[g, t0:t1] = counts == tile * tile
        out = (any_, all_, pairs)
        layout_cache.put(key, out)
        return out

    def block_layout(
        self,
        q_len: int,
        kv_len: int,
        block_q: int = 64,
        block_k: int | None = None,
        q_offset: int = 0,
        heads: int | None = None,
    ) -> BlockLayout:
        """The tiles this pattern touches at ``block_q x block_k`` (multiples of 16). Cached."""
        block_k = block_q if block_k is None else block_k
        for name, bsz in (("block_q", block_q), ("block_k", block_k)):
            if isinstance(bsz, bool) or not isinstance(bsz, int) or bsz <= 0 or bsz % _FINE:
                raise PatternError(bad(name, f"a positive multiple of {_FINE}", bsz))
        key = Key("layout", self, q_len, kv_len, q_offset, heads, (block_q, block_k))
        hit = layout_cache.get(key)
        if hit is not None:
            return hit
        any_, all_, pairs = self.tile_stats(q_len, kv_len, q_offset, heads)
        fq, fk = block_q // _FINE, block_k // _FINE
        G, nqt, nkt = any_.shape
        nqb, nkb = ceil_div(nqt, fq), ceil_div(nkt, fk)

        def pool(x: torch.Tensor, fill: bool, op) -> torch.Tensor:
            pad = torch.full((G, nqb * fq, nkb * fk), fill, dtype=torch.bool)
            pad[:, :nqt, :nkt] = x
            return op(op(pad.view(G, nqb, fq, nkb, fk), 4), 2)

        b_any = pool(any_, False, lambda t, d: t.any(d))
        # A block that reaches past the sequence end is never "full": its padding must be masked.
        b_all = pool(all_, False, lambda t, d: t.all(d))
        q_ar, k_ar = torch.arange(block_q), torch.arange(block_k)

        def tile_masks(g: int, qb: torch.Tensor, kb: torch.Tensor) -> torch.Tensor:
            q = qb[:, None] * block_q + q_ar[None, :]
            kv = kb[:, None] * block_k + k_ar[None, :]
            m = self._eval(g, (q.clamp(max=q_len - 1) + q_offset)[:, :, None], kv.clamp(max=kv_len - 1)[:, None, :])
            return m & (q < q_len)[:, :, None] & (kv < kv_len)[:, None, :]

        layout = BlockLayout.from_tile_stats(b_any, b_all, tile_masks, q_len, kv_len, block_q, block_k, pairs)
        layout_cache.put(key, layout)
        return layout

    def density(self, q_len: int, kv_len: int, q_offset: int = 0, heads: int | None = None) -> float:
        """Fraction of the ``q_len x kv_len`` pairs that interact (averaged over head groups)."""
        _, _, pairs = self.tile_stats(q_len, kv_len, q_offset, heads)
        return pairs / (self._head_groups(heads) * q_len * kv_len)

    def flops(self, q_len: int, kv_len: int, head_dim: int, heads: int = 1, batch: int = 1, q_offset: int = 0) -> float:
        """Useful forward FLOPs: ``4 * D * (interacting pairs)`` per batch and head (QK^T and PV)."""
        return 4.0 * head_dim * self.density(q_len, kv_len, q_offset, heads) * q_len * kv_len * heads * batch

    def picture(self, q_len: int | None = None, kv_len: int | None = None, heads: int | None = None):
        """The dense mask of head 0 as a ``(q_len, kv_len)`` bool tensor, for plots."""
        n = self.fixed_length or q_len or 64
        return self.dense_mask(q_len or n, kv_len or n, heads=heads)[0]


def _largest_int(obj, depth: int = 0) -> int:
    """The largest absolute int among a pattern's fields (and its parts'), 0 if none."""
    if isinstance(obj, bool):
        return 0
    if isinstance(obj, int):
        return abs(obj)
    if depth > 4:
        return 0
    if isinstance(obj, tuple | list):
        return max((_largest_int(x, depth + 1) for x in obj), default=0)
    fields = getattr(obj, "__dataclass_fields__", None)
    if fields is None:
        return 0
    return max((_largest_int(getattr(obj, f, 0), depth + 1) for f in fields), default=0)


def clear_cache() -> None:
    """Forget every cached tile statistic, layout and mask."""
    layout_cache.clear()


# -- composition ------------------------------------------------------------------------------------


def _merge_meta(parts: tuple[Pattern, ...], op: str):
    heads = {p.num_heads for p in parts if p.num_heads is not None}
    if len(heads) > 1:
        raise PatternError(bad("patterns", "per-head patterns with one number of heads", sorted(heads)))
    lengths = {p.fixed_length for p in parts if p.fixed_length is not None}
    if len(lengths) > 1:
        raise PatternError(bad("patterns", "spatial patterns of one size", sorted(lengths)))
    causal = any(p.causal for p in parts) if op == "and" else all(p.causal for p in parts)
    return (heads.pop() if heads else None), (lengths.pop() if lengths else None), causal


class _Compose(Pattern):
    _op = "and"

    def __post_init__(self):
        if len(self.parts) < 1 or not all(isinstance(p, Pattern) for p in self.parts):
            raise PatternError(bad("parts", "one or more Pattern objects", self.parts))
        h, n, c = _merge_meta(self.parts, self._op)
        object.__setattr__(self, "num_heads", h)
        object.__setattr__(self, "_n", n)
        object.__setattr__(self, "causal", c)

    @property
    def fixed_length(self):
        return self._n

    def check(self, q_len, kv_len, q_offset=0, heads=None):
        for p in self.parts:
            p.check(q_len, kv_len, q_offset, heads)


@dataclass(frozen=True)
class And(_Compose):
    """Pairs allowed by every part (``a & b``)."""

    parts: tuple

    def mask_mod(self, b, h, q_idx, kv_idx):
        return functools.reduce(lambda x, y: x & y, [p.mask_mod(b, h, q_idx, kv_idx) for p in self.parts])


@dataclass(frozen=True)
class Or(_Compose):
    """Pairs allowed by any part (``a | b``)."""

    parts: tuple
    _op = "or"

    def mask_mod(self, b, h, q_idx, kv_idx):
        return functools.reduce(lambda x, y: x | y, [p.mask_mod(b, h, q_idx, kv_idx) for p in self.parts])


@dataclass(frozen=True)
class PerHead(Pattern):
    """A different pattern per query head: head ``h`` uses ``patterns[h]``.

    With grouped-query attention the list is indexed by the *query* head.
    """

    patterns: tuple

    def __post_init__(self):
        if not isinstance(self.patterns, tuple | list):
            raise PatternError(bad("patterns", "a non-empty list of head-independent Pattern objects", self.patterns))
        pats = tuple(self.patterns)
        if not pats or not all(isinstance(p, Pattern) and p.num_heads is None for p in pats):
            raise PatternError(bad("patterns", "a non-empty list of head-independent Pattern objects", self.patterns))
        object.__setattr__(self, "patterns", pats)
        object.__setattr__(self, "num_heads", len(pats))
        object.__setattr__(self, "causal", all(p.causal for p in pats))
        lengths = {p.fixed_length for p in pats if p.fixed_length is not None}
        if len(lengths) > 1:
            raise PatternError(bad("patterns", "spatial patterns of one size", sorted(lengths)))
        object.__setattr__(self, "_n", lengths.pop() if lengths else None)

    @property
    def fixed_length(self):
        return self._n

    def mask_mod(self, b, h, q_idx, kv_idx):
        axis = _head_axis(h, q_idx, kv_idx)
        if axis is not None:
            # heads along one axis of their own (an explicit path's (B, G, Q, T) grid): each head's pattern on its
            # slice, one evaluation in all instead of one per pattern over the whole grid
            parts = [h.narrow(axis, i, 1) for i in range(h.shape[axis])]
            return torch.cat([self.patterns[int(x)].mask_mod(b, x, q_idx, kv_idx) for x in parts], axis)
        if isinstance(h, torch.Tensor) and h.dim() >= 2:
            # an explicit grid with heads on several axes (KV heads folded into the batch): each distinct pattern
            # once over the grid, picked per head (MoA's heads share a few spans, Duo's are of two kinds)
            distinct = list(dict.fromkeys(self.patterns))
            which = torch.tensor([distinct.index(p) for p in self.patterns], device=h.device)[h]
            out = distinct[-1].mask_mod(b, h, q_idx, kv_idx)
            for i in range(len(distinct) - 2, -1, -1):
                out = torch.where(which == i, distinct[i].mask_mod(b, h, q_idx, kv_idx), out)
            return out
        out = self.patterns[-1].mask_mod(b, h, q_idx, kv_idx)
        for i in range(len(self.patterns) - 2, -1, -1):
            out = torch.where(h == i, self.patterns[i].mask_mod(b, h, q_idx, kv_idx), out)
        return out

    def _eval(self, h, q, kv):
        return self.patterns[h]._eval(0, q, kv)


def _head_axis(h, q_idx, kv_idx) -> int | None:
    """The axis along which ``h`` alone varies (``q_idx`` and ``kv_idx`` have size 1 there and no more axes than
    ``h``), or None: a scalar head, as FlexAttention's vmap passes, or heads mixed into the query or key axes."""
    if not isinstance(h, torch.Tensor) or h.numel() == 1:
        return None
    big = [i for i, n in enumerate(h.shape) if n > 1]
    if len(big) != 1:
        return None
    for t in (q_idx, kv_idx):
        if not isinstance(t, torch.Tensor):
            continue
        at = big[0] - (h.dim() - t.dim())  # broadcasting aligns from the right
        if t.dim() > h.dim() or (at >= 0 and t.shape[at] != 1):
            return None
    return big[0]


@dataclass(frozen=True)
class InOrder(Pattern):
    """``base`` on its tokens renumbered by ``base.token_order()``: query ``i`` and key ``j`` here are tokens
    ``order[i]`` and ``order[j]`` of ``base``, so ``out[:, :, order] = attention(q[:, :, order], ...)`` holds with
    the same keys per query. Only the numbering changes: its tiles are what a 2-D or 3-D tile of ``base`` is.
    Equal (and hashed) as its ``base``'s wrapper, so its layouts are cached like any pattern's."""

    base: Pattern

    def __post_init__(self):
        order = self.base.token_order()
        n = self.base.fixed_length
        if order is None or n is None or tuple(order.shape) != (n,):
            raise PatternError(bad("base", "a spatial pattern with a token_order() of its length", repr(self.base)))
        object.__setattr__(self, "order", order)
        object.__setattr__(self, "num_heads", self.base.num_heads)

    @property
    def fixed_length(self):
        return self.base.fixed_length

    def mask_mod(self, b, h, q_idx, kv_idx):
        order = self.order.to(device=q_idx.device, dtype=q_idx.dtype)
        return self.base.mask_mod(b, h, order[q_idx], order[kv_idx])


@dataclass(frozen=True)
class Full(Pattern):
    """Every query sees every key (dense attention), as a pattern so that it composes."""

    def mask_mod(self, b, h, q_idx, kv_idx):
        return (q_idx >= 0) & (kv_idx >= 0)


_MAX_PARAM = 1 << 62  # past it a size already covers any sequence int64 can index, and sums of two overflow


def _require_int(name: str, value, lo: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < lo:
        raise PatternError(bad(name, f"an int >= {lo}", repr(value)))
    if value > _MAX_PARAM:
        # int64 positions cannot represent it: a clear error rather than a comparison that wraps.
        raise PatternError(bad(name, "an int <= 2**62 (any larger reaches no further on int64 positions)", value))
    return value


def as_tuple(name: str, value, dims: int, lo: int = 1) -> tuple[int, ...]:
    """Broadcast an int to a per-dimension tuple (NATTEN style) and check every entry."""
    if isinstance(value, int) and not isinstance(value, bool):
        vals = (value,) * dims
    elif isinstance(value, (tuple, list)):
        vals = tuple(value)
    else:
        raise PatternError(bad(name, f"an int or a tuple of {dims} ints", repr(value)))
    if len(vals) != dims:
        raise PatternError(bad(name, f"an int or a tuple of {dims} ints", repr(value)))
    for v in vals:
        _require_int(name, v, lo)
    return vals


def prod(xs) -> int:
    return math.prod(xs)
