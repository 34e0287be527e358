r"""Context-parallel softmax attention: each rank holds a shard of the sequence, the pattern decides the traffic.

Rank ``r`` holds the queries, keys and values of its chunks (:mod:`attnkit.distributed.plan`). It receives
from every other rank only the key/value rows its queries see, computes one *piece* per (query chunk, key run)
with :func:`attnkit.attention` at the piece's global positions, and merges the pieces by their log-sum-exp:

.. math::
    \mathrm{lse}_i = \log \sum_p e^{\mathrm{lse}_{p,i}}, \qquad
    o_i = \sum_p e^{\mathrm{lse}_{p,i} - \mathrm{lse}_i}\, o_{p,i}

which is the attention over all of the query's keys, as on one device (a query with no visible key gives
``o = 0``, ``lse = -inf``).

Backward (FlashAttention-2's, per piece): with the merged ``o`` and ``lse`` saved, the gradient of the piece's
keys and values is the tiled kernel's backward on that piece with the *global* ``lse`` and
:math:`\delta_i = \mathrm{rowsum}(dO_i \circ o_i)`, so no piece is normalised twice; ``dq`` sums over the pieces,
and the ``dk``, ``dv`` of received rows travel back to their owner, which adds them to its own. The received
rows are kept from the forward for the backward (memory: the rows a rank receives, the same bound as the
exchange); nothing is communicated twice.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch

from ..backends.tiled import _backend as tiled_backend
from ..backends.tiled import backward as tiled_backward
from ..backends.tiled import forward as tiled_forward
from ..errors import AttnkitError, DTypeError, ShapeError, UnsupportedError, bad
from ..patterns import Full, Pattern
from ..scores import Normalizer, ScoreMod
from ..shapes import check_finite, validate
from ..sparse import Selector
from ._comm import Group, agree, guarded
from .plan import BlockPairs, PatternPairs, build_plan, make_chunks, static_pattern
from .selection import global_selection

_DTYPES = {torch.float64: 0, torch.float32: 1, torch.bfloat16: 2, torch.float16: 3}
_TAG_FWD, _TAG_BWD = 1, 2
_plans: dict = {}  # plans by their inputs (a training loop makes the same call every step)
_MAX_PLANS = 64


class _Job:
    """What one call needs on its way through the autograd function (not tensors)."""

    def __init__(self, group, plan, pairs, strategy, scale, score, q_offset, kpm, selection):
        self.group, self.plan, self.pairs, self.strategy = group, plan, pairs, strategy
        self.scale, self.score, self.q_offset, self.kpm, self.selection = scale, score, q_offset, kpm, selection


class _ShiftedScore(ScoreMod):
    """A score mod seen from a key block starting at ``kv_shift`` (its positions made global again)."""

    def __init__(self, base: ScoreMod, kv_shift: int):
        self.base, self.kv_shift = base, kv_shift
        self.additive, self.num_heads = base.additive, base.num_heads

    def score_mod(self, score, b, h, q_idx, kv_idx):
        return self.base.score_mod(score, b, h, q_idx, kv_idx + self.kv_shift)

    def grad(self, score, h, q_idx, kv_idx):
        return self.base.grad(score, h, q_idx, kv_idx + self.kv_shift)

    def __hash__(self):
        return hash((self.base, self.kv_shift))

    def __eq__(self, other):
        return isinstance(other, _ShiftedScore) and (self.base, self.kv_shift) == (other.base, other.kv_shift)


def context_parallel_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    pattern=None,
    causal: bool = False,
    score: ScoreMod | None = None,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    q_offset: int = 0,
    balance: str = "contiguous",
    strategy: str = "auto",
    group=None,
    timeout: float | None = None,
    return_lse: bool = False,
):
    r"""Attention over a sequence sharded across the ranks of ``group``; each rank passes and gets its shard.

    The result on each rank equals the rows of its shard of :func:`attnkit.attention` over the whole sequence
    (tested in float64 to 1e-12, outputs and the three gradients, on 2 and 4 gloo processes).

    Args:
        q, k, v: this rank's shard: ``(B, Hq, n_r, D)``, ``(B, Hkv, n_r, D)``, ``(B, Hkv, n_r, Dv)``, the
            same ``n_r`` for the three (self-attention). With ``balance="contiguous"`` the ranks hold consecutive
            parts in rank order (any lengths); with ``"zigzag"`` rank ``r`` holds chunks ``r`` and ``2W-1-r`` of
            ``2W`` (:func:`shard` cuts both).
        pattern: None (dense), a static :class:`~attnkit.patterns.Pattern` over the whole sequence (global
            positions), or a block selector (:class:`~attnkit.sparse.BlockTopK` and the records built on it),
            which selects with global coordinates from block summaries all ranks share.
        causal: intersect with the causal mask (a selector selects under it, as :func:`attnkit.attention` does
            with ``causal=True``).
        score: a :class:`~attnkit.scores.ScoreMod` (static patterns), evaluated at global positions.
        scale: default ``D ** -0.5``.
        key_padding_mask: bool ``(B, n_r)``, True where this rank's key is real.
        q_offset: absolute position of the sequence's first query (the keys start at 0).
        balance: ``"contiguous"`` or ``"zigzag"``.
        strategy: ``"auto"`` (the cost model's choice, see :func:`explain_context_parallel`), ``"ring"``
            (point-to-point, only the rows needed, overlapped with compute) or ``"allgather"`` (one all-gather of
            every shard).
        group: the process group (default the world).
        timeout: seconds any rank waits for a peer before every rank raises
            :class:`~attnkit.distributed.DistributedError` (default 120).
        return_lse: also return ``lse`` ``(B, Hq, n_r)`` (float32 for low-precision inputs).

    Returns:
        ``out`` ``(B, Hq, n_r, Dv)`` in the dtype of ``q``, differentiable in ``q``, ``k``, ``v`` (autograd
        through the communication; the backward is collective too: every rank must call it).
    """
    g = Group.of(group, timeout)
    error, meta = None, [0] * 9
    try:
        if isinstance(score, Normalizer):
            raise UnsupportedError(
                bad("score", "a ScoreMod (a normaliser's per-row key count spans the ranks; not supported)", score)
            )
        if not isinstance(balance, str) or balance not in ("contiguous", "zigzag"):
            raise ShapeError(bad("balance", "'contiguous' or 'zigzag'", repr(balance)))
        if strategy not in ("auto", "ring", "allgather"):
            raise ShapeError(bad("strategy", "'auto', 'ring' or 'allgather'", repr(strategy)))
        if isinstance(q_offset, bool) or not isinstance(q_offset, int) or q_offset < 0:
            raise ShapeError(bad("q_offset", "an int >= 0", repr(q_offset)))
        dims = validate(q, k, v, key_padding_mask=key_padding_mask, scale=scale)
        if dims.q_len != dims.kv_len:
            raise ShapeError(bad("k", f"this rank's shard of the same {dims.q_len} tokens as q", dims.kv_len))
        if q.dtype not in _DTYPES:
            raise DTypeError(bad("q", f"one of {tuple(_DTYPES)}", q.dtype))
        if q.device.type != "cpu":
            raise UnsupportedError(bad("q", "CPU tensors (the pieces run the tiled CPU kernel's backward)", q.device))
        if isinstance(pattern, Selector):
            if score is not None:
                raise UnsupportedError(bad("score", "None with a selector (selections run plain softmax)", score))
            if q_offset:
                raise UnsupportedError(bad("q_offset", "0 with a selector", q_offset))
        elif pattern is not None and not isinstance(pattern, Pattern):
            want = "None, an attnkit Pattern or a block Selector"
            raise DTypeError(bad("pattern", want, type(pattern).__name__))
        k, v = check_finite(q, k, v, key_padding_mask)
        meta = [
            dims.q_len,
            dims.batch,
            dims.q_heads,
            dims.kv_heads,
            dims.head_dim,
            dims.v_dim,
            _DTYPES[q.dtype],
            key_padding_mask is not None,
            q_offset,
        ]
    except AttnkitError as e:
        error = e
    rows = agree(g, meta, error, "context_parallel_attention")
    if len({tuple(r[1:].tolist()) for r in rows}) != 1:
        raise ShapeError(
            bad("q, k, v", "the same batch, heads, head dims, dtype, padding and q_offset on every rank", rows.tolist())
        )
    lengths = rows[:, 0].tolist()
    chunks = make_chunks(lengths, balance)
    n = sum(lengths)
    scale = dims.head_dim**-0.5 if scale is None else scale
    row_bytes = dims.kv_heads * (dims.head_dim + dims.v_dim) * q.element_size()
    with guarded(g, "context_parallel_attention"):
        def plan_of(pairs):
            return build_plan(
                pairs,
                chunks,
                world=g.size,
                balance=balance,
                heads=dims.q_heads,
                kv_row_bytes=row_bytes,
                head_dim=dims.head_dim,
            )

        if isinstance(pattern, Selector):
            sel_blocks, block, sel_causal = global_selection(pattern, q, k, key_padding_mask, chunks, g, causal)
            pairs = BlockPairs(sel_blocks, n, block, sel_causal, dims.batch)
            plan = plan_of(pairs)
        else:
            pat = static_pattern(pattern, bool(causal))
            key = (pat, tuple(lengths), balance, q_offset, dims.q_heads, row_bytes, dims.head_dim)
            hit = _plans.get(key)
            if hit is None:
                pairs = PatternPairs(pat, n, q_offset, dims.q_heads)
                if len(_plans) >= _MAX_PLANS:
                    _plans.clear()
                _plans[key] = hit = (pairs, plan_of(pairs))
            pairs, plan = hit
        job = _Job(g, plan, pairs, plan.choose(strategy), scale, score, q_offset, key_padding_mask, None)
        out, lse = _ContextParallel.apply(q, k, v, job)
    return (out, lse) if return_lse else out


# -- the exchange -----------------------------------------------------------------------------------------------


def _local_slice(plan, rank: int, a: int, b: int) -> tuple[int, int]:
    """Global rows ``[a, b)`` of rank ``rank``'s chunks as a range of its local tensor."""
    for c in plan.local_chunks(rank):
        if c.start <= a and b <= c.end:
            return c.local + a - c.start, c.local + b - c.start
    raise AssertionError(f"rows [{a}, {b}) are not within one chunk of rank {rank}")


def _pack(tensors, lo: int, hi: int) -> torch.Tensor:
    return torch.cat([t[..., lo:hi, :].reshape(-1) if t.dim() == 4 else t[:, lo:hi].reshape(-1) for t in tensors])


def _unpack(buf: torch.Tensor, shapes) -> list[torch.Tensor]:
    out, at = [], 0
    for s in shapes:
        out.append(buf[at : at + math.prod(s)].view(s))
        at += math.prod(s)
    return out


class _Exchange:
    """The key/value rows of one call: what this rank receives, as ``{(src, a, b): (k, v, kpm)}``."""

    def __init__(self, job: _Job, k, v, kpm):
        self.job, self.k, self.v, self.mask = job, k, v, kpm
        self.kpm = None if kpm is None else kpm.to(k.dtype)  # travels with the rows, in their dtype
        self.recv: dict = {}
        self.sends: list = []

    def _shapes(self, rows: int):
        B, H = self.k.shape[0], self.k.shape[1]
        s = [(B, H, rows, self.k.shape[3]), (B, H, rows, self.v.shape[3])]
        return s + ([(B, rows)] if self.kpm is not None else [])

    def _parts(self):
        return [self.k, self.v] + ([self.kpm] if self.kpm is not None else [])

    def post_sends(self) -> None:
        g, plan = self.job.group, self.job.plan
        cache = {}
        for (dst, src), runs in sorted(plan.runs.items()):
            if src != g.rank:
                continue
            for a, b in runs:
                if (a, b) not in cache:
                    lo, hi = _local_slice(plan, src, a, b)
                    cache[(a, b)] = _pack(self._parts(), lo, hi)
                self.sends.append(g.isend(cache[(a, b)], dst, _TAG_FWD))

    def receives(self):
        """``(src, runs)`` in ring order: the peer ``s`` ranks behind first."""
        g, plan = self.job.group, self.job.plan
        for s in range(1, g.size):
            src = (g.rank - s) % g.size
            runs = plan.runs.get((g.rank, src))
            if runs:
                yield src, runs

    def post_recv(self, src: int, runs):
        works = []
        for a, b in runs:
            shapes = self._shapes(b - a)
            buf = self.k.new_empty(sum(math.prod(s) for s in shapes))
            works.append((a, b, buf, shapes, self.job.group.irecv(buf, src, _TAG_FWD)))
        return works

    def land(self, src: int, works) -> None:
        for a, b, buf, shapes, w in works:
            self.job.group.wait(w, f"receiving key rows [{a}, {b}) from rank {src}")
            parts = _unpack(buf, shapes)
            kpm = parts[2].bool() if len(parts) > 2 else None
            self.recv[(src, a, b)] = (parts[0], parts[1], kpm)

    def allgather(self) -> None:
        """The all-gather strategy: every shard to every rank in one collective (padded to the longest)."""
        g, plan = self.job.group, self.job.plan
        longest = max(sum(c.length for c in plan.local_chunks(r)) for r in range(g.size))
        n_r = self.k.shape[2]
        pad = [
            torch.nn.functional.pad(t, (0, 0, 0, longest - n_r))
            if t.dim() == 4
            else torch.nn.functional.pad(t, (0, longest - n_r))
            for t in self._parts()
        ]
        flat = _pack(pad, 0, longest)
        got = g.all_gather(flat, "the all-gather of the shards")
        shapes = self._shapes(longest)
        for src in range(g.size):
            if src == g.rank:
                continue
            parts = _unpack(got[src], shapes)
            for a, b in plan.runs.get((g.rank, src), ()):
                lo, hi = _local_slice(plan, src, a, b)
                kpm = parts[2][:, lo:hi].bool() if len(parts) > 2 else None
                self.recv[(src, a, b)] = (parts[0][:, :, lo:hi], parts[1][:, :, lo:hi], kpm)

    def rows(self, src: int, a: int, b: int):
        """Keys, values and padding mask of the global rows ``[a, b)`` of rank ``src`` (this rank's own, or
        received)."""
        if src == self.job.group.rank:
            lo, hi = _local_slice(self.job.plan, src, a, b)
            return self.k[:, :, lo:hi], self.v[:, :, lo:hi], None if self.mask is None else self.mask[:, lo:hi]
        return self.recv[(src, a, b)]

    def finish_sends(self) -> None:
        for w in self.sends:
            self.job.group.wait(w, "sending key rows")


# -- one piece --------------------------------------------------------------------------------------------------


def _piece_layout(job: _Job, piece):
    """The tiled kernel's layout of a piece at its global positions, and its query offset (cached on the piece,
    which the cached plan keeps: a training loop builds each layout once)."""
    if piece.layout is None:
        if isinstance(job.pairs, BlockPairs):
            lay = job.pairs.layout(piece.q.start, piece.q.end, piece.k0, piece.k1)
            piece.q_offset = lay.q_offset
        else:
            pat = job.pairs.piece_pattern(piece.k0) or Full()
            nq, nk, q_off = piece.q.length, piece.k1 - piece.k0, job.q_offset + piece.q.start
            dims = SimpleNamespace(q_len=nq, kv_len=nk, q_offset=q_off, q_heads=job.pairs.heads)
            b = tiled_backend.choose_block(pat, dims, True)
            lay = pat.block_layout(nq, nk, b, b, q_off, job.pairs.heads)
            piece.q_offset = q_off  # a static layout does not carry it; the score mods need it
        piece.layout = lay
    return piece.layout, piece.q_offset


def _piece_forward(job: _Job, piece, qc, k, v, kpm):
    # The tiled kernel for every piece, full and diagonal ones included: it returns the log-sum-exp
    # the merge needs at no extra cost, where SDPA asked for it falls back to its math path (12x slower
    # at 8k keys, measured by the distributed bench).
    lay, q_off = _piece_layout(job, piece)
    score = None if job.score is None else _ShiftedScore(job.score, piece.k0)
    return tiled_forward(qc, k, v, lay, job.scale, score, kpm, q_off, None)


def _piece_backward(job: _Job, piece, qc, k, v, kpm, out, lse, dout):
    lay, q_off = _piece_layout(job, piece)
    score = None if job.score is None else _ShiftedScore(job.score, piece.k0)
    return tiled_backward(dout, qc, k, v, out, lse, lay, job.scale, score, kpm, q_off, None)


def _merge(o_acc, l_acc, o, l):
    """The log-sum-exp merge of two partial results over disjoint keys (rows with no key stay 0, -inf)."""
    m = torch.maximum(l_acc, l)
    safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    a, b = torch.exp(l_acc - safe), torch.exp(l - safe)
    s = a + b
    o_new = (o_acc * a[..., None] + o * b[..., None]) / torch.where(s > 0, s, torch.ones_like(s))[..., None]
    return o_new, torch.where(s > 0, safe + torch.log(s), torch.full_like(s, float("-inf")))


class _ContextParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, job: _Job):
        g, plan = job.group, job.plan
        cd = torch.float64 if q.dtype == torch.float64 else torch.float32
        B, Hq, n_r, _ = q.shape
        out = torch.zeros(B, Hq, n_r, v.shape[3], dtype=cd)
        lse = torch.full((B, Hq, n_r), float("-inf"), dtype=cd)
        ex = _Exchange(job, k, v, job.kpm)
        ring = job.strategy == "ring"
        if ring:
            ex.post_sends()
            pending = list(ex.receives())
            posted = [(src, ex.post_recv(src, runs)) for src, runs in pending[:1]]
        else:
            ex.allgather()
            pending, posted = [], []
        pieces = plan.pieces[g.rank]

        def compute(src):
            for p in pieces:
                if p.src != src:
                    continue
                lo, hi = _local_slice(plan, g.rank, p.q.start, p.q.end)
                kk, vv, kpm = ex.rows(src, p.k0, p.k1)
                o, l = _piece_forward(job, p, q[:, :, lo:hi], kk, vv, kpm)
                out[:, :, lo:hi], lse[:, :, lo:hi] = _merge(out[:, :, lo:hi], lse[:, :, lo:hi], o.to(cd), l.to(cd))

        compute(g.rank)
        if ring:
            for i in range(len(pending)):
                src, works = posted[i]
                if i + 1 < len(pending):  # the next receive is in flight while this step computes
                    posted.append((pending[i + 1][0], ex.post_recv(*pending[i + 1])))
                ex.land(src, works)
                compute(src)
            ex.finish_sends()
        else:
            for src in range(g.size):
                if src != g.rank:
                    compute(src)
        ctx.job, ctx.ex = job, ex
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.mark_non_differentiable(lse)
        return out.to(q.dtype), lse.to(torch.float32 if cd == torch.float32 else cd)

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        job, ex = ctx.job, ctx.ex
        g, plan = job.group, job.plan
        with guarded(g, "the backward of context_parallel_attention"):
            dout = dout.to(out.dtype)
            dq, dk, dv = (torch.zeros_like(t, dtype=out.dtype) for t in (q, k, v))
            back: dict = {}  # (src, a, b) -> [dk, dv] of received rows, to send back
            # Post the receives of the gradients this rank's rows get from the ranks that used them.
            incoming = []
            for (dst, src), runs in sorted(plan.runs.items()):
                if src != g.rank:
                    continue
                for a, b in runs:
                    B, H = k.shape[:2]
                    buf = dk.new_empty(B * H * (b - a) * (k.shape[3] + v.shape[3]))
                    incoming.append((dst, a, b, buf, g.irecv(buf, dst, _TAG_BWD)))
            for p in plan.pieces[g.rank]:
                lo, hi = _local_slice(plan, g.rank, p.q.start, p.q.end)
                kk, vv, kpm = ex.rows(p.src, p.k0, p.k1)
                dqp, dkp, dvp = _piece_backward(
                    job, p, q[:, :, lo:hi], kk, vv, kpm, out[:, :, lo:hi], lse[:, :, lo:hi], dout[:, :, lo:hi]
                )
                dq[:, :, lo:hi] += dqp.to(dq.dtype)
                if p.src == g.rank:
                    klo, khi = _local_slice(plan, g.rank, p.k0, p.k1)
                    dk[:, :, klo:khi] += dkp.to(dk.dtype)
                    dv[:, :, klo:khi] += dvp.to(dv.dtype)
                else:
                    acc = back.setdefault((p.src, p.k0, p.k1), [0, 0])
                    acc[0], acc[1] = acc[0] + dkp.to(dk.dtype), acc[1] + dvp.to(dv.dtype)
            sends = []
            for src, runs in ex.receives():
                for a, b in runs:
                    acc = back.get((src, a, b))
                    if acc is None:
                        B, H = k.shape[:2]
                        acc = [dk.new_zeros(B, H, b - a, k.shape[3]), dv.new_zeros(B, H, b - a, v.shape[3])]
                    buf = torch.cat([acc[0].reshape(-1), acc[1].reshape(-1)])
                    sends.append(g.isend(buf, src, _TAG_BWD))
            for dst, a, b, buf, w in incoming:
                g.wait(w, f"receiving key gradients [{a}, {b}) from rank {dst}")
                B, H = k.shape[:2]
                gk, gv = _unpack(buf, [(B, H, b - a, k.shape[3]), (B, H, b - a, v.shape[3])])
                lo, hi = _local_slice(plan, g.rank, a, b)
                dk[:, :, lo:hi] += gk
                dv[:, :, lo:hi] += gv
            for w in sends:
                g.wait(w, "sending key gradients")
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None
