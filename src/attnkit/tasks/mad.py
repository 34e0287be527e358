"""Three of MAD's synthetic tasks (Poli et al., 2024, "Mechanistic Design and Scaling of Hybrid Architectures"),
generated as the paper describes them, at CPU scale (sequences of 64 tokens, vocabularies of 16-32).

* **in-context recall**: a sequence of key-value pairs ``k v k v ...`` whose key-to-value map is drawn per
  sequence; keys repeat, and each repeated key must be followed by its value.
* **noisy recall**: the same with tokens of a separate noise vocabulary inserted at random pair boundaries (a
  fraction ``noise`` of the sequence), which the model must learn to skip.
* **selective copying**: ``copies`` tokens scattered at random positions among blank tokens, then as many copy
  markers; the model must emit the scattered tokens in order, one per marker.

Scored positions are only those whose answer the inputs determine (a key's first appearance is not scored).
Fuzzy recall, compression and memorisation are not generated yet.
"""

from __future__ import annotations

import numpy as np

from ..records import register
from .base import IGNORE, TokenTask

_MAD = "Mechanistic Design and Scaling of Hybrid Architectures (Poli et al., 2024)"


def _recall_row(rng, n, keys, values, noise_tokens, noise):
    """One recall row of ``n`` tokens: pairs over ``keys`` keys mapped to ``values`` values, plus noise."""
    mapping = rng.integers(0, values, keys) + keys  # key k -> value token
    n_noise = int(round(noise * n)) if noise_tokens else 0
    pairs = (n - n_noise) // 2
    ks = rng.integers(0, keys, pairs)
    seq, tgt, seen = [], [], set()
    for k in ks:
        seq += [k, mapping[k]]
        tgt += [mapping[k] if k in seen else IGNORE, IGNORE]
        seen.add(k)
    # noise goes between pairs (never between a key and its value), so a key is still followed by its value
    for p in np.sort(rng.choice(np.arange(0, len(seq) + 1, 2), n - len(seq), replace=True))[::-1]:
        seq.insert(p, keys + values + rng.integers(0, max(noise_tokens, 1)))
        tgt.insert(p, IGNORE)
    return seq[:n], tgt[:n]


def in_context_recall(n: int = 64, *, seed: int = 0, keys: int = 8, values: int = 8, noise: float = 0.0) -> TokenTask:
    """MAD's in-context recall (``noise = 0``) or noisy recall: vocabulary ``keys + values (+ 4 noise)``."""
    noise_tokens = 4 if noise > 0 else 0
    if n < 4 or keys < 1 or values < 1 or not 0 <= noise < 0.5:
        raise ValueError(f"in_context_recall: need n >= 4, keys, values >= 1, 0 <= noise < 0.5; got {n=}, {noise=}")

    def make(rng, size):
        rows = [_recall_row(rng, n, keys, values, noise_tokens, noise) for _ in range(size)]
        return np.array([r[0] for r in rows]), np.array([r[1] for r in rows])

    name = "noisy_recall" if noise > 0 else "in_context_recall"
    vocab = keys + values + max(noise_tokens, 1)
    return TokenTask(name, n, vocab, seed, make, {"keys": keys, "values": values, "noise": noise})


def noisy_recall(n: int = 64, *, seed: int = 0, keys: int = 8, values: int = 8, noise: float = 0.2) -> TokenTask:
    """MAD's noisy recall: in-context recall with a fraction ``noise`` of noise tokens inserted."""
    return in_context_recall(n, seed=seed, keys=keys, values=values, noise=noise)


def selective_copying(n: int = 64, *, seed: int = 0, copies: int = 8, tokens: int = 16) -> TokenTask:
    """MAD's selective copying: ``copies`` of ``tokens`` content tokens (ids 2..) scattered among blanks (0) in
    the first ``n - copies`` positions, then ``copies`` markers (1); at the last context position and at each
    marker but the last the target is the next content token in order."""
    ctx = n - copies
    if copies < 1 or ctx < copies + 1:
        raise ValueError(f"selective_copying: need 1 <= copies and n >= 2 * copies + 1, got {n=}, {copies=}")

    def make(rng, size):
        inputs = np.zeros((size, n), np.int64)
        targets = np.full((size, n), IGNORE, np.int64)
        rows = np.arange(size)[:, None]
        content = rng.integers(2, 2 + tokens, (size, copies))
        pos = np.sort(np.argsort(rng.random((size, ctx - 1)), axis=1)[:, :copies], axis=1)  # not the last slot
        inputs[rows, pos] = content
        inputs[:, ctx:] = 1
        targets[:, ctx - 1 : n - 1] = content
        return inputs, targets

    return TokenTask("selective_copying", n, 2 + tokens, seed, make, {"copies": copies, "tokens": tokens})


for _name, _fn, _summary in (
    ("in_context_recall", in_context_recall, "MAD in-context recall: repeated keys, predict their value"),
    ("noisy_recall", noisy_recall, "MAD noisy recall: in-context recall with noise tokens inserted"),
    ("selective_copying", selective_copying, "MAD selective copying: copy scattered tokens in order"),
):
    register(
        _name,
        family="J",
        kind="task",
        paper=_MAD,
        exact=True,
        supports={"causal"},
        factory=_fn,
        summary=_summary,
        source=_fn,
    )
