"""Multi-query associative recall (MQAR), the task of Zoology (Arora et al., 2023).

A sequence of ``n`` tokens starts with ``pairs`` key-value pairs ``k_1 v_1 ... k_D v_D`` (keys drawn without
replacement from the lower half of the vocabulary, values from the upper half, token 0 kept as filler). The rest
of the sequence is filler in which every key appears once more, in a random order at random positions; at each
such position the model must emit that key's value: ``target[p] = v_j`` where ``inputs[p] = k_j``, every other
target is ignored. Recall needs the model to look back past ``p - 2j`` tokens, so a causal window shorter than
that distance cannot solve it, and a fixed-size recurrent state (linear attention) must store ``D`` associations.

Differences from Zoology's generator (``zoology/data/associative_recall.py``), chosen for CPU training in
seconds: the vocabulary is small (default 64, Zoology 8,192), and query positions are uniform over the query
region instead of Zoology's power law (alpha = 0.01), which makes some queries nearer to their pair.
"""

from __future__ import annotations

import numpy as np

from ..records import register
from .base import IGNORE, TokenTask


def mqar(n: int = 64, *, seed: int = 0, pairs: int = 4, vocab: int = 64) -> TokenTask:
    """An MQAR task: ``pairs`` key-value pairs recalled in a sequence of ``n`` tokens, ``vocab`` tokens."""
    half = vocab // 2
    if pairs < 1 or pairs > half - 1 or n < 4 * pairs:
        raise ValueError(f"mqar: need 1 <= pairs <= vocab/2 - 1 and n >= 4 * pairs, got {pairs=}, {n=}, {vocab=}")

    def make(rng, size):
        inputs = np.zeros((size, n), np.int64)
        targets = np.full((size, n), IGNORE, np.int64)
        rows = np.arange(size)[:, None]
        keys = np.argsort(rng.random((size, half - 1)), axis=1)[:, :pairs] + 1
        values = rng.integers(half, vocab, (size, pairs))
        inputs[:, 0 : 2 * pairs : 2], inputs[:, 1 : 2 * pairs : 2] = keys, values
        region = n - 2 * pairs
        pos = np.sort(np.argsort(rng.random((size, region)), axis=1)[:, :pairs], axis=1) + 2 * pairs
        order = np.argsort(rng.random((size, pairs)), axis=1)
        inputs[rows, pos] = keys[rows, order]
        targets[rows, pos] = values[rows, order]
        return inputs, targets

    return TokenTask("mqar", n, vocab, seed, make, {"pairs": pairs, "vocab": vocab})


register(
    "mqar",
    family="J",
    kind="task",
    paper="Zoology: Measuring and Improving Recall in Efficient Language Models (Arora et al., 2023)",
    exact=True,
    supports={"causal"},
    factory=mqar,
    summary="multi-query associative recall: D key-value pairs, then each key again, predict its value",
    source=mqar,
)
