"""CAB's four attention settings on generated tasks (after Zhang et al., 2022, "CAB: Comprehensive Attention
Benchmarking on Long Sequence Modeling"): non-causal self (NS), causal self (CS), non-causal cross (NC) and
causal cross (CC).

CAB scores each setting on real downloaded data (LJSpeech, Multi-News, ETT, PCN, PG-19, FFHQ). Nothing can be
downloaded here, so each setting gets a generated lookup task instead, small enough to train on a CPU in
seconds, whose answer is one content-based attention hop away (a query must find the one token whose key
matches its own, wherever it is, and read its value). Causal self is served by the existing token tasks
(``mqar`` and the MAD tasks). A *record* token carries a key and a value in one id,
``record(k, v) = k * values + v`` (in the source vocabulary; offset in a self-attention vocabulary).

* **bidirectional recall** (NS, a :class:`~attnkit.tasks.base.TokenTask`): ``pairs`` record tokens and as
  many query tokens (one per record key, in a random order) at random positions among filler; at each query
  the target is the value of the record with its key, which is as often after the query as before it, so a
  causal model can answer only about half of them.
* **cross lookup** (NC, a :class:`CrossTask`): a source of ``n`` records with distinct keys, and a target of
  ``queries`` key tokens (a different length: the attention is not square); target ``i`` must emit the value of
  the source record whose key it names. Every target query may see every source token.
* **streaming lookup** (CC, a :class:`CrossTask` with ``causal = True``): source and target of ``n`` tokens,
  aligned in time; target ``i`` names the key of a source record ``j <= i`` (uniform over ``0..i``) and must
  emit its value, so query ``i`` needs source keys ``<= i`` only (CAB's causal cross: a streaming decoder that
  reads a source as it arrives).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..records import register
from .base import IGNORE, TEST_STREAM, TokenTask

_CAB = "CAB: Comprehensive Attention Benchmarking on Long Sequence Modeling (Zhang et al., 2022)"


@dataclass(frozen=True)
class CrossTask:
    """A cross-attention task: a target of ``n_target`` tokens reads a source of ``n`` tokens.

    :meth:`batch` returns ``(source, inputs, targets)``: integer ``source`` ``(size, n)`` from a vocabulary
    of ``source_vocab``, target ``inputs`` ``(size, n_target)`` from ``vocab``, and ``targets``
    ``(size, n_target)`` among ``classes`` answers (or :data:`~attnkit.tasks.base.IGNORE`). All outputs are
    predicted at once from the source and the inputs (no next-token shift). ``causal``: target ``i`` needs only
    source tokens ``j <= i`` (then ``n_target == n``). Batches are a pure function of ``(seed, step)`` as for
    :class:`~attnkit.tasks.base.TokenTask`.
    """

    name: str
    n: int
    n_target: int
    source_vocab: int
    vocab: int
    classes: int
    causal: bool
    seed: int
    make: Callable
    settings: dict

    def batch(self, size: int, step: int = 0):
        rng = np.random.default_rng((self.seed, step))
        return tuple(a.astype(np.int64) for a in self.make(rng, size))

    def test_batch(self, size: int, index: int = 0):
        """A held-out batch: drawn from a stream the training steps never use."""
        return self.batch(size, TEST_STREAM + index)


def _check(name, **sizes):
    for key, val in sizes.items():
        if isinstance(val, bool) or not isinstance(val, (int, np.integer)) or val < 1:
            raise ValueError(f"{name}: {key} must be an int >= 1, got {key}={val!r}")


def _distinct(rng, size, count, pool):
    """``(size, count)`` distinct draws from ``range(pool)`` per row."""
    return np.argsort(rng.random((size, pool)), axis=1)[:, :count]


def bidirectional_recall(n: int = 32, *, seed: int = 0, pairs: int = 8, keys: int = 8, values: int = 8) -> TokenTask:
    """NS: ``pairs`` records and their ``pairs`` queries scattered in ``n`` tokens; label each query with the
    value of its record, before or after it. Vocabulary: ``0`` filler, ``1 + k`` query of key ``k``,
    ``1 + keys + values`` ... record tokens, ``1 + keys + v`` the answer value ``v``."""
    _check("bidirectional_recall", n=n, pairs=pairs, keys=keys, values=values)
    if pairs > keys or n < 2 * pairs:
        raise ValueError(f"bidirectional_recall: need pairs <= keys and n >= 2 * pairs, got {n=}, {pairs=}, {keys=}")
    answer0, record0 = 1 + keys, 1 + keys + values

    def make(rng, size):
        rows = np.arange(size)[:, None]
        k = _distinct(rng, size, pairs, keys)
        v = rng.integers(0, values, (size, pairs))
        slots = _distinct(rng, size, 2 * pairs, n)  # random positions: records first, then their queries
        order = np.argsort(rng.random((size, pairs)), axis=1)  # the queries ask the keys in a random order
        inputs = np.zeros((size, n), np.int64)
        targets = np.full((size, n), IGNORE, np.int64)
        inputs[rows, slots[:, :pairs]] = record0 + k * values + v
        inputs[rows, slots[:, pairs:]] = 1 + k[rows, order]
        targets[rows, slots[:, pairs:]] = answer0 + v[rows, order]
        return inputs, targets

    vocab = 1 + keys + values + keys * values
    return TokenTask("bidirectional_recall", n, vocab, seed, make, {"pairs": pairs, "keys": keys, "values": values})


def cross_lookup(
    n: int = 16, *, seed: int = 0, queries: int | None = None, keys: int | None = None, values: int = 8
) -> CrossTask:
    """NC: a source of ``n`` records with distinct keys (``record = key * values + value``) out of ``keys``
    (default ``max(n, 16)``); ``queries`` (default ``n // 2``) target tokens each name one of those keys
    (distinct, random order) and must emit its value."""
    keys = max(n, 16) if keys is None else keys
    queries = max(1, n // 2) if queries is None else queries
    _check("cross_lookup", n=n, queries=queries, keys=keys, values=values)
    if n > keys or queries > n:
        raise ValueError(
            f"cross_lookup: need n <= keys (distinct keys) and queries <= n, got {n=}, {queries=}, {keys=}"
        )

    def make(rng, size):
        rows = np.arange(size)[:, None]
        k = _distinct(rng, size, n, keys)
        v = rng.integers(0, values, (size, n))
        asked = _distinct(rng, size, queries, n)  # which records the queries name
        return k * values + v, k[rows, asked], v[rows, asked]

    settings = {"queries": queries, "keys": keys, "values": values}
    return CrossTask("cross_lookup", n, queries, keys * values, keys, values, False, seed, make, settings)


def streaming_lookup(n: int = 16, *, seed: int = 0, keys: int | None = None, values: int = 8) -> CrossTask:
    """CC: source and target of ``n`` aligned steps; source ``j`` is a record with a distinct key (out of
    ``keys``, default ``max(n, 16)``), target ``i`` names the key of a record ``j <= i`` (uniform) and must emit
    its value."""
    keys = max(n, 16) if keys is None else keys
    _check("streaming_lookup", n=n, keys=keys, values=values)
    if n > keys:
        raise ValueError(f"streaming_lookup: need n <= keys (distinct keys), got {n=}, {keys=}")

    def make(rng, size):
        rows = np.arange(size)[:, None]
        k = _distinct(rng, size, n, keys)
        v = rng.integers(0, values, (size, n))
        j = np.floor(rng.random((size, n)) * (np.arange(n) + 1)).astype(np.int64)  # uniform in 0..i
        return k * values + v, k[rows, j], v[rows, j]

    return CrossTask(
        "streaming_lookup", n, n, keys * values, keys, values, True, seed, make, {"keys": keys, "values": values}
    )


for _name, _fn, _supports, _summary in (
    (
        "bidirectional_recall",
        bidirectional_recall,
        {"noncausal"},
        "CAB non-causal self: label each query with the value of its record, before or after it",
    ),
    (
        "cross_lookup",
        cross_lookup,
        {"noncausal", "cross"},
        "CAB non-causal cross: target queries look their keys up in a source of records",
    ),
    (
        "streaming_lookup",
        streaming_lookup,
        {"causal", "cross"},
        "CAB causal cross: target i looks up a key among the source records <= i",
    ),
):
    register(
        _name,
        family="J",
        kind="task",
        paper=_CAB,
        exact=True,
        supports=_supports,
        factory=_fn,
        summary=_summary,
        source=_fn,
    )
