"""Masks for mixed image/text (or video-frame) sequences.

* ``BlockCausalSpans(length, spans)``: causal, except that tokens inside one span (an image, or a video
  frame) see each other both ways. This is the frame-wise block-causal mask of TC-LLaVA and the
  "bidirectional within the image, causal text" mask of prefix-LM style MLLMs (Croc).
* ``ModalityMutual(length, spans)``: AKI's modality-mutual attention ("Unlocking Causal Attention into
  Modality-Mutual Attention", 2025): causal, and image tokens may also attend to the text tokens that come
  *after* them (no new parameters). The abstract leaves open whether image tokens see later images; they do
  not here (image-to-image stays causal, text stays causal).

``spans`` are ``(start, end)`` half-open token ranges of the image (or frame) segments, non-overlapping.

Pictures on 8 tokens with an image at ``(2, 5)``, ``BlockCausalSpans`` and ``ModalityMutual``::

    #.......        #.......
    ##......        ##......
    #####...        ###..###
    #####...        ####.###
    #####...        ########
    ######..        ######..
    #######.        #######.
    ########        ########
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import PatternError, bad, check_memory
from ..records import SPATIAL, register
from .base import Pattern, _require_int

__all__ = ["BlockCausalSpans", "ModalityMutual"]

def _segments(length: int, spans) -> tuple[tuple[int, int], ...]:
    _require_int("length", length)
    try:
        spans = tuple((int(a), int(b)) for a, b in spans)
    except (TypeError, ValueError):
        raise PatternError(bad("spans", "a sequence of (start, end) pairs", repr(spans))) from None
    prev = 0
    for a, b in sorted(spans):
        if not (0 <= a < b <= length) or a < prev:
            raise PatternError(bad("spans", f"non-overlapping (start, end) ranges inside [0, {length}]", spans))
        prev = b
    return tuple(sorted(spans))


@dataclass(frozen=True)
class _SpanPattern(Pattern):
    length: int
    spans: tuple
    _seg: torch.Tensor = field(init=False, repr=False, compare=False, hash=False)

    causal = False

    def __post_init__(self):
        spans = _segments(self.length, self.spans)
        # One label per token: a length no sequence could have is refused before it is allocated.
        check_memory(f"{type(self).__name__}(length={self.length})", 8 * self.length, "use the sequence's length")
        seg = torch.full((self.length,), -1, dtype=torch.long)
        for i, (a, b) in enumerate(spans):
            seg[a:b] = i
        object.__setattr__(self, "spans", spans)
        object.__setattr__(self, "_seg", seg)

    @property
    def fixed_length(self) -> int:
        return self.length

    def _lookup(self, idx):
        return self._seg.to(idx.device)[idx]


@dataclass(frozen=True)
class BlockCausalSpans(_SpanPattern):
    """Causal text; bidirectional inside each span (image or frame)."""

    def mask_mod(self, b, h, q_idx, kv_idx):
        sq, sk = self._lookup(q_idx), self._lookup(kv_idx)
        return (kv_idx <= q_idx) | ((sq == sk) & (sq >= 0))


@dataclass(frozen=True)
class ModalityMutual(_SpanPattern):
    """Causal, plus image tokens attend to every text token after them (AKI)."""

    def mask_mod(self, b, h, q_idx, kv_idx):
        sq, sk = self._lookup(q_idx), self._lookup(kv_idx)
        return (kv_idx <= q_idx) | ((sq >= 0) & (sk < 0))


register(
    "block_causal_spans",
    family="A",
    kind="pattern",
    paper="TC-LLaVA (frame-wise block causal mask, 2024)",
    exact=True,
    supports=SPATIAL - {"spatial"},
    factory=lambda n: BlockCausalSpans(n, ((n // 8, n // 8 + n // 4), (n // 2, n // 2 + n // 4))),
    summary="causal text, two bidirectional image spans of n/4",
    source=BlockCausalSpans,
)

register(
    "modality_mutual",
    family="A",
    kind="pattern",
    paper="AKI: Unlocking Causal Attention into Modality-Mutual Attention (2025)",
    exact=True,
    supports=SPATIAL - {"spatial"},
    factory=lambda n: ModalityMutual(n, ((n // 8, n // 8 + n // 4),)),
    summary="causal, image tokens also see later text",
    source=ModalityMutual,
)
