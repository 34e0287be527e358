"""Layers: ``nn.Module`` s built only from :func:`attnkit.attention` and the mechanisms (DESIGN.md, "layers").

* :class:`Attention` over ``(B, N, dim)`` for any registered pattern, selector or family-C mechanism, with
  GQA, RoPE (:class:`Rotary`, :class:`RopeScaling`), QK-norm, cross attention and key padding; decode caches
  (:class:`KVCache`, :class:`HeadKVCache`, :class:`StateCache`); :class:`Attention2d` / :class:`Attention3d`
  over spatial layouts.
* :class:`TransformerBlock` and a decoder-only :class:`Transformer`.
"""

from .attention import Attention
from .cache import Cache, HeadKVCache, KVCache, StateCache
from .rope import RopeScaling, Rotary
from .spatial import Attention2d, Attention3d
from .transformer import SwiGLU, Transformer, TransformerBlock

__all__ = [
    "Attention",
    "Attention2d",
    "Attention3d",
    "Cache",
    "HeadKVCache",
    "KVCache",
    "RopeScaling",
    "Rotary",
    "StateCache",
    "SwiGLU",
    "Transformer",
    "TransformerBlock",
]
