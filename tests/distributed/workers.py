"""What each rank runs in the context-parallel tests (module level, so that spawned processes can import it).

Each worker builds the whole problem from a seed on every rank, runs single-process attnkit on it (the truth)
and the context-parallel call on this rank's shard, and returns the largest differences of the output and of
the three gradients on its shard."""

from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist

import attnkit as ak
from attnkit import layers
from attnkit.distributed import (
    DistributedError,
    context_parallel_attention,
    context_parallel_linear_attention,
    record_traffic,
    shard,
)


def _qkv(seed, B, H, Hk, N, D, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, h, N, D, generator=g, dtype=dtype) for h in (H, Hk, Hk)]


def _cut(x, lengths, rank, dim=2):
    """This rank's part of ``x`` for explicit contiguous ``lengths``."""
    start = sum(lengths[:rank])
    return x.narrow(dim, start, lengths[rank])


def compare(rank, world, inputs, ref_fn, cp_fn, cut):
    """Max |difference| of the output and the q, k, v gradients on this rank's shard."""
    ref_in = [t.clone().requires_grad_() for t in inputs]
    ref = ref_fn(*ref_in)
    dout = torch.randn(ref.shape, generator=torch.Generator().manual_seed(99), dtype=ref.dtype)
    ref.backward(dout)
    loc = [cut(t).clone().requires_grad_() for t in inputs]
    out = cp_fn(*loc)
    out.backward(cut(dout))
    errs = [(out - cut(ref)).abs().max().item()]
    errs += [(a.grad - cut(r.grad)).abs().max().item() for a, r in zip(loc, ref_in, strict=True)]
    return max(errs)


def every_pattern(rank, world, balance):
    """Every registered static pattern (family A), at its own size: ``{name: max error}``."""
    out = {}
    for rec in ak.registry.records(kind="pattern"):
        pat = rec.make(96)
        n = pat.fixed_length or 96
        q, k, v = _qkv(1, 1, 4, 2, n, 8)

        def cut(t, dim=2):
            return shard(t, dim=dim, balance=balance)

        out[rec.name] = compare(
            rank,
            world,
            (q, k, v),
            lambda q, k, v, p=pat: ak.attention(q, k, v, pattern=p),
            lambda q, k, v, p=pat: context_parallel_attention(q, k, v, pattern=p, balance=balance),
            cut,
        )
    return out


def features(rank, world):
    """Score mods at global positions, q_offset, uneven shards, GQA, padding with fully masked rows, both
    strategies, a document (block-causal span) mask: ``{case: max error}``."""
    lengths = [37, 90, 13, 60][:world]
    n = sum(lengths)
    q, k, v = _qkv(2, 2, 4, 2, n, 8)
    kpm = torch.rand(2, n, generator=torch.Generator().manual_seed(3)) > 0.3
    kpm[1] = False  # batch row 1: no real key, every query of it is fully masked

    def cut(t):
        return _cut(t, lengths, rank)

    SW = ak.patterns.SlidingWindow
    cases = {
        "alibi_window_ring": dict(pattern=SW(left=40, right=0), score=ak.scores.ALiBi(4), strategy="ring"),
        "softcap_causal_allgather": dict(causal=True, score=ak.scores.Softcap(5.0), strategy="allgather"),
        "q_offset_window": dict(pattern=SW(left=50, right=0), q_offset=7),
        "dense_noncausal": dict(),
        "a_shape": dict(pattern=ak.patterns.AShape(sinks=3, window=25)),
        "symmetric_window_padding": dict(pattern=SW(left=30, right=30), padded=True),
    }
    out = {}
    for name, kw in cases.items():
        kw = dict(kw)
        pad = kpm if kw.pop("padded", False) else None
        strategy = kw.pop("strategy", "auto")
        if "q_offset" in kw:
            out[name] = _q_offset_case(rank, lengths, q, k, v, kw)
            continue

        def ref(q, k, v, kw=kw, pad=pad):
            return ak.attention(q, k, v, key_padding_mask=pad, **kw)

        def cp(q, k, v, kw=kw, pad=pad, strategy=strategy):
            mask = None if pad is None else _cut(pad, lengths, rank, 1)
            return context_parallel_attention(q, k, v, key_padding_mask=mask, strategy=strategy, **kw)

        out[name] = compare(rank, world, (q, k, v), ref, cp, cut)
    # fully masked rows: output 0 and lse -inf, as everywhere
    o, lse = context_parallel_attention(
        cut(q),
        cut(k),
        cut(v),
        pattern=SW(left=30, right=30),
        key_padding_mask=_cut(kpm, lengths, rank, 1),
        return_lse=True,
    )
    out["masked_rows_zero"] = float(o[1].abs().max()) + float(~torch.isneginf(lse[1]).all())
    return out


def _q_offset_case(rank, lengths, q, k, v, kw):
    """``q_offset = s``: the queries are at positions ``s..`` and the keys at ``0..n-1``. One process needs
    ``q_offset + Nq <= Nk``, so the truth runs over ``n + s`` keys whose last ``s`` are padding."""
    s = kw["q_offset"]
    pat = kw["pattern"]
    n = q.shape[2]
    ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
    qi, ki, vi = ref_in
    kpad = torch.cat([ki, torch.zeros_like(ki[:, :, :s])], 2)
    vpad = torch.cat([vi, torch.zeros_like(vi[:, :, :s])], 2)
    real = torch.ones(q.shape[0], n + s, dtype=torch.bool)
    real[:, n:] = False
    ref = ak.attention(qi, kpad, vpad, pattern=pat, q_offset=s, key_padding_mask=real)
    dout = torch.randn(ref.shape, generator=torch.Generator().manual_seed(5), dtype=ref.dtype)
    ref.backward(dout)
    loc = [_cut(t, lengths, rank).clone().requires_grad_() for t in (q, k, v)]
    out = context_parallel_attention(*loc, pattern=pat, q_offset=s)
    out.backward(_cut(dout, lengths, rank))
    errs = [(out - _cut(ref, lengths, rank)).abs().max().item()]
    errs += [(a.grad - _cut(r.grad, lengths, rank)).abs().max().item() for a, r in zip(loc, ref_in, strict=True)]
    return max(errs)


def block_selector(rank, world):
    """MInference's block-sparse selector (BlockTopK) across ranks: error and the bytes it moved."""
    n = 1024
    q, k, v = _qkv(4, 1, 4, 2, n, 16)
    sel = ak.sparse.BlockTopK(block_size=32, budget=2, share_group=True)
    with record_traffic() as t:
        err = compare(
            rank,
            world,
            (q, k, v),
            lambda q, k, v: ak.attention(q, k, v, pattern=sel, causal=True),
            lambda q, k, v: context_parallel_attention(q, k, v, pattern=sel, causal=True),
            lambda t: shard(t),
        )
    return {"error": err, "sent": t.sent, "collective": t.collective}


def linear(rank, world):
    """Causal linear attention by the prefix scan of states, with decays and every normaliser."""
    lengths = [50, 120, 31, 99][:world]
    n = sum(lengths)
    q, k, v = _qkv(6, 2, 4, 2, n, 8)
    kpm = torch.rand(2, n, generator=torch.Generator().manual_seed(7)) > 0.2
    out = {}
    cases = {
        "elu_sum": dict(),
        "retnet_decay": dict(decay=ak.linear.retnet_decay(4), normalize=False, scale=8**-0.5),
        "inline": dict(normalize="inline"),
        "mala_decay": dict(normalize="mala", decay=0.97),
        "rms_relu": dict(normalize="rms", feature_map="relu"),
    }
    for name, kw in cases.items():
        out[name] = compare(
            rank,
            world,
            (q, k, v),
            lambda q, k, v, kw=kw: ak.linear.linear_attention(q, k, v, key_padding_mask=kpm, **kw),
            lambda q, k, v, kw=kw: context_parallel_linear_attention(
                q, k, v, key_padding_mask=_cut(kpm, lengths, rank, 1), **kw
            ),
            lambda t: _cut(t, lengths, rank),
        )
    return out


def window_traffic(rank, world, n, window):
    """Bytes a causal window sends per peer (counted), and the row bytes to check them against."""
    q, k, v = _qkv(8, 1, 2, 2, n, 16, torch.float32)
    pat = ak.patterns.SlidingWindow(left=window - 1, right=0)
    with record_traffic() as t:
        context_parallel_attention(shard(q), shard(k), shard(v), pattern=pat, strategy="ring")
    row = 2 * 2 * 16 * 4  # K and V rows of 2 heads x 16 dims in float32
    return {"per_peer": t.per_peer, "received": t.received, "row_bytes": row}


class FailOn(ak.scores.ScoreMod):
    """A user score mod that raises on one rank, in the middle of the call (after the exchange is posted)."""

    def __init__(self, rank: int):
        self.rank = rank

    def score_mod(self, score, b, h, q_idx, kv_idx):
        if dist.get_rank() == self.rank:
            raise RuntimeError("a user score_mod failed")
        return score

    def __hash__(self):
        return hash(("FailOn", self.rank))


def failure(rank, world, how, timeout):
    """Run a call where rank 1 fails (``raise``: its score mod raises; ``die``: the process exits; ``bad``: its
    input has the wrong shape); return what this rank raised and after how long."""
    q, k, v = _qkv(9, 1, 2, 2, 64, 8, torch.float32)
    t0 = time.perf_counter()
    try:
        if how == "raise":
            context_parallel_attention(q, k, v, causal=True, score=FailOn(1), timeout=timeout)
        elif how == "die":
            if rank == 1:
                os._exit(3)
            context_parallel_attention(q, k, v, causal=True, timeout=timeout)
        elif how == "bad":
            context_parallel_attention(q if rank != 1 else q[..., :4], k, v, causal=True, timeout=timeout)
        elif how == "backward":
            x = q.clone().requires_grad_()
            out = context_parallel_attention(x, k, v, causal=True, timeout=timeout)
            if rank == 1:
                raise SystemExit(0)  # rank 1 never runs the backward: the others must not hang in it
            out.sum().backward()
    except DistributedError as e:
        return {"type": "DistributedError", "message": str(e), "seconds": time.perf_counter() - t0}
    except Exception as e:  # noqa: BLE001 - the failing rank's own error is reported as it is
        return {"type": type(e).__name__, "message": str(e), "seconds": time.perf_counter() - t0}
    return {"type": None, "seconds": time.perf_counter() - t0}


def layer_parallel(rank, world, mechanism, balance):
    """A context-parallel Attention layer against the same layer on one process: outputs and the parameter
    gradients (summed over ranks, as DDP does)."""
    torch.manual_seed(0)
    one = layers.Attention(32, 4, kv_heads=2, mechanism=mechanism, rope=True).double()
    torch.manual_seed(0)
    layer = layers.Attention(
        32, 4, kv_heads=2, mechanism=mechanism, rope=True, process_group=dist.group.WORLD, cp_balance=balance
    ).double()
    x = torch.randn(2, 128, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref = one(x)
    ref.square().sum().backward()
    out = layer(shard(x, dim=1, balance=balance))
    out.square().sum().backward()
    err = (out - shard(ref, dim=1, balance=balance)).abs().max().item()
    for p_one, p in zip(one.parameters(), layer.parameters(), strict=True):
        g = p.grad.clone()
        dist.all_reduce(g)
        err = max(err, (g - p_one.grad).abs().max().item())
    return err


def low_precision(rank, world, dtype_name):
    """bf16 / fp32 by the 2x-naive rule: the context-parallel error against the float64 oracle is at most twice
    single-process attnkit's in the same dtype (outputs and gradients), per case."""
    dtype = getattr(torch, dtype_name)
    n = 256
    q, k, v = _qkv(11, 1, 4, 2, n, 16)
    dout = torch.randn(1, 4, n, 16, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    out = {}
    for name, kw in {
        "causal": dict(causal=True),
        "window": dict(pattern=ak.patterns.SlidingWindow(left=63, right=0)),
    }.items():

        def run(fn, inputs, kw=kw):
            x = [t.clone().requires_grad_() for t in inputs]
            o = fn(*x, **kw)
            o.backward(dout.to(o.dtype) if o.shape == dout.shape else shard(dout).to(o.dtype))
            return [o.double()] + [t.grad.double() for t in x]

        oracle = run(lambda q, k, v, **kw: ak.attention(q, k, v, backend="reference", **kw), (q, k, v))
        one = run(ak.attention, [t.to(dtype) for t in (q, k, v)])
        cp = run(context_parallel_attention, [shard(t).to(dtype) for t in (q, k, v)])
        ratios = []
        for o, s1, c in zip(oracle, one, cp, strict=True):
            e1 = (shard(s1) - shard(o)).abs().max().item()
            ec = (c - shard(o)).abs().max().item()
            ratios.append(ec / max(e1, torch.finfo(dtype).eps))
        out[name] = max(ratios)
    return out
