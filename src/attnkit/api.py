"""The one entry point: :func:`attention`, and :func:`explain`, which says what it would do and why.

Both validate the call into one :class:`~attnkit.backends.request.Request`, ask every backend
``why_not(request)``, choose, and (``attention``) ``run(request)``. A static pattern and a dynamic selector take
the same path: a selector's ``select`` runs first (under ``torch.no_grad``) and the request carries its
:class:`~attnkit.sparse.Selection`.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field

import torch

from . import reference as _reference
from .backends import BACKENDS
from .backends.request import Request, needs_grad
from .errors import DTypeError, MemoryBudgetError, NonFiniteError, ShapeError, UnsupportedError, bad
from .patterns.base import Pattern
from .patterns.causal import Causal
from .records import register_function
from .scores import Normalizer, ScoreMod, Sigmoid, Softplus
from .shapes import Dims, all_finite, check_finite, validate
from .sparse import Selection, Selector
from .sparse._core import visible_pairs

_SPARSE_BELOW = 0.5  # auto prefers the tiled kernel when fewer than this fraction of pairs interact
_EXACT_DENSITY_MAX = 4096  # above this, a token-grain selection's density is estimated from its tiles


@dataclass
class Explanation:
    """What :func:`attention` would do with these arguments. ``str()`` gives a readable account.

    For a dynamic selector, ``selection`` holds what the selection cost and chose: ``selector``, ``seconds``,
    ``form`` (``"blocks"``, ``"blocks, token-grain"``, ``"permuted blocks"`` or ``"token indices"``) and
    ``density_exact``.
    """

    backend: str
    reasons: dict
    density: float
    computed_density: float | None
    block: tuple | None
    flops: float
    bytes: float
    dims: Dims
    notes: list = field(default_factory=list)
    selection: dict | None = None

    def __str__(self) -> str:
        d = self.dims
        lines = [
            f"attnkit.attention: B={d.batch} Hq={d.q_heads} Hkv={d.kv_heads} Nq={d.q_len} Nk={d.kv_len} "
            f"D={d.head_dim} q_offset={d.q_offset}",
            f"  backend: {self.backend}",
        ]
        for name, why in self.reasons.items():
            lines.append(f"    {name:9s} {'chosen' if name == self.backend else why}")
        if self.selection is not None:
            s = self.selection
            lines.append(
                f"  selection: {s['selector']} chose {s['form']} in {1e3 * s['seconds']:.1f} ms, "
                f"{s['of_visible']:.4f} of the pairs it could see"
                + ("" if s["density_exact"] else " (density from its tiles)")
            )
        lines.append(
            f"  density: {self.density:.4f} of the {d.q_len}x{d.kv_len} pairs interact"
            f" (ideal speed-up over dense {1 / max(self.density, 1e-12):.1f}x)"
        )
        if self.computed_density is not None:
            lines.append(f"  tiled computes {self.computed_density:.4f} (tiles {self.block[0]}x{self.block[1]})")
        lines.append(f"  useful FLOPs: {self.flops:.3e}   bytes moved (q, k, v, out): {self.bytes:.3e}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _request(
    q, k, v, *, pattern, score, scale, key_padding_mask, q_offset, return_lse, normalizer, backend, causal
) -> tuple[Request, float | None]:
    """Validate the call; run a selector's ``select``. Returns the request and the selection's seconds."""
    dims = validate(q, k, v, key_padding_mask=key_padding_mask, q_offset=q_offset, scale=scale)
    if isinstance(pattern, Selector):
        # A selector reads q and k before any kernel: NaN would make a meaningless choice (or a raw error).
        k, v = check_finite(q, k, v, key_padding_mask)
    if not isinstance(backend, str) or (backend != "auto" and backend not in BACKENDS):
        raise ShapeError(bad("backend", f"'auto' or one of {tuple(BACKENDS)}", repr(backend)))
    if causal not in (None, True, False):
        raise DTypeError(bad("causal", "None, True or False", repr(causal)))
    if score is not None and not isinstance(score, ScoreMod):
        raise DTypeError(bad("score", "an attnkit.scores.ScoreMod or None", type(score).__name__))
    if score is not None:
        score.check(dims.q_heads)
    if normalizer is not None and not isinstance(normalizer, Normalizer):
        raise DTypeError(bad("normalizer", "an attnkit.scores.Normalizer or None", type(normalizer).__name__))
    common = dict(
        q=q,
        k=k,
        v=v,
        dims=dims,
        score=score,
        normalizer=normalizer,
        scale=scale,
        key_padding_mask=key_padding_mask,
        q_offset=q_offset,
        return_lse=return_lse,
        needs_grad=needs_grad(q, k, v),
    )
    if pattern is None or isinstance(pattern, Pattern):
        if causal:
            pattern = Causal() if pattern is None else pattern & Causal()
        if pattern is not None:
            pattern.check(dims.q_len, dims.kv_len, q_offset, dims.q_heads)
        return Request(pattern=pattern, **common), None
    if not isinstance(pattern, Selector | Selection):
        want = "an attnkit.patterns.Pattern, an attnkit.sparse Selector or Selection, or None"
        raise DTypeError(bad("pattern", want, type(pattern).__name__))
    if q_offset:
        raise UnsupportedError(bad("q_offset", "0 with a dynamic selector (it selects over the whole call)", q_offset))
    if score is not None or normalizer is not None:
        # Every kernel that runs selections (and their oracle) is plain softmax over the chosen pairs.
        what = "score" if score is not None else "normalizer"
        raise UnsupportedError(bad(what, "None: a dynamic selection runs plain softmax", score or normalizer))
    t0 = time.perf_counter()
    sel, causal = _select(pattern, q, k, v, dims, causal, key_padding_mask)
    seconds = time.perf_counter() - t0 if isinstance(pattern, Selector) else None
    return Request(selection=sel, causal=causal, **common), seconds


def _select(selector, q, k, v, dims, causal, kpm) -> tuple[Selection, bool]:
    if isinstance(selector, Selection):
        sel = selector
        if (sel.layout is None) == (sel.indices is None):
            got = "neither or both of layout and indices"
            raise ShapeError(bad("pattern (a selection)", "a Selection with a layout or indices (one of them)", got))
        if sel.indices is not None and isinstance(sel.query_block, int) and sel.query_block > max(1, dims.q_len):
            # One row of indices shared by more queries than there are is one row shared by all of them.
            sel = dataclasses.replace(sel, query_block=max(1, dims.q_len))
        # A selection made by attention() knows its cut; one made by selector.select() directly does not, and
        # runs as the caller says (default causal).
        if sel.causal is not None and causal is not None and causal != sel.causal:
            raise ShapeError(bad("causal", f"{sel.causal}, as the selection was made", causal))
        causal = sel.causal if causal is None else causal
        causal = True if causal is None else causal
    else:
        causal = selector.causal_ok if causal is None else causal
        if causal and not selector.causal_ok:
            raise UnsupportedError(bad("causal", f"False ({type(selector).__name__} is not causal)", causal))
        if causal and dims.q_len > dims.kv_len:
            raise ShapeError(bad("q", f"at most Nk = {dims.kv_len} queries with causal=True", dims.q_len))
        with torch.no_grad():
            sel = selector.select(q.detach(), k.detach(), v.detach(), causal=causal, key_padding_mask=kpm)
        sel.causal = causal
        if sel.key_bias is not None and hasattr(selector, "key_bias"):
            # The bias is part of the function (not of the choice of keys): recompute it under autograd so
            # that the selector's parameters and v get its gradient.
            sel.key_bias = selector.key_bias(v, dims.q_heads)
    if (sel.q_len, sel.kv_len) != (dims.q_len, dims.kv_len):
        raise ShapeError(
            bad("pattern (a selection)", f"one made for {dims.q_len} x {dims.kv_len}", (sel.q_len, sel.kv_len))
        )
    if isinstance(selector, Selection) and sel.layout is not None:
        sel.layout.check(dims.q_len, dims.kv_len)  # the caller's layout, maybe hand-made; ours are well formed
    elif isinstance(selector, Selection) and sel.indices is not None:
        sel.check_indices(dims.batch, dims.q_heads)
    return sel, causal


def _choose(req: Request, backend: str) -> tuple[str, dict]:
    """The backend to run and, for every backend, why it is not used (None for the one chosen)."""
    reasons = {name: mod.why_not(req) for name, mod in BACKENDS.items()}
    if backend != "auto":
        return backend, reasons
    reasons["reference"] = reasons["reference"] or "float64 oracle, for tests; never chosen by auto"
    d = req.dims
    if req.selection is not None:
        # The selection's form decides: block layouts run on tiled, token indices on gather.
        choice = "gather" if req.selection.indices is not None else "tiled"
        why = f"the selection runs on '{choice}'"
    else:
        dense_fast = req.pattern is None or req.dense_causal
        short = reasons["decode"] is None
        density = None if dense_fast or short else _density(req)
        if short:
            choice = "decode"
            why = f"{d.q_len} queries (decode): their {d.q_len} x {d.kv_len} rows are cheap, no layout to build"
        elif reasons["tiled"] is None and req.return_lse and not short:
            # SDPA returns no log-sum-exp: a second pass over every pair recomputes it (5.6x the tiled kernel's
            # time for causal attention at 2k on 2 cores); the tiled kernel keeps it as it goes.
            choice, why = "tiled", "return_lse: SDPA has no log-sum-exp to return; tiled keeps it"
        elif reasons["sdpa"] is None and (dense_fast or density >= _SPARSE_BELOW):
            choice = "sdpa"
            why = (
                "dense or near-dense request: fused SDPA is faster"
                if dense_fast
                else f"density {density:.2f} >= {_SPARSE_BELOW}: dense SDPA with a mask is faster"
            )
        elif req.device.type != "cpu" and reasons["flex"] is None:
            choice, why = "flex", "on GPU, compiled FlexAttention is faster"
        else:
            choice = "tiled"
            if reasons["flex"] is None:
                reasons["flex"] = "on CPU the first compile takes ~20 s; auto does not make a call wait for it"
            why = f"density {_density(req):.3f}: a dense mask computes every pair; tiled skips empty tiles"
    for name in BACKENDS:
        if name != choice and reasons[name] is None:
            reasons[name] = why
    return choice, reasons


def _density(req: Request) -> float:
    d = req.dims
    if req.selection is not None:
        return _selection_density(req)[0]
    if req.pattern is None:
        return 1.0
    return req.pattern.density(d.q_len, d.kv_len, d.q_offset, d.q_heads)


def _selection_density(req: Request) -> tuple[float, bool]:
    """``(density, exact)`` of the request's selection: exact up to 4k tokens or for pure block layouts."""
    sel = req.selection
    if sel.layout is not None and sel.layout.select is None and sel.q_order is None:
        return sel.density(req.causal), True
    if req.dims.q_len <= _EXACT_DENSITY_MAX:
        return sel.density(req.causal), True
    return sel.density(req.causal, exact=False), False


def _raise_if_cannot(choice: str, reasons: dict) -> None:
    why = reasons.get(choice)
    if why:
        cls = MemoryBudgetError if "memory budget" in why else UnsupportedError
        raise cls(f"backend='{choice}' cannot run this request: {why}")


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    pattern: Pattern | Selector | Selection | None = None,
    score: ScoreMod | None = None,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    q_offset: int = 0,
    return_lse: bool = False,
    normalizer: Normalizer | None = None,
    causal: bool | None = None,
    backend: str = "auto",
):
    r"""Attention over any pattern or dynamic selector, score modification, normaliser and backend.

    .. math::
        \mathrm{out}_i = \sum_{j \in P(i)} \frac{\exp(s_{ij})}{\sum_{j' \in P(i)} \exp(s_{ij'})} v_j,\qquad
        s_{ij} = \mathrm{mod}(\mathrm{scale}\; q_i \cdot k_j), \qquad
        \mathrm{lse}_i = \log \sum_{j \in P(i)} \exp(s_{ij})

    where ``P(i)`` are the keys the pattern allows for query ``i`` (absolute position ``q_offset + i``), or the
    keys a dynamic selector chose for it from ``q`` and ``k``, that are not padding.

    Args:
        q: ``(B, Hq, Nq, D)``. k: ``(B, Hkv, Nk, D)``. v: ``(B, Hkv, Nk, Dv)``; ``Hq % Hkv == 0`` (GQA).
        pattern: a static :class:`~attnkit.patterns.Pattern`; a dynamic :class:`~attnkit.sparse.Selector`
            (its ``select`` runs first, under ``torch.no_grad``: the output is differentiable in ``q, k, v``,
            not through the choice); a :class:`~attnkit.sparse.Selection` a selector already returned (to time
            selection and attention apart); or None (every key).
        score: a :class:`~attnkit.scores.ScoreMod` applied to the scaled logits.
        scale: logit scale, default ``1 / sqrt(D)``.
        key_padding_mask: bool ``(B, Nk)``, True where the key is real.
        q_offset: absolute position of the first query (decode with a KV cache: ``Nk - Nq``).
        return_lse: also return ``lse`` ``(B, Hq, Nq)`` (float32 for low-precision inputs). With a selector,
            ``exp(lse_sparse - lse_dense)`` is the share of the dense attention mass the selection kept.
        normalizer: a :class:`~attnkit.scores.Normalizer` (:class:`~attnkit.scores.Sigmoid`,
            :class:`~attnkit.scores.Softplus`) in place of the softmax: the weights become ``p(s_ij)``, divided
            by their row sum when the normaliser is ``l1``, and ``lse = log sum_j p(s_ij)``. Runs on ``tiled``
            (and ``reference``).
        causal: with a static pattern (or None), True intersects it with :class:`~attnkit.patterns.Causal`
            (SDPA's ``is_causal``). With a selector, whether it selects under the causal cut, the queries being
            the last ``Nq`` of the ``Nk`` positions (default: True when the selector can).
        backend: ``"auto"``, ``"sdpa"``, ``"flex"``, ``"tiled"``, ``"gather"`` or ``"reference"``. A named
            backend that cannot run the request raises :class:`~attnkit.errors.UnsupportedError`; nothing
            falls back silently.

    Returns:
        ``out`` ``(B, Hq, Nq, Dv)`` in the dtype of ``q`` (and ``lse``). A query with no visible key gives
        ``out = 0`` and ``lse = -inf``. NaN or inf in ``q`` (at a query that sees a key), or in ``k`` or ``v`` at a
        key some query sees, raises :class:`~attnkit.errors.NonFiniteError` naming the tensor and the first bad
        index, on every backend (:func:`attnkit.shapes.check_finite`). A padded key's contents never matter; a
        value no query can reach either raises too (kernels that read every key) or is ignored (kernels that
        skip its tile), and never changes the answer.
    """
    req, _ = _request(
        q,
        k,
        v,
        pattern=pattern,
        score=score,
        scale=scale,
        key_padding_mask=key_padding_mask,
        q_offset=q_offset,
        return_lse=return_lse,
        normalizer=normalizer,
        backend=backend,
        causal=causal,
    )
    out, lse = _run(req, backend)
    return (out, lse) if return_lse else out


def _run(req: Request, backend: str):
    if backend == "auto" and req.selection is None and BACKENDS["decode"].why_not(req) is None:
        # what _choose picks first, without asking every other backend why not (a decode step is ~100 us of
        # work on SmolLM2's cache, and those questions were a fifth of it)
        choice = "decode"
    else:
        choice, reasons = _choose(req, backend)
        _raise_if_cannot(choice, reasons)
    mod = BACKENDS[choice]
    # The non-finite rule (check_finite). A backend whose kernel carries every NaN or inf of q, k or v that
    # reaches a row into that row's output is checked after it runs, with one sum over the output, a third of
    # the cost of checking q, k and v first; the others are checked first.
    if not mod.carries_nonfinite(req):
        req = _finite(req)
    out, lse = mod.run(req)
    if all_finite(out):
        return out, lse
    clean = _finite(req)  # raises NonFiniteError naming the first bad input
    if clean is not req:  # only padded keys held NaN or inf, which a kernel multiplied by 0: run without them
        out, lse = mod.run(clean)
        if all_finite(out):
            return out, lse
    raise NonFiniteError(
        bad(
            "q, k, v",
            f"values whose logits and outputs fit in {out.dtype}",
            "finite inputs that gave a non-finite output (overflow, or a score modification returned NaN/inf)",
        )
    )


def _finite(req: Request) -> Request:
    k, v = check_finite(req.q, req.k, req.v, req.key_padding_mask)
    return req if k is req.k and v is req.v else dataclasses.replace(req, k=k, v=v)


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    selector: Selector | Selection,
    *,
    causal: bool = True,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    return_selection: bool = False,
    return_lse: bool = False,
    backend: str = "auto",
):
    """``attention(q, k, v, pattern=selector, causal=causal, ...)``, which can also return the
    :class:`~attnkit.sparse.Selection` it ran (``return_selection``). Returns ``out``, then ``lse`` and the
    selection when asked."""
    if not isinstance(selector, Selector | Selection):
        raise DTypeError(bad("selector", "an attnkit.sparse Selector or Selection", type(selector).__name__))
    req, _ = _request(
        q,
        k,
        v,
        pattern=selector,
        score=None,
        scale=scale,
        key_padding_mask=key_padding_mask,
        q_offset=0,
        return_lse=return_lse,
        normalizer=None,
        backend=backend,
        causal=causal,
    )
    out, lse = _run(req, backend)
    res = (out,) + ((lse,) if return_lse else ()) + ((req.selection,) if return_selection else ())
    return res if len(res) > 1 else out


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
    causal=None,
    backend="auto",
) -> Explanation:
    """Say which backend :func:`attention` uses for these arguments, why the others are not used, the
    density, the useful FLOPs and the bytes moved. Runs no attention; a dynamic selector's ``select`` runs
    (that is where its density comes from), and its cost is reported."""
    req, seconds = _request(
        q,
        k,
        v,
        pattern=pattern,
        score=score,
        scale=scale,
        key_padding_mask=key_padding_mask,
        q_offset=q_offset,
        return_lse=return_lse,
        normalizer=normalizer,
        backend=backend,
        causal=causal,
    )
    choice, reasons = _choose(req, backend)
    d = req.dims
    selection = None
    if req.selection is not None:
        density, exact = _selection_density(req)
        sel = req.selection
        form = (
            "token indices"
            if sel.indices is not None
            else "permuted blocks"
            if sel.q_order is not None
            else "blocks, token-grain"
            if sel.layout.select is not None
            else "blocks"
        )
        name = type(pattern).__name__ if isinstance(pattern, Selector) else "a given Selection"
        # Selection densities are of the visible pairs (the causal triangle); report them over all pairs, as
        # a static pattern's are, so the ideal speed-up compares with dense attention the same way.
        visible = visible_pairs(d.q_len, d.kv_len, req.causal)
        selection = {
            "selector": name,
            "seconds": seconds or 0.0,
            "form": form,
            "density_exact": exact,
            "of_visible": density,
        }
        density = density * visible / (d.q_len * d.kv_len)
    else:
        density = _density(req)
    # What the chosen backend computes, when it says (tiled: its layout's tiles); asking only the chosen one
    # spares building a layout for an sdpa or flex answer.
    describe = getattr(BACKENDS[choice], "describe", None)
    computes = describe(req) if describe is not None and not reasons[choice] else {}
    flops = 4.0 * d.batch * d.q_heads * d.q_len * d.kv_len * density * d.head_dim
    nbytes = (
        q.element_size()
        * d.batch
        * (d.q_heads * d.q_len * (d.head_dim + d.v_dim) + d.kv_heads * d.kv_len * (d.head_dim + d.v_dim))
    )
    notes = []
    if reasons.get(choice) and choice != "reference":
        notes.append(f"the named backend cannot run this: {reasons[choice]}")
    return Explanation(
        choice, reasons, density, computes.get("density"), computes.get("block"), flops, nbytes, d, notes, selection
    )


# -- records: the normalisers of attnkit.scores run through attention(normalizer=...) -------------------------
_NORMALISED = {"gqa", "backward", "bf16", "causal", "padding"}
register_function(
    "sigmoid_attention",
    paper="Theory, Analysis, and Best Practices for Sigmoid Self-Attention (Ramapuram et al., 2024)",
    summary="causal sigmoid(s - log n) weights (n = the training length) on the tiled kernel, no row normalisation",
    supports=_NORMALISED,
    fn=attention,
    ref=_reference.attention,
    kwargs=lambda n: {"pattern": Causal(), "normalizer": Sigmoid(-math.log(n))},
    source=Sigmoid,
)
register_function(
    "softplus_attention",
    paper="Softplus Attention with Re-weighting Boosts Length Extrapolation in LLMs (Gao & Spratling, 2025)",
    summary="causal softplus(log(n_i) s) weights, l1-normalised (LSSA) on the tiled kernel",
    supports=_NORMALISED,
    fn=attention,
    ref=_reference.attention,
    kwargs={"pattern": Causal(), "normalizer": Softplus()},
    source=Softplus,
)
