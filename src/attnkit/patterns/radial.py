"""Radial attention: a spatial window that shrinks exponentially with temporal distance.

Paper: "Radial Attention: O(n log n) Sparse Attention with Energy Decay for Long Video Generation"
(Li et al., 2025). Tokens are ``num_frames`` frames of ``frame_tokens`` tokens (frame-major). For a
query at (frame ``t``, position ``s``) and a key at (``t'``, ``s'``), with ``dt = |t - t'|`` and band
``r = 0`` for ``dt = 0``, else ``r = floor(log2 dt) + 1``:

* the spatial half-width is ``window >> r`` (halved per band): visible when ``|s - s'| <= window >> r``;
* once the half-width reaches 0, only the same position (``s = s'``) is kept, and only on every
  ``2^(r - r0)``-th frame of the band (``dt % 2^(r - r0) == 0``, ``r0`` the first band of half-width 0), so
  the compute per band keeps halving.

This gives ``O(n log n)`` pairs. The abstract gives the decay but not the exact band rule: the rule above is
our reading of "exponentially decaying compute density" and is tested as written.

Picture, ``Radial(frame_tokens=2, num_frames=4, window=1)`` (8 tokens)::

    ###.#...
    ##.#.#..
    #.###.#.
    .###.#.#
    #.#.###.
    .#.###.#
    ..#.#.##
    ...#.###
"""

from __future__ import annotations

from dataclasses import dataclass

from ..records import SPATIAL, register
from .base import Pattern, _require_int

__all__ = ["Radial"]

@dataclass(frozen=True)
class Radial(Pattern):
    """Spatiotemporal mask whose spatial window halves with each doubling of the frame distance."""

    frame_tokens: int
    num_frames: int
    window: int = 8

    def __post_init__(self):
        _require_int("frame_tokens", self.frame_tokens)
        _require_int("num_frames", self.num_frames)
        _require_int("window", self.window, 0)

    @property
    def fixed_length(self) -> int:
        return self.frame_tokens * self.num_frames

    def mask_mod(self, b, h, q_idx, kv_idx):
        ft = self.frame_tokens
        dt = (q_idx // ft - kv_idx // ft).abs()
        ds = (q_idx % ft - kv_idx % ft).abs()
        band = dt * 0
        for j in range(max(self.num_frames, 1).bit_length() + 1):
            band = band + (dt >= (1 << j)).to(dt.dtype)
        width = self.window >> band
        r0 = self.window.bit_length()  # the first band whose half-width is 0
        step = 1 << (band - r0).clamp(min=0)
        wide = width > 0
        thin = (ds == 0) & (dt % step == 0)
        return (wide & (ds <= width)) | (~wide & thin)


register(
    "radial",
    family="A",
    kind="pattern",
    paper="Radial Attention: O(n log n) Sparse Attention with Energy Decay for Long Video Generation (2025)",
    exact=True,
    supports=SPATIAL,
    factory=lambda n: Radial(frame_tokens=max(4, n // 16), num_frames=16, window=max(1, n // 64)),
    summary="16 frames, spatial window halving with frame distance",
    source=Radial,
)
