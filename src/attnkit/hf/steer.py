r"""Training-free attention interventions on pretrained models (family G), one small dataclass per method.

An intervention changes, in chosen (layer, head) pairs, either the softmax temperature, the logits (an additive
bias on chosen keys) or the probabilities after the softmax. :class:`Steer` is the policy that applies a list
of them through :func:`attnkit.hf.apply`, so they work on any model whose attention runs through transformers'
``AttentionInterface``, with batch > 1, left padding, prefill and decode (the model's own cache):

.. code-block:: python

    steer = Steer([PASTA(span=(40, 60), heads={(12, 3), (14, 0)}), Temperature({(5, 2): 0.8})])
    with attnkit.hf.applied(model, steer):
        out = model.generate(**enc)

Per call, in each layer:

- no intervention touches the layer: attnkit's dense path, as under :class:`~attnkit.hf.Dense`;
- only temperatures (:class:`Temperature`, :class:`LogNScaling`, :class:`SSMax`): the queries of each head are
  scaled by its factor and the fast kernels run (scaling :math:`q_h` by :math:`t_h` scales its logits by
  :math:`t_h`, exactly);
- a bias or a probability edit: an explicit softmax over each KV head's query group, chunked over queries
  (no full ``Q x K`` tensor per layer), biases added to the logits, then the probability edits in list order.

**Identity settings are identity**: a temperature of 1, ``alpha = 1`` for PASTA, ``beta = 1`` for ACT,
``rho = 0`` for VAR, ``alpha = 0`` for the head perturbation install nothing in the layer (the output is
bit-identical to :class:`~attnkit.hf.Dense`, tested).

Spans are token *indices* of the prompt (the same for every batch row; with left padding, give indices into
the padded batch); keys past the prompt (generated tokens) are outside every span. Methods published for
vision-language models (ACT's hidden-sink heads, VAR's image-centric heads) act here on a marked span of text
tokens: the docstrings say so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..errors import ShapeError, bad
from ..patterns.causal import Causal
from ..records import register
from .policy import Policy

_CHUNK = 1 << 23  # logits per chunk of the explicit path


def _heads(value, name) -> frozenset:
    try:
        out = frozenset((int(a), int(b)) for a, b in value)
    except (TypeError, ValueError):
        raise ShapeError(bad(name, "an iterable of (layer, head) pairs", value)) from None
    if any(a < 0 or b < 0 for a, b in out):
        raise ShapeError(bad(name, "non-negative layer and head indices", sorted(out)))
    return out


def _span(value, name) -> tuple[int, int]:
    if not (isinstance(value, tuple) and len(value) == 2 and all(isinstance(x, int) for x in value)):
        raise ShapeError(bad(name, "a (start, end) tuple of token indices", value))
    if not 0 <= value[0] < value[1]:
        raise ShapeError(bad(name, "0 <= start < end", value))
    return value


def _in_span(span, K, device) -> torch.Tensor:
    j = torch.arange(K, device=device)
    return (j >= span[0]) & (j < span[1])


class Intervention:
    """Base class: say which layers it touches; give temperatures, a logit bias or a probability edit."""

    def layers(self) -> set:
        return set()

    def temperature(self, layer: int, q_heads: int, kv_len: int, q_len: int):
        """Logit multipliers for this call: ``(q_heads,)``, or ``(q_heads, q_len)`` per query; or None."""
        return None

    def bias(self, layer: int, q_heads: int, kv_len: int, device):
        """``(q_heads, kv_len)`` additive logit bias, or None."""
        return None

    def edit(self, layer: int, p: torch.Tensor, heads: torch.Tensor, q_pos: torch.Tensor, valid: torch.Tensor):
        """Edit probabilities ``p`` ``(B, G, Q, K)`` of query heads ``heads`` ``(G,)`` in place or return new ones;
        ``q_pos`` ``(Q,)`` the queries' key indices, ``valid`` ``(B, K)``. None: no edit in this layer."""
        return None


@dataclass(frozen=True)
class Temperature(Intervention):
    r"""Per-(layer, head) logit temperature: :math:`\mathrm{softmax}(t_{l,h}\, s\, q k^\top)` (``t > 1``
    sharpens). The knob that model code hides (Llama 4's attention temperature tuning, YaRN's mscale, Qwen's
    log-n attention), here post hoc, for any head. ``factors``: ``{(layer, head): t}``."""

    factors: dict

    def __post_init__(self):
        _heads(self.factors, "factors")
        for k, t in self.factors.items():
            if not (isinstance(t, (int, float)) and math.isfinite(t) and t > 0):
                raise ShapeError(bad(f"factors[{k}]", "a finite temperature > 0", t))

    def layers(self):
        return {layer for (layer, _), t in self.factors.items() if t != 1}

    def temperature(self, layer, q_heads, kv_len, q_len):
        t = torch.ones(q_heads, dtype=torch.float64)
        for (lyr, h), f in self.factors.items():
            if lyr == layer and h < q_heads:
                t[h] = f
        return None if bool((t == 1).all()) else t


def _keys_seen(kv_len: int, q_len: int) -> torch.Tensor:
    """``(q_len,)`` float64: the keys each query of a causal call sees."""
    return torch.arange(kv_len - q_len + 1, kv_len + 1, dtype=torch.float64)


def _per_query(t: torch.Tensor, q_len: int) -> torch.Tensor:
    return t[:, None].expand(-1, q_len) if t.dim() == 1 else t


@dataclass(frozen=True)
class LogNScaling(Intervention):
    r"""Entropy-aware log-n scaling (the training-free variable-size adaptation of diffusion models; Qwen's
    ``use_logn_attn`` for LLMs): logits multiplied by :math:`\sqrt{\log n / \log n_{train}}` once the ``n`` keys a
    query sees exceed ``train_length`` (1 below it), so the attention entropy stays where it was trained.
    ``sqrt=False`` uses :math:`\log n / \log n_{train}` (Qwen's form). All layers and heads unless ``only``.

    ``n`` is per query: query ``i`` of a causal call over ``K`` keys with ``Q`` queries sees
    :math:`n_i = K - Q + i + 1` keys (left padding counted), so a long prefill scales only its late queries."""

    train_length: int = 2048
    sqrt: bool = True
    only: tuple | None = None

    def __post_init__(self):
        if isinstance(self.train_length, bool) or not isinstance(self.train_length, int) or self.train_length < 2:
            raise ShapeError(bad("train_length", "an int >= 2", self.train_length))

    def temperature(self, layer, q_heads, kv_len, q_len):
        if self.only is not None and layer not in self.only:
            return None
        if kv_len <= self.train_length:
            return None
        n = _keys_seen(kv_len, q_len)
        r = (n.log() / math.log(self.train_length)).clamp_min(1.0)
        return (r.sqrt() if self.sqrt else r)[None].expand(q_heads, q_len)


@dataclass(frozen=True)
class SSMax(Intervention):
    r"""Scalable-Softmax (Nakanishi, 2025) swapped in after pretraining: logits multiplied by :math:`s \log n`
    with ``n`` the number of keys the query sees (per query, as :class:`LogNScaling`). The paper trains ``s``
    per head; post hoc, ``s = 1 / log n_train`` keeps the softmax unchanged at the training length, softens it
    before and sharpens it past it (which is what the paper's "swap in after pretraining" experiment
    measures). All layers and heads unless ``only``."""

    train_length: int = 2048
    only: tuple | None = None

    def temperature(self, layer, q_heads, kv_len, q_len):
        if self.only is not None and layer not in self.only:
            return None
        t = _keys_seen(kv_len, q_len).clamp_min(2).log() / math.log(self.train_length)
        return None if bool((t == 1).all()) else t[None].expand(q_heads, q_len)


@dataclass(frozen=True)
class PASTA(Intervention):
    r"""PASTA (Zhang et al., *Tell Your Model Where to Attend: Post-hoc Attention Steering for LLMs*, 2024):
    in the chosen heads, the attention on tokens *outside* the emphasised span is scaled by ``alpha`` and the
    rows renormalised, i.e. :math:`\log\alpha` is added to their logits (pastalib's default
    ``scale_position="exclude"``; ``"include"`` adds :math:`-\log\alpha` to the span's logits instead, the same
    distribution). ``alpha = 1`` is no steering. The paper selects heads by profiling on held-out examples; pass
    the heads (e.g. the top of an :mod:`attnkit.analysis` span score)."""

    span: tuple
    heads: frozenset
    alpha: float = 0.01
    scale: str = "exclude"

    def __post_init__(self):
        object.__setattr__(self, "span", _span(self.span, "span"))
        object.__setattr__(self, "heads", _heads(self.heads, "heads"))
        if not (isinstance(self.alpha, (int, float)) and 0 < self.alpha <= 1):
            raise ShapeError(bad("alpha", "a number in (0, 1]", self.alpha))
        if self.scale not in ("exclude", "include"):
            raise ShapeError(bad("scale", "'exclude' or 'include'", self.scale))

    def layers(self):
        return set() if self.alpha == 1 else {layer for layer, _ in self.heads}

    def bias(self, layer, q_heads, kv_len, device):
        hs = [h for lyr, h in self.heads if lyr == layer and h < q_heads]
        if not hs or self.alpha == 1:
            return None
        inside = _in_span(self.span, kv_len, device)
        b = torch.zeros(q_heads, kv_len, device=device)
        la = math.log(self.alpha)
        row = torch.where(inside, 0.0, la) if self.scale == "exclude" else torch.where(inside, -la, 0.0)
        b[hs] = row.to(b)
        return b


@dataclass(frozen=True)
class SpanAmplification(Intervention):
    r"""Imbalanced-attention amplification (*Fixing Imbalanced Attention to Mitigate In-Context Hallucination
    of Large Vision-Language Models*, 2025): attention to a span is amplified in each head in proportion to the
    head's sensitivity to it, :math:`p_{ij} \propto (1 + \gamma s_h)\, p_{ij}` for ``j`` in the span, i.e.
    :math:`\log(1 + \gamma s_h)` added to the span's logits. ``sensitivity``: ``{(layer, head): s_h >= 0}`` (for
    instance a :class:`attnkit.analysis.SpanHeads` score). The paper's dual-stream token selection picks the
    span among image tokens; here the span is a marked passage of text. ``gamma = 0`` is no change."""

    span: tuple
    sensitivity: dict
    gamma: float = 1.0

    def __post_init__(self):
        object.__setattr__(self, "span", _span(self.span, "span"))
        _heads(self.sensitivity, "sensitivity")
        if any(not (isinstance(v, (int, float)) and v >= 0) for v in self.sensitivity.values()):
            raise ShapeError(bad("sensitivity", "scores >= 0 per (layer, head)", self.sensitivity))
        if not (isinstance(self.gamma, (int, float)) and self.gamma >= 0):
            raise ShapeError(bad("gamma", "a number >= 0", self.gamma))

    def layers(self):
        return set() if self.gamma == 0 else {layer for (layer, _), v in self.sensitivity.items() if v > 0}

    def bias(self, layer, q_heads, kv_len, device):
        gains = {h: v for (lyr, h), v in self.sensitivity.items() if lyr == layer and h < q_heads and v > 0}
        if not gains or self.gamma == 0:
            return None
        inside = _in_span(self.span, kv_len, device).float()
        b = torch.zeros(q_heads, kv_len, device=device)
        for h, v in gains.items():
            b[h] = inside * math.log1p(self.gamma * v)
        return b


@dataclass(frozen=True)
class SpanKnockout(Intervention):
    """Every query's attention to a span removed in chosen layers (all heads): the counterfactual attention of
    :func:`contrastive_logits` (CausalMM's "the model without the image", on a text span). Queries inside the
    span keep their own keys in it, so no row is left empty."""

    span: tuple
    layers_: tuple = ()

    def __post_init__(self):
        object.__setattr__(self, "span", _span(self.span, "span"))
        object.__setattr__(self, "layers_", tuple(int(x) for x in self.layers_))

    def layers(self):
        return set(self.layers_)

    def edit(self, layer, p, heads, q_pos, valid):
        if layer not in self.layers_:
            return None
        inside = _in_span(self.span, p.shape[-1], p.device)
        return _cut(p, inside[None, :] & ~inside[q_pos][:, None])


@dataclass(frozen=True)
class GroupKnockout(Intervention):
    """The pairs from ``dst`` queries to ``src`` keys removed in ``layers_`` (all heads), rows renormalised (a row
    left with no key gives 0). ``src``, ``dst``: ``(N,)`` bool masks over token indices; indices past them (generated
    tokens) are in neither group. The attention knockout of :func:`attnkit.analysis.knockout`."""

    src: torch.Tensor
    dst: torch.Tensor
    layers_: tuple = ()

    def layers(self):
        return set(self.layers_)

    def edit(self, layer, p, heads, q_pos, valid):
        if layer not in self.layers_:
            return None
        K = p.shape[-1]
        src = torch.nn.functional.pad(self.src.to(torch.bool), (0, max(0, K - len(self.src))))[:K]
        dst = torch.nn.functional.pad(self.dst.to(torch.bool), (0, max(0, K - len(self.dst))))[q_pos]
        return _cut(p, dst[:, None] & src[None, :])


def _cut(p: torch.Tensor, cut: torch.Tensor) -> torch.Tensor:
    """``p`` ``(B, G, Q, K)`` without the pairs ``cut`` ``(Q, K)``, rows renormalised (an emptied row stays 0)."""
    kept = p.masked_fill(cut[None, None], 0.0)
    return kept / kept.sum(-1, keepdim=True).clamp_min(1e-30)


@dataclass(frozen=True)
class ACT(Intervention):
    r"""ACT's attention calibration (Yu et al., *Unveiling and Harnessing Hidden Attention Sinks*, 2024): in
    the chosen heads, every key other than the first whose column draws more than ``alpha / N`` of the attention
    (a hidden sink, :class:`attnkit.analysis.HiddenSinks`) keeps ``beta`` of its mass and the removed mass goes
    to the other keys of the row in proportion to their attention:

    .. math:: p'_{is} = \beta p_{is}\ (s \in S), \qquad p'_{ij} = p_{ij} + (1 - \beta)\,\frac{\sum_{s} p_{is}}
        {1 - \sum_{s} p_{is}}\, p_{ij}\ (j \notin S).

    Sinks are found per call from the column means of the call's queries (a decode step: from its one
    query; a call over 8M logits per KV head: per chunk of queries). ``beta = 1`` is no calibration. ACT
    searches its heads on held-out prompts; pass them."""

    heads: frozenset
    beta: float = 0.4
    alpha: float = 5.0

    def __post_init__(self):
        object.__setattr__(self, "heads", _heads(self.heads, "heads"))
        if not (isinstance(self.beta, (int, float)) and 0 <= self.beta <= 1):
            raise ShapeError(bad("beta", "a number in [0, 1]", self.beta))

    def layers(self):
        return set() if self.beta == 1 else {layer for layer, _ in self.heads}

    def edit(self, layer, p, heads, q_pos, valid):
        mine = torch.tensor([(layer, int(h)) in self.heads for h in heads], device=p.device)
        if self.beta == 1 or not bool(mine.any()):
            return None
        n = valid.sum(-1).clamp_min(1).to(p.dtype)  # (B,)
        col = p.mean(2)  # (B, G, K)
        sink = col > (self.alpha / n)[:, None, None]
        first = valid.float().argmax(-1)  # the first real token stays
        sink[torch.arange(p.shape[0]), :, first] = False
        sink &= mine[None, :, None]
        mass = (p * sink[:, :, None, :]).sum(-1, keepdim=True)  # (B, G, Q, 1)
        rest = (1 - mass).clamp_min(1e-12)
        grow = 1 + (1 - self.beta) * mass / rest
        return torch.where(sink[:, :, None, :], p * self.beta, p * grow)


@dataclass(frozen=True)
class VAR(Intervention):
    r"""VAR (Kang et al., *See What You Are Told: Visual Attention Sink in Large Multimodal Models*, 2025): in
    span-centric heads, a share ``rho`` of the mass on the sink (the first real token) moves onto the span, in
    proportion to the span's own attention:

    .. math:: p'_{i0} = (1 - \rho)\, p_{i0}, \qquad p'_{ij} = p_{ij} + \rho\, p_{i0}\, \frac{p_{ij}}{\sum_{j'
        \in \text{span}} p_{ij'}}\ (j \in \text{span}).

    Substitute: VAR acts on the image tokens of a vision-language model and picks the heads whose image
    attention is high; here the span is a marked passage of text (the heads from
    :class:`attnkit.analysis.SpanHeads`). ``rho = 0`` is no change."""

    span: tuple
    heads: frozenset
    rho: float = 0.5

    def __post_init__(self):
        object.__setattr__(self, "span", _span(self.span, "span"))
        object.__setattr__(self, "heads", _heads(self.heads, "heads"))
        if not (isinstance(self.rho, (int, float)) and 0 <= self.rho <= 1):
            raise ShapeError(bad("rho", "a number in [0, 1]", self.rho))

    def layers(self):
        return set() if self.rho == 0 else {layer for layer, _ in self.heads}

    def edit(self, layer, p, heads, q_pos, valid):
        mine = torch.tensor([(layer, int(h)) in self.heads for h in heads], device=p.device)
        if self.rho == 0 or not bool(mine.any()):
            return None
        K = p.shape[-1]
        inside = _in_span(self.span, K, p.device).to(p.dtype)
        first = valid.float().argmax(-1)  # (B,)
        sink = p.gather(-1, first[:, None, None, None].expand(*p.shape[:3], 1))[..., 0]
        span_mass = (p * inside).sum(-1)
        move = torch.where(span_mass > 0, self.rho * sink, torch.zeros_like(sink)) * mine[None, :, None]
        out = p + move[..., None] * p * inside / span_mass.clamp_min(1e-30)[..., None]
        return out.scatter_add(-1, first[:, None, None, None].expand(*p.shape[:3], 1), -move[..., None])


@dataclass(frozen=True)
class HeadPerturbation(Intervention):
    r"""HeadHunter / SoftPAG's per-head perturbation: :math:`A_h \leftarrow (1 - \alpha) A_h + \alpha I` in the
    chosen heads (each query keeps ``1 - alpha`` of its attention and puts ``alpha`` on itself). Published as the
    "weak model" of perturbed-attention guidance in diffusion transformers; here on a language model's heads,
    the guidance itself (contrasting the two outputs) is the caller's. ``alpha = 0`` is no perturbation."""

    heads: frozenset
    alpha: float = 1.0

    def __post_init__(self):
        object.__setattr__(self, "heads", _heads(self.heads, "heads"))
        if not (isinstance(self.alpha, (int, float)) and 0 <= self.alpha <= 1):
            raise ShapeError(bad("alpha", "a number in [0, 1]", self.alpha))

    def layers(self):
        return set() if self.alpha == 0 else {layer for layer, _ in self.heads}

    def edit(self, layer, p, heads, q_pos, valid):
        mine = torch.tensor([(layer, int(h)) in self.heads for h in heads], device=p.device, dtype=p.dtype)
        if self.alpha == 0 or not bool(mine.any()):
            return None
        eye = torch.zeros(p.shape[2], p.shape[3], dtype=p.dtype, device=p.device)
        eye[torch.arange(p.shape[2]), q_pos] = 1.0
        a = self.alpha * mine[None, :, None, None]
        return (1 - a) * p + a * eye


@dataclass(frozen=True)
class VHR(Intervention):
    r"""VHR (He et al., *Cracking the Code of Hallucination in LVLMs with Vision-aware Head Divergence*, 2024):
    reinforce the heads whose output depends most on the context by scaling their outputs,
    :math:`o_h \leftarrow \alpha_h o_h`. Since :math:`o_h = A_h V`, this is :math:`A_h \leftarrow \alpha_h A_h`
    (rows then sum to :math:`\alpha_h`, which is the point: the head speaks louder in the residual stream).

    The heads come from VHD, the divergence of each head's output with and without the context
    (:func:`attnkit.analysis.context_divergence`); :meth:`from_scores` takes the ``top`` of such scores.
    Choices: VHD/VHR's paper scores heads per generated token with the image and without it; here the heads
    are chosen once, on held-out prompts (one extra forward pass per prompt, not per token), and every chosen
    head gets the same ``alpha``. Substitute: the context is a text passage, not an image. ``alpha = 1`` is no
    change."""

    factors: dict

    def __post_init__(self):
        try:
            f = {(int(a), int(b)): float(x) for (a, b), x in dict(self.factors).items()}
        except (TypeError, ValueError):
            raise ShapeError(bad("factors", "a {(layer, head): factor} dict", self.factors)) from None
        if any(x <= 0 for x in f.values()):
            raise ShapeError(bad("factors", "positive output factors", f))
        _heads(f, "factors")
        object.__setattr__(self, "factors", f)

    @classmethod
    def from_scores(cls, scores, *, top: int = 16, alpha: float = 1.5) -> "VHR":
        """The ``top`` heads of a :class:`~attnkit.analysis.HeadScores` (e.g. ``context_divergence``), each scaled
        by ``alpha``."""
        return cls({(layer, head): alpha for layer, head, _ in scores.top(top)})

    def layers(self):
        return {layer for (layer, _), x in self.factors.items() if x != 1.0}

    def edit(self, layer, p, heads, q_pos, valid):
        f = torch.tensor([self.factors.get((layer, int(h)), 1.0) for h in heads], device=p.device, dtype=p.dtype)
        if bool((f == 1).all()):
            return None
        return p * f[None, :, None, None]


@dataclass(frozen=True)
class CARVE(Intervention):
    r"""CARVE (*Focusing by Contrastive Attention*, 2025): the attention a **task** query pays to the context,
    contrasted with the attention a **general** query pays to it, separates what the task needs from what any
    query looks at (the "noise"); only the task-relevant context stays.

    With :math:`a^{task}_j` and :math:`a^{gen}_j` the attention of each prompt's last token to context token
    :math:`j`, averaged over heads and the ``layers`` used, each normalised over the span, the contrast is
    :math:`c_j = a^{task}_j - a^{gen}_j`; the ``keep`` share of the span with the highest contrast stays and
    every other span token is masked from every query outside the span, in ``layers_`` (:func:`carve`: all;
    rows renormalised), as
    CARVE masks the image outside the extracted regions before answering.

    Choices: CARVE's paper builds pixel-level masks from the contrast of attention maps of a VLM and re-runs on
    the masked image; here the span is a text passage, the mask drops tokens from attention (not from the
    input), and the contrast is the difference of normalised maps. Substitute: a text passage for the image.
    Build it with :func:`carve` (which computes the two maps); ``keep = 1`` is no change."""

    span: tuple
    drop: tuple = ()
    layers_: tuple = ()

    def __post_init__(self):
        object.__setattr__(self, "span", _span(self.span, "span"))
        object.__setattr__(self, "layers_", tuple(int(x) for x in self.layers_))
        drop = tuple(sorted(int(t) for t in self.drop))
        a, b = self.span
        if any(not a <= t < b for t in drop):
            raise ShapeError(bad("drop", f"token indices inside the span {self.span}", drop))
        object.__setattr__(self, "drop", drop)

    def layers(self):
        return set(self.layers_) if self.drop else set()

    def edit(self, layer, p, heads, q_pos, valid):
        if not self.drop or layer not in self.layers_:
            return None
        K = p.shape[-1]
        gone = torch.zeros(K, dtype=torch.bool, device=p.device)
        idx = torch.tensor([t for t in self.drop if t < K], dtype=torch.long, device=p.device)
        gone[idx] = True
        outside = ~_in_span(self.span, K, p.device)[q_pos]
        return _cut(p, gone[None, :] & outside[:, None])


def carve(model, task_ids, general_ids, *, span, keep: float = 0.5, layers=None) -> CARVE:
    """A :class:`CARVE` mask from one forward of ``task_ids`` and one of ``general_ids`` ``(1, N)``: two prompts
    holding the same context at ``span`` and ending in different queries. ``layers``: the second half by
    default (CARVE finds attention focused in deep layers)."""
    from ._integration import applied
    from .prune import _RankingRows

    if not 0 < keep <= 1:
        raise ShapeError(bad("keep", "a fraction in (0, 1]", keep))
    span = _span(span, "span")
    a, b = span
    L = model.config.num_hidden_layers
    layers = tuple(range(L // 2, L)) if layers is None else tuple(layers)
    maps = []
    for ids in (task_ids, general_ids):
        if ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] <= b:
            raise ShapeError(bad("task_ids/general_ids", f"(1, N) ids with N > {b} (the span's end)", tuple(ids.shape)))
        rec = _RankingRows(layers, 1, 1)
        with applied(model, rec), torch.no_grad():
            model(input_ids=ids)
        m = torch.stack([rec.rows[layer][0].mean(0)[a:b] for layer in layers]).mean(0)
        maps.append(m / m.sum().clamp_min(1e-30))
    contrast = maps[0] - maps[1]
    n_keep = max(1, int(round(keep * (b - a))))
    kept = set(contrast.topk(n_keep).indices.tolist())
    return CARVE(span=span, drop=tuple(a + i for i in range(b - a) if i not in kept), layers_=tuple(range(L)))


@dataclass(frozen=True)
class Steer(Policy):
    """Dense attention with ``interventions`` applied in list order (probability edits) and combined
    (temperatures multiply, biases add). See the module docstring for which path a layer takes."""

    interventions: tuple = field(default_factory=tuple)
    name = "steer"

    def __post_init__(self):
        items = tuple(self.interventions) if not isinstance(self.interventions, Intervention) else (self.interventions,)
        for i, x in enumerate(items):
            if not isinstance(x, Intervention):
                raise ShapeError(bad(f"interventions[{i}]", "an attnkit.hf.steer Intervention", type(x).__name__))
        object.__setattr__(self, "interventions", items)

    def describe(self) -> str:
        return "steer(" + ", ".join(type(x).__name__ for x in self.interventions) + ")"

    def combined(self, layer: int, q_heads: int, kv_len: int, q_len: int, device):
        """The layer's interventions combined: temperatures ``(Hq, Q)`` multiplied, biases ``(Hq, K)`` added (None
        when there are none), and the probability edits in list order."""
        temps, biases, edits = None, None, []
        for x in self.interventions:
            t = x.temperature(layer, q_heads, kv_len, q_len)
            if t is not None:
                temps = _per_query(t, q_len) if temps is None else temps * _per_query(t, q_len)
            b = x.bias(layer, q_heads, kv_len, device)
            if b is not None:
                biases = b if biases is None else biases + b
            if layer in x.layers() and type(x).edit is not Intervention.edit:
                edits.append(x)
        return temps, biases, edits

    def attend(self, layer, q, k, v, key_padding_mask, q_offset, scale, causal):
        B, Hq, Q, D = q.shape
        K = k.shape[2]
        scale = D**-0.5 if scale is None else scale
        temps, biases, edits = self.combined(layer, Hq, K, Q, q.device)
        if temps is None and biases is None and not edits:
            return None
        if temps is not None:
            q = q * temps.to(q.dtype).view(1, Hq, Q, 1)
        if biases is None and not edits:
            from ..api import attention

            return attention(
                q,
                k,
                v,
                pattern=Causal() if causal else None,
                key_padding_mask=key_padding_mask,
                q_offset=q_offset,
                scale=scale,
            )
        return _explicit(q, k, v, key_padding_mask, q_offset, scale, causal, biases, edits, layer)


def contrastive_logits(model, input_ids, counterfactual: Steer, *, beta: float = 1.0, attention_mask=None):
    r"""CausalMM's counterfactual-attention correction at the logit level: with the factual run's logits
    :math:`z` and the counterfactual run's :math:`z_{cf}` (attention changed by ``counterfactual``, e.g. a
    :class:`SpanKnockout` of the context), returns :math:`(1 + \beta) z - \beta z_{cf}`, which favours what the
    context, and not the prior, supports. ``beta = 0`` returns the factual logits."""
    from ._integration import applied

    with torch.no_grad():
        z = model(input_ids=input_ids, attention_mask=attention_mask).logits
        if beta == 0:
            return z
        with applied(model, counterfactual):
            zc = model(input_ids=input_ids, attention_mask=attention_mask).logits
    return (1 + beta) * z - beta * zc


def _explicit(q, k, v, kpm, q_offset, scale, causal, biases, edits, layer):
    """Softmax per KV head's query group with biases and probability edits, chunked over queries."""
    B, Hq, Q, D = q.shape
    Hkv, K = k.shape[1], k.shape[2]
    G = Hq // Hkv
    valid = torch.ones(B, K, dtype=torch.bool, device=q.device) if kpm is None else kpm.to(torch.bool)
    out = torch.empty(B, Hq, Q, v.shape[-1], dtype=q.dtype, device=q.device)
    step = max(1, _CHUNK // max(1, B * G * K))
    kidx = torch.arange(K, device=q.device)
    cd = torch.float64 if q.dtype == torch.float64 else torch.float32
    for h in range(Hkv):
        heads = torch.arange(h * G, (h + 1) * G, device=q.device)
        kh, vh = k[:, h].to(cd), v[:, h].to(cd)
        for a in range(0, Q, step):
            e = min(Q, a + step)
            qpos = q_offset + torch.arange(a, e, device=q.device)
            s = torch.matmul(q[:, heads, a:e].to(cd), kh.transpose(-1, -2)[:, None]) * scale
            if biases is not None:
                s = s + biases[heads][None, :, None, :].to(cd)
            allowed = valid[:, None, None, :]
            if causal:
                allowed = allowed & (kidx[None, :] <= qpos[:, None])[None, None]
            s = s.masked_fill(~allowed, float("-inf"))
            top = s.amax(-1, keepdim=True)
            p = torch.exp(s - torch.where(torch.isfinite(top), top, torch.zeros_like(top)))
            p = p / p.sum(-1, keepdim=True).clamp_min(torch.finfo(cd).tiny)
            for x in edits:
                got = x.edit(layer, p, heads, qpos, valid)
                if got is not None:
                    p = got
            out[:, heads, a:e] = torch.matmul(p, vh[:, None]).to(q.dtype)
    return out


def _make(cls, **kw):
    return lambda n, *, model=None: Steer((cls(**kw),))


for _name, _cls, _kw, _paper, _summary in (
    (
        "head_temperature",
        Temperature,
        {"factors": {(0, 0): 1.2}},
        "Attention temperature as model code sets it (Llama 4 attn_temperature_tuning, YaRN mscale)",
        "per-(layer, head) logit temperature",
    ),
    (
        "logn_scaling",
        LogNScaling,
        {},
        "Training-free Diffusion Model Adaptation for Variable-Sized Text-to-Image Synthesis (2023)",
        "logits scaled by sqrt(log n / log n_train) past the training length",
    ),
    (
        "ssmax",
        SSMax,
        {},
        "Scalable-Softmax Is Superior for Attention (Nakanishi, 2025)",
        "logits scaled by s log n, swapped in after pretraining",
    ),
    (
        "pasta",
        PASTA,
        {"span": (0, 8), "heads": {(0, 0)}},
        "Tell Your Model Where to Attend: Post-hoc Attention Steering for LLMs (PASTA, Zhang et al., 2024)",
        "log alpha added to the logits outside an emphasised span, in chosen heads",
    ),
    (
        "span_amplification",
        SpanAmplification,
        {"span": (0, 8), "sensitivity": {(0, 0): 1.0}},
        "Fixing Imbalanced Attention to Mitigate In-Context Hallucination of LVLMs (2025) [text span]",
        "span attention amplified per head in proportion to its sensitivity",
    ),
    (
        "span_knockout",
        SpanKnockout,
        {"span": (0, 8), "layers_": (0,)},
        "CausalMM: counterfactual attention for modality priors (2025) [text span]; see contrastive_logits",
        "attention to a span removed: the counterfactual of a logit contrast",
    ),
    (
        "act_calibration",
        ACT,
        {"heads": {(0, 0)}},
        "Unveiling and Harnessing Hidden Attention Sinks (ACT, Yu et al., 2024)",
        "hidden sinks keep beta of their mass, the rest goes to the other keys",
    ),
    (
        "var_redistribution",
        VAR,
        {"span": (0, 8), "heads": {(0, 0)}},
        "See What You Are Told: Visual Attention Sink in Large Multimodal Models (VAR, 2025) [text span]",
        "sink mass moved onto a span in span-centric heads",
    ),
    (
        "vhr",
        VHR,
        {"factors": {(0, 0): 1.5}},
        "Cracking the Code of Hallucination in LVLMs with Vision-aware Head Divergence (VHD/VHR, 2024) [text span]",
        "outputs of the heads that diverge most without the context, scaled up",
    ),
    (
        "carve",
        CARVE,
        {"span": (0, 8), "drop": (1, 3), "layers_": (0,)},
        "Focusing by Contrastive Attention: Enhancing VLMs' Visual Reasoning (CARVE, 2025) [text span]",
        "context tokens a general query attends as much as the task query masked out",
    ),
    (
        "head_perturbation",
        HeadPerturbation,
        {"heads": {(0, 0)}},
        "HeadHunter / SoftPAG: fine-grained perturbation guidance via attention head selection (2025)",
        "A <- (1 - alpha) A + alpha I in chosen heads",
    ),
):
    register(
        _name,
        family="G",
        kind="intervention",
        paper=_paper,
        exact=True,
        supports=("causal", "gqa", "padding", "decode"),
        factory=_make(_cls, **_kw),
        summary=_summary,
        source=_cls,
    )
