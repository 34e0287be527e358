r"""``decode``: a few queries over a KV cache (a decode step, a short chunk), with no layout and no mask cache.

For the ``Nq <= 16`` queries at positions ``q_offset .. q_offset + Nq - 1`` the pattern is evaluated on those
rows only (``Nq x Nk`` booleans, no layout and nothing cached per step), the keys any of them reads are the
columns that stay (a window's last ``w`` keys are a view of the cache, any other set one gather), and the step
is two products over them:

.. math::
    s = \mathrm{scale}\; Q K_R^\top + b, \qquad
    \ell_i = \log \sum_{j \in P(i)} e^{s_{ij}}, \qquad
    \mathrm{out}_i = \sum_{j \in P(i)} e^{s_{ij} - \ell_i}\, v_j,

with ``R`` the keys read, ``P(i) = R`` minus the pattern's and padding's masked keys, ``b`` an additive score
modification evaluated at the read positions. A pattern whose heads read every ``S``-th key from their own
offset below some position (S2-Attention's shards, :meth:`~attnkit.patterns.Pattern.strided_keys`) has those
keys read through a strided view of the cache, ``K[b, h // g, o_h :: S]`` (no gather, no mask: the pattern
vouches for them), and only the keys above evaluated by its rule. A query head reads its KV head's keys in one
product for the whole group (GQA: the ``g`` query heads of a KV head are rows of one matrix). Logits and the
softmax are in float32 (float64 for float64 inputs); the products run in the input dtype (bf16 on the CPU's
matrix units).

Why not SDPA: at one query its CPU kernel reads the cache as fast as these two products in fp32 but is 5-15x
slower in bf16 (49.9 against 9.9 ms at 32k keys, 8 heads of 64, one thread), it computes every masked key of a
window, and it leaves NaN checks to a separate pass over ``K`` and ``V`` (a third of the step at 32k).

The non-finite rule: a NaN or inf in ``q`` or in a read key of ``k`` makes a raw logit non-finite (``0 * inf`` is
NaN, ``x * inf`` is ``+-inf``), and one in a read value reaches the output through the second product (``0 *
NaN`` is NaN), so :func:`attnkit.attention` checks the output only (``carries_nonfinite``): this module turns
a non-finite raw logit into a NaN output, and the caller's full check then names the first bad input. A key no
query reads is never looked at, as with the tiled kernel's skipped tiles.
"""

from __future__ import annotations

import torch

from ..shapes import all_finite
from .request import Request, softmax_kernel_why_not

MAX_QUERIES = 16  # a q_len x kv_len mask is a few rows: cheap to evaluate per step


def carries_nonfinite(req: Request) -> bool:
    """Yes: a non-finite raw logit becomes a NaN output, and a read value reaches the output (see above)."""
    return True


def why_not(req: Request) -> str | None:
    d = req.dims
    if d.q_len > MAX_QUERIES:
        return f"decode runs at most {MAX_QUERIES} queries over a cache, got {d.q_len}; use 'tiled' or 'sdpa'"
    if req.needs_grad:
        return "decode is inference only (no autograd); use 'tiled' or 'sdpa'"
    return softmax_kernel_why_not(req, "decode")


def _visible(req: Request) -> torch.Tensor | None:
    """``(G, Nq, Nk)`` booleans (``G`` = 1, or the query heads of a per-head pattern), or None for every key."""
    d = req.dims
    if req.pattern is None or req.causal_sees_all:
        return None
    return req.pattern.dense_mask(d.q_len, d.kv_len, req.q_offset, d.q_heads, device=req.device)


#: Keys read that fill at least this share of the run from the first to the last are read as that run (a view of
#: the cache, the keys in between masked), not gathered: StreamingLLM's sinks and window over SmolLM2's cache
#: (512 of 513 keys, 3 KV heads of 64) took 410 us gathered against 137 us for the whole cache unmasked.
SPAN_SHARE = 1 / 2


def _read(visible: torch.Tensor | None, kv_len: int):
    """``(keys, exact)``: the keys any query reads, a ``slice`` (a contiguous run: a view of the cache) or an index
    tensor, and whether every key read is visible to some query (else the run holds masked keys)."""
    if visible is None:
        return slice(0, kv_len), True
    idx = visible.any(0).any(0).nonzero().flatten()
    if len(idx) == 0:
        return slice(0, 0), True
    first, last = int(idx[0]), int(idx[-1])
    if len(idx) < SPAN_SHARE * (last - first + 1):
        return idx, True
    return slice(first, last + 1), last - first + 1 == len(idx)


def _count(keys) -> int:
    return keys.stop - keys.start if isinstance(keys, slice) else len(keys)


#: A per-head gather pays when each head reads at most this share of the keys all heads read together. Strided
#: shards (a quarter of the cache per head, at a stride of 4) measured slower gathered than over the union with
#: a mask: 7.2 against 3.1 ms at 32k, 1.34 against 0.47 ms at 4k (4 heads of 64, 2 threads); they now read
#: strided views (:func:`_strided`), which copy nothing.
PER_HEAD_SHARE = 1 / 8


def _per_head(visible: torch.Tensor, union: int):
    """For a per-head pattern whose heads read different, few keys: ``(idx, valid)``, each head's read keys
    ``(Hq, n)`` padded to the most any head reads, or None when that is over :data:`PER_HEAD_SHARE` of the
    union (one shared read of the union with a mask is then cheaper)."""
    per = visible.any(1)  # (Hq, Nk)
    counts = per.sum(-1)
    n = int(counts.max())
    if visible.shape[0] == 1 or n == 0 or n > PER_HEAD_SHARE * union:
        return None
    rows, cols = per.nonzero(as_tuple=True)  # row-major: each head's keys in order
    slot = torch.arange(len(rows), device=rows.device) - (counts.cumsum(0) - counts)[rows]
    idx = torch.zeros(per.shape[0], n, dtype=torch.long, device=rows.device)
    valid = torch.zeros(per.shape[0], n, dtype=torch.bool, device=rows.device)
    idx[rows, slot], valid[rows, slot] = cols, True
    return idx, valid


def _rows(t: torch.Tensor, kv_head: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``t[:, kv_head[h], idx[h]]`` for every query head ``h``: ``(B, Hq, n, D)``. One ``index_select`` over the
    flattened rows (11x faster than advanced indexing: 0.19 against 2.1 ms for 4 heads of 8k rows at 32k)."""
    B, Hk, N, D = t.shape
    if not t.is_contiguous():
        return t[:, kv_head[:, None], idx]
    base = (torch.arange(B, device=t.device)[:, None, None] * Hk + kv_head[None, :, None]) * N
    return t.view(B * Hk * N, D).index_select(0, (base + idx[None]).flatten()).view(B, len(kv_head), -1, D)


def _strided(req: Request):
    """For a pattern whose heads read strided keys below some ``stop`` (:meth:`Pattern.strided_keys`):
    ``(keys, chunks)``, with ``chunks`` the runs ``(h0, h1, kv_stride)`` of query heads whose first strided key
    lies a fixed distance apart in ``k`` (and ``v``: both must share strides), so each run reads one
    :func:`torch.as_strided` view; else None."""
    pat, d, k, v = req.pattern, req.dims, req.k, req.v
    sk = None if pat is None else pat.strided_keys(req.q_offset, d.kv_len)
    if sk is None or sk.stop < sk.stride or k.stride() != v.stride() or len(sk.offsets) != d.q_heads:
        return None
    _, sh, sn, _ = k.stride()
    at = [(h // d.group) * sh + sk.offsets[h] * sn for h in range(d.q_heads)]
    chunks, h0 = [], 0
    for h in range(1, d.q_heads + 1):
        if h == d.q_heads or at[h] < at[h - 1] or (h - h0 > 1 and at[h] - at[h - 1] != at[h0 + 1] - at[h0]):
            chunks.append((h0, h, at[h0 + 1] - at[h0] if h - h0 > 1 else 0))
            h0 = h
    return sk, chunks


def _strided_view(t: torch.Tensor, req: Request, sk, h0: int, h1: int, head_stride: int) -> torch.Tensor:
    """``(B, h1 - h0, stop // stride, D)``: query head ``h``'s strided keys (or values) of its KV head, a view."""
    b, _, n, dd = t.stride()
    first = (h0 // req.dims.group) * t.stride(1) + sk.offsets[h0] * n
    shape = (t.shape[0], h1 - h0, sk.stop // sk.stride, t.shape[3])
    return t.as_strided(shape, (b, head_stride, sk.stride * n, dd), t.storage_offset() + first)


def _plan(req: Request):
    """``(visible, keys, exact, heads, strided)``: the step's rows of the pattern, the keys any query reads and
    whether all of them are visible (:func:`_read`), their per-head gather where each head reads few keys of its
    own (:func:`_per_head`; else None), and the strided reads (:func:`_strided`; else None: then ``visible``
    covers keys from ``stop`` on)."""
    strided = _strided(req)
    if strided is not None:
        d, stop = req.dims, strided[0].stop
        visible = req.pattern.dense_mask(d.q_len, d.kv_len, req.q_offset, d.q_heads, req.device, kv_start=stop)
        return visible, slice(stop, d.kv_len), False, None, strided
    visible = _visible(req)
    keys, exact = _read(visible, req.dims.kv_len)
    return visible, keys, exact, None if visible is None else _per_head(visible, _count(keys)), None


def run(req: Request):
    """``(out, lse or None)``; the caller has checked :func:`why_not`."""
    q, k, v, d = req.q, req.k, req.v, req.dims
    B, Hq, Nq, Hk, g = d.batch, d.q_heads, d.q_len, d.kv_heads, d.group
    cd = torch.float64 if q.dtype == torch.float64 else torch.float32
    visible, keys, exact, heads, strided = _plan(req)
    # Every op here costs a few microseconds of dispatch, about what SDPA's whole 4k step costs: one query of a
    # head-independent pattern reads exactly its visible keys (unless a run is read with keys masked in it), so
    # it needs no mask, and without a mask or an lse to return one softmax call replaces the log-sum-exp and the
    # exponential.
    one_row = Nq == 1 and visible is not None and visible.shape[0] == 1 and exact
    # With strided reads every row sees its strided keys, so no row is empty unless padding drops them; nor is
    # the one row of a head-independent pattern whose keys read are not none.
    whole = Nq == 1 and visible is not None and visible.shape[0] == 1 and strided is None and _count(keys) > 0
    full_rows = (strided is not None or whole) and req.key_padding_mask is None
    if heads is not None:  # (B, Hq, n, D): query head h gathers its own keys from KV head h // g
        idx, valid = heads
        kv_head = torch.arange(Hq, device=q.device) // g
        kr, vr, pos = _rows(k, kv_head, idx), _rows(v, kv_head, idx), idx[:, None, :]  # pos: (Hq, 1, n)
        s = torch.matmul(q, kr.transpose(-1, -2))
        mask = (torch.gather(visible, 2, idx[:, None, :].expand(-1, Nq, -1)) & valid[:, None, :])[None]
        kp_at = idx
    else:  # (B, Hk, g * Nq, D): a KV head's query heads are rows of one product
        if isinstance(keys, slice):
            kr, vr, pos = k[:, :, keys], v[:, :, keys], None
        else:  # one index_select along the keys: also fast on a strided view of a cache's buffer
            kr, vr, pos = k.index_select(2, keys), v.index_select(2, keys), keys
        s = torch.matmul(q.reshape(B, Hk, g * Nq, -1), kr.transpose(-1, -2)).view(B, Hq, Nq, -1)
        mask = None if visible is None or one_row or strided else visible[..., keys][None]  # (1, G, Nq, n)
        if pos is None and (req.score is not None or req.key_padding_mask is not None):
            pos = torch.arange(keys.start, keys.stop, device=q.device)
        if strided is not None:  # the strided keys go first: (B, Hq, Nq, m + n), a view per run of heads
            sk, chunks = strided
            parts = [
                torch.matmul(q[:, h0:h1], _strided_view(k, req, sk, h0, h1, st).transpose(-1, -2))
                for h0, h1, st in chunks
            ]
            s = torch.cat([*parts, s], -1) if len(parts) == 1 else torch.cat([torch.cat(parts, 1), s], -1)
            m = sk.stop // sk.stride
            mask = torch.cat([visible.new_ones(1, Hq, Nq, m), visible[None]], -1)  # visible: keys from stop on
            if pos is not None:
                off = torch.tensor(sk.offsets, device=q.device)[:, None]
                mine = off + sk.stride * torch.arange(m, device=q.device)
                pos = torch.cat([mine, pos.expand(Hq, -1)], -1)  # (Hq, m + n)
        kp_at, pos = pos, None if pos is None else (pos[:, None, :] if pos.dim() == 2 else pos[None, None, :])
    s = s.to(cd) * req.scale_or_default
    bad = not all_finite(s)  # before any masking: a bad read key or query shows here
    if req.score is not None:
        h = torch.arange(Hq, device=q.device)[:, None, None]
        qi = torch.arange(req.q_offset, req.q_offset + Nq, device=q.device)[None, :, None]
        s = s + req.score.score_mod(torch.zeros((), dtype=cd, device=q.device), 0, h, qi, pos).to(cd)
    if req.key_padding_mask is not None:
        kp = req.key_padding_mask[:, kp_at]  # (B, n) or (B, Hq, n)
        kp = kp[:, None, None, :] if kp.dim() == 2 else kp[:, :, None, :]
        mask = kp if mask is None else mask & kp
    lse = None
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    if (mask is None or full_rows) and not req.return_lse:
        p = torch.softmax(s, -1).to(v.dtype)  # no row is empty
    else:
        lse = torch.logsumexp(s, -1, keepdim=True)  # -inf on a row with no key
        p = torch.exp(s - lse.clamp_min(torch.finfo(cd).min)).to(v.dtype)  # a row with no key: exp(-inf) = 0
    if heads is not None:
        out = torch.matmul(p, vr)
    elif strided is None:
        out = torch.matmul(p.view(B, Hk, g * Nq, -1), vr).view(B, Hq, Nq, -1)
    else:
        pt = p[..., m:].reshape(B, Hk, g * Nq, -1)
        out = torch.matmul(pt, vr).view(B, Hq, Nq, -1)
        mine = [torch.matmul(p[:, h0:h1, :, :m], _strided_view(v, req, sk, h0, h1, st)) for h0, h1, st in chunks]
        out = out + (mine[0] if len(mine) == 1 else torch.cat(mine, 1))
    if bad:
        out = torch.full_like(out, float("nan"))  # the caller's check names the first bad input
    return out, (lse.squeeze(-1) if req.return_lse else None)


def describe(req: Request) -> dict:
    """``keys_read``: the keys the step's products run over (per head for a per-head gather), ``of`` the cache."""
    _, keys, _, heads, strided = _plan(req)
    read = _count(keys)
    if strided is not None:
        read += strided[0].stop // strided[0].stride
    return {"keys_read": read if heads is None else heads[0].shape[1], "of": req.dims.kv_len}
