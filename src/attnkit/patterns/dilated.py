"""Dilated sliding window: every ``dilation``-th key within a window of ``window`` taken keys.

Causal form (LongNet-style dilated window; the catalogue's "Dilated"): query ``i`` sees ``j = i - m * dilation``
for ``m = 0 .. window - 1``. Non-causal form: ``|i - j| = m * dilation`` with ``m < window`` on both sides.
``Dilated(w, 1)`` equals ``SlidingWindow(w - 1, 0)``.

Picture, ``Dilated(window=3, dilation=2)`` on 8 tokens::

    #.......
    .#......
    #.#.....
    .#.#....
    #.#.#...
    .#.#.#..
    ..#.#.#.
    ...#.#.#
"""

from __future__ import annotations

from dataclasses import dataclass

from ..records import SEQUENCE, register, window_size
from .base import Pattern, _require_int

__all__ = ["Dilated"]

@dataclass(frozen=True)
class Dilated(Pattern):
    """Keys at distances ``0, d, 2d, ..., (window - 1) d`` (both sides when ``causal=False``)."""

    window: int
    dilation: int = 2
    is_causal: bool = True

    def __post_init__(self):
        _require_int("window", self.window)
        _require_int("dilation", self.dilation)
        object.__setattr__(self, "causal", bool(self.is_causal))

    def mask_mod(self, b, h, q_idx, kv_idx):
        d = q_idx - kv_idx
        if not self.is_causal:
            d = d.abs()
        # A span past 2^62 reaches every key of any sequence int64 can index: the same rule, without overflow.
        span = min(self.window * self.dilation, 1 << 62)
        return (d >= 0) & (d % self.dilation == 0) & (d < span)


register(
    "dilated",
    family="A",
    kind="pattern",
    paper="LongNet: Scaling Transformers to 1,000,000,000 Tokens (2023)",
    exact=True,
    supports=SEQUENCE | {"causal"},
    factory=lambda n: Dilated(max(2, window_size(n, 16, 128)), 2),
    summary="every 2nd key over a span of min(n/8, 256)",
    source=Dilated,
)
