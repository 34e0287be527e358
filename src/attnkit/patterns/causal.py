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

from .base import Pattern


@dataclass(frozen=True)
class Causal(Pattern):
    """``kv_idx <= q_idx`` (absolute positions, so decode with ``q_offset`` is right)."""

    causal = True

    def mask_mod(self, b, h, q_idx, kv_idx):
        return kv_idx <= q_idx
