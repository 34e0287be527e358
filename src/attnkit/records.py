"""What a registry record is, and how a mechanism registers one beside its own code.

This module is in the bottom layer: it imports no mechanism. Each mechanism's module calls :func:`register`
next to the class or function it describes (one class may register several records: the neighbourhood
variants, the linear maps), and :mod:`attnkit.registry` loads the families and answers queries.

A record says what a mechanism is (name, family letter of the catalogue, kind, paper), whether it is exact,
what it supports, the object whose docstring holds its math (``source``), and a factory that makes a small
instance for a sequence of about ``n`` tokens. The factory's signature is fixed per kind (:data:`KINDS`) and
checked when the record is registered: its first parameter is ``n``, the others are keyword-only with defaults,
and the kind's keywords are among them, so ``record.make(n, **options)`` works the same for every record of a
kind.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .errors import PatternError, ShapeError, bad, check_count, check_memory

FAMILIES = {
    "A": "static sparse patterns",
    "B": "dynamic, content-based sparse selectors",
    "C": "linear, kernelised and re-normalised attention",
    "D": "head-level and projection variants",
    "E": "KV cache and long-context policies",
    "F": "token pruning and merging",
    "G": "training-free interventions",
    "H": "analysis and interpretability",
    "I": "vision modules",
    "J": "quality tasks",
}

#: kind -> (what the factory makes, the keyword arguments every factory of the kind accepts).
#: Every factory is ``factory(n, *, <these keywords with defaults>, ...)``.
KINDS = {
    "pattern": ("a Pattern for attnkit.attention(pattern=...)", ()),
    "function": ("a Mechanism: m(q, k, v) and its float64 m.reference(q, k, v)", ()),
    "module": ("an nn.Module over (B, N, dim) with its own reference", ()),
    "selector": (
        "a Selector for attnkit.attention(pattern=...) on q (B, heads, n, head_dim)",
        ("budget", "heads", "kv_heads", "head_dim", "block"),
    ),
    "policy": ("an attnkit.hf Policy holding about budget * n KV entries per head", ("model", "budget")),
    "layer": ("an nn.Module attention layer over (B, n, dim)", ("dim", "heads")),
    "analysis": ("an analysis of a model's attention", ("model",)),
    "intervention": ("a training-free intervention on a model's attention", ("model",)),
    "pruner": ("a token pruner keeping about budget * n tokens", ("model", "budget")),
    "task": ("a quality-benchmark task with sequences of about n tokens", ("seed",)),
}

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
    "noncausal",  # a task scored with non-causal attention (CAB's NS and NC settings; attnkit.tasks.cab)
)

#: Tags that change how the benchmark treats a record. ``slow``: the quick run takes it at its shortest
#: length only.
TAGS = ("slow",)


@dataclass(frozen=True)
class Record:
    """One registered mechanism. ``make(n, **options)`` builds a small instance for about ``n`` tokens.

    ``fit`` (selectors with learned parts): ``fit(q, k, v) -> factory options`` fits the parameters on
    held-out ``q, k, v`` and returns what :meth:`make` takes (``{"gate": gate}``).
    """

    name: str
    family: str
    kind: str
    paper: str
    exact: bool
    supports: frozenset
    factory: Callable
    summary: str
    source: object = None
    tags: frozenset = frozenset()
    fit: Callable | None = None

    def make(self, n: int = 256, **options):
        """``factory(n, **options)``, the kind's common keywords checked first (named errors, not a crash deep
        in a constructor): sizes are ints >= 1; a ``block`` longer than the sequence is one block over all of it
        (clamped, as ``chunk_size`` is); a selector's learned projections (bounded by ``heads x head_dim^2``
        floats each) must fit the memory budget before any is allocated."""
        check_count("n", n, 1, error=PatternError)
        for name in ("heads", "kv_heads", "head_dim", "block", "dim"):
            if name in options:
                check_count(name, options[name], 1, error=PatternError)
        if "block" in options:
            options["block"] = min(options["block"], 1 << max(4, (n - 1).bit_length()))
        if "budget" in options and isinstance(options["budget"], int) and not isinstance(options["budget"], bool):
            options["budget"] = min(options["budget"], n)  # more blocks or tokens than the sequence has is all
        if self.kind == "selector":
            d = {p.name: p.default for p in inspect.signature(self.factory).parameters.values()}
            heads = max(options.get(h, d.get(h, 1)) for h in ("heads", "kv_heads"))
            dim = options.get("head_dim", d.get("head_dim", 1))
            check_memory(f"{self.name}.make", 16 * heads * dim * dim, "use fewer heads or a smaller head_dim")
        return self.factory(n, **options)

    @property
    def doc(self) -> str:
        """The docstring of the object the record documents (its math), or ``""``."""
        if self.source is None:
            return ""
        return inspect.getdoc(self.source) or ""


_RECORDS: dict[str, Record] = {}


def check_factory(kind: str, factory: Callable, name: str = "factory") -> None:
    """Raise :class:`ShapeError` unless ``factory`` has the signature of its kind (:data:`KINDS`)."""
    try:
        params = list(inspect.signature(factory).parameters.values())
    except (TypeError, ValueError):
        raise ShapeError(bad(name, "a callable with an inspectable signature", factory)) from None
    first = params[0] if params else None
    if first is None or first.name != "n" or first.kind not in (first.POSITIONAL_ONLY, first.POSITIONAL_OR_KEYWORD):
        raise ShapeError(bad(name, "a first positional parameter named n (the sequence length)", params))
    rest = params[1:]
    positional = [p.name for p in rest if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if positional:
        raise ShapeError(bad(name, "keyword-only parameters after n", f"positional {positional}"))
    no_default = [p.name for p in rest if p.kind == p.KEYWORD_ONLY and p.default is p.empty]
    if no_default:
        raise ShapeError(bad(name, "defaults for every keyword (make(n) must work)", f"none for {no_default}"))
    names = {p.name for p in rest}
    missing = [kw for kw in KINDS[kind][1] if kw not in names]
    if missing:
        raise ShapeError(bad(name, f"the keywords of kind {kind!r}: {KINDS[kind][1]}", f"no {missing}"))


def register(
    name: str,
    *,
    family: str,
    kind: str,
    paper: str,
    exact: bool,
    supports,
    factory: Callable,
    summary: str,
    source: object = None,
    tags=(),
    fit: Callable | None = None,
) -> Record:
    """Register a mechanism's record (called by the mechanism's own module, beside its code)."""
    if name in _RECORDS:
        raise ShapeError(bad("name", "a name not yet registered", name))
    if family not in FAMILIES:
        raise ShapeError(bad("family", f"one of {sorted(FAMILIES)}", repr(family)))
    if kind not in KINDS:
        raise ShapeError(bad("kind", f"one of {tuple(KINDS)}", repr(kind)))
    for arg, given, allowed in (("supports", supports, SUPPORT_KEYS), ("tags", tags, TAGS)):
        unknown = set(given) - set(allowed)
        if unknown:
            raise ShapeError(bad(arg, f"a subset of {allowed}", sorted(unknown)))
    check_factory(kind, factory, f"factory of {name!r}")
    rec = Record(name, family, kind, paper, exact, frozenset(supports), factory, summary, source, frozenset(tags), fit)
    _RECORDS[name] = rec
    return rec


def all_records() -> dict[str, Record]:
    """Every record registered so far, by name (the modules that register them must have been imported)."""
    return _RECORDS


# -- helpers the factories share ------------------------------------------------------------------------------


def window_size(n: int, frac: int, cap: int) -> int:
    """A window of ``n / frac`` tokens (at least 1), capped at ``cap``: small in tests, realistic at 16k."""
    return max(1, min(n // frac, cap))


def grid_side(n: int, dims: int, lo: int) -> int:
    """The side of a ``dims``-dimensional grid of about ``n`` cells (at least ``lo``)."""
    return max(lo, round(n ** (1 / dims)))


#: The supports of a 1-D sequence pattern and of a spatial (grid) pattern.
SEQUENCE = frozenset({"cross", "gqa", "backward", "decode", "bf16", "padding"})
SPATIAL = frozenset({"gqa", "backward", "bf16", "spatial", "padding"})


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


def register_function(
    name: str,
    *,
    paper: str,
    summary: str,
    supports,
    fn: Callable,
    ref: Callable,
    kwargs=None,
    exact: bool = True,
    setup: Callable | None = None,
    extras: Callable | None = None,
    source: object = None,
) -> Record:
    """Register a family-C function bound to its float64 reference (kind ``"function"``); ``source`` (default
    ``fn``) is what documents it."""

    def factory(n):
        return Mechanism(fn, ref, kwargs(n) if callable(kwargs) else dict(kwargs or {}), setup, extras)

    return register(
        name,
        family="C",
        kind="function",
        paper=paper,
        exact=exact,
        supports=supports,
        factory=factory,
        summary=summary,
        source=fn if source is None else source,
    )
