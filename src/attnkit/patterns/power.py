"""PowerAttention: a local window plus keys at power-of-two distances (causal).

Paper: "PowerAttention: Exponentially Scaling of Receptive Fields for Effective Sparse Attention"
(Chen et al., 2025). After ``L`` layers a token's receptive field reaches ``2^L`` tokens, complete and
continuous. The paper works on blocks; this is the token-level form: query ``i`` sees ``j`` when
``d = i - j >= 0`` and ``d < window`` or ``d`` is a power of two.

Picture, ``Power(window=1)`` on 8 tokens::

    #.......
    ##......
    ###.....
    .###....
    #.###...
    .#.###..
    ..#.###.
    ...#.###
"""

from __future__ import annotations

from dataclasses import dataclass

from ..records import SEQUENCE, register, window_size
from .base import Pattern, _require_int

__all__ = ["Power"]

@dataclass(frozen=True)
class Power(Pattern):
    """Causal local window of ``window`` keys plus every key at a power-of-two distance."""

    window: int = 64

    causal = True

    def __post_init__(self):
        _require_int("window", self.window)

    def mask_mod(self, b, h, q_idx, kv_idx):
        d = q_idx - kv_idx
        pow2 = (d > 0) & ((d & (d - 1)) == 0)
        return (d >= 0) & ((d < self.window) | pow2)


register(
    "power",
    family="A",
    kind="pattern",
    paper="PowerAttention: Exponentially Scaling of Receptive Fields for Effective Sparse Attention (2025)",
    exact=True,
    supports=SEQUENCE | {"causal"},
    factory=lambda n: Power(window=window_size(n, 16, 128)),
    summary="causal window min(n/16, 128) + power-of-2 distances",
    source=Power,
)
