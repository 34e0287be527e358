"""MoA: a per-head elastic window, chosen from an offline profile of each head's influence on the loss.

Fu et al., *MoA: Mixture of Sparse Attention for Automatic Large Language Model Compression* (2024). Every head
gets sinks plus a sliding window whose span grows with the input, ``span_h = beta_h * N``; a profile measures
how much the loss would rise if each head lost the attention outside each candidate span, and a search picks
the spans that lose least under an average-span budget.

Choices where the paper has more machinery: the profile is per KV head (the cache is per KV head; the paper
converts GQA models to MHA first), spans are pure ``beta * N`` from a fixed candidate set, and the search is an
exact dynamic programme (the paper uses a MILP solver for the same multiple-choice knapsack).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import ShapeError, bad, check_count
from ..models.smollm2 import english_text
from ..patterns.base import PerHead
from ..records import register
from . import artifacts
from .policy import POLICY_SUPPORTS, Policy, keep_recent
from .streaming import sinks_and_window

METHOD = "moa"
CALIBRATION_OFFSET = 60_000  # tokens
CANDIDATES = (1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0)


@dataclass(frozen=True)
class MoA(Policy):
    """Per KV head: ``sinks`` first tokens plus the last ``ceil(span * N)`` (``N`` real tokens seen so far).

    Args:
        spans: ``(layers, kv_heads)`` span fractions (from :meth:`plan`).
        sinks: initial tokens every head keeps.

    The prefill computes the same per-head pattern; the cache keeps what the pattern can still reach.
    """

    spans: tuple
    sinks: int = 4
    name = "moa"

    def __post_init__(self):
        check_count("sinks", self.sinks, 0)
        spans = tuple(tuple(float(x) for x in row) for row in self.spans)
        if any(not 0.0 < x <= 1.0 for row in spans for x in row):
            raise ShapeError(bad("spans", "fractions in (0, 1]", self.spans))
        object.__setattr__(self, "spans", spans)

    @classmethod
    def plan(cls, costs, budget: float, sinks: int = 4, candidates=CANDIDATES) -> MoA:
        """Spans minimising the summed profiled loss increase with mean span fraction ``<= budget``.

        ``costs``: ``(layers, kv_heads, len(candidates))``, the loss increase of each head at each span.
        """
        c = np.asarray(costs, dtype=np.float64)
        L, H, C = c.shape
        if C != len(candidates):
            raise ShapeError(bad("costs", f"a last dimension of {len(candidates)} candidates", c.shape))
        if not min(candidates) <= budget <= 1.0:
            raise ShapeError(bad("budget", f"a mean span fraction in [{min(candidates)}, 1]", budget))
        unit = min(candidates)
        units = [int(round(x / unit)) for x in candidates]
        cap = int(math.floor(budget / unit * L * H + 1e-9))
        inf = float("inf")
        best = np.full(cap + 1, inf)
        best[0] = 0.0
        choice = []
        for cost in np.clip(c.reshape(L * H, C), 0.0, None):  # a negative first-order estimate is noise
            new = np.full(cap + 1, inf)
            arg = np.zeros(cap + 1, dtype=np.int64)
            for j, u in enumerate(units):
                cand = np.full(cap + 1, inf)
                cand[u:] = best[: cap + 1 - u] + cost[j]
                better = cand < new
                new[better], arg[better] = cand[better], j
            choice.append(arg)
            best = new
        end = int(np.argmin(best))
        picks = []
        for arg in reversed(choice):
            j = int(arg[end])
            picks.append(candidates[j])
            end -= units[j]
        spans = np.array(picks[::-1]).reshape(L, H)
        return cls(spans=tuple(map(tuple, spans.tolist())), sinks=sinks)

    @classmethod
    def load(cls, model, budget: float, path=None, sinks: int = 4) -> MoA:
        """Plan from a profile file (default: the one attnkit ships for ``model``)."""
        doc = artifacts.load(path or artifacts.shipped(model, METHOD), model, METHOD)
        return cls.plan(doc["values"], budget, sinks=sinks, candidates=tuple(doc["settings"]["candidates"]))

    @property
    def compresses(self):
        return True

    def _span(self, layer, h, seen):
        return max(1, math.ceil(self.spans[layer][h] * seen))

    def pattern(self, layer, q_heads, kv_heads, seen, q_len):
        g = q_heads // kv_heads
        return PerHead([sinks_and_window(self.sinks, self._span(layer, h // g, seen)) for h in range(q_heads)])

    def keep(self, layer, view, q_len):
        seen = view.seen_real
        return keep_recent(view, self.sinks, [self.sinks + self._span(layer, h, seen) for h in range(view.kv_heads)])

    def describe(self):
        mean = float(np.mean(self.spans))
        return f"moa(mean span={mean:.3f}, sinks={self.sinks})"


class _Influence(Policy):
    """The profiling forward: explicit attention probabilities kept as leaves so the loss reaches them."""

    name = "moa_profile"

    def __init__(self):
        self.probs = {}

    def attend(self, layer, q, k, v, key_padding_mask, q_offset, scale, causal):
        g = q.shape[1] // k.shape[1]
        kk, vv = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
        s = torch.matmul(q, kk.transpose(-1, -2)) * scale
        n_q, n_k = s.shape[-2:]
        allowed = torch.arange(n_k)[None, :] <= torch.arange(q_offset, q_offset + n_q)[:, None]
        s = s.masked_fill(~allowed, float("-inf"))
        p = torch.softmax(s, -1).detach().requires_grad_(True)
        self.probs[layer] = p
        return torch.matmul(p, vv)


def profile(
    model, tok, *, length: int = 1024, samples: int = 2, sinks: int = 4, candidates=CANDIDATES, progress=None
) -> dict:
    r"""MoA's attention-influence profile on English text: ``{"values": (L, Hkv, C) costs, "settings"}``.

    With ``A`` a head's attention probabilities and ``G = dL/dA`` (language-modelling loss), dropping entry
    ``(i, j)`` and renormalising row ``i`` changes the loss by, to first order,
    ``A_ij (sum_n A_in G_in - G_ij)``. A span ``beta`` drops the entries with ``i - j >= beta * N`` outside the
    sinks; its cost is the sum of the *absolute* values of those terms over rows, query heads of the KV head, and
    samples (averaged). The absolute value is our choice: it makes the cost grow as the span shrinks, where the
    signed first-order sum over a few samples is mostly noise (measured: it picked spans that lost more than a
    uniform span of the same budget).
    """
    from ._integration import applied

    # the evaluation reads the text from its start; the profile reads it from CALIBRATION_OFFSET on
    ids_all = tok(english_text(), return_tensors="pt").input_ids[0, CALIBRATION_OFFSET:]
    cfg = model.config.get_text_config()
    L, Hkv = cfg.num_hidden_layers, cfg.num_key_value_heads
    costs = torch.zeros(L, Hkv, len(candidates), dtype=torch.float64)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        for s in range(samples):
            ids = ids_all[s * length : (s + 1) * length][None]
            pol = _Influence()
            with applied(model, pol):
                out = model(ids, labels=ids)
                out.loss.backward()
            N = ids.shape[1]
            d = torch.arange(N)[:, None] - torch.arange(N)[None, :]
            for layer, p in pol.probs.items():
                a, gr = p.detach().double(), p.grad.double()
                # absolute per-entry effects: with a few samples the signed sum is dominated by noise (40% of
                # signed head costs came out negative on SmolLM2), and a span's cost must not fall as it shrinks
                infl = (a * ((a * gr).sum(-1, keepdim=True) - gr)).abs()  # (1, Hq, N, N)
                infl[..., :sinks] = 0
                infl = infl[0].view(Hkv, -1, N, N).sum(1)
                for c, beta in enumerate(candidates):
                    span = max(1, math.ceil(beta * N))
                    costs[layer, :, c] += infl.masked_fill(d < span, 0).sum((-1, -2)) / samples
            if progress:
                progress(f"moa profile sample {s + 1}/{samples}: loss {float(out.loss.detach()):.3f}")
    finally:
        for p in params:
            p.requires_grad_(True)
    settings = dict(length=length, samples=samples, sinks=sinks, candidates=list(candidates))
    return {"values": costs.tolist(), "settings": settings}


register(
    "moa",
    family="E",
    kind="policy",
    paper="MoA: Mixture of Sparse Attention for Automatic Large Language Model Compression (Fu et al., 2024)",
    exact=False,
    supports=POLICY_SUPPORTS,
    factory=lambda n, *, model=None, budget=0.25: MoA.load(model, budget),
    summary="per-head elastic window span = beta * N, chosen by a profiled DP under a mean-span budget",
    source=MoA,
)
