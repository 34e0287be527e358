"""The registry: one record per mechanism. Tests, the benchmark and ``attnkit list`` iterate it.

A record says what a mechanism is (name, family letter of the catalogue, paper), whether it is exact, what it
supports, and how to make a small instance for a sequence of about ``n`` tokens (``factory(n)``; spatial
patterns choose their grid from ``n`` and report the real length as ``fixed_length``).

Families: A static sparse, B dynamic sparse, C linear/normalisation, D heads, E KV cache, F token pruning,
G interventions, H analysis, I vision modules.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from . import patterns as P
from .errors import ShapeError, bad

SUPPORT_KEYS = ("causal", "cross", "gqa", "backward", "decode", "bf16", "per_head", "spatial")


@dataclass(frozen=True)
class Record:
    name: str
    family: str
    paper: str
    exact: bool
    supports: frozenset
    factory: Callable
    summary: str

    def make(self, n: int = 256):
        return self.factory(n)


_REGISTRY: dict[str, Record] = {}


def register(name: str, *, family: str, paper: str, exact: bool, supports, factory, summary: str) -> Record:
    unknown = set(supports) - set(SUPPORT_KEYS)
    if unknown:
        raise ShapeError(bad("supports", f"a subset of {SUPPORT_KEYS}", sorted(unknown)))
    if name in _REGISTRY:
        raise ShapeError(bad("name", "a name not yet registered", name))
    rec = Record(name, family, paper, exact, frozenset(supports), factory, summary)
    _REGISTRY[name] = rec
    return rec


def get(name: str) -> Record:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ShapeError(bad("name", f"one of {sorted(_REGISTRY)}", repr(name))) from None


def records(family: str | None = None) -> list[Record]:
    return [r for r in _REGISTRY.values() if family is None or r.family == family]


def _w(n: int, frac: int, cap: int) -> int:
    """A window of ``n / frac`` tokens (at least 1), capped at ``cap``: small in tests, realistic at 16k."""
    return max(1, min(n // frac, cap))


def _side(n: int, dims: int, lo: int) -> int:
    return max(lo, round(n ** (1 / dims)))


_SEQ = {"cross", "gqa", "backward", "decode", "bf16"}
_SPATIAL = {"gqa", "backward", "bf16", "spatial"}

register(
    "causal",
    family="A",
    paper="Attention Is All You Need (Vaswani et al., 2017)",
    exact=True,
    supports=_SEQ | {"causal"},
    factory=lambda n: P.Causal(),
    summary="kv <= q",
)
register(
    "sliding_window",
    family="A",
    paper="Longformer (Beltagy et al., 2020); Mistral 7B",
    exact=True,
    supports=_SEQ | {"causal"},
    factory=lambda n: P.SlidingWindow(_w(n, 8, 256) - 1, 0),
    summary="causal window of min(n/8, 256) keys",
)
register(
    "sliding_window_symmetric",
    family="A",
    paper="Longformer (Beltagy et al., 2020)",
    exact=True,
    supports=_SEQ,
    factory=lambda n: P.SlidingWindow(_w(n, 16, 128), _w(n, 16, 128)),
    summary="window of min(n/16, 128) keys on each side",
)
register(
    "neighborhood_1d",
    family="A",
    paper="Faster Neighborhood Attention (Hassani et al., 2024)",
    exact=True,
    supports=_SPATIAL,
    factory=lambda n: P.Neighborhood((n,), kernel_size=max(3, _w(n, 8, 256) - 1) | 1),
    summary="NATTEN 1-D neighbourhood, kernel min(n/8, 255)",
)
register(
    "neighborhood_2d",
    family="A",
    paper="Faster Neighborhood Attention (Hassani et al., 2024)",
    exact=True,
    supports=_SPATIAL,
    factory=lambda n: P.Neighborhood((_side(n, 2, 8),) * 2, kernel_size=7),
    summary="NATTEN 2-D neighbourhood, kernel 7x7",
)
register(
    "dilated_neighborhood_2d",
    family="A",
    paper="Dilated Neighborhood Attention Transformer (DiNAT, 2022)",
    exact=True,
    supports=_SPATIAL,
    factory=lambda n: P.Neighborhood((_side(n, 2, 10),) * 2, kernel_size=5, dilation=2),
    summary="2-D neighbourhood 5x5, dilation 2",
)
register(
    "strided_neighborhood_2d",
    family="A",
    paper="Generalized Neighborhood Attention (GNA, 2025)",
    exact=True,
    supports=_SPATIAL,
    factory=lambda n: P.Neighborhood((_side(n, 2, 8),) * 2, kernel_size=7, stride=4),
    summary="2-D neighbourhood 7x7, stride 4 (GNA)",
)
register(
    "neighborhood_3d_causal",
    family="A",
    paper="Generalized Neighborhood Attention (GNA, 2025)",
    exact=True,
    supports=_SPATIAL | {"causal"},
    factory=lambda n: P.Neighborhood((_side(n, 3, 4),) * 3, kernel_size=3, is_causal=True),
    summary="3-D (video) neighbourhood 3x3x3, causal in every dim",
)
register(
    "halo_2d",
    family="A",
    paper="Scaling Local Self-Attention for Parameter Efficient Visual Backbones (HaloNet, 2021)",
    exact=True,
    supports=_SPATIAL,
    factory=lambda n: P.HaloBlocks((_side(n, 2, 8) // 4 * 4,) * 2, block=4, halo=1),
    summary="4x4 query blocks, halo 1",
)
register(
    "maxvit_block",
    family="A",
    paper="MaxViT: Multi-Axis Vision Transformer (Tu et al., 2022)",
    exact=True,
    supports=_SPATIAL,
    factory=lambda n: P.BlockAxis((_side(n, 2, 8) // 4 * 4,) * 2, window=4),
    summary="4x4 non-overlapping windows",
)
register(
    "maxvit_grid",
    family="A",
    paper="MaxViT: Multi-Axis Vision Transformer (Tu et al., 2022)",
    exact=True,
    supports=_SPATIAL,
    factory=lambda n: P.GridAxis((_side(n, 2, 8) // 4 * 4,) * 2, grid=4),
    summary="4x4 dilated global grid",
)
register(
    "dilated",
    family="A",
    paper="LongNet: Scaling Transformers to 1,000,000,000 Tokens (2023)",
    exact=True,
    supports=_SEQ | {"causal"},
    factory=lambda n: P.Dilated(max(2, _w(n, 16, 128)), 2),
    summary="every 2nd key over a span of min(n/8, 256)",
)
register(
    "strided_shards",
    family="A",
    paper="S2-Attention: Hardware-Aware Context Sharding Among Attention Heads (2024)",
    exact=True,
    supports=_SEQ | {"causal", "per_head"},
    factory=lambda n: P.StridedShards(heads=4, shards=4, local=_w(n, 16, 128)),
    summary="4 heads, 4 strided shards + local window min(n/16, 128)",
)
register(
    "global_tokens",
    family="A",
    paper="Longformer (global attention); BigBird (2020)",
    exact=True,
    supports=_SEQ,
    factory=lambda n: P.GlobalTokens(4) | P.SlidingWindow(_w(n, 16, 128), _w(n, 16, 128)),
    summary="4 global tokens + symmetric window min(n/16, 128)",
)
register(
    "a_shape",
    family="A",
    paper="Efficient Streaming Language Models with Attention Sinks (StreamingLLM, 2023)",
    exact=True,
    supports=_SEQ | {"causal"},
    factory=lambda n: P.AShape(sinks=4, window=_w(n, 8, 256)),
    summary="4 sinks + causal window min(n/8, 256)",
)
register(
    "radial",
    family="A",
    paper="Radial Attention: O(n log n) Sparse Attention with Energy Decay for Long Video Generation (2025)",
    exact=True,
    supports=_SPATIAL,
    factory=lambda n: P.Radial(frame_tokens=max(4, n // 16), num_frames=16, window=max(1, n // 64)),
    summary="16 frames, spatial window halving with frame distance",
)
register(
    "power",
    family="A",
    paper="PowerAttention: Exponentially Scaling of Receptive Fields for Effective Sparse Attention (2025)",
    exact=True,
    supports=_SEQ | {"causal"},
    factory=lambda n: P.Power(window=_w(n, 16, 128)),
    summary="causal window min(n/16, 128) + power-of-2 distances",
)
register(
    "block_causal_spans",
    family="A",
    paper="TC-LLaVA (frame-wise block causal mask, 2024)",
    exact=True,
    supports=_SPATIAL - {"spatial"},
    factory=lambda n: P.BlockCausalSpans(n, ((n // 8, n // 8 + n // 4), (n // 2, n // 2 + n // 4))),
    summary="causal text, two bidirectional image spans of n/4",
)
register(
    "modality_mutual",
    family="A",
    paper="AKI: Unlocking Causal Attention into Modality-Mutual Attention (2025)",
    exact=True,
    supports=_SPATIAL - {"spatial"},
    factory=lambda n: P.ModalityMutual(n, ((n // 8, n // 8 + n // 4),)),
    summary="causal, image tokens also see later text",
)
