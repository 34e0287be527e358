"""Family I: vision token mixers over ``(B, H, W, C)`` (channel last, raster order), each registered with its
paper and checked against its float64 reference in :mod:`attnkit.reference.vision`.

* :class:`EfficientLocalAttention` (ELA), :class:`ULSAM`, :class:`CoordSEAttention` (coordinate attention
  fused with squeeze-excitation): convolutional attention gates.
* :class:`ChannelGroupAttention` (DaViT), :class:`ReversedAttention` (DependencyViT),
  :class:`AggregatedAttention` (TransNeXt): attention variants.
* :class:`FocalModulation` (FocalNets): an attention-free mixer.
* :class:`PartialAttention` (PATNet): a partial convolution on some channels, self-attention on the rest.
* :class:`PolylineMaskedAttention` (PPMA): attention logits plus a structured decay mask along row-then-column paths.
* :class:`CausalClassTokenAttention` (iLLaMA): causal attention with a post-sequence class token; its
  ``pool(x) -> (B, C)`` is the class-token readout.
* :class:`TAPAttention` (TAP): attention over token-aware pooled tokens; ``aux_loss()`` after a forward is
  the attention-diversification loss (:func:`attention_diversity_loss`).
* :class:`DualBranchAttention` (UltraGen): window attention plus full attention over pooled tokens, mixed per head.
* :class:`GlobalLocalCrossAttention` (DCAL): self-attention plus cross-attention from the most attended tokens
  (GLCA), and the pair-wise distractor attention (PWCA) as a training option.
* :class:`RelationGeometryAttention` (Relation-DETR): logits plus a learned bias from the pairwise geometry of the
  cells' boxes (:func:`cell_boxes`, :func:`box_relations`), applied as a score modification.
* :class:`TokenCoordinatedPromptAttention` (TCPA): CLS prompts for a class token and image prompts matched to
  each image token; ``pool(x)`` and ``aux_loss()`` (the matching loss).

Every module also takes ``(B, N, C)`` when built with a ``grid`` of ``N`` cells (the factories do).
"""

from ._base import VisionMixer, grid_for
from .coordse import CoordSEAttention
from .davit import ChannelGroupAttention
from .dcal import GlobalLocalCrossAttention
from .dependency import ReversedAttention
from .ela import EfficientLocalAttention
from .focal import FocalModulation
from .illama import CausalClassTokenAttention
from .patnet import PartialAttention
from .polyline import PolylineMaskedAttention, polyline_log_mask
from .relation import RelationGeometryAttention, box_relations, cell_boxes
from .tap import TAPAttention, attention_diversity_loss
from .tcpa import TokenCoordinatedPromptAttention
from .transnext import AggregatedAttention
from .ulsam import ULSAM
from .ultragen import DualBranchAttention

__all__ = [
    "ULSAM",
    "AggregatedAttention",
    "CausalClassTokenAttention",
    "ChannelGroupAttention",
    "CoordSEAttention",
    "DualBranchAttention",
    "EfficientLocalAttention",
    "FocalModulation",
    "GlobalLocalCrossAttention",
    "PartialAttention",
    "PolylineMaskedAttention",
    "RelationGeometryAttention",
    "ReversedAttention",
    "TAPAttention",
    "TokenCoordinatedPromptAttention",
    "VisionMixer",
    "attention_diversity_loss",
    "box_relations",
    "cell_boxes",
    "grid_for",
    "polyline_log_mask",
]
