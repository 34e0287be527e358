"""EE-MLLM's composite attention as a mask: no attention among image tokens.

EE-MLLM ("A Data-Efficient and Compute-Efficient Multimodal Large Language Model", Ma et al., 2024) replaces the
MLLM's self-attention with a *composite attention*: text tokens attend causally to every earlier token (image
and text); image tokens do not attend to other image tokens, which removes the ``O(n_img^2)`` part of the cost.
In the paper an image token's attention output is replaced by an *aligner* that reuses the layer's own weights
on that token alone; as a mask this is the diagonal: an image token sees only itself (softmax over one key
gives its own value, which the layer's output projection then maps, as the aligner does). The weight reuse
itself belongs to the model; this pattern is the mask, and the FLOPs it saves are the image-to-image block.

.. math::
    P(i) = \\begin{cases} \\{i\\} & i \\in \\text{image} \\\\ \\{j \\le i\\} & \\text{otherwise} \\end{cases}

``spans`` are ``(start, end)`` half-open token ranges of the images, non-overlapping. Picture on 8 tokens with an
image at ``(2, 5)``::

    #.......
    ##......
    ..#.....
    ...#....
    ....#...
    ######..
    #######.
    ########
"""

from __future__ import annotations

from dataclasses import dataclass

from ..records import SPATIAL, register
from .modality import _SpanPattern

__all__ = ["CompositeAttention"]

@dataclass(frozen=True)
class CompositeAttention(_SpanPattern):
    """Causal text over every earlier token; each image token sees only itself (EE-MLLM)."""

    causal = True

    def mask_mod(self, b, h, q_idx, kv_idx):
        image = self._lookup(q_idx) >= 0
        return (kv_idx == q_idx) | (~image & (kv_idx <= q_idx))


register(
    "composite_attention",
    family="A",
    kind="pattern",
    paper="EE-MLLM: A Data-Efficient and Compute-Efficient Multimodal Large Language Model (Ma et al., 2024)",
    exact=True,
    supports=(SPATIAL - {"spatial"}) | {"causal"},
    factory=lambda n: CompositeAttention(n, ((n // 8, n // 8 + n // 2),)),
    summary="image tokens see only themselves, text is causal (an image of n/2)",
    source=CompositeAttention,
)
