"""The family-J task generators: shapes, seeds, and answers that the inputs determine."""

import numpy as np
import pytest

from attnkit import registry
from attnkit.tasks import IGNORE, mad, mqar

TASKS = registry.names(family="J")


def test_every_task_record_is_a_task_of_family_j():
    assert set(TASKS) >= {"mqar", "in_context_recall", "noisy_recall", "selective_copying"}
    for name in TASKS:
        assert registry.get(name).kind == "task"


@pytest.mark.parametrize("name", TASKS)
def test_batches_have_their_shape_and_are_seeded(name):
    task = registry.get(name).make(64, seed=3)
    x, y = task.batch(5, step=2)
    assert x.shape == y.shape == (5, 64) and x.dtype == y.dtype == np.int64
    assert 0 <= x.min() and x.max() < task.vocab
    scored = y != IGNORE
    assert scored.any() and y[scored].max() < task.vocab
    again, _ = task.batch(5, step=2)
    assert (again == x).all()
    assert not (task.batch(5, step=3)[0] == x).all()
    assert not (task.test_batch(5)[0] == x).all()  # the held-out stream
    assert not (registry.get(name).make(64, seed=4).batch(5, step=2)[0] == x).all()


def test_mqar_answers_are_the_values_of_the_pairs():
    task = mqar.mqar(128, seed=0, pairs=8, vocab=64)
    x, y = task.batch(16)
    for b in range(16):
        pairs = dict(zip(x[b, 0:16:2], x[b, 1:16:2], strict=True))
        assert len(pairs) == 8 and min(pairs) >= 1 and max(pairs) < 32 and min(pairs.values()) >= 32
        scored = np.nonzero(y[b] != IGNORE)[0]
        assert len(scored) == 8 and scored.min() >= 16
        assert sorted(x[b, scored]) == sorted(pairs)  # every key is queried once
        for p in scored:
            assert y[b, p] == pairs[x[b, p]]
        assert (np.delete(x[b, 16:], scored - 16) == 0).all()  # the rest is filler


def test_recall_answers_come_from_an_earlier_pair():
    for task in (mad.in_context_recall(64, seed=1), mad.noisy_recall(64, seed=1)):
        x, y = task.batch(8)
        keys = task.settings["keys"]
        for b in range(8):
            for p in np.nonzero(y[b] != IGNORE)[0]:
                assert x[b, p] < keys and x[b, p + 1] == y[b, p]
                earlier = [i for i in range(p) if x[b, i] == x[b, p]]
                assert earlier and x[b, earlier[0] + 1] == y[b, p]
    noisy = mad.noisy_recall(64, seed=1).batch(8)[0]
    assert (noisy >= 16).mean() > 0.1  # noise tokens are there


def test_selective_copying_targets_the_scattered_tokens_in_order():
    task = mad.selective_copying(64, seed=0, copies=8)
    x, y = task.batch(8)
    for b in range(8):
        content = x[b, :56][x[b, :56] > 1]
        assert len(content) == 8 and (x[b, 56:] == 1).all()
        assert (y[b, 55:63] == content).all() and (np.delete(y[b], range(55, 63)) == IGNORE).all()


def test_impossible_settings_are_refused():
    with pytest.raises(ValueError, match="pairs"):
        mqar.mqar(16, pairs=8)
    with pytest.raises(ValueError, match="copies"):
        mad.selective_copying(8, copies=8)
    with pytest.raises(ValueError, match="noise"):
        mad.in_context_recall(64, noise=0.7)
