"""Layers: ``nn.Module`` s built only from :func:`attnkit.attention` and the mechanisms (DESIGN.md, "layers").

* :class:`Attention` over ``(B, N, dim)`` for any registered pattern, selector or family-C mechanism, with
  GQA, RoPE (:class:`Rotary`, :class:`RopeScaling`), QK-norm, cross attention and key padding; decode caches
  (:class:`KVCache`, :class:`HeadKVCache`, :class:`StateCache`); :class:`Attention2d` / :class:`Attention3d`
  over spatial layouts.
* :class:`TransformerBlock` and a decoder-only :class:`Transformer`.
* Family D, the head and projection variants, each registered with its paper:
  :class:`MultiheadLatentAttention` (MLA, naive and absorbed, with a :class:`LatentCache`),
  :class:`TensorParallelLatentAttention` (TPLA, simulated on one device), :class:`MoHAttention`,
  :class:`SparseQueryAttention`, :class:`BAMAttention`, :class:`MinimalAttention`, :class:`RCMHA`,
  :class:`DifferentialAttention`, and the attentive probes :class:`EfficientProbe`, :class:`AttentiveProbe`
  (with the :class:`MeanProbe` baseline).
* Family I, the vision modules over ``(B, H, W, C)``: :mod:`attnkit.layers.vision`.
"""

from .attention import Attention
from .bam import BAMAttention
from .cache import Cache, HeadKVCache, KVCache, StateCache
from .differential import DifferentialAttention, lambda_init_fn
from .minimal import MinimalAttention
from .mla import LatentCache, MultiheadLatentAttention
from .moh import MoHAttention
from .probe import AttentiveProbe, EfficientProbe, MeanProbe
from .rcmha import RCMHA, RCMHACache
from .rope import RopeScaling, Rotary
from .spatial import Attention2d, Attention3d
from .sqa import VARIANTS as SQA_VARIANTS
from .sqa import SparseQueryAttention
from .tpla import TensorParallelLatentAttention
from .transformer import SwiGLU, Transformer, TransformerBlock
from . import vision  # noqa: E402  (family I registers its records)

__all__ = [
    "RCMHA",
    "SQA_VARIANTS",
    "Attention",
    "Attention2d",
    "Attention3d",
    "AttentiveProbe",
    "BAMAttention",
    "Cache",
    "DifferentialAttention",
    "EfficientProbe",
    "HeadKVCache",
    "KVCache",
    "LatentCache",
    "MeanProbe",
    "MinimalAttention",
    "MoHAttention",
    "MultiheadLatentAttention",
    "RCMHACache",
    "RopeScaling",
    "Rotary",
    "SparseQueryAttention",
    "StateCache",
    "SwiGLU",
    "TensorParallelLatentAttention",
    "Transformer",
    "TransformerBlock",
    "lambda_init_fn",
    "vision",
]
