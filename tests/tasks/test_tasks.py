"""The family-J task generators: shapes, seeds, and answers that the inputs determine."""

import numpy as np
import pytest

from attnkit import registry
from attnkit.tasks import IGNORE, cab, mad, mqar

TASKS = registry.names(family="J")
TOKEN_TASKS = [n for n in TASKS if not {"spatial", "cross"} & registry.get(n).supports]
CROSS_TASKS = [n for n in TASKS if "cross" in registry.get(n).supports]


def test_every_task_record_is_a_task_of_family_j():
    assert set(TASKS) >= {"mqar", "in_context_recall", "noisy_recall", "selective_copying", "digits"}
    assert {"bidirectional_recall", "cross_lookup", "streaming_lookup"} <= set(TASKS)
    for name in TASKS:
        assert registry.get(name).kind == "task"


@pytest.mark.parametrize("name", TOKEN_TASKS)
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


def test_digits_are_scikit_learns_images_with_a_held_out_fifth():
    from sklearn.datasets import load_digits

    task = registry.get("digits").make(64, seed=1)
    assert task.grid == (8, 8) and task.n == 64 and task.classes == 10
    assert len(task.train_labels) + len(task.test_labels) == 1797 and len(task.test_labels) == 359
    x, y = task.batch(6, step=2)
    assert x.shape == (6, 8, 8, 1) and x.dtype == np.float32 and y.dtype == np.int64
    assert 0 <= x.min() and x.max() <= 1 and set(y) <= set(range(10))
    assert (task.batch(6, step=2)[0] == x).all() and not (task.batch(6, step=3)[0] == x).all()
    # every image is one of the bundled ones, and no training image is a test image
    raw = load_digits()
    flat = {tuple((im / 16.0).astype(np.float32).reshape(-1)): t for im, t in zip(raw.images, raw.target, strict=True)}
    assert all(flat[tuple(im.reshape(-1))] == t for im, t in zip(task.test_images, task.test_labels, strict=True))
    test = {tuple(im.reshape(-1)) for im in task.test_images}
    assert len(test & {tuple(im.reshape(-1)) for im in task.train_images}) < 5  # a few duplicates exist in the set
    pooled = registry.get("digits").make(16, seed=1)
    assert pooled.grid == (4, 4) and np.allclose(
        pooled.test_images[0], task.test_images[0].reshape(4, 2, 4, 2).mean((1, 3))
    )
    with pytest.raises(ValueError, match="n must be"):
        registry.get("digits").make(32)


# -- CAB's settings (attnkit.tasks.cab) -------------------------------------------------------------------------


def test_cab_task_records_say_their_setting():
    sup = {n: registry.get(n).supports for n in ("bidirectional_recall", "cross_lookup", "streaming_lookup")}
    assert sup == {
        "bidirectional_recall": {"noncausal"},
        "cross_lookup": {"noncausal", "cross"},
        "streaming_lookup": {"causal", "cross"},
    }
    assert set(CROSS_TASKS) >= {"cross_lookup", "streaming_lookup"}


@pytest.mark.parametrize("name", CROSS_TASKS)
def test_cross_batches_have_their_shape_and_are_seeded(name):
    task = registry.get(name).make(32, seed=3)
    src, x, y = task.batch(5, step=2)
    assert src.shape == (5, task.n) == (5, 32) and x.shape == y.shape == (5, task.n_target)
    assert all(a.dtype == np.int64 for a in (src, x, y))
    assert 0 <= src.min() and src.max() < task.source_vocab and 0 <= x.min() and x.max() < task.vocab
    assert 0 <= y.min() and y.max() < task.classes
    assert all((a == b).all() for a, b in zip(task.batch(5, step=2), (src, x, y), strict=True))
    assert not (task.batch(5, step=3)[0] == src).all()
    assert not (task.test_batch(5)[0] == src).all()
    assert not (registry.get(name).make(32, seed=4).batch(5, step=2)[0] == src).all()


def _lookup(records, key, values):
    """The hand solver: the value of the record whose key is ``key`` (records are ``key * values + value``)."""
    hits = [r % values for r in records if r // values == key]
    assert len(hits) == 1  # the record keys are distinct, so the answer is determined
    return hits[0]


def test_a_solver_that_reads_both_sides_solves_bidirectional_recall_and_a_causal_one_cannot():
    task = cab.bidirectional_recall(32, seed=0, pairs=8, keys=8, values=8)
    x, y = task.batch(64)
    k, v = task.settings["keys"], task.settings["values"]
    rec0, ans0 = 1 + k + v, 1 + k
    full = causal = total = 0
    for b in range(64):
        scored = np.nonzero(y[b] != IGNORE)[0]
        assert len(scored) == 8 and (x[b, scored] >= 1).all() and (x[b, scored] <= k).all()
        assert ((x[b] >= rec0).sum(), (x[b] == 0).sum()) == (8, 16)  # 8 records, 8 queries, 16 filler
        for p in scored:
            key = x[b, p] - 1
            full += ans0 + _lookup([r - rec0 for r in x[b] if r >= rec0], key, v) == y[b, p]
            left = [r - rec0 for r in x[b, :p] if r >= rec0 and (r - rec0) // v == key]
            causal += bool(left) and ans0 + left[0] % v == y[b, p]
            total += 1
    assert full == total  # the whole row determines every answer
    assert 0.3 < causal / total < 0.7  # about half the records come after their query


def test_a_solver_that_reads_the_source_solves_cross_lookup():
    task = cab.cross_lookup(16, seed=1)
    assert (task.n, task.n_target, task.settings["keys"]) == (16, 8, 16)  # not square
    src, x, y = task.batch(32)
    v = task.settings["values"]
    for b in range(32):
        assert len(set(src[b] // v)) == 16 and len(set(x[b])) == 8  # distinct keys, distinct queries
        assert [_lookup(src[b], key, v) for key in x[b]] == list(y[b])


def test_a_solver_that_reads_only_the_past_source_solves_streaming_lookup():
    task = cab.streaming_lookup(16, seed=2)
    src, x, y = task.batch(32)
    v = task.settings["values"]
    far = 0
    for b in range(32):
        for i in range(16):
            assert _lookup(src[b, : i + 1], x[b, i], v) == y[b, i]  # source j <= i is enough
            far += int(np.nonzero(src[b] // v == x[b, i])[0][0] < i - 4)
    assert far > 32 * 16 * 0.2  # many answers lie beyond a short window


def test_bad_cab_settings_are_refused_by_name():
    with pytest.raises(ValueError, match="pairs"):
        cab.bidirectional_recall(8, pairs=5)
    with pytest.raises(ValueError, match="keys"):
        cab.bidirectional_recall(32, pairs=9, keys=8)
    with pytest.raises(ValueError, match="queries"):
        cab.cross_lookup(8, queries=9)
    with pytest.raises(ValueError, match="distinct keys"):
        cab.cross_lookup(32, keys=16)
    with pytest.raises(ValueError, match="distinct keys"):
        cab.streaming_lookup(32, keys=16)
    with pytest.raises(ValueError, match="values"):
        cab.streaming_lookup(8, values=0)
    with pytest.raises(ValueError, match="n must"):
        cab.cross_lookup(0)
