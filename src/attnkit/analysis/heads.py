"""Detectors: which heads sink, retrieve, copy, look back one token or stay local (family H).

Each detector is a small frozen dataclass with the paper in its docstring and one method,
``run(model, tokenizer, ids=None) -> HeadScores`` (a layers x heads table). It captures what it needs with
:func:`~attnkit.analysis.capture` (block by block, no N x N map) on a prompt it generates (or the ``ids`` given),
so a score costs one forward (or one generation). Every detector is registered (kind ``analysis``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ShapeError, bad
from .observer import Statistics, capture
from .prompts import needles, repeated_tokens, text_ids
from .scores import HeadScores, register_tool


def _text_ids(tok, tokens: int, offset: int = 0) -> torch.Tensor:
    from ..models import english_text

    return text_ids(tok, english_text()[offset : offset + 8 * tokens], tokens)


def _forward(model, ids, attention_mask=None, **stats):
    with capture(model, Statistics(**stats)) as cap, torch.no_grad():
        model(input_ids=ids, attention_mask=attention_mask)
    return cap


def _check_fraction(name, v):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 1:
        raise ShapeError(bad(name, "a number in (0, 1)", v))


@dataclass(frozen=True)
class SinkHeads:
    """The attention sink (Gu et al., *When Attention Sink Emerges in Language Models*, ICLR 2025): a head is a
    sink head when its mean attention to the first token, over the queries of a prompt, exceeds ``threshold``
    (0.3, sail-sg/Attention-Sink's epsilon); the *sink rate* is the share of (layer, head) pairs that are.

    Scores are the mean first-token mass per head; ``extra["sink_rate"]`` the rate. The prompt is ``tokens``
    tokens of shipped English text, or ``ids``."""

    threshold: float = 0.3
    tokens: int = 256

    def __post_init__(self):
        _check_fraction("threshold", self.threshold)

    def run(self, model, tok, ids=None, attention_mask=None) -> HeadScores:
        ids = _text_ids(tok, self.tokens) if ids is None else ids
        mass = _forward(model, ids, attention_mask, first=1).first_mass.mean(0)
        rate = float((mass > self.threshold).double().mean())
        return HeadScores(
            "sink",
            mass,
            paper="When Attention Sink Emerges in Language Models: An Empirical View (Gu et al., 2025)",
            meaning="mean attention to the first token",
            extra={"sink_rate": round(rate, 4), "threshold": self.threshold, "tokens": int(ids.shape[1])},
        )


@dataclass(frozen=True)
class PreviousTokenHeads:
    """Previous-token heads: mean attention from each query to the token just before it (TransformerLens's
    ``previous_token_head`` pattern, its "mul" measure), on shipped text."""

    tokens: int = 256

    def run(self, model, tok, ids=None, attention_mask=None) -> HeadScores:
        ids = _text_ids(tok, self.tokens) if ids is None else ids
        mass = _forward(model, ids, attention_mask, offsets=(1,)).offset_mass(1).mean(0)
        return HeadScores(
            "previous_token",
            mass,
            paper="TransformerLens head_detector (previous_token_head)",
            meaning="mean attention to the previous token",
        )


@dataclass(frozen=True)
class InductionHeads:
    """Induction heads (Olsson et al., *In-context Learning and Induction Heads*, 2022): on a random token
    sequence repeated twice, the mean attention from each query of the second copy to the token *after* the
    same token's first occurrence (offset ``length - 1``), TransformerLens's ``induction_head`` pattern."""

    length: int = 32
    batch: int = 4
    seed: int = 0

    def run(self, model, tok, ids=None, attention_mask=None) -> HeadScores:
        if ids is not None:
            raise ShapeError(bad("ids", "None (the detector makes its repeated random sequences)", "ids"))
        ids, start = repeated_tokens(tok, length=self.length, batch=self.batch, seed=self.seed)
        queries = torch.zeros(ids.shape, dtype=torch.bool)
        queries[:, start:] = True
        cap = _forward(model, ids, offsets=(self.length - 1, 1), queries=queries)
        return HeadScores(
            "induction",
            cap.offset_mass(self.length - 1).mean(0),
            paper="In-context Learning and Induction Heads (Olsson et al., 2022)",
            meaning="attention to the token after the previous occurrence",
            extra={"length": self.length, "batch": self.batch},
        )


@dataclass(frozen=True)
class LocalHeads:
    """Local (streaming) heads: the mean mass inside a window of the ``window`` most recent keys (DuoAttention's
    streaming heads and MoA's local heads are the ones whose mass stays there)."""

    window: int = 16
    tokens: int = 512

    def run(self, model, tok, ids=None, attention_mask=None) -> HeadScores:
        ids = _text_ids(tok, self.tokens) if ids is None else ids
        cap = _forward(model, ids, attention_mask, window=self.window, first=1)
        local = cap.local_mass.mean(0)
        return HeadScores(
            "local",
            local,
            paper="DuoAttention: Efficient Long-Context LLM Inference with Retrieval and Streaming Heads (2024)",
            meaning=f"mass on the {self.window} most recent keys",
            extra={"window": self.window, "local_or_sink": "see sink"},
        )


@dataclass(frozen=True)
class SpanHeads:
    """Span-centric heads (VAR's "image-centric" heads, here on a marked span of text tokens): the mean mass
    that the queries after the span put on it. ``span = (start, end)`` token indices of ``ids``; without
    ``ids`` the span is the middle third of a shipped text prompt.

    Substitute: VAR selects heads by their attention to image tokens of a vision-language model; no such model
    runs offline here, so a text span stands in for the image."""

    span: tuple | None = None
    tokens: int = 256

    def run(self, model, tok, ids=None, attention_mask=None) -> HeadScores:
        ids = _text_ids(tok, self.tokens) if ids is None else ids
        N = ids.shape[1]
        a, b = self.span if self.span is not None else (N // 3, 2 * N // 3)
        if not 0 <= a < b < N:
            raise ShapeError(bad("span", f"0 <= start < end < {N} (queries must follow the span)", (a, b)))
        groups = torch.full(ids.shape, -1)
        groups[:, a:b] = 0
        groups[:, b:] = 1
        cap = _forward(model, ids, attention_mask, groups=groups)
        mass = cap.group_mass.mean(0)[..., 1, 0]  # queries after the span -> keys in it
        return HeadScores(
            "span",
            mass,
            paper="See What You Are Told: Visual Attention Sink in Large Multimodal Models (VAR, 2025) [text span]",
            meaning=f"mass from the later queries on tokens [{a}, {b})",
            extra={"span": [a, b]},
        )


@dataclass(frozen=True)
class HiddenSinks:
    """ACT's hidden attention sinks (Yu et al., *Unveiling and Harnessing Hidden Attention Sinks*, ICML 2024):
    tokens other than the first that draw far more attention than a uniform share. A key ``j`` is a sink of a
    head when the mean attention it receives exceeds ``alpha / N`` (our reading of ACT's threshold: ``alpha``
    times the uniform share ``1 / N``; ACT's code sets the threshold by an environment variable).

    Scores: the number of hidden sinks per head; ``extra["tokens"]`` lists the most common sink tokens."""

    alpha: float = 5.0
    tokens: int = 256

    def run(self, model, tok, ids=None, attention_mask=None) -> HeadScores:
        ids = _text_ids(tok, self.tokens) if ids is None else ids
        cap = _forward(model, ids, attention_mask, columns=True)
        N = ids.shape[1]
        counts, where = [], torch.zeros(N)
        for layer in cap.layers:
            col = cap.columns(layer).mean(0)  # (H, N)
            sinks = col > self.alpha / N
            sinks[:, 0] = False  # the first token is the visible sink; ACT looks past it
            counts.append(sinks.sum(-1).double())
            where += sinks.sum(0).double()
        top = where.topk(min(5, N))
        common = [(int(j), tok.decode([int(ids[0, j])]), int(c)) for c, j in zip(*top, strict=True) if c > 0]
        return HeadScores(
            "hidden_sinks",
            torch.stack(counts),
            paper="Unveiling and Harnessing Hidden Attention Sinks (ACT, Yu et al., 2024)",
            meaning=f"tokens past the first with mean received attention > {self.alpha}/N",
            extra={"alpha": self.alpha, "tokens": common},
        )


@dataclass(frozen=True)
class RetrievalHeads:
    """Retrieval heads (Wu et al., *Retrieval Head Mechanistically Explains Long-Context Factuality*, 2024): on
    needle-in-a-haystack prompts, at every generated token a head scores ``1 / |needle|`` when its most-attended
    key lies inside the needle *and* is the token being generated (copy-paste); the score sums over the
    generation and averages over prompts. The top-1 key of each decode step is captured per head (O(H N)
    memory, no N x N map); the paper's grid of 20 lengths x 10 depths is here ``depths`` at one ``tokens``, and
    its needle is a pass key (the needle SmolLM2-135M retrieves; :func:`~attnkit.analysis.needles`). The score
    is normalised by the needle's length, as in the paper, so a head that copies all of a 5-digit key from a
    20-token needle scores about 0.25."""

    tokens: int = 384
    depths: tuple = (0.2, 0.5, 0.8)
    seed: int = 0

    def run(self, model, tok, ids=None, attention_mask=None) -> HeadScores:
        if ids is not None:
            raise ShapeError(bad("ids", "None (the detector makes its needle prompts)", "ids"))
        prompts = needles(tok, tokens=self.tokens, depths=self.depths, seed=self.seed)
        total, found = None, 0
        for p in prompts:
            n_needle = p.end - p.start
            steps = len(tok(" " + p.answer, add_special_tokens=False).input_ids) + 1
            with capture(model, Statistics(top_k=1)) as cap, torch.no_grad():
                out = model.generate(p.ids, max_new_tokens=steps, do_sample=False)
            N = p.ids.shape[1]
            gen = out[0, N:]
            seq = out[0]
            scores = []
            for layer in cap.layers:
                _, keys = cap.top_k(layer)  # (1, H, N + steps - 1, 1)
                steps = keys[0, :, N - 1 : N - 1 + len(gen), 0]  # (H, T): the query that produced token t
                inside = (steps >= p.start) & (steps < p.end)
                copies = seq[steps.clamp_min(0)] == gen[None, : steps.shape[1]]
                scores.append((inside & copies).double().sum(-1) / n_needle)
            s = torch.stack(scores)
            total = s if total is None else total + s
            found += int(tok.decode(gen).strip().startswith(p.answer))
        return HeadScores(
            "retrieval",
            total / len(prompts),
            paper="Retrieval Head Mechanistically Explains Long-Context Factuality (Wu et al., 2024)",
            meaning="share of the needle copied by the head's top-1 attention while generated",
            extra={"prompts": len(prompts), "tokens": self.tokens, "needle_found": found},
        )


for _name, _cls, _paper, _summary in (
    (
        "sink_heads",
        SinkHeads,
        "When Attention Sink Emerges in Language Models: An Empirical View (Gu et al., 2025)",
        "heads whose mean attention to the first token exceeds 0.3, and the sink rate",
    ),
    ("previous_token_heads", PreviousTokenHeads, "TransformerLens head_detector", "attention to the previous token"),
    (
        "induction_heads",
        InductionHeads,
        "In-context Learning and Induction Heads (Olsson et al., 2022)",
        "attention to the token after the previous occurrence, on repeated random tokens",
    ),
    (
        "local_heads",
        LocalHeads,
        "DuoAttention (Xiao et al., 2024): streaming heads",
        "mass inside a window of recent keys",
    ),
    (
        "span_heads",
        SpanHeads,
        "See What You Are Told: Visual Attention Sink in LMMs (VAR, 2025), on a text span",
        "mass the later queries put on a marked span (a text span for VAR's image)",
    ),
    (
        "hidden_sinks",
        HiddenSinks,
        "Unveiling and Harnessing Hidden Attention Sinks (ACT, Yu et al., 2024)",
        "tokens past the first that draw more than alpha / N of the attention",
    ),
    (
        "retrieval_heads",
        RetrievalHeads,
        "Retrieval Head Mechanistically Explains Long-Context Factuality (Wu et al., 2024)",
        "heads whose top-1 attention copies the needle while it is generated",
    ),
):
    register_tool(_name, _cls, paper=_paper, summary=_summary, supports=("causal", "gqa", "padding"))
