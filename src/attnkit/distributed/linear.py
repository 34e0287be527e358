r"""Causal linear attention across ranks: the recurrent state is passed on, as a prefix scan of the ranks' states.

Rank ``r`` holds a contiguous part of the sequence (ranks in order of position). Its queries see its own keys
and, through the state, every earlier rank's. With :math:`S_s` the state rank ``s``'s keys alone reach
(:func:`attnkit.linear.linear_state`, ``O(n F Dv)``, no output computed) and :math:`n_t` the ranks' lengths,
the state entering rank ``r`` is the exclusive prefix scan

.. math:: P_r = \sum_{s<r} \gamma^{\sum_{s<t<r} n_t}\, S_s

(:math:`\gamma = 1` without a decay), gathered in one all-gather of the ``W`` states (``F x (Dv + 1)`` per head,
independent of the sequence length) and run by :func:`attnkit.linear.linear_attention` as its
``initial_state``. The result equals one process's call over the whole sequence; gradients flow back into every
earlier rank's keys and values through the all-gather's backward (an all-reduce of the states' gradients).
"""

from __future__ import annotations

import torch

from ..errors import AttnkitError, DTypeError, ShapeError, bad
from ..linear import LinearState, linear_attention, linear_state
from ..linear.engine import _log_decay
from ._comm import Group, agree, guarded


class _AllGather(torch.autograd.Function):
    """Stack every rank's ``x`` ``(W, *x.shape)``; the backward sums the gradients over ranks and keeps ours."""

    @staticmethod
    def forward(ctx, x, group: Group):
        ctx.group = group
        return torch.stack(group.all_gather(x, "the all-gather of the linear states"))

    @staticmethod
    def backward(ctx, grad):
        g = ctx.group
        return g.all_reduce_sum(grad, "the all-reduce of the linear states' gradients")[g.rank], None


def context_parallel_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    feature_map="elu+1",
    decay=None,
    normalize=True,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    chunk_size: int = 64,
    group=None,
    timeout: float | None = None,
) -> torch.Tensor:
    """Causal :func:`attnkit.linear.linear_attention` over a sequence split into contiguous shards, one per rank
    in rank order (any lengths); each rank passes its shard ``(B, H, n_r, D)`` and gets its rows of the output.
    The arguments are those of :func:`~attnkit.linear.linear_attention` (causal). See the module docstring."""
    g = Group.of(group, timeout)
    error, meta = None, [0] * 6
    try:
        if not isinstance(q, torch.Tensor) or not isinstance(k, torch.Tensor) or not isinstance(v, torch.Tensor):
            raise DTypeError(bad("q, k, v", "tensors", (type(q).__name__, type(k).__name__, type(v).__name__)))
        if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or q.shape[2] != k.shape[2]:
            raise ShapeError(
                bad("q, k, v", "(B, H, n_r, D) shards of the same n_r tokens", (q.shape, k.shape, v.shape))
            )
        st = linear_state(
            k,
            v,
            heads=q.shape[1],
            feature_map=feature_map,
            decay=decay,
            normalize=normalize,
            key_padding_mask=key_padding_mask,
        )
        meta = [q.shape[2], q.shape[0], q.shape[1], k.shape[1], v.shape[3], st.kv.shape[2]]
    except AttnkitError as e:
        error = e
    rows = agree(g, meta, error, "context_parallel_linear_attention")
    if len({tuple(r[1:].tolist()) for r in rows}) != 1:
        raise ShapeError(bad("q, k, v", "the same batch, heads and dims on every rank", rows.tolist()))
    lengths = rows[:, 0].tolist()
    with guarded(g, "context_parallel_linear_attention"):
        kv = _AllGather.apply(st.kv, g)
        tot = None if st.totals is None else _AllGather.apply(st.totals, g)
        logd = _log_decay(decay, q.shape[1], st.kv.dtype, q.device)
        # Every rank's state enters every rank's prefix (with weight 0 from itself and later ranks), so that the
        # all-gather is in every rank's graph and its collective backward runs on every rank.
        r, W = g.rank, g.size
        between = torch.tensor([sum(lengths[s + 1 : r]) for s in range(W)], dtype=kv.dtype)
        earlier = (torch.arange(W) < r).to(kv.dtype)
        if logd is None:
            w = earlier.view(W, 1, 1, 1, 1).expand(W, 1, q.shape[1], 1, 1)
        else:
            w = (torch.exp(between[:, None] * logd[None, :]) * earlier[:, None]).view(W, 1, -1, 1, 1)
        prefix = (kv * w).sum(0)
        tprefix = None if tot is None else (tot * w).sum(0)
        state = LinearState(prefix, tprefix, sum(lengths[:r])) if r else None
        if state is None:
            out_dep = prefix.sum() * 0 + (0 if tprefix is None else tprefix.sum() * 0)
        out = linear_attention(
            q,
            k,
            v,
            feature_map=feature_map,
            decay=decay,
            normalize=normalize,
            causal=True,
            chunk_size=chunk_size,
            initial_state=state,
            key_padding_mask=key_padding_mask,
            scale=scale,
        )
        if state is None:
            out = out + out_dep
    return out
