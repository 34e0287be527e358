"""Dynamic, content-based sparse attention (family B): selectors that look at q and k and choose what to compute.

``selector.select(q, k, v, causal=...)`` returns a :class:`Selection` (a per-batch, per-head block layout, a
permuted layout, or token indices); ``attnkit.attention(q, k, v, pattern=selector)`` selects and runs it on the
CPU kernels (``tiled`` for block layouts, ``gather`` for token indices), as it runs a static pattern. Every
selector reaches dense attention when its budget covers every key.
"""

from ._core import Selection, Selector
from .block_topk import BiLevelRouting, BlockTopK
from .estimate import AnchorStripes, LinearEstimate, QuantizedEstimate, VerticalSlash
from .hip import HierarchicalPruning
from .moba import LongHeads, MoBA
from .routing import KMeansRouting
from .seer import SeerAttention, SeerGate, block_attention_target, fit_gate
from .token import DynamicMask, Sparsifiner, fit_sparsifiner
from .vmoba import VMoBA

__all__ = [
    "AnchorStripes",
    "BiLevelRouting",
    "BlockTopK",
    "DynamicMask",
    "HierarchicalPruning",
    "KMeansRouting",
    "LinearEstimate",
    "LongHeads",
    "MoBA",
    "QuantizedEstimate",
    "SeerAttention",
    "SeerGate",
    "Selection",
    "Selector",
    "Sparsifiner",
    "VMoBA",
    "VerticalSlash",
    "block_attention_target",
    "fit_gate",
    "fit_sparsifiner",
]
