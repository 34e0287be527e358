r"""Token pruning inside a decoder (family F): tokens of a marked span really leave the sequence mid-model.

Published for the image tokens of vision-language models; here the span is a marked passage of text tokens
in SmolLM2 (or any Llama-style ``model.model.layers`` decoder), which the docstrings and reports say.

:func:`pruned_forward` runs the decoder layer by layer. After each layer that a pruner's schedule names, it
ranks the span's remaining tokens by the attention the **last token of the instruction** (before the scored
tail) gives them in that layer, averaged over heads, keeps the top ones and drops the rest from the hidden
states. Every later
layer then computes (and caches) fewer tokens, so time and memory fall. Kept tokens keep their original
positions (the rotary embedding uses them), and their order, so the causal mask stays right.

- :class:`FastV` (Chen et al., *An Image is Worth 1/2 Tokens After Layer 2*, 2024): one drop after layer
  ``K`` keeping a fraction ``keep`` of the span. FastV ranks by the attention the tokens receive; the
  last-token variant is PyramidDrop's, used here for both.
- :class:`PyramidDrop` (Xing et al., 2024): drops at several layers, each keeping ``ratio`` of what is left.
- :class:`DyVTE` (2024): the whole span leaves after layer ``L`` (its "visual tokens exit" point).
- :class:`PSigmoid`: keep counts following a sigmoid over depth (the P-Sigmoid schedule G-Search fits),
  ``n_l = n_0 / (1 + exp(k (l - l_0)))``, applied at every layer.
- :func:`g_search` (the same paper): a greedy search, shallow to deep, for the fewest tokens each layer can keep
  without losing performance on a validation set; returns a :class:`GSearch` schedule.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from ..errors import ShapeError, UnsupportedError, bad
from ..records import register
from .policy import Policy


@dataclass(frozen=True)
class FastV:
    """One drop after ``layer``: ``keep`` of the span stays."""

    layer: int = 2
    keep: float = 0.5

    def schedule(self, n_layers: int) -> dict:
        return {self.layer: self.keep}


@dataclass(frozen=True)
class PyramidDrop:
    """A drop after each of ``layers``, each keeping ``ratio`` of the span tokens left."""

    layers: tuple = (8, 16, 24)
    ratio: float = 0.5

    def schedule(self, n_layers: int) -> dict:
        return {lyr: self.ratio for lyr in self.layers}


@dataclass(frozen=True)
class DyVTE:
    """The whole span leaves after ``layer``."""

    layer: int = 16

    def schedule(self, n_layers: int) -> dict:
        return {self.layer: 0.0}


@dataclass(frozen=True)
class PSigmoid:
    """Span kept at layer ``l``: ``1 / (1 + exp(k (l - midpoint)))`` of the original, dropped layer by layer."""

    midpoint: float = 12.0
    k: float = 0.5

    def schedule(self, n_layers: int) -> dict:
        out, prev = {}, 1.0
        for layer in range(n_layers - 1):
            want = 1 / (1 + math.exp(self.k * (layer - self.midpoint)))
            out[layer] = min(1.0, want / prev) if prev > 0 else 0.0
            prev = want
        return out


@dataclass(frozen=True)
class GSearch:
    """A schedule found by :func:`g_search`: ``keeps[l]`` is the fraction of the span tokens still alive that
    survives layer ``l``."""

    keeps: dict = field(default_factory=dict)

    def schedule(self, n_layers: int) -> dict:
        return dict(self.keeps)

    def alive(self, n_layers: int) -> list:
        """The fraction of the span each layer computes (what the budget counts)."""
        out, frac = [], 1.0
        for layer in range(n_layers):
            out.append(frac)
            frac *= self.keeps.get(layer, 1.0)
        return out


def answer_logprob(model, items, pruner) -> float:
    """Mean over ``items`` of the answer's total log-probability, teacher-forced. Each item is
    ``(ids (1, N), span, answer_ids)`` with ``ids`` ending in the answer's tokens but the last."""
    total = 0.0
    for ids, span, answer in items:
        res = pruned_forward(model, ids, span=span, pruner=pruner, tail=len(answer))
        logp = torch.log_softmax(res.logits[0].float(), -1)
        total += float(logp[torch.arange(len(answer)), torch.tensor(answer)].sum())
    return total / len(items)


def g_search(model, items, *, layers=None, fractions=(0.125, 0.25, 0.5, 0.75), tolerance: float = 0.25) -> GSearch:
    r"""G-Search (Zhao et al., *Rethinking token reduction in MLLMs*, 2024): from the shallowest candidate layer
    to the deepest, keep the fewest top-ranked span tokens that do not lose performance on a validation set.

    The paper's observation is that the number of essential tokens never grows with depth, so each layer's
    choice is final and the next layer starts from it. Here "performance" is :func:`answer_logprob` on
    ``items`` and "no loss" is a drop of at most ``tolerance`` nats from dense (exact accuracy on a handful of
    CPU-sized validation prompts is too coarse to steer a search). At each layer of ``layers`` (default: every
    fourth layer from 2) the alive fraction of the span is tried at ``fractions`` below the current one, fewest
    first; the first that passes is kept. The 0 fraction (drop the whole span) is tried first at each layer.
    Costs at most ``len(layers) * (len(fractions) + 1)`` validation passes.
    """
    inner = getattr(model, "model", None)
    L = len(inner.layers) if inner is not None and hasattr(inner, "layers") else None
    if L is None:
        raise UnsupportedError(bad("model", "a Llama-style causal LM (model.model.layers)", type(model).__name__))
    if not items:
        raise ShapeError(bad("items", "at least one validation item (ids, span, answer_ids)", items))
    if tolerance < 0:
        raise ShapeError(bad("tolerance", "a non-negative number of nats", tolerance))
    layers = tuple(range(2, L - 1, 4)) if layers is None else tuple(sorted(layers))
    if any(not 0 <= lyr < L - 1 for lyr in layers):
        raise ShapeError(bad("layers", f"layers in [0, {L - 1})", layers))
    floor = answer_logprob(model, items, None) - tolerance
    keeps, alive = {}, 1.0
    for layer in layers:
        for f in (0.0,) + tuple(sorted(x for x in fractions if x < alive)):
            trial = GSearch({**keeps, layer: f / alive})
            if answer_logprob(model, items, trial) >= floor:
                keeps[layer], alive = f / alive, f
                break
        if alive == 0.0:
            break
    return GSearch(keeps)


PRUNERS = (FastV, PyramidDrop, DyVTE, PSigmoid, GSearch)


class _RankingRows(Policy):
    """Dense attention that also keeps, in chosen layers, the mean probabilities ``(B, Hq, K)`` of the ranking
    queries: the ``window`` queries that end ``tail`` positions before the end (the instruction's last tokens;
    the scored tail after them is never looked at, so the answer cannot steer what is kept)."""

    name = "ranking_rows"

    def __init__(self, layers, tail: int, window: int):
        self.layers, self.tail, self.window, self.rows = set(layers), tail, window, {}

    def attend(self, layer, q, k, v, key_padding_mask, q_offset, scale, causal):
        if layer not in self.layers:
            return None
        G = q.shape[1] // k.shape[1]
        Q = q.shape[2]
        end = Q - self.tail + 1
        qs = q[:, :, end - self.window : end].float()
        s = qs @ k.float().repeat_interleave(G, 1).transpose(-1, -2)
        s = s * (q.shape[-1] ** -0.5 if scale is None else scale)
        pos = torch.arange(end - self.window, end, device=q.device) + q_offset
        s = s.masked_fill(torch.arange(k.shape[2], device=q.device)[None, :] > pos[:, None], float("-inf"))
        self.rows[layer] = torch.softmax(s, -1).mean(2)
        return None


@dataclass
class Pruned:
    """What :func:`pruned_forward` returns: the logits of the last ``tail`` positions ``(B, tail, vocab)``, the
    tokens each layer computed, and the forward's seconds."""

    logits: torch.Tensor
    tokens_per_layer: list
    seconds: float

    @property
    def kv_tokens(self) -> int:
        """Cached key/value entries summed over layers (what a KV cache of this prefill would hold)."""
        return sum(self.tokens_per_layer)


def pruned_forward(model, ids, *, span, pruner=None, tail: int = 1, window: int = 1) -> Pruned:
    """One prefill of ``ids`` ``(1, N)`` with ``pruner`` dropping tokens of ``span = (start, end)``; None: dense.

    The last ``tail`` positions are scored: their logits are returned, and the first of them (position
    ``N - tail``, the end of the instruction) is the query whose attention ranks the span tokens; positions
    after it (a teacher-forced answer) never influence the ranking. ``window > 1`` ranks by the mean attention
    of the ``window`` queries ending there (the question's tokens, as SnapKV's observation window) instead of
    the single last instruction token of FastV and PyramidDrop."""
    from ._integration import applied

    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(inner, "rotary_emb"):
        raise UnsupportedError(
            bad("model", "a Llama-style causal LM (model.model.layers, rotary_emb)", type(model).__name__)
        )
    if ids.dim() != 2 or ids.shape[0] != 1:
        raise ShapeError(bad("ids", "(1, N) token ids (one prompt)", tuple(ids.shape)))
    N = ids.shape[1]
    a, b = span
    if not 0 <= a < b <= N - tail:
        raise ShapeError(bad("span", f"0 <= start < end <= {N - tail} (before the scored tail)", span))
    if not 1 <= window <= N - tail + 1 - b:
        raise ShapeError(bad("window", f"1 <= window <= {N - tail + 1 - b} (ranking queries after the span)", window))
    L = len(inner.layers)
    sched = {} if pruner is None else pruner.schedule(L)
    rec = _RankingRows(sched, tail, window)
    pos = torch.arange(N)[None]
    in_span = (pos[0] >= a) & (pos[0] < b)
    counts = []
    t0 = time.perf_counter()
    with applied(model, rec), torch.no_grad():
        h = inner.embed_tokens(ids)
        for layer, block in enumerate(inner.layers):
            counts.append(h.shape[1])
            h = block(h, attention_mask=None, position_ids=pos, position_embeddings=inner.rotary_emb(h, pos))
            if layer in sched:
                score = rec.rows.pop(layer)[0].mean(0)  # (current tokens,)
                alive = in_span.nonzero().flatten()
                n_keep = int(round(sched[layer] * len(alive)))
                top = alive[score[alive].topk(n_keep).indices] if n_keep else alive[:0]
                keep = ~in_span
                keep[top] = True
                h, pos, in_span = h[:, keep], pos[:, keep], in_span[keep]
        logits = model.lm_head(inner.norm(h[:, -tail:]))
    return Pruned(logits, counts, time.perf_counter() - t0)


def _factory(cls):
    def make(n, *, model=None, budget=0.5):
        return cls(keep=budget) if cls is FastV else cls()

    return make


for _name, _cls, _paper, _summary in (
    (
        "fastv",
        FastV,
        "An Image is Worth 1/2 Tokens After Layer 2 (FastV, Chen et al., 2024) [text span]",
        "one drop of span tokens after layer K, ranked by the last token's attention",
    ),
    (
        "pyramid_drop",
        PyramidDrop,
        "PyramidDrop: Accelerating LVLMs via Pyramid Visual Redundancy Reduction (2024) [text span]",
        "span tokens dropped in stages, each keeping a ratio of what is left",
    ),
    ("dyvte", DyVTE, "Dynamic Visual Token Exit (DyVTE, 2024) [text span]", "the whole span leaves after layer L"),
    (
        "p_sigmoid",
        PSigmoid,
        "Rethinking token reduction in MLLMs: G-Search and P-Sigmoid (2024) [text span]",
        "span kept per layer on a sigmoid schedule",
    ),
):
    register(
        _name,
        family="F",
        kind="pruner",
        paper=_paper,
        exact=False,
        supports=("causal", "gqa"),
        factory=_factory(_cls),
        summary=_summary,
        source=_cls,
    )
