"""Causal attention: query ``i`` sees keys ``j <= i``.

Picture (8 x 8)::

    #.......
    ##......
    ###.....
    ####....
    #####...
    ######..
    #######.
    ########
"""

from __future__ import annotations

from dataclasses import dataclass

from ..records import SEQUENCE, register
from .base import Pattern

__all__ = ["Causal"]

@dataclass(frozen=True)
class Causal(Pattern):
    """``kv_idx <= q_idx`` (absolute positions, so decode with ``q_offset`` is right)."""

    causal = True

    def mask_mod(self, b, h, q_idx, kv_idx):
        return kv_idx <= q_idx


register(
    "causal",
    family="A",
    kind="pattern",
    paper="Attention Is All You Need (Vaswani et al., 2017)",
    exact=True,
    supports=SEQUENCE | {"causal"},
    factory=lambda n: Causal(),
    summary="kv <= q",
    source=Causal,
)
