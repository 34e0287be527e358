r"""Who needs which key/value rows: the sharding of a sequence over ranks and the exchange a pattern implies.

A sequence of ``N`` tokens is cut into *chunks*, each held by one rank (its local tensor is its chunks
concatenated in order):

* ``balance="contiguous"``: rank ``r`` holds one contiguous chunk (any lengths; :func:`shard` cuts evenly);
* ``balance="zigzag"``: ``2W`` chunks of near-equal length; rank ``r`` holds chunks ``r`` and ``2W - 1 - r``
  (the head-tail split of ring-flash-attention and torch's context parallelism), so each rank has an early and
  a late part of a causal triangle and the work balances.

For each pair of ranks the plan computes, from the pattern, the exact set of key rows of the sender that any
query of the receiver attends to (:meth:`ContextParallelPlan.needed_rows`): a sliding window of 256 keys needs the
last 255 rows of the previous rank and nothing else, a causal mask never needs a later rank, a document mask
needs the earlier part of a document that crosses the boundary. Those rows are sent as a few contiguous runs
(``max_runs`` per pair; runs closer than ``merge_gap`` rows are joined, and the rows of a gap are counted as
sent). The rows are found from the pattern's 16 x 16 tile statistics (cached, as for the tiled kernel) and
refined exactly only in the tiles that are partly visible, so the plan never builds an ``N x N`` mask.

The cost model (:class:`CostModel`) predicts each strategy's time per rank and :meth:`ContextParallelPlan.choose`
takes the cheaper:

* ``"ring"``: point-to-point sends of the needed rows only, in ring order (step ``s`` receives from rank
  ``r - s``); the receive of step ``s + 1`` is posted before step ``s`` is computed, so communication overlaps
  compute: time :math:`\sum_s \max(c_s, t_s) + \text{latency} \cdot m`;
* ``"allgather"``: one all-gather of every shard (one collective, whole shards, no overlap): time
  :math:`\text{latency} \lceil \log_2 W \rceil + (W - 1) S / \beta + \sum_s t_s`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..errors import PatternError, ShapeError, bad
from ..layout import BlockLayout, ceil_div
from ..patterns import Pattern
from ..patterns.causal import Causal

BALANCES = ("contiguous", "zigzag")
STRATEGIES = ("auto", "ring", "allgather")
_T = 16  # the tile of Pattern.tile_stats
_PAIR_BATCH = 1 << 14  # partly visible tiles evaluated at once (each 16 x 16)


@dataclass(frozen=True)
class Chunk:
    """A contiguous part ``[start, start + length)`` of the sequence, held by rank ``owner`` at ``local``."""

    start: int
    length: int
    owner: int
    local: int

    @property
    def end(self) -> int:
        return self.start + self.length


def chunk_lengths(n: int, parts: int) -> list[int]:
    """``n`` tokens in ``parts`` near-equal chunks (the first ``n % parts`` one longer)."""
    return [n // parts + (i < n % parts) for i in range(parts)]


def make_chunks(local_lengths: list[int], balance: str) -> tuple[Chunk, ...]:
    """The chunks of a sequence whose ranks hold ``local_lengths`` tokens each, in order of position."""
    W = len(local_lengths)
    if balance == "contiguous":
        starts = [sum(local_lengths[:r]) for r in range(W)]
        return tuple(Chunk(starts[r], local_lengths[r], r, 0) for r in range(W))
    if balance != "zigzag":
        raise ShapeError(bad("balance", f"one of {BALANCES}", repr(balance)))
    n = sum(local_lengths)
    sizes = chunk_lengths(n, 2 * W)
    want = [sizes[r] + sizes[2 * W - 1 - r] for r in range(W)]
    if list(local_lengths) != want:
        raise ShapeError(
            bad("q", f"local lengths {want} for balance='zigzag' over {n} tokens (shard() cuts them)", local_lengths)
        )
    chunks, start = [], 0
    for c, size in enumerate(sizes):
        owner = c if c < W else 2 * W - 1 - c
        chunks.append(Chunk(start, size, owner, 0 if c < W else sizes[owner]))
        start += size
    return tuple(chunks)


def shard_lengths(n: int, world: int, balance: str) -> list[int]:
    """The local length of each rank when :func:`shard` cuts ``n`` tokens."""
    if balance == "contiguous":
        return chunk_lengths(n, world)
    sizes = chunk_lengths(n, 2 * world)
    return [sizes[r] + sizes[2 * world - 1 - r] for r in range(world)]


def runs_of(mask: torch.Tensor, merge_gap: int, max_runs: int) -> list[tuple[int, int]]:
    """The ``[a, b)`` runs of True in a 1-D bool ``mask``: gaps of at most ``merge_gap`` are joined, then the
    smallest gaps until at most ``max_runs`` remain."""
    if not bool(mask.any()):
        return []
    m = mask.to(torch.int8)
    edges = torch.diff(torch.cat([m.new_zeros(1), m, m.new_zeros(1)]))
    starts = (edges == 1).nonzero().flatten().tolist()
    ends = (edges == -1).nonzero().flatten().tolist()
    runs = [[a, b] for a, b in zip(starts, ends, strict=True)]
    merged = [runs[0]]
    for a, b in runs[1:]:
        if a - merged[-1][1] <= merge_gap:
            merged[-1][1] = b
        else:
            merged.append([a, b])
    while len(merged) > max_runs:
        i = min(range(len(merged) - 1), key=lambda j: merged[j + 1][0] - merged[j][1])
        merged[i][1] = merged.pop(i + 1)[1]
    return [(a, b) for a, b in merged]


# -- which pairs interact ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shifted(Pattern):
    """``base`` seen from a key block that starts at global position ``kv_shift``: key ``j`` of the block is key
    ``kv_shift + j`` of the sequence (queries are placed by ``q_offset`` as everywhere). The sizes are checked
    once on the whole sequence, so the block's own sizes are not checked again."""

    base: Pattern
    kv_shift: int

    def __post_init__(self):
        object.__setattr__(self, "num_heads", self.base.num_heads)
        object.__setattr__(self, "causal", self.base.causal)

    def mask_mod(self, b, h, q_idx, kv_idx):
        return self.base.mask_mod(b, h, q_idx, kv_idx + self.kv_shift)

    def _eval(self, h, q, kv):
        return self.base._eval(h, q, kv + self.kv_shift)

    def check(self, q_len, kv_len, q_offset=0, heads=None):
        return None


class PatternPairs:
    """The interacting pairs of a static pattern over the whole sequence (``N`` queries at ``q_offset``)."""

    def __init__(self, pattern: Pattern | None, n: int, q_offset: int, heads: int):
        self.pattern = pattern
        self.n, self.q_offset, self.heads = n, q_offset, heads
        if pattern is not None:
            pattern.check(n, n, q_offset, heads)

    def _stats(self):
        return self.pattern.tile_stats(self.n, self.n, self.q_offset, self.heads)

    def needed(self, rows: torch.Tensor, k0: int, k1: int) -> torch.Tensor:
        """Bool ``(k1 - k0,)``: the keys in ``[k0, k1)`` that some query marked in ``rows`` ``(N,)`` sees."""
        if self.pattern is None:
            return torch.full((k1 - k0,), bool(rows.any()))
        any_, all_, _ = self._stats()
        G, nqt, nkt = any_.shape
        pad = torch.zeros(nqt * _T, dtype=torch.bool)
        pad[: self.n] = rows
        touch = pad.view(nqt, _T).any(1)
        inside = (pad | (torch.arange(nqt * _T) >= self.n)).view(nqt, _T).all(1) & touch
        kt0, kt1 = k0 // _T, ceil_div(k1, _T)
        full = all_[:, inside, kt0:kt1].any(1).any(0)  # (kt,) key tiles that some query tile sees whole
        need = torch.zeros(k1 - k0, dtype=torch.bool)
        pos = torch.arange(kt0 * _T, kt1 * _T).view(-1, _T)
        for t in full.nonzero().flatten().tolist():
            a, b = max(k0, (kt0 + t) * _T), min(k1, (kt0 + t + 1) * _T)
            need[a - k0 : b - k0] = True
        part = any_[:, :, kt0:kt1] & touch[None, :, None] & ~full[None, None, :]
        q_ar = torch.arange(_T)
        for g in range(G):
            qt, kt = part[g].nonzero(as_tuple=True)
            for i in range(0, len(qt), _PAIR_BATCH):
                qi, ki = qt[i : i + _PAIR_BATCH], kt[i : i + _PAIR_BATCH]
                q = qi[:, None] * _T + q_ar[None, :]
                kv = pos[ki]
                q_ok = pad[q.clamp(max=nqt * _T - 1)] & (q < self.n)
                k_ok = (kv >= k0) & (kv < k1)
                m = self.pattern._eval(
                    g, (q.clamp(max=self.n - 1) + self.q_offset)[:, :, None], kv.clamp(max=self.n - 1)[:, None, :]
                )
                hit = (m & q_ok[:, :, None] & k_ok[:, None, :]).any(1)  # (P, 16) keys seen
                idx = kv[hit] - k0
                need[idx] = True
        return need

    def pairs(self, q0: int, q1: int, k0: int, k1: int) -> int:
        """Exact number of interacting (query, key) pairs, summed over the pattern's head groups."""
        if self.pattern is None:
            return (q1 - q0) * (k1 - k0)
        _, _, pairs = self.piece_pattern(k0).tile_stats(q1 - q0, k1 - k0, self.q_offset + q0, self.heads)
        return pairs

    def groups(self) -> int:
        return 1 if self.pattern is None else self.pattern._head_groups(self.heads)

    def piece_pattern(self, k0: int) -> Pattern | None:
        return None if self.pattern is None else Shifted(self.pattern, k0)


class BlockPairs:
    """The interacting pairs of a global block selection ``blocks`` ``(B * H, nqb, nkb)`` (causal cut inside
    the diagonal blocks), as the ``tiled`` kernel runs it."""

    def __init__(self, blocks: torch.Tensor, n: int, block: tuple[int, int], causal: bool, batch: int):
        self.blocks, self.n, self.block, self.causal, self.batch = blocks, n, block, causal, batch
        self._layouts: dict = {}

    def needed(self, rows: torch.Tensor, k0: int, k1: int) -> torch.Tensor:
        bq, bk = self.block
        nqb = self.blocks.shape[1]
        pad = torch.zeros(nqb * bq, dtype=torch.bool)
        pad[: self.n] = rows
        qb = pad.view(nqb, bq).any(1)
        kb = self.blocks[:, qb].any(1).any(0)  # (nkb,)
        keys = kb.repeat_interleave(bk)[: self.n]
        return keys[k0:k1].clone()

    def pairs(self, q0: int, q1: int, k0: int, k1: int) -> int:
        return int(self.layout(q0, q1, k0, k1).pairs)

    def layout(self, q0: int, q1: int, k0: int, k1: int) -> BlockLayout:
        """The piece's layout: the selected blocks of queries ``[q0, q1)`` and keys ``[k0, k1)`` (cached)."""
        key = (q0, q1, k0, k1)
        if key not in self._layouts:
            bq, bk = self.block
            sub = self.blocks[:, q0 // bq : ceil_div(q1, bq), k0 // bk : ceil_div(k1, bk)]
            sub = sub.reshape(self.batch, -1, *sub.shape[1:])
            self._layouts[key] = BlockLayout.from_blocks(
                sub, q1 - q0, k1 - k0, (bq, bk), causal=self.causal, q_offset=q0 - k0
            )
        return self._layouts[key]


# -- the plan ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CostModel:
    """Seconds per byte, per message and per FLOP for the strategy choice (defaults: gloo over loopback on this
    2-core machine, measured by ``attnkit bench --suite distributed``; pass your fabric's numbers)."""

    latency_s: float = 60e-6
    bytes_per_s: float = 2.0e9
    flops_per_s: float = 1.0e11


@dataclass
class Piece:
    """One unit of a rank's compute: its query chunk ``q`` against the key rows ``[k0, k1)`` owned by ``src``."""

    q: Chunk
    k0: int
    k1: int
    src: int
    pairs: int
    layout: object = field(default=None, repr=False)
    q_offset: int = 0


@dataclass
class ContextParallelPlan:
    """The exchange and compute of one context-parallel call, for every rank (see the module docstring).

    ``runs[(dst, src)]``: the ``[a, b)`` global key rows ``src`` sends to ``dst``; ``needed[(dst, src)]``: how many
    of them ``dst``'s queries really see (the rest fill merged gaps); ``pieces[r]``: rank ``r``'s compute;
    ``work[r]``: its interacting pairs (times heads per pattern group)."""

    n: int
    world: int
    balance: str
    chunks: tuple
    runs: dict
    needed: dict
    pieces: list
    work: list
    heads: int = 1
    kv_row_bytes: int = 0
    head_dim: int = 64
    cost: CostModel = field(default_factory=CostModel)

    # -- derived ----------------------------------------------------------------------------------------------
    def local_chunks(self, rank: int) -> list[Chunk]:
        return [c for c in self.chunks if c.owner == rank]

    def rows_sent(self, src: int) -> int:
        return sum(b - a for (d, s), rr in self.runs.items() if s == src for a, b in rr)

    def rows_received(self, dst: int) -> int:
        return sum(b - a for (d, s), rr in self.runs.items() if d == dst for a, b in rr)

    def bytes_sent(self, src: int) -> int:
        return self.rows_sent(src) * self.kv_row_bytes

    def dense_ring_bytes(self, src: int) -> int:
        """What a dense ring (every shard to every rank) sends from ``src``."""
        return (self.world - 1) * sum(c.length for c in self.local_chunks(src)) * self.kv_row_bytes

    def imbalance(self) -> float:
        """Largest per-rank work over the mean (1.0 is perfect balance)."""
        mean = sum(self.work) / max(len(self.work), 1)
        return max(self.work) / mean if mean else 1.0

    def predict(self, strategy: str) -> float:
        """Predicted seconds of the slowest rank under ``strategy`` (``"ring"`` or ``"allgather"``)."""
        c = self.cost
        flop = 4.0 * self.head_dim * self.heads  # per interacting pair, forward
        worst = 0.0
        for r in range(self.world):
            per_src: dict[int, int] = {}
            for p in self.pieces[r]:
                per_src[p.src] = per_src.get(p.src, 0) + p.pairs
            compute = {s: w * flop / c.flops_per_s for s, w in per_src.items()}
            if strategy == "ring":
                t = compute.get(r, 0.0)
                for s in range(1, self.world):
                    src = (r - s) % self.world
                    rows = sum(b - a for a, b in self.runs.get((r, src), ()))
                    if rows:
                        comm = c.latency_s + rows * self.kv_row_bytes / c.bytes_per_s
                        t += max(comm, compute.get(src, 0.0))
            else:
                shard = max(sum(ch.length for ch in self.local_chunks(x)) for x in range(self.world))
                comm = c.latency_s * math.ceil(math.log2(max(self.world, 2)))
                comm += (self.world - 1) * shard * self.kv_row_bytes / c.bytes_per_s
                t = comm + sum(compute.values())
            worst = max(worst, t)
        return worst

    def choose(self, strategy: str = "auto") -> str:
        if strategy not in STRATEGIES:
            raise ShapeError(bad("strategy", f"one of {STRATEGIES}", repr(strategy)))
        if strategy != "auto":
            return strategy
        return "ring" if self.predict("ring") <= self.predict("allgather") else "allgather"

    def __str__(self) -> str:
        lines = [
            f"context parallel: N={self.n} over {self.world} ranks, balance={self.balance}, "
            f"strategy {self.choose()} (predicted ring {self.predict('ring') * 1e3:.2f} ms, "
            f"allgather {self.predict('allgather') * 1e3:.2f} ms)",
            f"  work imbalance (max / mean pairs): {self.imbalance():.3f}",
        ]
        for r in range(self.world):
            sent = self.rows_sent(r)
            dense = self.dense_ring_bytes(r) // max(self.kv_row_bytes, 1)
            peers = sorted(d for (d, s) in self.runs if s == r)
            lines.append(
                f"  rank {r}: holds {[(c.start, c.end) for c in self.local_chunks(r)]}, sends {sent} key rows "
                f"to {peers} (a dense ring sends {dense}), work {self.work[r]} pairs"
            )
        return "\n".join(lines)


def build_plan(
    pairs,
    chunks: tuple,
    *,
    world: int,
    balance: str,
    heads: int,
    kv_row_bytes: int,
    head_dim: int,
    merge_gap: int = 16,
    max_runs: int = 8,
    cost: CostModel | None = None,
) -> ContextParallelPlan:
    """Work out the plan from ``pairs`` (:class:`PatternPairs` or :class:`BlockPairs`) over ``chunks``."""
    n = sum(c.length for c in chunks)
    runs, needed, pieces = {}, {}, [[] for _ in range(world)]
    groups = pairs.groups() if hasattr(pairs, "groups") else 1
    per_group = max(heads // max(groups, 1), 1)
    for dst in range(world):
        rows = torch.zeros(n, dtype=torch.bool)
        mine = [c for c in chunks if c.owner == dst]
        for c in mine:
            rows[c.start : c.end] = True
        for src in range(world):
            owned = [c for c in chunks if c.owner == src]
            got, exact = [], 0
            for c in owned:
                if not c.length:
                    continue
                need = pairs.needed(rows, c.start, c.end)
                exact += int(need.sum())
                got += [(c.start + a, c.start + b) for a, b in runs_of(need, merge_gap, max_runs)]
            if src != dst and got:
                runs[(dst, src)], needed[(dst, src)] = got, exact
            for qc in mine:
                for a, b in got:
                    w = pairs.pairs(qc.start, qc.end, a, b) if qc.length else 0
                    if w:
                        pieces[dst].append(Piece(qc, a, b, src, w))
    work = [sum(p.pairs for p in ps) * per_group for ps in pieces]
    return ContextParallelPlan(
        n=n,
        world=world,
        balance=balance,
        chunks=chunks,
        runs=runs,
        needed=needed,
        pieces=pieces,
        work=work,
        heads=heads,
        kv_row_bytes=kv_row_bytes,
        head_dim=head_dim,
        cost=cost or CostModel(),
    )


def explain_context_parallel(
    n: int,
    world: int,
    *,
    pattern: Pattern | None = None,
    causal: bool = False,
    balance: str = "contiguous",
    q_offset: int = 0,
    heads: int = 8,
    kv_heads: int | None = None,
    head_dim: int = 64,
    bytes_per_element: int = 4,
    cost: CostModel | None = None,
) -> ContextParallelPlan:
    """The plan of a context-parallel call over ``world`` ranks without running it (no process group needed):
    the rows each rank sends, the work balance and each strategy's predicted time. ``print`` it."""
    for name, val in (("n", n), ("world", world), ("heads", heads), ("head_dim", head_dim)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 1:
            raise ShapeError(bad(name, "a positive int", repr(val)))
    pattern = static_pattern(pattern, causal)
    kvh = heads if kv_heads is None else kv_heads
    chunks = make_chunks(shard_lengths(n, world, balance), balance)
    return build_plan(
        PatternPairs(pattern, n, q_offset, heads),
        chunks,
        world=world,
        balance=balance,
        heads=heads,
        kv_row_bytes=2 * kvh * head_dim * bytes_per_element,
        head_dim=head_dim,
        cost=cost,
    )


def static_pattern(pattern, causal: bool):
    if pattern is not None and not isinstance(pattern, Pattern):
        raise PatternError(bad("pattern", "an attnkit Pattern or None", type(pattern).__name__))
    if causal not in (True, False):
        raise ShapeError(bad("causal", "True or False", repr(causal)))
    if causal:
        return Causal() if pattern is None else pattern & Causal()
    return pattern
