"""Pretrained transformers models with attnkit attention, long-context patterns and KV-cache policies (family E).

>>> import attnkit.hf as akhf
>>> with akhf.applied(model, akhf.StreamingLLM(budget=1024, sinks=4)) as handle:
...     out = model.generate(**inputs, max_new_tokens=32)

Everything goes through transformers' public ``AttentionInterface`` and ``Cache`` types: no forked modeling
file, no monkeypatched forward. See :func:`apply` for what is supported.
"""

from .artifacts import CalibrationError
from .chunked import ChunkedPrefill
from .duo import DuoAttention
from .encoder_prune import VMTC, Encoded, FlowCut, HiRED, MustDrop, VFlowOpt, VTCCLS, pruned_encode
from .hack import HACK
from .kv import H2O, TOVA, ExpectedAttention, HeadAware, KVCompress, SnapKV, Uniform
from .lookm import LOOKM
from .moa import MoA
from .compose import Steered
from .policy import Dense, PerLayer, Policy, SparsePrefill
from .pine import PINE
from .prune import DyVTE, FastV, GSearch, PSigmoid, PyramidDrop, g_search, pruned_forward
from .steer import (
    ACT,
    CARVE,
    PASTA,
    VHR,
    SSMax,
    VAR,
    HeadPerturbation,
    Intervention,
    LogNScaling,
    SpanAmplification,
    SpanKnockout,
    Steer,
    Temperature,
    carve,
    contrastive_logits,
)
from .streaming import StreamingLLM
from .tidal import TidalDecode

# transformers is imported on first use of what needs it, so that loading the policies (the registry does) stays
# light and works without the models extra.
_LAZY = {
    "Handle": "._integration",
    "applied": "._integration",
    "apply": "._integration",
    "masked_attention": "._integration",
    "HeadwiseCache": ".cache",
    "convert_to_mla": ".mla",
    "latent_caches": ".mla",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ACT",
    "CARVE",
    "ChunkedPrefill",
    "DyVTE",
    "Encoded",
    "FlowCut",
    "HiRED",
    "MustDrop",
    "VFlowOpt",
    "VMTC",
    "VTCCLS",
    "ExpectedAttention",
    "FastV",
    "GSearch",
    "PINE",
    "PSigmoid",
    "PyramidDrop",
    "H2O",
    "HACK",
    "LOOKM",
    "HeadPerturbation",
    "Intervention",
    "LogNScaling",
    "PASTA",
    "SSMax",
    "SpanAmplification",
    "SpanKnockout",
    "Steer",
    "Steered",
    "Temperature",
    "VAR",
    "VHR",
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
    "TOVA",
    "TidalDecode",
    "Uniform",
    "applied",
    "convert_to_mla",
    "latent_caches",
    "apply",
    "carve",
    "contrastive_logits",
    "g_search",
    "pruned_encode",
    "pruned_forward",
    "masked_attention",
]
