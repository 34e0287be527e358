"""Policies: what attnkit does inside a pretrained model, per layer and per head.

A policy answers three questions, asked by the attention function that :func:`attnkit.hf.apply` registers:

- :meth:`Policy.pattern` -- which query-key pairs a *prefill* step (more than one query) computes;
- :meth:`Policy.keep` -- after a step, which cached keys each KV head keeps (``None``: all of them);
- :meth:`Policy.observes` -- how many of the step's last queries the scorer must see (attention mass).

Policies that keep fewer keys than they were given run on a :class:`~attnkit.hf.HeadwiseCache`, which really
drops the evicted entries, per KV head. Positions used by patterns and causality are *real-token* positions
(left padding does not count), so a sink is the first real token of each row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import DTypeError, ShapeError, bad
from ..patterns.base import Pattern
from ..patterns.global_tokens import AShape as _a_shape
from ..records import register


class Policy:
    """Base class. The default is dense attention with the model's own (causal) mask and a full cache."""

    name: str = "dense"
    #: Move kept keys to contiguous positions after eviction (StreamingLLM's "positions within the cache").
    rerotate: bool = False

    def pattern(self, layer: int, q_heads: int, kv_heads: int, seen: int, q_len: int) -> Pattern | None:
        """The pairs a step of ``q_len`` queries computes in ``layer`` once ``seen`` real tokens have arrived
        (None: every causal pair)."""
        return None

    @property
    def compresses(self) -> bool:
        """True when the policy evicts cache entries (it then needs a :class:`HeadwiseCache`)."""
        return False

    def observes(self, q_len: int) -> int:
        """How many of a step's last queries have their attention recorded for :meth:`keep` (0: none)."""
        return 0

    def attend(self, layer: int, q, k, v, key_padding_mask, q_offset: int, scale, causal: bool):
        """Compute the step's attention itself (calibration policies); None lets attnkit do it."""
        return None

    def keep(self, layer: int, view, q_len: int) -> list[torch.Tensor | None] | torch.Tensor | None:
        """Per KV head, the sorted indices ``(B, n_h)`` of the cached entries to keep, or None to keep all; or,
        when every head keeps as many, one ``(B, H, n)`` tensor for all heads (None: nothing is evicted)."""
        return [None] * view.kv_heads

    def observes_at(self, layer: int, q_len: int) -> int:
        return self.observes(q_len)

    def merge_at(self, layer: int):
        """``merge(k, v, valid, keep) -> (k_kept, v_kept)`` folding evicted entries into kept ones (None: drop)."""
        return None

    def scorer_at(self, layer: int):
        """The scorer whose scores :meth:`keep` reads in ``layer`` (None: no attention mass is recorded)."""
        return getattr(self, "scorer", None)

    def describe(self) -> str:
        return self.name


@dataclass(frozen=True)
class PerLayer(Policy):
    """A different policy per layer: ``layers[l]`` in layer ``l``, ``default`` in the others.

    E.g. ``PerLayer({0: Dense(), 1: Dense()}, default=StreamingLLM(512))`` keeps the first two layers dense.
    The policies must agree on ``rerotate`` (the cache shifts positions the same way in every layer).
    """

    layers: dict
    default: Policy = None
    name = "per_layer"

    def __post_init__(self):
        if self.default is None:
            object.__setattr__(self, "default", Dense())
        pols = list(self.layers.values()) + [self.default]
        if not all(isinstance(p, Policy) for p in pols) or not all(isinstance(k, int) for k in self.layers):
            raise DTypeError(bad("layers", "a dict {layer index: Policy}", self.layers))
        if len({p.rerotate for p in pols}) > 1:
            raise ShapeError(bad("layers", "policies that agree on rerotate", [p.describe() for p in pols]))
        object.__setattr__(self, "rerotate", self.default.rerotate)

    def at(self, layer: int) -> Policy:
        return self.layers.get(layer, self.default)

    @property
    def compresses(self):
        return any(p.compresses for p in list(self.layers.values()) + [self.default])

    def pattern(self, layer, q_heads, kv_heads, seen, q_len):
        return self.at(layer).pattern(layer, q_heads, kv_heads, seen, q_len)

    def observes_at(self, layer, q_len):
        return self.at(layer).observes(q_len)

    def attend(self, layer, q, k, v, key_padding_mask, q_offset, scale, causal):
        return self.at(layer).attend(layer, q, k, v, key_padding_mask, q_offset, scale, causal)

    def keep(self, layer, view, q_len):
        return self.at(layer).keep(layer, view, q_len)

    def scorer_at(self, layer):
        return self.at(layer).scorer_at(layer)

    def merge_at(self, layer):
        return self.at(layer).merge_at(layer)

    def describe(self):
        inner = ", ".join(f"{k}: {p.describe()}" for k, p in sorted(self.layers.items()))
        return f"per_layer({{{inner}}}, default={self.default.describe()})"


@dataclass(frozen=True)
class Dense(Policy):
    """Dense causal attention computed by :func:`attnkit.attention`: the reference every policy is judged by."""

    name = "dense"


@dataclass(frozen=True)
class SparsePrefill(Policy):
    """A static pattern applied at prefill only (every step with more than one query); decoding stays dense.

    ``prefill`` is any registered static pattern (``AShape``, ``SlidingWindow | Sinks``, ``PerHead``...), a
    dynamic selector from :mod:`attnkit.sparse` (``VerticalSlash``, ``BlockTopK``...: the prompt must come in
    one step, since a selector chooses over the whole prompt), or a ``dict`` from layer index to either (layers
    not in it stay dense). A pattern is intersected with the causal mask and evaluated on real-token positions.
    """

    prefill: object
    name = "sparse_prefill"

    def __post_init__(self):
        from ..sparse import Selector

        pats = self.prefill.values() if isinstance(self.prefill, dict) else [self.prefill]
        if not all(isinstance(p, Pattern | Selector) for p in pats):
            raise DTypeError(
                bad("prefill", "an attnkit Pattern or sparse Selector, or a dict {layer: one of them}", self.prefill)
            )

    def pattern(self, layer, q_heads, kv_heads, seen, q_len):
        if q_len == 1:
            return None
        if isinstance(self.prefill, dict):
            return self.prefill.get(layer)
        return self.prefill


def resolve_budget(budget: int | float, seen: int, name: str = "budget") -> int:
    """Tokens per head: an ``int`` is a token count; a ``float`` in (0, 1] a fraction of the tokens seen."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise DTypeError(bad(name, "an int (tokens) or a float in (0, 1] (fraction of the context)", budget))
    if isinstance(budget, float):
        if not 0.0 < budget <= 1.0:
            raise ShapeError(bad(name, "a fraction in (0, 1]", budget))
        return max(1, math.ceil(budget * seen))
    if budget < 1:
        raise ShapeError(bad(name, "a positive token count", budget))
    return int(budget)


def keep_top(priority: torch.Tensor, valid: torch.Tensor, n_keep: int) -> torch.Tensor | None:
    """Sorted indices ``(..., n_keep)`` of the highest ``priority (..., T)`` entries; padding goes first. None if
    all fit."""
    if priority.shape[-1] <= n_keep:
        return None
    pri = priority.float().masked_fill(~valid, float("-inf"))
    idx = pri.topk(n_keep, dim=-1).indices
    return idx.sort(dim=-1).values


def recency(view, head: int | None, sinks: int) -> torch.Tensor:
    """Priority for StreamingLLM's rule: the first ``sinks`` real tokens, then the most recent ones (``head``
    None: every head's at once, ``(B, H, T)``, for heads holding as many entries)."""
    pos = view.pos[head] if head is not None else view.stacked_meta("pos")
    return torch.where(pos < sinks, float("inf"), pos.float())


def keep_recent(view, sinks: int, n_keep):
    """StreamingLLM's rule: each KV head keeps its first ``sinks`` real tokens and its most recent ones,
    ``n_keep`` entries in all (an int for every head, or a per-head list, None keeping everything). One
    ``(B, H, n_keep)`` selection when the heads hold as many entries (None if all fit), else one per head.

    Entries are held in position order, so where they are all real and the sinks lead, the kept ones are the
    first ``sinks`` and the last ``n_keep - sinks`` indices: no top-k."""
    pos = view.stacked_meta("pos")
    if isinstance(n_keep, int) and pos is not None:
        if pos.shape[-1] <= n_keep:
            return None
        idx = _first_and_last(pos, view.all_valid(), sinks, n_keep)
        return idx if idx is not None else keep_top(recency(view, None, sinks), view.stacked_meta("valid"), n_keep)
    counts = [n_keep] * view.kv_heads if isinstance(n_keep, int) else n_keep
    out = []
    for h, n in enumerate(counts):
        pos, ok = view.pos[h], view.valid[h]
        if n is None or pos.shape[-1] <= n:
            out.append(None)
            continue
        idx = _first_and_last(pos, bool(ok.all()), sinks, n)
        out.append(idx if idx is not None else keep_top(recency(view, h, sinks), ok, n))
    return out


def _first_and_last(pos: torch.Tensor, all_valid: bool, sinks: int, n_keep: int) -> torch.Tensor | None:
    """The first ``min(sinks, n_keep)`` and the last others of ``pos (..., T)``'s indices, when that is what
    :func:`recency` ranks highest (every entry real, the sinks first); else None."""
    T, s = pos.shape[-1], min(sinks, n_keep)
    if not all_valid or not bool((pos[..., :s] < sinks).all()) or not bool((pos[..., s:] >= sinks).all()):
        return None
    idx = torch.cat([torch.arange(s), torch.arange(T - (n_keep - s), T)]).to(pos.device)
    return idx.expand(*pos.shape[:-1], n_keep)


def kv_tokens(n: int, budget: float) -> int:
    """KV entries per head that a budget (a fraction of the context) buys at ``n`` tokens: at least 8."""
    return max(8, int(budget * n))


POLICY_SUPPORTS = frozenset({"causal", "decode", "gqa", "padding"})

register(
    "sparse_prefill",
    family="E",
    kind="policy",
    paper="Efficient Streaming Language Models with Attention Sinks (A-shape prefill, as in MInference)",
    exact=False,
    supports=POLICY_SUPPORTS,
    factory=lambda n, *, model=None, budget=0.25: SparsePrefill(_a_shape(4, kv_tokens(n, budget))),
    summary="any static pattern at prefill only (here A-shape: sinks + window); decoding stays dense",
    source=SparsePrefill,
)
