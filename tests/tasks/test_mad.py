"""MAD's fuzzy recall, compression and memorisation: seeded batches whose scored answers a hand-written solver
reproduces from the inputs (and, for memorisation, from a table read off the training batches)."""

import numpy as np
import pytest

from attnkit import registry
from attnkit.tasks import IGNORE, mad

NEW = ("fuzzy_recall", "compression", "memorisation")


@pytest.mark.parametrize("name", NEW)
def test_each_is_a_causal_task_record_of_mad(name):
    rec = registry.get(name)
    assert rec.family == "J" and rec.kind == "task" and rec.supports == {"causal"} and "Poli" in rec.paper


@pytest.mark.parametrize("name", NEW)
def test_batches_are_seeded_int64_and_in_the_vocabulary(name):
    task = registry.get(name).make(64, seed=5)
    x, y = task.batch(8, step=1)
    assert x.shape == y.shape == (8, 64) and x.dtype == y.dtype == np.int64
    assert 0 <= x.min() and x.max() < task.vocab and (y[y != IGNORE] < task.vocab).all()
    assert ((y != IGNORE).sum(1) > 0).all()  # every row scores something
    assert all((a == b).all() for a, b in zip(task.batch(8, step=1), (x, y), strict=True))
    again = registry.get(name).make(64, seed=5).test_batch(8, 2)
    assert all((a == b).all() for a, b in zip(task.test_batch(8, 2), again, strict=True))
    assert not (task.batch(8, step=2)[0] == x).all() and not (task.test_batch(8)[0] == x).all()


def _fuzzy_solver(row, key_tokens, key_span):
    """Split the row into key and value spans (the vocabularies are disjoint) and predict what is determined."""
    pred = np.full(len(row), IGNORE)
    runs, start = [], 0
    for i in range(1, len(row) + 1):
        if i == len(row) or (row[i] < key_tokens) != (row[i - 1] < key_tokens):
            runs.append((start, i))
            start = i
    assert row[0] < key_tokens  # a row starts with a key
    runs.append((len(row), len(row)))  # a key cut off at the end has an empty value
    table = {}
    for (ks, ke), (vs, ve) in zip(runs[0::2], runs[1::2], strict=False):
        key, value = tuple(row[ks:ke]), tuple(row[vs:ve])
        if key in table:
            known = table[key]
            if ke - ks == key_span:
                pred[ke - 1] = known[0]
            for j in range(vs, min(vs + len(known) - 1, len(row))):
                pred[j] = known[j - vs + 1]
        if ve < len(row):  # a value cut at the end of the row is not complete
            table[key] = value
    return pred


def test_fuzzy_recall_answers_are_the_earlier_value_spans():
    task = mad.fuzzy_recall(64, seed=2)
    kt, span = task.settings["key_tokens"], task.settings["key_span"]
    x, y = task.test_batch(64)
    lengths = set()
    for b in range(64):
        pred = _fuzzy_solver(x[b], kt, span)
        scored = y[b] != IGNORE
        assert (pred[scored] == y[b, scored]).all() and (pred[~scored] == IGNORE).all()
        assert (x[b, 1:][scored[:-1]] == y[b, :-1][scored[:-1]]).all()  # the answer is the next token
        runs = np.split(x[b], np.nonzero(np.diff(x[b] < kt))[0] + 1)
        lengths |= {len(r) for r in runs[:-1]}
    assert lengths == {1, 2, 3}  # keys and values are spans of 1 to 3 tokens
    assert (y[y != IGNORE] >= kt).all()  # only value tokens are answers


def test_fuzzy_recall_redraws_repeated_key_spans_until_they_are_distinct():
    """15 copies of one key span, and the 15 spans of 3 key tokens are all that can be drawn: the row still has
    15 distinct keys, each followed by its value."""
    values = [(3 + i % 4,) for i in range(15)]
    order = list(range(15)) * 3
    rng = np.random.default_rng(0)
    seq, _ = mad._fuzzy_row(rng, 200, [(0,)] * 15, values, order, key_span=3, key_tokens=3)
    runs = np.split(np.array(seq), np.nonzero(np.diff(np.array(seq) < 3))[0] + 1)
    keys = [tuple(r) for r in runs[0:30:2]]
    assert len(set(keys)) == 15 and keys[0] == (0,) and all(r[0] < 3 for r in runs[0:30:2])


def test_compression_reproduces_the_sequence_after_its_token():
    task = mad.compression(64, seed=0)
    x, y = task.test_batch(16)
    assert (x[:, 32] == 1).all() and (x[:, 33:] == 0).all() and (x[:, :32] >= 2).all()
    assert (y[:, 32:] == x[:, :32]).all() and (y[:, :32] == IGNORE).all()
    odd = mad.compression(9, seed=0).batch(4)[1]
    assert (odd[:, 4:8] != IGNORE).all() and (odd[:, 8] == IGNORE).all() and (odd[:, :4] == IGNORE).all()


def test_memorisation_is_one_fixed_map_that_never_shows_a_value():
    task = mad.memorisation(64, seed=0)
    keys = task.settings["keys"]
    assert task.vocab == 2 * keys + 1 == 255
    table = {}
    for step in range(12):  # the map read off training batches ...
        x, y = task.batch(32, step)
        assert (x < keys)[:, 0::2].all() and (x[:, 1::2] == 2 * keys).all()  # keys and insert tokens only
        for k, v in zip(x[:, 0::2].ravel(), y[:, 1::2].ravel(), strict=True):
            assert table.setdefault(k, v) == v
    assert len(table) == keys and sorted(table.values()) == list(range(keys, 2 * keys))
    for i in range(3):  # ... answers every held-out batch
        x, y = task.test_batch(64, i)
        assert (np.vectorize(table.get)(x[:, 0::2]) == y[:, 1::2]).all() and (y[:, 0::2] == IGNORE).all()
    assert (task.settings["map"] == [table[k] for k in range(keys)]).all()
    other = mad.memorisation(64, seed=1)
    assert not (other.settings["map"] == task.settings["map"]).all()  # the map is drawn from the seed
    assert (mad.memorisation(64, seed=0).settings["map"] == task.settings["map"]).all()


@pytest.mark.parametrize(
    ("call", "arg"),
    [
        (lambda: mad.fuzzy_recall(64, keys=0), "keys"),
        (lambda: mad.fuzzy_recall(64, key_tokens=2, key_span=3), "key_span"),
        (lambda: mad.fuzzy_recall(64, key_tokens=2, key_span=1, keys=3), "keys"),
        (lambda: mad.fuzzy_recall(2), "n"),
        (lambda: mad.fuzzy_recall(64, value_span=1.5), "value_span"),
        (lambda: mad.compression(2), "n"),
        (lambda: mad.compression(64, tokens=0), "tokens"),
        (lambda: mad.memorisation(64, keys=0), "keys"),
        (lambda: mad.memorisation(1), "n"),
        (lambda: mad.memorisation(64, keys=True), "keys"),
    ],
)
def test_bad_arguments_are_refused_by_name(call, arg):
    with pytest.raises(ValueError, match=arg):
        call()
