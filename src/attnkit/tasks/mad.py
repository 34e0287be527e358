"""MAD's six synthetic tasks (Poli et al., 2024, "Mechanistic Design and Scaling of Hybrid Architectures"),
generated as the paper describes them (and as its public generators, ``mad/data/instances.py`` of
athms/mad-lab, draw them), at CPU scale (sequences of 64 tokens, vocabularies of 16-255).

* **in-context recall**: a sequence of key-value pairs ``k v k v ...`` whose key-to-value map is drawn per
  sequence; keys repeat, and each repeated key must be followed by its value.
* **noisy recall**: the same with tokens of a separate noise vocabulary inserted at random pair boundaries (a
  fraction ``noise`` of the sequence), which the model must learn to skip.
* **selective copying**: ``copies`` tokens scattered at random positions among blank tokens, then as many copy
  markers; the model must emit the scattered tokens in order, one per marker.
* **fuzzy recall**: in-context recall whose keys and values are spans of 1 to 3 tokens (:func:`fuzzy_recall`).
* **compression**: a sequence, a compression token, then the model must reproduce the sequence
  (:func:`compression`; MAD trains an encoder-decoder on it, cast here as next-token prediction).
* **memorisation**: a map from keys to values fixed for the task (the same in every batch, so it must be stored
  in the weights); the context holds keys only, never values (:func:`memorisation`).

Scored positions are only those whose answer the inputs determine (a key's first appearance is not scored), and
the three tasks above score only what MAD scores on its test instances. Each function's docstring gives its
generation rule, MAD's default settings and what changed here for training on two CPU cores.
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import bad
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


def _check_counts(task: str, **counts):
    for arg, (value, lo) in counts.items():
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < lo:
            raise ValueError(f"{task}: " + bad(arg, f"an int >= {lo}", repr(value)))


def _spans(rng, shape: tuple, tokens: int, longest: int, offset: int) -> list:
    """Spans (an array of ``shape`` of them, as nested lists of tuples) of 1..``longest`` distinct tokens from
    ``offset .. offset + tokens - 1`` (MAD's permutations), the length uniform."""
    lengths = rng.integers(1, longest + 1, shape)
    picks = np.argsort(rng.random((*shape, tokens)), axis=-1)[..., :longest] + offset
    return [
        [tuple(p[:length]) for p, length in zip(row, lens, strict=True)]
        for row, lens in zip(picks.tolist(), lengths.tolist(), strict=True)
    ]


def _fuzzy_row(rng, n, key_spans, value_spans, order, key_span, key_tokens):
    spans = dict(zip(key_spans, value_spans, strict=True))
    while len(spans) < len(key_spans):  # a repeated key span (rare): draw more until ``keys`` are distinct
        for k in _spans(rng, (1, len(key_spans)), key_tokens, key_span, 0)[0]:
            if len(spans) < len(key_spans):
                spans.setdefault(k, value_spans[len(spans)])
    pairs = list(spans.items())
    seq, tgt, seen = [], [], set()
    for i in order:
        if len(seq) > n:
            break
        k, v = pairs[i]
        known = k in seen
        seq += [*k, *v]
        # at a key's last token its value's first token is known only if the key cannot go on (full length);
        # inside a value every next token is known; after a value's last token the next key is random
        tgt += [IGNORE] * (len(k) - 1) + [v[0] if known and len(k) == key_span else IGNORE]
        tgt += [*(v[1:] if known else [IGNORE] * (len(v) - 1)), IGNORE]
        seen.add(k)
    return seq[:n], tgt[:n]


def fuzzy_recall(
    n: int = 64,
    *,
    seed: int = 0,
    keys: int = 8,
    key_tokens: int = 8,
    value_tokens: int = 8,
    key_span: int = 3,
    value_span: int = 3,
) -> TokenTask:
    """MAD's fuzzy in-context recall: in-context recall whose keys and values are multi-token spans.

    Generation rule (per sequence): draw ``keys`` distinct key spans, each of 1..``key_span`` distinct tokens
    from the key vocabulary ``0 .. key_tokens - 1`` (length uniform), and for each a value span of
    1..``value_span`` distinct tokens from the value vocabulary ``key_tokens .. key_tokens + value_tokens - 1``;
    then concatenate pairs ``key span, value span`` with the key drawn uniformly until ``n`` tokens are
    filled (the last pair is cut at ``n``). The vocabularies are disjoint, so a span ends where the other kind
    of token starts. Scored: for a key seen before in the sequence, each token of its value after the first
    (predicted at the value token before it), and the value's first token (predicted at the key's last token)
    when the key has the full ``key_span`` tokens, the only length at which the inputs show that the key is
    over (MAD's test instances likewise probe keys of full length only).

    MAD's defaults (``configs/tasks/fuzzy-in-context-recall.yml``): vocabulary 16 (7 key and 8 value tokens
    and a pad token), sequences of 128 tokens, 12,800 training sequences, spans of up to 3 tokens,
    multi-query; each pair's key is drawn from every span of the key vocabulary, one planted probe key
    repeats, and training uses the full next-token loss. Changed for two CPU cores: 64 tokens, 8 + 8 tokens,
    and a set of ``keys = 8`` key spans per sequence, so that keys repeat in 64 tokens (MAD's 259 possible
    spans rarely repeat but for the single-token ones); fresh sequences every step instead of a fixed
    training set; only the determined positions are trained and scored; the sequence is cut at ``n``
    instead of left-padded.
    """
    _check_counts(
        "fuzzy_recall",
        n=(n, 4),
        keys=(keys, 1),
        key_tokens=(key_tokens, 1),
        value_tokens=(value_tokens, 1),
        key_span=(key_span, 1),
        value_span=(value_span, 1),
    )
    if key_span > key_tokens or value_span > value_tokens:
        raise ValueError(
            "fuzzy_recall: " + bad("key_span, value_span", "at most key_tokens, value_tokens", (key_span, value_span))
        )
    possible = sum(math.perm(key_tokens, length) for length in range(1, key_span + 1))
    if keys > possible:
        raise ValueError("fuzzy_recall: " + bad("keys", f"at most {possible} distinct key spans", keys))

    def make(rng, size):
        key_spans = _spans(rng, (size, keys), key_tokens, key_span, 0)
        value_spans = _spans(rng, (size, keys), value_tokens, value_span, key_tokens)
        orders = rng.integers(0, keys, (size, n // 2 + 1)).tolist()  # enough pairs: each has at least 2 tokens
        rows = [
            _fuzzy_row(rng, n, ks, vs, order, key_span, key_tokens)
            for ks, vs, order in zip(key_spans, value_spans, orders, strict=True)
        ]
        return np.array([r[0] for r in rows]), np.array([r[1] for r in rows])

    settings = dict(keys=keys, key_tokens=key_tokens, value_tokens=value_tokens, key_span=key_span)
    return TokenTask("fuzzy_recall", n, key_tokens + value_tokens, seed, make, {**settings, "value_span": value_span})


def compression(n: int = 64, *, seed: int = 0, tokens: int = 14) -> TokenTask:
    """MAD's compression: reproduce a random sequence after a compression token.

    Generation rule: ``m = n // 2`` content tokens drawn uniformly (with replacement) from ``2 .. tokens + 1``,
    then the compression token (1), then blanks (0) to ``n``. The target at the compression token is the first
    content token and at the ``i``-th blank the ``i + 1``-th: the sequence is reproduced in order, one token per
    position, ``m`` positions after the token it is copied from.

    MAD's defaults (``configs/tasks/compression.yml``): vocabulary 16, 32 tokens (31 content tokens and the
    compression token), 12,800 training sequences. MAD trains an encoder-decoder on it: the encoder's output at
    the compression token (the last position) is the only thing an MLP decoder sees, with a position embedding
    per output position. Cast here as a :class:`TokenTask` for the same causal model as every other task: the
    reproduction is the positions after the compression token. A recurrent or linear mechanism carries nothing
    past the compression token but its state (the blanks carry no information), so for it the task is MAD's
    compression into a fixed-size representation; a softmax layer can instead look back ``m`` tokens, so for it
    the task is an offset copy (no bottleneck is imposed on it). Changed for two CPU cores: 64 tokens (32 to
    reproduce), fresh sequences every step; vocabulary ``tokens + 2 = 16`` as MAD's.
    """
    _check_counts("compression", n=(n, 3), tokens=(tokens, 1))
    m = n // 2

    def make(rng, size):
        content = rng.integers(2, 2 + tokens, (size, m))
        inputs = np.zeros((size, n), np.int64)
        inputs[:, :m], inputs[:, m] = content, 1
        targets = np.full((size, n), IGNORE, np.int64)
        targets[:, m : 2 * m] = content
        return inputs, targets

    return TokenTask("compression", n, 2 + tokens, seed, make, {"tokens": tokens})


#: The stream (beside ``(seed, step)``) that draws a memorisation task's fixed map.
MAP_STREAM = 1 << 30


def memorisation(n: int = 64, *, seed: int = 0, keys: int = 127) -> TokenTask:
    """MAD's memorisation: a key-to-value map fixed for the task, learnt into the weights.

    Generation rule: the map sends key ``k`` (``0 .. keys - 1``) to value token ``keys + p(k)`` for a random
    permutation ``p`` drawn once from ``seed`` (the same map in every batch, training and test); a sequence is
    ``n // 2`` pairs ``k, insert`` (the insert token is ``2 * keys``) with keys drawn uniformly, and the target
    at each insert token is the value of the key before it. Values never appear in the inputs, so only weights
    can hold them. :attr:`TokenTask.settings` holds the map (``"map"``, an array: value token of each key).

    MAD's defaults (``configs/tasks/memorization.yml``): vocabulary 256 (127 keys, 128 value tokens, the
    insert token), 32 tokens, 256 training sequences seen over many epochs, the map drawn from the run's seed.
    Kept here: 127 keys (vocabulary 255, a bijection onto 127 value tokens); changed for two CPU cores: 64
    tokens, and fresh key draws every step instead of a fixed set of 256 sequences (the map is what is learnt,
    so the held-out batches test the same map on new sequences).
    """
    _check_counts("memorisation", n=(n, 2), keys=(keys, 1))
    mapping = np.random.default_rng((seed, MAP_STREAM)).permutation(keys) + keys
    pairs = n // 2

    def make(rng, size):
        ks = rng.integers(0, keys, (size, pairs))
        inputs = np.full((size, n), 2 * keys, np.int64)
        inputs[:, 0 : 2 * pairs : 2] = ks
        targets = np.full((size, n), IGNORE, np.int64)
        targets[:, 1 : 2 * pairs : 2] = mapping[ks]
        return inputs, targets

    return TokenTask("memorisation", n, 2 * keys + 1, seed, make, {"keys": keys, "map": mapping})


for _name, _fn, _summary in (
    ("in_context_recall", in_context_recall, "MAD in-context recall: repeated keys, predict their value"),
    ("noisy_recall", noisy_recall, "MAD noisy recall: in-context recall with noise tokens inserted"),
    ("selective_copying", selective_copying, "MAD selective copying: copy scattered tokens in order"),
    ("fuzzy_recall", fuzzy_recall, "MAD fuzzy recall: in-context recall of multi-token key and value spans"),
    ("compression", compression, "MAD compression: reproduce a sequence after a compression token"),
    ("memorisation", memorisation, "MAD memorisation: a fixed key-value map learnt into the weights"),
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
