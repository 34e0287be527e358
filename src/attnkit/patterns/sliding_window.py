"""Sliding-window (local, banded) attention.

Query ``i`` sees keys ``j`` with ``i - left <= j <= i + right``; the query itself always.
``SlidingWindow(left=255, right=0)`` is a causal window of 256 keys (Longformer / Mistral style);
``SlidingWindow(left=w, right=w)`` is symmetric. With ``q_offset`` the ``i`` is the absolute position.

Picture, ``SlidingWindow(2, 0)`` on 8 tokens::

    #.......
    ##......
    ###.....
    .###....
    ..###...
    ...###..
    ....###.
    .....###
"""

from __future__ import annotations

from dataclasses import dataclass

from ..records import SEQUENCE, register, window_size
from .base import Pattern, _require_int

__all__ = ["SlidingWindow"]

@dataclass(frozen=True)
class SlidingWindow(Pattern):
    """Local window of ``left`` keys before and ``right`` keys after each query (plus itself).

    Edges: near the start a query simply has fewer keys (the window is not shifted; compare
    :class:`~attnkit.patterns.Neighborhood`, which shifts it). A window longer than the sequence is legal
    (a prompt shorter than the model's window) and then equals causal (or full) attention; unlike a
    neighbourhood kernel, nothing about it is undefined.
    """

    left: int
    right: int = 0

    def __post_init__(self):
        _require_int("left", self.left, 0)
        _require_int("right", self.right, 0)
        object.__setattr__(self, "causal", self.right == 0)

    def mask_mod(self, b, h, q_idx, kv_idx):
        d = q_idx - kv_idx
        return (d <= self.left) & (d >= -self.right)


register(
    "sliding_window",
    family="A",
    kind="pattern",
    paper="Longformer (Beltagy et al., 2020); Mistral 7B",
    exact=True,
    supports=SEQUENCE | {"causal"},
    factory=lambda n: SlidingWindow(window_size(n, 8, 256) - 1, 0),
    summary="causal window of min(n/8, 256) keys",
    source=SlidingWindow,
)

register(
    "sliding_window_symmetric",
    family="A",
    kind="pattern",
    paper="Longformer (Beltagy et al., 2020)",
    exact=True,
    supports=SEQUENCE,
    factory=lambda n: SlidingWindow(window_size(n, 16, 128), window_size(n, 16, 128)),
    summary="window of min(n/16, 128) keys on each side",
    source=SlidingWindow,
)
