"""Process-group plumbing for context parallelism: ranks, deadlines, byte counting and the agreement steps.

Every wait has a deadline (``timeout`` seconds): a peer that died or raised makes the others raise
:class:`DistributedError` instead of hanging. Each call starts with one small all-gather in which every rank
reports its shapes and whether its input is valid, so a bad input on one rank makes every rank raise the same
error, and ends with a one-integer all-reduce in which a rank that failed says so, so every rank raises.
"""

from __future__ import annotations

import contextlib
import datetime
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ..errors import AttnkitError, DTypeError, bad

DEFAULT_TIMEOUT = 120.0


class DistributedError(AttnkitError, RuntimeError):
    """A context-parallel call failed on another rank, or a peer did not answer within the timeout.

    Raised on every rank of the group. After it the group may hold unmatched messages: destroy it."""


@dataclass
class Traffic:
    """Bytes this rank moved while a :func:`record_traffic` block was open, counted from the tensors sent.

    ``sent`` / ``received``: point-to-point key/value payload (and its padding mask rows); ``per_peer``: bytes
    sent to each peer rank; ``collective``: bytes this rank contributed to collectives (the shape agreement, the
    all-gather strategy's shards, selector summaries, linear states); ``messages``: point-to-point sends."""

    sent: int = 0
    received: int = 0
    collective: int = 0
    messages: int = 0
    per_peer: dict = field(default_factory=dict)


_recorders: list[Traffic] = []


@contextlib.contextmanager
def record_traffic():
    """Count the bytes this process sends and receives in context-parallel calls inside the block.

    >>> with record_traffic() as t:
    ...     out = context_parallel_attention(q, k, v, pattern=SlidingWindow(255, 0))
    >>> t.sent, t.per_peer
    """
    t = Traffic()
    _recorders.append(t)
    try:
        yield t
    finally:
        _recorders.remove(t)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def count_send(peer: int, t: torch.Tensor) -> None:
    for r in _recorders:
        r.sent += _nbytes(t)
        r.messages += 1
        r.per_peer[peer] = r.per_peer.get(peer, 0) + _nbytes(t)


def count_recv(t: torch.Tensor) -> None:
    for r in _recorders:
        r.received += _nbytes(t)


def count_collective(t: torch.Tensor) -> None:
    for r in _recorders:
        r.collective += _nbytes(t)


@dataclass(frozen=True)
class Group:
    """The process group of a call: its rank and size, the global rank of each member, the deadline."""

    pg: object
    rank: int
    size: int
    timeout: float

    @staticmethod
    def of(group, timeout) -> Group:
        if not dist.is_available() or not dist.is_initialized():
            raise DistributedError(
                bad("group", "an initialised torch.distributed process group (dist.init_process_group)", "none")
            )
        if timeout is None:
            timeout = DEFAULT_TIMEOUT
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise DTypeError(bad("timeout", "a positive number of seconds or None", repr(timeout)))
        return Group(group, dist.get_rank(group), dist.get_world_size(group), float(timeout))

    def global_rank(self, r: int) -> int:
        return r if self.pg is None else dist.get_global_rank(self.pg, r)

    @contextlib.contextmanager
    def peer_errors(self, what: str):
        """gloo raises a RuntimeError on a timeout or a closed peer connection, when an operation is waited on and
        also when it is issued (a peer that died between two calls): both become a :class:`DistributedError`."""
        try:
            yield
        except DistributedError:
            raise
        except Exception as e:
            why = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
            raise DistributedError(
                f"rank {self.rank}: {what} failed (a peer died, failed, or is not making the same call; "
                f"each wait is limited to {self.timeout:g} s): {why.split('] ')[-1]}"
            ) from None

    def wait(self, work, what: str) -> None:
        with self.peer_errors(what):
            ok = work.wait(timeout=datetime.timedelta(seconds=self.timeout))
        if ok is False:
            raise DistributedError(f"rank {self.rank}: {what} did not complete within {self.timeout:g} s")

    def all_gather(self, t: torch.Tensor, what: str) -> list[torch.Tensor]:
        t = t.contiguous()
        outs = [torch.empty_like(t) for _ in range(self.size)]
        count_collective(t)
        with self.peer_errors(what):  # issued and waited on: a peer may be gone at either
            self.wait(dist.all_gather(outs, t, group=self.pg, async_op=True), what)
        return outs

    def all_reduce_max(self, t: torch.Tensor, what: str) -> torch.Tensor:
        t = t.clone()
        count_collective(t)
        with self.peer_errors(what):  # issued and waited on: a peer may be gone at either
            self.wait(dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.pg, async_op=True), what)
        return t

    def all_reduce_sum(self, t: torch.Tensor, what: str) -> torch.Tensor:
        t = t.contiguous().clone()
        count_collective(t)
        with self.peer_errors(what):  # issued and waited on: a peer may be gone at either
            self.wait(dist.all_reduce(t, group=self.pg, async_op=True), what)
        return t

    def isend(self, t: torch.Tensor, peer: int, tag: int):
        count_send(peer, t)
        with self.peer_errors(f"a send to rank {peer}"):
            return dist.isend(t, self.global_rank(peer), group=self.pg, tag=tag)

    def irecv(self, t: torch.Tensor, peer: int, tag: int):
        count_recv(t)
        with self.peer_errors(f"a receive from rank {peer}"):
            return dist.irecv(t, self.global_rank(peer), group=self.pg, tag=tag)


def agree(group: Group, meta: list[int], error: BaseException | None, what: str) -> torch.Tensor:
    """All-gather every rank's ``meta`` (ints, the same length on every rank) and its input error flag.

    Returns ``(size, len(meta))``. If any rank reported an error, every rank raises: the rank with the error
    re-raises its own message, the others a :class:`DistributedError` naming it."""
    row = torch.tensor([0 if error is None else 1, len(meta), *meta], dtype=torch.long)
    width = torch.tensor([row.numel()], dtype=torch.long)
    widths = group.all_gather(width, what)
    if len({int(w) for w in widths}) != 1:
        raise DistributedError(f"rank {group.rank}: the ranks are not making the same {what} call")
    rows = torch.stack(group.all_gather(row, what))
    failed = [r for r in range(group.size) if rows[r, 0]]
    if failed:
        if error is not None:
            raise error
        raise DistributedError(f"rank {group.rank}: {what} refused on rank(s) {failed} (see their error)")
    return rows[:, 2:]


def finish(group: Group, failed: bool, what: str) -> None:
    """The closing agreement: every rank says whether its part failed; any failure raises on every rank."""
    flag = torch.tensor([group.rank + 1 if failed else 0], dtype=torch.long)
    got = int(group.all_reduce_max(flag, what)[0])
    if got and not failed:
        raise DistributedError(f"rank {group.rank}: {what} failed on rank {got - 1} (see its error)")


@contextlib.contextmanager
def guarded(group: Group, what: str):
    """Run a call's body so that a failure on any rank raises on every rank within the timeout."""
    try:
        yield
    except BaseException:
        with contextlib.suppress(Exception):
            finish(group, True, what)
        raise
    finish(group, False, what)
