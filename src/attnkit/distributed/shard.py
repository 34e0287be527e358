"""Cutting a whole sequence into this rank's shard and putting the shards back together."""

from __future__ import annotations

import torch

from ..errors import ShapeError, bad
from ._comm import Group
from .plan import BALANCES, make_chunks, shard_lengths


def _check(x, dim, balance):
    if not isinstance(x, torch.Tensor):
        raise ShapeError(bad("x", "a tensor", type(x).__name__))
    if isinstance(dim, bool) or not isinstance(dim, int) or not -x.dim() <= dim < x.dim():
        raise ShapeError(bad("dim", f"a dimension of the {x.dim()}-D tensor", repr(dim)))
    if balance not in BALANCES:
        raise ShapeError(bad("balance", f"one of {BALANCES}", repr(balance)))
    return dim % x.dim()


def shard(
    x: torch.Tensor,
    *,
    dim: int = 2,
    balance: str = "contiguous",
    group=None,
    rank: int | None = None,
    world: int | None = None,
) -> torch.Tensor:
    """This rank's part of the whole sequence ``x`` along ``dim``: the rows :func:`context_parallel_attention`
    expects (``"contiguous"``: near-equal consecutive parts; ``"zigzag"``: chunks ``r`` and ``2W-1-r`` of ``2W``).
    ``rank`` / ``world`` default to the group's (pass both to cut without a process group)."""
    dim = _check(x, dim, balance)
    if rank is None or world is None:
        g = Group.of(group, None)
        rank, world = g.rank, g.size
    n = x.shape[dim]
    chunks = make_chunks(shard_lengths(n, world, balance), balance)
    return torch.cat([x.narrow(dim, c.start, c.length) for c in chunks if c.owner == rank], dim)


def local_positions(n_local: int, *, balance: str = "contiguous", group=None, timeout=None) -> torch.Tensor:
    """The global positions ``(n_local,)`` of this rank's tokens (for RoPE), from every rank's length."""
    g = Group.of(group, timeout)
    lengths = [int(t) for t in g.all_gather(torch.tensor([n_local]), "the all-gather of the shard lengths")]
    chunks = make_chunks(lengths, balance)
    return torch.cat([torch.arange(c.start, c.end) for c in chunks if c.owner == g.rank] or [torch.zeros(0).long()])


def unshard(x: torch.Tensor, *, dim: int = 2, balance: str = "contiguous", group=None, timeout=None) -> torch.Tensor:
    """The whole sequence from every rank's shard ``x`` (the inverse of :func:`shard`; an all-gather, no
    gradient)."""
    dim = _check(x, dim, balance)
    g = Group.of(group, timeout)
    lengths = [int(t) for t in g.all_gather(torch.tensor([x.shape[dim]]), "the all-gather of the shard lengths")]
    longest = max(lengths)
    pad = [0, 0] * (x.dim() - 1 - dim) + [0, longest - x.shape[dim]]
    parts = g.all_gather(torch.nn.functional.pad(x.detach(), pad), "the all-gather of the shards")
    chunks = make_chunks(lengths, balance)
    pieces = [parts[c.owner].narrow(dim, c.local, c.length) for c in chunks]
    return torch.cat(pieces, dim)
