"""Static attention patterns (family A): *which* query-key pairs interact.

Every pattern is a frozen dataclass with a FlexAttention-compatible ``mask_mod``, a dense mask for the
oracle, a cached :class:`~attnkit.layout.BlockLayout` for the tiled kernel, ``density()`` and ``flops()``.
Patterns compose with ``&``, ``|`` and :class:`PerHead`. A picture of every registered pattern:
``docs/patterns/README.md`` (drawn by ``attnkit pictures``).
"""

from .base import And, Full, Or, Pattern, PerHead, clear_cache
from .causal import Causal
from .dilated import Dilated
from .global_tokens import AShape, GlobalTokens, Sinks
from .halo import HaloBlocks
from .maxvit import BlockAxis, GridAxis
from .modality import BlockCausalSpans, ModalityMutual
from .neighborhood import Neighborhood
from .power import Power
from .radial import Radial
from .sliding_window import SlidingWindow
from .strided_shards import StridedShards

__all__ = [
    "AShape",
    "And",
    "BlockAxis",
    "BlockCausalSpans",
    "Causal",
    "Dilated",
    "Full",
    "GlobalTokens",
    "GridAxis",
    "HaloBlocks",
    "ModalityMutual",
    "Neighborhood",
    "Or",
    "Pattern",
    "PerHead",
    "Power",
    "Radial",
    "Sinks",
    "SlidingWindow",
    "StridedShards",
    "clear_cache",
]
