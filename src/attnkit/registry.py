"""The registry: every mechanism's record, loaded from the families and queried here.

Records are registered by the mechanisms' own modules (:func:`attnkit.records.register`, beside the code they
describe); this module imports the families once, on the first query, and answers: :func:`records`,
:func:`get`, :func:`names`. The tests, the benchmark, the documentation gallery and ``attnkit list`` iterate
it, so registering a mechanism gets it tested, benchmarked, documented and listed.

Kinds and their factory signatures (:data:`attnkit.records.KINDS`), every one ``factory(n, *, ...)``:

=============  ==========================================================================================
kind           ``record.make(n, **options)`` returns
=============  ==========================================================================================
pattern        a :class:`~attnkit.patterns.Pattern` (family A)
function       a :class:`~attnkit.records.Mechanism`: ``m(q, k, v)`` and ``m.reference(q, k, v)`` (C)
module         an ``nn.Module`` over ``(B, N, dim)`` (C)
selector       a :class:`~attnkit.sparse.Selector`; keywords ``budget, heads, kv_heads, head_dim, block`` (B)
policy         an :mod:`attnkit.hf` policy; keywords ``model, budget`` (E)
layer          an attention layer; keywords ``dim, heads`` (D, I)
analysis       an analysis; keyword ``model`` (H)
intervention   an intervention; keyword ``model`` (G)
pruner         a token pruner; keywords ``model, budget`` (F)
task           a quality task; keyword ``seed`` (J)
=============  ==========================================================================================
"""

from __future__ import annotations

import importlib

from .errors import ShapeError, bad
from .records import FAMILIES, KINDS, SUPPORT_KEYS, Mechanism, Record, all_records

__all__ = ["FAMILIES", "KINDS", "SUPPORT_KEYS", "Mechanism", "Record", "get", "names", "records"]

# The packages whose modules register records; importing them registers everything.
_FAMILIES = (
    "attnkit.patterns",
    "attnkit.api",
    "attnkit.linear",
    "attnkit.sparse",
    "attnkit.layers",
    "attnkit.hf",
    "attnkit.analysis",
    "attnkit.tasks",
)
_loaded = False


def _load() -> dict[str, Record]:
    global _loaded
    if not _loaded:
        for mod in _FAMILIES:
            importlib.import_module(mod)
        _loaded = True
    return all_records()


def get(name: str) -> Record:
    """The record called ``name``."""
    recs = _load()
    try:
        return recs[name]
    except KeyError:
        raise ShapeError(bad("name", f"one of {sorted(recs)}", repr(name))) from None


def records(family: str | None = None, kind: str | None = None) -> list[Record]:
    """Every record, or those of one family letter and/or kind, in registration order."""
    if family is not None and family not in FAMILIES:
        raise ShapeError(bad("family", f"one of {sorted(FAMILIES)}", repr(family)))
    if kind is not None and kind not in KINDS:
        raise ShapeError(bad("kind", f"one of {tuple(KINDS)}", repr(kind)))
    return [r for r in _load().values() if (family is None or r.family == family) and (kind is None or r.kind == kind)]


def names(family: str | None = None, kind: str | None = None) -> tuple[str, ...]:
    return tuple(r.name for r in records(family, kind))
