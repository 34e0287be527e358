"""attnkit: the attention mechanisms of the recent literature behind one API.

>>> import torch, attnkit as ak
>>> q = k = v = torch.randn(1, 4, 1024, 64)
>>> out = ak.attention(q, k, v, pattern=ak.patterns.SlidingWindow(left=255, right=0))
"""

from . import distributed, linear, patterns, reference, registry, scores, sparse
from .api import Explanation, attention, explain, sparse_attention
from .backends.tiled import tiled_attention
from .errors import (
    AttnkitError,
    DeviceError,
    DTypeError,
    MemoryBudgetError,
    NonFiniteError,
    PatternError,
    ShapeError,
    UnsupportedError,
)
from .layout import BlockLayout

__version__ = "0.1.0"

__all__ = [
    "AttnkitError",
    "BlockLayout",
    "DTypeError",
    "DeviceError",
    "Explanation",
    "MemoryBudgetError",
    "NonFiniteError",
    "PatternError",
    "ShapeError",
    "UnsupportedError",
    "attention",
    "distributed",
    "explain",
    "linear",
    "sparse",
    "sparse_attention",
    "patterns",
    "reference",
    "registry",
    "scores",
    "tiled_attention",
]
