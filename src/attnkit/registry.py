"""The registry: one record per mechanism. Tests, the benchmark and ``attnkit list`` iterate it.

A record says what a mechanism is (name, family letter of the catalogue, paper), whether it is exact, what it
supports, and how to make a small instance for a sequence of about ``n`` tokens (``factory(n)``; spatial
patterns choose their grid from ``n`` and report the real length as ``fixed_length``). ``kind`` says what the
factory makes: a ``"pattern"`` (:class:`~attnkit.patterns.Pattern`, run by :func:`attnkit.attention`), a
``"function"`` (a :class:`Mechanism`: ``m(q, k, v)`` and its float64 ``m.reference(q, k, v)``), or a
``"module"`` (an ``nn.Module`` over ``(B, N, dim)`` with its own reference).

Families: A static sparse, B dynamic sparse, C linear/normalisation, D heads, E KV cache, F token pruning,
G interventions, H analysis, I vision modules.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from . import linear as L
from . import patterns as P
from . import reference as R
from .api import attention
from .errors import ShapeError, bad
from .scores import Sigmoid, Softplus

SUPPORT_KEYS = (
    "causal",
    "cross",
    "gqa",
    "backward",
    "decode",
    "bf16",
    "per_head",
    "spatial",
    "padding",
    "trainable",
    "grid",
)
KINDS = ("pattern", "function", "module", "selector", "policy")


@dataclass(frozen=True)
class Record:
    name: str
    family: str
    paper: str
    exact: bool
    supports: frozenset
    factory: Callable
    summary: str
    kind: str = "pattern"

    def make(self, n: int = 256):
        return self.factory(n)


_REGISTRY: dict[str, Record] = {}


def register(
    name: str, *, family: str, paper: str, exact: bool, supports, factory, summary: str, kind: str = "pattern"
) -> Record:
    unknown = set(supports) - set(SUPPORT_KEYS)
    if unknown:
        raise ShapeError(bad("supports", f"a subset of {SUPPORT_KEYS}", sorted(unknown)))
    if name in _REGISTRY:
        raise ShapeError(bad("name", "a name not yet registered", name))
    if kind not in KINDS:
        raise ShapeError(bad("kind", f"one of {KINDS}", repr(kind)))
    rec = Record(name, family, paper, exact, frozenset(supports), factory, summary, kind)
    _REGISTRY[name] = rec
    return rec


def get(name: str) -> Record:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ShapeError(bad("name", f"one of {sorted(_REGISTRY)}", repr(name))) from None


def records(family: str | None = None, kind: str | None = None) -> list[Record]:
    return [
        r for r in _REGISTRY.values() if (family is None or r.family == family) and (kind is None or r.kind == kind)
    ]


@dataclass
class Mechanism:
    """A family-C function bound to its arguments, with its float64 oracle.

    ``m(q, k, v, **kw)`` runs ``fn``; ``m.reference(q, k, v, dtype=..., **kw)`` runs the naive reference in
    ``dtype`` (float64: the oracle; the input dtype: the naive implementation of the 2x-naive rule). ``setup``
    derives shape-dependent arguments (a per-head decay, a learnable map) from ``q``; they are built once per
    shape, so the function and its reference see the same objects. ``extras`` derives extra inputs (agent
    tokens, forget gates) from ``q, k, v`` differentiably.
    """

    fn: Callable
    ref: Callable
    kwargs: dict = field(default_factory=dict)
    setup: Callable | None = None
    extras: Callable | None = None
    _built: dict = field(default_factory=dict, repr=False)

    def _args(self, q):
        if self.setup is None:
            return self.kwargs
        key = (q.shape[1], q.shape[3])
        if key not in self._built:
            self._built[key] = {**self.kwargs, **self.setup(q.shape[1], q.shape[3])}
        return self._built[key]

    def __call__(self, q, k, v, **kw):
        extra = self.extras(q, k, v) if self.extras else {}
        return self.fn(q, k, v, **self._args(q), **extra, **kw)

    def reference(self, q, k, v, *, dtype=torch.float64, **kw):
        extra = self.extras(q, k, v) if self.extras else {}
        return self.ref(q, k, v, **self._args(q), **extra, dtype=dtype, **kw)


def _w(n: int, frac: int, cap: int) -> int:
    """A window of ``n / frac`` tokens (at least 1), capped at ``cap``: small in tests, realistic at 16k."""
    return max(1, min(n // frac, cap))


def _side(n: int, dims: int, lo: int) -> int:
    return max(lo, round(n ** (1 / dims)))


_SEQ = {"cross", "gqa", "backward", "decode", "bf16", "padding"}
_SPATIAL = {"gqa", "backward", "bf16", "spatial", "padding"}

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


# ---- family C: linear, kernelised and re-normalised attention (kind "function" / "module") ----------------

_LIN = {"gqa", "backward", "bf16", "padding"}


def _function(name, paper, summary, supports, fn, ref, kwargs=None, *, exact=True, setup=None, extras=None):
    """Register a family-C function bound to its float64 reference."""
    register(
        name,
        family="C",
        paper=paper,
        exact=exact,
        supports=supports,
        kind="function",
        factory=lambda n: Mechanism(fn, ref, kwargs(n) if callable(kwargs) else dict(kwargs or {}), setup, extras),
        summary=summary,
    )


def _linear(name, paper, summary, *, exact=True, causal=True, setup=None, **kwargs):
    supports = _LIN | ({"causal", "decode"} if causal else {"cross"})
    args = {"causal": causal, **kwargs}
    _function(name, paper, summary, supports, L.linear_attention, R.linear_attention, args, exact=exact, setup=setup)


def _hedgehog(heads, head_dim):
    fmap = L.Hedgehog(heads, head_dim)
    with torch.no_grad():  # a trained-looking map: the identity initialisation would hide per-head mistakes
        g = torch.Generator().manual_seed(0)
        fmap.weight.add_(0.3 * torch.randn(fmap.weight.shape, generator=g))
    return {"feature_map": fmap}


_KATHAROPOULOS = (
    "Transformers are RNNs: Fast Autoregressive Transformers with Linear Attention (Katharopoulos et al., 2020)"
)
_linear("linear_elu", _KATHAROPOULOS, "causal linear attention, phi = elu + 1, sum-normalised", feature_map="elu+1")
_linear(
    "linear_elu_bidirectional",
    _KATHAROPOULOS,
    "non-causal linear attention, phi = elu + 1 (cross attention allowed)",
    causal=False,
    feature_map="elu+1",
)
_linear("linear_relu", _KATHAROPOULOS, "causal linear attention, phi = relu", feature_map="relu")
_linear(
    "performer_favor",
    "Rethinking Attention with Performers (Choromanski et al., 2021)",
    "FAVOR+ positive orthogonal random features (2D of them): an unbiased estimate of softmax",
    exact=False,
    setup=lambda h, d: {"feature_map": L.FAVOR(d, 2 * d)},
)
_linear(
    "hedgehog",
    "The Hedgehog & the Porcupine: Expressive Linear Attentions with Softmax Mimicry (Zhang et al., 2024)",
    "learnable per-head softmax-mimicking map [softmax(Wx), softmax(-Wx)]; fit with fit_hedgehog",
    setup=_hedgehog,
)
_linear(
    "mala",
    "Rectifying Magnitude Neglect in Linear Attention (MALA, Fan et al., 2025)",
    "magnitude-aware weights (1 + 1/z) phi.phi - z/n, phi = elu + 1",
    feature_map="elu+1",
    normalize="mala",
)
_linear(
    "inline",
    "Bridging the Divide: Reconsidering Softmax and Linear Attention (InLine, Han et al., 2024)",
    "injective weights phi.phi - mean + 1/n, phi = relu",
    feature_map="relu",
    normalize="inline",
)
_linear(
    "retnet",
    "Retentive Network: A Successor to Transformer for Large Language Models (Sun et al., 2023)",
    "retention: q.k / sqrt(D) with per-head decay 1 - 2^(-5-h), unnormalised",
    feature_map="identity",
    normalize=False,
    setup=lambda h, d: {"decay": L.retnet_decay(h), "scale": d**-0.5},
)
_linear(
    "lightning_transnormer",
    "Lightning Attention-2 (Qin et al., 2024); TransNormerLLM (Qin et al., 2023)",
    "TransNormerLLM: per-head decay exp(-8h/H (1 - l/L)) (layer 0 of 2), RMS-normalised output",
    feature_map="identity",
    normalize="rms",
    setup=lambda h, d: {"decay": L.transnormer_decay(h, 0, 2), "scale": d**-0.5},
)

_FLOW = "Flowformer: Linearizing Transformers with Conservation Flows (Wu et al., ICML 2022)"
_NOPAD = {"gqa", "backward", "bf16"}
_function(
    "flowformer",
    _FLOW,
    "flow conservation: competition (softmax over sources), allocation (sigmoid gate on sinks)",
    _LIN | {"cross"},
    L.flow_attention,
    R.flow_attention,
    {"causal": False},
)
_function(
    "flowformer_causal",
    _FLOW,
    "causal flow attention (cumulative flows normalised by position)",
    _NOPAD | {"causal"},
    L.flow_attention,
    R.flow_attention,
    {"causal": True},
)
_function(
    "agent_attention",
    "Agent Attention: On the Integration of Softmax and Linear Attention (Han et al., ECCV 2024)",
    "n agents pooled from q: softmax(Q A^T) softmax(A K^T) V",
    _NOPAD | {"cross"},
    L.agent_attention,
    R.agent_attention,
    extras=lambda q, k, v: {"agents": L.pool_agents(q, max(1, min(q.shape[2], 49) // 7))},
)
_function(
    "rat",
    "RAT: Bridging RNN Efficiency and Attention Accuracy in Language Modeling (Wei et al., 2025)",
    "gated recurrence inside chunks of min(n/8, 16), softmax across chunk states",
    _NOPAD | {"causal"},
    L.rat_attention,
    R.rat_attention,
    lambda n: {"chunk_size": max(2, min(16, n // 8))},
    extras=lambda q, k, v: {"forget": torch.sigmoid(k.mean(-1, keepdim=True))},
)
_function(
    "local_linear",
    "Local Linear Attention: An Optimal Interpolation of Linear and Softmax Attention (Zuo et al., 2025)",
    "softmax-weighted local linear regression per query (ridge 1); quadratic",
    _NOPAD | {"causal"},
    L.local_linear_attention,
    R.local_linear_attention,
    {"causal": True, "ridge": 1.0},
)
_function(
    "sigmoid_attention",
    "Theory, Analysis, and Best Practices for Sigmoid Self-Attention (Ramapuram et al., 2024)",
    "causal sigmoid(s - log n) weights (n = the training length) on the tiled kernel, no row normalisation",
    _NOPAD | {"causal", "padding"},
    attention,
    R.attention,
    lambda n: {"pattern": P.Causal(), "normalizer": Sigmoid(-math.log(n))},
)
_function(
    "softplus_attention",
    "Softplus Attention with Re-weighting Boosts Length Extrapolation in LLMs (Gao & Spratling, 2025)",
    "causal softplus(log(n_i) s) weights, l1-normalised (LSSA) on the tiled kernel",
    _NOPAD | {"causal", "padding"},
    attention,
    R.attention,
    {"pattern": P.Causal(), "normalizer": Softplus()},
)
register(
    "gaussian_adaptive",
    family="C",
    paper="Gaussian Adaptive Attention is All You Need (GAAM, Ioannides et al., 2024)",
    exact=True,
    supports={"backward", "bf16"},
    kind="module",
    factory=lambda n: L.GaussianAdaptiveAttention(32, 4),
    summary="per-head learnable Gaussian (mean offset, variance scale) re-weighting features over the sequence",
)


# ---- family B: dynamic, content-based selectors (kind "selector") ------------------------------------------
# factory(budget, *, heads, kv_heads, head_dim, block, n) -> a Selector for q (B, heads, n, head_dim).

from . import sparse as S  # noqa: E402

_SEL = {"gqa", "backward", "bf16", "padding", "cross"}


def _selector(name, paper, summary, factory, *, supports=_SEL | {"causal"}):
    register(
        name, family="B", paper=paper, exact=False, supports=supports, kind="selector", factory=factory, summary=summary
    )


def _grid(n):
    side = int(round(n**0.5))
    return (1, side, n // side) if side * (n // side) == n else None


_selector(
    "moba",
    S.MoBA.paper,
    "per-token top-k key blocks by mean-pooled key gates, own block forced",
    lambda budget, *, block=64, **_: S.MoBA(block_size=block, budget=budget, keep_first=1),
)
_selector(
    "vmoba",
    S.VMoBA.paper,
    "MoBA over 1-D/2-D/3-D blocks of a (T, H, W) grid, top-k / global / threshold",
    lambda budget, *, block=64, n=256, **_: S.VMoBA(grid=(1, 16, n // 16), block=(1, 4, 4), budget=budget),
    supports={"gqa", "backward", "bf16", "grid"},
)


def _seer(budget, block, gate=None):
    # Key tiles a quarter of the query block, a layer-wide budget, the first key tile (sinks) and the query
    # block's worth of keys before its own kept: the configuration chosen on held-out SmolLM2 text (BENCHMARKS.md).
    sub = max(1, block // 4)
    return S.SeerAttention(
        gate,
        block_size=(block, sub),
        budget=budget,
        allocate="layer",
        keep_first=1,
        keep_local=4,
        query_pool=None if gate is not None else sub,
    )


_selector(
    "seer_attention",
    S.SeerAttention.paper,
    "training-free gate (mean-pooled q sub-blocks vs key blocks), budget spent across the layer",
    lambda budget, *, block=64, **_: _seer(budget, block),
)
_selector(
    "seer_attention_trained",
    S.SeerAttention.paper,
    "SeerGate on pooled q and [max, min, mean] k, fitted by fit_gate (self-distillation); layer-wide budget",
    lambda budget, *, block=64, heads=4, head_dim=16, gate=None, **_: _seer(
        budget, block, gate if gate is not None else S.SeerGate(heads, head_dim, query_pool=max(1, block // 4))
    ),
    supports=_SEL | {"causal", "trainable"},
)
_selector(
    "bilevel_routing",
    S.BiLevelRouting.paper,
    "region-to-region top-k routing, token attention in routed regions (1-D)",
    lambda budget, *, block=64, **_: S.BiLevelRouting(block_size=block, budget=budget, keep_first=1, keep_local=1),
)
_selector(
    "bilevel_routing_2d",
    S.BiLevelRouting.paper,
    "bi-level routing over 2-D regions of an image grid (non-causal)",
    lambda budget, *, block=64, n=256, **_: S.BiLevelRouting(
        block_size=16, budget=budget, grid=(16, n // 16), region=(4, 4)
    ),
    supports={"gqa", "backward", "bf16", "grid"},
)
_selector(
    "routing_kmeans",
    S.KMeansRouting.paper,
    "online k-means over unit q and k, attention inside each cluster (1/budget clusters)",
    lambda budget, *, block=64, heads=4, head_dim=16, **_: S.KMeansRouting(
        heads, head_dim, max(1, round(1 / budget)), block_size=block
    ),
    supports={"gqa", "backward", "bf16", "padding", "causal", "trainable"},
)
_selector(
    "hip",
    S.HierarchicalPruning.paper,
    "training-free tree search for the top-k key blocks, O(N k log N)",
    lambda budget, *, block=64, **_: S.HierarchicalPruning(block_size=block, budget=budget, keep_first=1),
)
_selector(
    "sea",
    S.LinearEstimate.paper,
    "linear-attention (elu+1) estimate of each query's block mass, top-k blocks",
    lambda budget, *, block=64, **_: S.LinearEstimate(block_size=block, budget=budget),
)
_selector(
    "sale",
    S.QuantizedEstimate.paper,
    "4-bit q.k estimate, relative attention score per tile, top-k blocks",
    lambda budget, *, block=64, **_: S.QuantizedEstimate(block_size=block, budget=budget),
)
_selector(
    "anchor_attention",
    S.AnchorStripes.paper,
    "anchor from initial + local keys, key stripes nearest the anchor",
    lambda budget, *, block=64, **_: S.AnchorStripes(block_size=block, budget=budget, init=block),
)
_selector(
    "minference_vertical_slash",
    S.VerticalSlash.paper,
    "vertical and slash lines estimated from the last 64 queries",
    lambda budget, *, block=64, **_: S.VerticalSlash(budget=budget, last_q=block, local=block, block_size=block),
    supports={"gqa", "backward", "bf16", "padding", "causal"},
)
_selector(
    "minference_block_sparse",
    S.BlockTopK.paper,
    "top-k blocks from mean-pooled 64-token q and k blocks",
    lambda budget, *, block=64, **_: S.BlockTopK(
        block_size=block, budget=budget, keep_first=1, keep_local=1, share_group=True
    ),
)


def _sparsifiner(budget, heads, head_dim, predictor=None):
    # A fitted predictor's weights at this budget; without one, the untrained (truncated identity) predictor.
    sel = S.Sparsifiner(heads, head_dim, rank=max(1, head_dim // 4), budget=budget)
    if predictor is not None:
        sel.load_state_dict(predictor.state_dict())
    return sel


_selector(
    "sparsifiner",
    S.Sparsifiner.paper,
    "low-rank connectivity predictor (fit_sparsifiner distils it), top-k keys per query (token level)",
    lambda budget, *, heads=4, head_dim=16, predictor=None, **_: _sparsifiner(budget, heads, head_dim, predictor),
    supports=_SEL | {"causal", "trainable"},
)
_selector(
    "dynamic_mask",
    S.DynamicMask.paper,
    "key mask and bias from the values, top-k keys per query block (token level)",
    lambda budget, *, block=64, kv_heads=2, head_dim=16, **_: S.DynamicMask(
        kv_heads, head_dim, budget=budget, query_block=block
    ),
    supports=_SEL | {"causal", "trainable"},
)
_selector(
    "longheads",
    S.LongHeads.paper,
    "per-head, per-token chunk choice: first + own + best chunks",
    lambda budget, *, block=64, **_: S.LongHeads(chunk_size=block, budget=budget),
)


# -- family E: policies for pretrained models (attnkit.hf; transformers is imported only when one is made) --
_POL = {"causal", "decode", "gqa", "padding"}


def _policy(name, paper, summary, make):
    """``factory(n, model, budget=0.25)``: the policy that holds ``budget * n`` KV entries per head on average
    at ``n`` tokens of context (``model`` is needed by the calibrated policies)."""
    register(name, family="E", paper=paper, exact=False, supports=_POL, kind="policy", factory=make, summary=summary)


def _hf():
    from . import hf

    return hf


def _tokens(n, budget):
    return max(8, int(budget * n))


def _duo(n, model=None, budget=0.25):
    hf = _hf()
    # streaming heads keep 16 sinks + 368 recent at 4k (a 16 + 240 window missed needles ~400 tokens back,
    # probed with other keys than the evaluation's); never more than half the per-head budget
    stream = min(384, _tokens(n, budget) // 2)
    sinks = min(16, stream // 4)
    return hf.DuoAttention.for_budget(hf.DuoAttention.load(model).gates, budget, n, sinks=sinks, recent=stream - sinks)


_policy(
    "streaming_llm",
    "Efficient Streaming Language Models with Attention Sinks (Xiao et al., ICLR 2024)",
    "sinks + recent window, as a prefill pattern and an evicting cache with RoPE re-rotation",
    lambda n, model=None, budget=0.25: _hf().StreamingLLM(budget=_tokens(n, budget), sinks=4),
)
_policy(
    "duo_attention",
    "DuoAttention: Efficient Long-Context LLM Inference with Retrieval and Streaming Heads (Xiao et al., 2024)",
    "retrieval heads keep the full cache, streaming heads sinks + window; gates calibrated offline",
    _duo,
)
_policy(
    "moa",
    "MoA: Mixture of Sparse Attention for Automatic Large Language Model Compression (Fu et al., 2024)",
    "per-head elastic window span = beta * N, chosen by a profiled DP under a mean-span budget",
    lambda n, model=None, budget=0.25: _hf().MoA.load(model, budget),
)
_policy(
    "h2o",
    "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language Models (Zhang et al., 2023)",
    "keep the keys with the largest accumulated attention plus a recent window",
    lambda n, model=None, budget=0.25: _hf().KVCompress(_hf().H2O(), budget=_tokens(n, budget), phase="both"),
)
_policy(
    "snapkv",
    "SnapKV: LLM Knows What You are Looking for Before Generation (Li et al., 2024)",
    "an observation window of the last prompt queries votes (max-pooled) for the keys to keep",
    lambda n, model=None, budget=0.25: _hf().KVCompress(_hf().SnapKV(), budget=_tokens(n, budget), phase="prefill"),
)
_policy(
    "head_aware_kv",
    "HACK: Head-Aware KV Cache Compression for Visual Autoregressive Modeling; Ada-KV",
    "per-head budgets from where each head's attention mass lies (joint top-k), real per-head memory",
    lambda n, model=None, budget=0.25: _hf().KVCompress(
        _hf().SnapKV(), budget=_tokens(n, budget), allocator=_hf().HeadAware(), phase="prefill"
    ),
)
_policy(
    "sparse_prefill",
    "Efficient Streaming Language Models with Attention Sinks (A-shape prefill, as in MInference)",
    "any static pattern at prefill only (here A-shape: sinks + window); decoding stays dense",
    lambda n, model=None, budget=0.25: _hf().SparsePrefill(P.AShape(4, _tokens(n, budget))),
)
