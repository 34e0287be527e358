"""Global tokens, attention sinks and the A-shape.

* ``Sinks(n)``: every query also sees the first ``n`` keys (StreamingLLM's attention sinks, "Efficient
  Streaming Language Models with Attention Sinks", Xiao et al., 2023). Combine with a window.
* ``GlobalTokens(n)``: the first ``n`` tokens are global both ways: every query sees them and they see every
  key (Longformer/BigBird-style global tokens).
* ``AShape(sinks, window)``: causal, the first ``sinks`` keys plus a causal window of ``window`` keys (the
  "A-shape" of MInference and StreamingLLM's prefill pattern).

Picture, ``AShape(sinks=1, window=2)`` on 8 tokens::

    #.......
    ##......
    ###.....
    #.##....
    #..##...
    #...##..
    #....##.
    #.....##
"""

from __future__ import annotations

from dataclasses import dataclass

from ..records import SEQUENCE, register, window_size
from .base import Pattern, _require_int
from .sliding_window import SlidingWindow

__all__ = ["AShape", "GlobalTokens", "Sinks"]

@dataclass(frozen=True)
class Sinks(Pattern):
    """Keys ``0 .. n-1`` are visible to every query. Not causal by itself: ``Sinks(n) & Causal()`` is."""

    n: int = 4

    def __post_init__(self):
        _require_int("n", self.n)

    def mask_mod(self, b, h, q_idx, kv_idx):
        return (kv_idx < self.n) & (q_idx >= 0)


@dataclass(frozen=True)
class GlobalTokens(Pattern):
    """The first ``n`` tokens attend to everything and are attended by everything."""

    n: int = 4

    def __post_init__(self):
        _require_int("n", self.n)

    def mask_mod(self, b, h, q_idx, kv_idx):
        return (kv_idx < self.n) | (q_idx < self.n)


@dataclass(frozen=True)
class AShape(Pattern):
    """Causal attention to ``sinks`` initial keys plus the last ``window`` keys (query included)."""

    sinks: int = 4
    window: int = 256

    causal = True

    def __post_init__(self):
        _require_int("sinks", self.sinks)
        _require_int("window", self.window)

    def mask_mod(self, b, h, q_idx, kv_idx):
        d = q_idx - kv_idx
        return (d >= 0) & ((kv_idx < self.sinks) | (d < self.window))


register(
    "global_tokens",
    family="A",
    kind="pattern",
    paper="Longformer (global attention); BigBird (2020)",
    exact=True,
    supports=SEQUENCE,
    factory=lambda n: GlobalTokens(4) | SlidingWindow(window_size(n, 16, 128), window_size(n, 16, 128)),
    summary="4 global tokens + symmetric window min(n/16, 128)",
    source=GlobalTokens,
)

register(
    "a_shape",
    family="A",
    kind="pattern",
    paper="Efficient Streaming Language Models with Attention Sinks (StreamingLLM, 2023)",
    exact=True,
    supports=SEQUENCE | {"causal"},
    factory=lambda n: AShape(sinks=4, window=window_size(n, 8, 256)),
    summary="4 sinks + causal window min(n/8, 256)",
    source=AShape,
)
