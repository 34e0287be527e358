"""The one entry point: :func:`attention`, and :func:`explain`, which says what it would do and why."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import reference as _reference
from .backends import BACKENDS
from .backends import flex as _flex
from .backends import sdpa as _sdpa
from .backends.tiled import tiled_attention
from .errors import DTypeError, MemoryBudgetError, NonFiniteError, ShapeError, UnsupportedError, bad
from .patterns.base import _FINE, Pattern, _cache_get, _cache_put
from .patterns.causal import Causal
from .scores import Normalizer, ScoreMod
from .shapes import Dims, validate

_SPARSE_BELOW = 0.5  # auto prefers the tiled kernel when fewer than this fraction of pairs interact
_SHORT_QUERIES = 16  # decode steps and short chunks: a q_len x kv_len mask is cheap, SDPA wins


@dataclass
class Explanation:
    """What :func:`attention` would do with these arguments. ``str()`` gives a readable account."""

    backend: str
    reasons: dict
    density: float
    computed_density: float | None
    block: tuple | None
    flops: float
    bytes: float
    dims: Dims
    notes: list = field(default_factory=list)

    def __str__(self) -> str:
        d = self.dims
        lines = [
            f"attnkit.attention: B={d.batch} Hq={d.q_heads} Hkv={d.kv_heads} Nq={d.q_len} Nk={d.kv_len} "
            f"D={d.head_dim} q_offset={d.q_offset}",
            f"  backend: {self.backend}",
        ]
        for name, why in self.reasons.items():
            lines.append(f"    {name:9s} {'chosen' if name == self.backend else why}")
        lines.append(
            f"  density: {self.density:.4f} of the {d.q_len}x{d.kv_len} pairs interact"
            f" (ideal speed-up over dense {1 / max(self.density, 1e-12):.1f}x)"
        )
        if self.computed_density is not None:
            lines.append(f"  tiled computes {self.computed_density:.4f} (tiles {self.block[0]}x{self.block[1]})")
        lines.append(f"  useful FLOPs: {self.flops:.3e}   bytes moved (q, k, v, out): {self.bytes:.3e}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _check_args(q, k, v, pattern, score, key_padding_mask, q_offset, scale, backend, normalizer=None):
    dims = validate(q, k, v, key_padding_mask=key_padding_mask, q_offset=q_offset, scale=scale)
    if backend not in ("auto",) + BACKENDS:
        raise ShapeError(bad("backend", f"'auto' or one of {BACKENDS}", repr(backend)))
    if pattern is not None:
        if not isinstance(pattern, Pattern):
            raise DTypeError(bad("pattern", "an attnkit.patterns.Pattern or None", type(pattern).__name__))
        pattern.check(dims.q_len, dims.kv_len, q_offset, dims.q_heads)
    if score is not None:
        if not isinstance(score, ScoreMod):
            raise DTypeError(bad("score", "an attnkit.scores.ScoreMod or None", type(score).__name__))
        score.check(dims.q_heads)
    if normalizer is not None and not isinstance(normalizer, Normalizer):
        raise DTypeError(bad("normalizer", "an attnkit.scores.Normalizer or None", type(normalizer).__name__))
    return dims


def choose_block(pattern, dims: Dims, training: bool) -> int:
    """Tile size for ``tiled``: the candidate with the least computed area, weighted by per-tile overhead."""
    if pattern is None:
        return 64
    key = ("block", pattern, dims.q_len, dims.kv_len, dims.q_offset, dims.q_heads, training)
    hit = _cache_get(key)
    if hit is not None:
        return hit
    any_, _, _ = pattern.tile_stats(dims.q_len, dims.kv_len, dims.q_offset, dims.q_heads)
    # Measured on 2 cores (fwd): time ~ computed area x (1 + 8 / b) across windows, neighbourhoods, grids and
    # power-of-two patterns; the backward's per-tile scatter favours larger tiles (1 + 32 / b).
    overhead = 32 if training else 8
    best, best_cost = _FINE, float("inf")
    for b in (16, 32, 64, 128):
        f = b // _FINE
        G, nqt, nkt = any_.shape
        pad = torch.zeros(G, -(-nqt // f) * f, -(-nkt // f) * f, dtype=torch.bool)
        pad[:, :nqt, :nkt] = any_
        tiles = int(pad.view(G, -1, f, pad.shape[2] // f, f).any(4).any(2).sum())
        cost = tiles * b * b * (1 + overhead / b)
        if cost < best_cost:
            best, best_cost = b, cost
    _cache_put(key, best)
    return best


def _plan(q, k, v, dims, pattern, score, key_padding_mask, q_offset, return_lse, backend, normalizer=None):
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    budget = _sdpa.DEFAULT_BUDGET
    reasons = {
        "sdpa": _sdpa.why_not(q, k, v, dims, pattern, score, budget),
        "flex": _flex.why_not(q, k, v, dims, pattern, score, return_lse, needs_grad),
        "tiled": None
        if q.device.type == "cpu"
        else (f"tiled is a CPU kernel; on {q.device.type} use 'flex' (compiled FlexAttention) or 'sdpa'"),
        "reference": "float64 oracle, for tests; never chosen by auto",
    }
    if normalizer is not None:
        reasons["sdpa"] = f"normalizer {normalizer!r} replaces the softmax, which SDPA has built in; use 'tiled'"
        reasons["flex"] = f"normalizer {normalizer!r} replaces the softmax, which FlexAttention has built in"
    if backend != "auto":
        return backend, reasons, needs_grad
    dense_fast = pattern is None or _sdpa_causal_fast(pattern, dims, key_padding_mask)
    short = reasons["sdpa"] is None and dims.q_len <= _SHORT_QUERIES and not needs_grad
    density = None if dense_fast or short else _density(pattern, dims)
    if short:
        choice = "sdpa"
        why = f"{dims.q_len} queries (decode): the {dims.q_len} x {dims.kv_len} mask is cheap, no layout to build"
    elif reasons["sdpa"] is None and (dense_fast or density >= _SPARSE_BELOW):
        choice = "sdpa"
        why = (
            "dense or near-dense request: fused SDPA is faster"
            if dense_fast
            else f"density {density:.2f} >= {_SPARSE_BELOW}: dense SDPA with a mask is faster"
        )
    elif q.device.type != "cpu" and reasons["flex"] is None:
        choice, why = "flex", "on GPU, compiled FlexAttention is faster"
    else:
        choice = "tiled"
        if reasons["flex"] is None:
            reasons["flex"] = "on CPU the first compile takes ~20 s; auto does not make a call wait for it"
        why = f"density {_density(pattern, dims):.3f}: a dense mask computes every pair; tiled skips empty tiles"
    for name in ("sdpa", "flex", "tiled"):
        if name != choice and reasons[name] is None:
            reasons[name] = why
    return choice, reasons, needs_grad


def _density(pattern, dims) -> float:
    if pattern is None:
        return 1.0
    return pattern.density(dims.q_len, dims.kv_len, dims.q_offset, dims.q_heads)


def _sdpa_causal_fast(pattern, dims, kpm) -> bool:
    return isinstance(pattern, Causal) and dims.q_offset == 0 and dims.q_len == dims.kv_len and kpm is None


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    pattern: Pattern | None = None,
    score: ScoreMod | None = None,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    q_offset: int = 0,
    return_lse: bool = False,
    normalizer: Normalizer | None = None,
    backend: str = "auto",
):
    r"""Attention over any pattern, score modification, normaliser and backend.

    .. math::
        \mathrm{out}_i = \sum_{j \in P(i)} \frac{\exp(s_{ij})}{\sum_{j' \in P(i)} \exp(s_{ij'})} v_j,\qquad
        s_{ij} = \mathrm{mod}(\mathrm{scale}\; q_i \cdot k_j), \qquad
        \mathrm{lse}_i = \log \sum_{j \in P(i)} \exp(s_{ij})

    where ``P(i)`` are the keys the pattern allows for query ``i`` (absolute position ``q_offset + i``) that
    are not padding.

    Args:
        q: ``(B, Hq, Nq, D)``. k: ``(B, Hkv, Nk, D)``. v: ``(B, Hkv, Nk, Dv)``; ``Hq % Hkv == 0`` (GQA).
        pattern: a :class:`~attnkit.patterns.Pattern` (None = every key).
        score: a :class:`~attnkit.scores.ScoreMod` applied to the scaled logits.
        scale: logit scale, default ``1 / sqrt(D)``.
        key_padding_mask: bool ``(B, Nk)``, True where the key is real.
        q_offset: absolute position of the first query (decode with a KV cache: ``Nk - Nq``).
        return_lse: also return ``lse`` ``(B, Hq, Nq)`` (float32 for low-precision inputs).
        normalizer: a :class:`~attnkit.scores.Normalizer` (:class:`~attnkit.scores.Sigmoid`,
            :class:`~attnkit.scores.Softplus`) in place of the softmax: the weights become ``p(s_ij)``, divided
            by their row sum when the normaliser is ``l1``, and ``lse = log sum_j p(s_ij)``. Runs on ``tiled``
            (and ``reference``).
        backend: ``"auto"``, ``"sdpa"``, ``"flex"``, ``"tiled"`` or ``"reference"``. A named backend that cannot
            run the request raises :class:`~attnkit.errors.UnsupportedError`; nothing falls back silently.

    Returns:
        ``out`` ``(B, Hq, Nq, Dv)`` in the dtype of ``q`` (and ``lse``). A query with no visible key gives
        ``out = 0`` and ``lse = -inf``. Non-finite inputs raise :class:`~attnkit.errors.NonFiniteError` (checked
        on CPU with one pass over the output).
    """
    dims = _check_args(q, k, v, pattern, score, key_padding_mask, q_offset, scale, backend, normalizer)
    result = _dispatch(
        q, k, v, dims, pattern, score, scale, key_padding_mask, q_offset, return_lse, backend, normalizer
    )
    out = result[0] if return_lse else result
    # One cheap reduction over the output (not the inputs): NaN/inf in q, k or v reaches it. The exact
    # check runs only when the sum is not finite (a sum can overflow on huge but finite values).
    if out.device.type == "cpu" and not bool(torch.isfinite(out.sum())) and not bool(torch.isfinite(out).all()):
        raise NonFiniteError(
            bad(
                "q, k, v",
                "finite values (attention is undefined with NaN or inf inputs)",
                "a non-finite output; check the inputs",
            )
        )
    return result


def _dispatch(q, k, v, dims, pattern, score, scale, key_padding_mask, q_offset, return_lse, backend, normalizer=None):
    choice, reasons, needs_grad = _plan(
        q, k, v, dims, pattern, score, key_padding_mask, q_offset, return_lse, backend, normalizer
    )
    if reasons.get(choice) and choice != "reference":
        cls = MemoryBudgetError if "memory budget" in reasons[choice] else UnsupportedError
        raise cls(f"backend='{choice}' cannot run this request: {reasons[choice]}")
    kw = dict(
        pattern=pattern,
        score=score,
        scale=scale,
        key_padding_mask=key_padding_mask,
        q_offset=q_offset,
        return_lse=return_lse,
    )
    if choice == "sdpa":
        if _sdpa_causal_fast(pattern, dims, key_padding_mask) and score is None:
            out = torch.nn.functional.scaled_dot_product_attention(
                q, k, v, is_causal=True, scale=scale, enable_gqa=dims.group > 1
            )
            return (out, _sdpa._lse(q, k, None, scale, dims.group, causal=True)) if return_lse else out
        return _sdpa.attention(q, k, v, dims, **kw)
    if choice == "flex":
        return _flex.attention(q, k, v, dims, **kw)
    if choice == "reference":
        out = _reference.attention(q, k, v, normalizer=normalizer, **kw)
        return (out[0].to(q.dtype), out[1]) if return_lse else out.to(q.dtype)
    layout = _layout(pattern, dims, needs_grad)
    bound = normalizer.bind(dims.kv_len) if normalizer is not None else None
    out, lse = tiled_attention(
        q,
        k,
        v,
        layout,
        scale=scale,
        score=score,
        key_padding_mask=key_padding_mask,
        q_offset=q_offset,
        normalizer=bound,
    )
    return (out, lse) if return_lse else out


def _layout(pattern, dims, training):
    from .patterns.base import Full

    pat = pattern if pattern is not None else Full()
    b = choose_block(pattern, dims, training)
    return pat.block_layout(dims.q_len, dims.kv_len, b, b, dims.q_offset, dims.q_heads)


def explain(
    q,
    k,
    v,
    *,
    pattern=None,
    score=None,
    scale=None,
    key_padding_mask=None,
    q_offset=0,
    return_lse=False,
    normalizer=None,
    backend="auto",
) -> Explanation:
    """Say which backend :func:`attention` uses for these arguments, why the others are not used, the
    pattern's density, the useful FLOPs and the bytes moved. Runs no attention."""
    dims = _check_args(q, k, v, pattern, score, key_padding_mask, q_offset, scale, backend, normalizer)
    choice, reasons, needs_grad = _plan(
        q, k, v, dims, pattern, score, key_padding_mask, q_offset, return_lse, backend, normalizer
    )
    density = _density(pattern, dims)
    # Only the tiled backend has a layout; building one for an sdpa or flex answer would be work for nothing.
    layout = _layout(pattern, dims, needs_grad) if choice == "tiled" else None
    flops = 4.0 * dims.batch * dims.q_heads * dims.q_len * dims.kv_len * density * dims.head_dim
    elt = q.element_size()
    nbytes = (
        elt
        * dims.batch
        * (
            dims.q_heads * dims.q_len * (dims.head_dim + dims.v_dim)
            + dims.kv_heads * dims.kv_len * (dims.head_dim + dims.v_dim)
        )
    )
    notes = []
    if reasons.get(choice) and choice != "reference":
        notes.append(f"the named backend cannot run this: {reasons[choice]}")
    computed = layout.tile_density if layout is not None else None
    block = (layout.block_q, layout.block_k) if layout is not None else None
    return Explanation(choice, reasons, density, computed, block, flops, nbytes, dims, notes)
