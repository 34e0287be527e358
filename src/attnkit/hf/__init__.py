"""Pretrained transformers models with attnkit attention, long-context patterns and KV-cache policies (family E).

>>> import attnkit.hf as akhf
>>> with akhf.applied(model, akhf.StreamingLLM(budget=1024, sinks=4)) as handle:
...     out = model.generate(**inputs, max_new_tokens=32)

Everything goes through transformers' public ``AttentionInterface`` and ``Cache`` types: no forked modeling
file, no monkeypatched forward. See :func:`apply` for what is supported.
"""

from ._integration import Handle, applied, apply, masked_attention
from .artifacts import CalibrationError
from .cache import HeadwiseCache
from .duo import DuoAttention
from .moa import MoA
from .kv import H2O, HeadAware, KVCompress, SnapKV, Uniform
from .policy import Dense, PerLayer, Policy, SparsePrefill
from .streaming import StreamingLLM

__all__ = [
    "H2O",
    "CalibrationError",
    "Dense",
    "DuoAttention",
    "Handle",
    "HeadAware",
    "HeadwiseCache",
    "KVCompress",
    "MoA",
    "PerLayer",
    "Policy",
    "SnapKV",
    "SparsePrefill",
    "StreamingLLM",
    "Uniform",
    "applied",
    "apply",
    "masked_attention",
]
