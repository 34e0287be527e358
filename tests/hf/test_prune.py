"""Token pruning inside SmolLM2: keep-all equals dense, tokens really leave, the schedules are what they say."""

import math

import pytest
import torch

from attnkit.errors import ShapeError
from attnkit.hf import DyVTE, FastV, PSigmoid, PyramidDrop, pruned_forward


@pytest.fixture(scope="module")
def ids():
    return torch.randint(300, 8000, (1, 64), generator=torch.Generator().manual_seed(4))


def test_dense_and_keep_all_equal_the_model(smollm2, ids):
    model, _ = smollm2
    with torch.no_grad():
        want = model(ids).logits[:, -3:]
    dense = pruned_forward(model, ids, span=(1, 50), tail=3)
    assert (dense.logits - want).abs().max().item() < 1e-4
    keep_all = pruned_forward(model, ids, span=(1, 50), pruner=FastV(layer=2, keep=1.0), tail=3)
    assert (keep_all.logits - dense.logits).abs().max().item() < 1e-5
    assert dense.tokens_per_layer == [64] * 30 == keep_all.tokens_per_layer


def test_tokens_leave_and_only_span_tokens_do(smollm2, ids):
    model, _ = smollm2
    res = pruned_forward(model, ids, span=(1, 50), pruner=FastV(layer=2, keep=0.5), tail=3)
    assert res.tokens_per_layer[:3] == [64, 64, 64] and set(res.tokens_per_layer[3:]) == {64 - 49 + 24}
    gone = pruned_forward(model, ids, span=(1, 50), pruner=DyVTE(layer=5), tail=3)
    assert gone.tokens_per_layer[6:] == [15] * 24
    # with the whole span gone, the tail depends only on the tokens outside it
    changed = ids.clone()
    changed[0, 10:40] = 777
    with torch.no_grad():
        other = pruned_forward(model, changed, span=(1, 50), pruner=DyVTE(layer=0), tail=3)
        same = pruned_forward(model, ids, span=(1, 50), pruner=DyVTE(layer=0), tail=3)
    assert not torch.equal(other.logits, same.logits)  # layer 0 still saw the span


def test_schedules():
    assert PyramidDrop(layers=(2, 4), ratio=0.5).schedule(30) == {2: 0.5, 4: 0.5}
    s = PSigmoid(midpoint=10, k=1.0).schedule(30)
    kept = 1.0
    for layer in range(29):
        kept *= s[layer]
        assert abs(kept - 1 / (1 + math.exp(layer - 10))) < 1e-12


def test_bad_spans_are_named(smollm2, ids):
    model, _ = smollm2
    with pytest.raises(ShapeError, match="span"):
        pruned_forward(model, ids, span=(10, 64), tail=3)
    with pytest.raises(ShapeError, match="ids"):
        pruned_forward(model, ids.repeat(2, 1), span=(1, 10))
