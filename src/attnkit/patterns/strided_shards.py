"""Heterogeneous context sharding among heads (S2-Attention).

Paper: "S2-Attention: Hardware-Aware Context Sharding Among Attention Heads" (Lin et al., 2024).
Each head attends to its own strided shard of the context, the shards differ between heads so that the
heads together cover every position, and every head keeps a dense local window (the paper's
"dense local + sharded remote" recipe; the abstract leaves the offsets open, so we choose):

``head h`` sees key ``j`` from query ``i`` when ``j <= i`` (causal) and either ``i - j < local`` or
``j % shards == h % shards``. With ``num_heads >= shards`` the union over heads is full causal attention.

Picture, head 0 of ``StridedShards(num_heads=2, shards=2, local=2)``::

    #.......
    ##......
    ###.....
    #.##....
    #.###...
    #.#.##..
    #.#.###.
    #.#.#.##
"""

from __future__ import annotations

from dataclasses import dataclass

from ..records import SEQUENCE, register, window_size
from .base import Pattern, StridedKeys, _require_int

__all__ = ["StridedShards"]


@dataclass(frozen=True)
class StridedShards(Pattern):
    """Per-head strided shards plus a dense local window (causal)."""

    heads: int
    shards: int = 4
    local: int = 64

    def __post_init__(self):
        _require_int("heads", self.heads)
        _require_int("shards", self.shards)
        _require_int("local", self.local)
        object.__setattr__(self, "num_heads", self.heads)
        object.__setattr__(self, "causal", True)

    def mask_mod(self, b, h, q_idx, kv_idx):
        d = q_idx - kv_idx
        return (d >= 0) & ((d < self.local) | (kv_idx % self.shards == h % self.shards))

    def strided_keys(self, q_offset: int, kv_len: int) -> StridedKeys | None:
        """Below ``q_offset - local + 1`` no query from ``q_offset`` on is in its window: there each head sees
        its shard only (rounded down to whole strides)."""
        stop = min(kv_len, max(0, q_offset - self.local + 1)) // self.shards * self.shards
        offsets = tuple(h % self.shards for h in range(self.heads))
        return StridedKeys(self.shards, offsets, stop) if stop else None


register(
    "strided_shards",
    family="A",
    kind="pattern",
    paper="S2-Attention: Hardware-Aware Context Sharding Among Attention Heads (2024)",
    exact=True,
    supports=SEQUENCE | {"causal", "per_head"},
    factory=lambda n: StridedShards(heads=4, shards=4, local=window_size(n, 16, 128)),
    summary="4 heads, 4 strided shards + local window min(n/16, 128)",
    source=StridedShards,
)
