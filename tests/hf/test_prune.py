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


def test_the_scored_answer_does_not_steer_the_ranking(smollm2):
    """The ranking query is the end of the instruction: changing the teacher-forced answer keeps the same tokens."""
    model, tok = smollm2
    ids = tok("The pass key is 4821. " * 6 + "What is the pass key? It is", return_tensors="pt").input_ids
    other = ids.clone()
    ids = torch.cat([ids, torch.tensor([[35, 36]])], 1)
    other = torch.cat([other, torch.tensor([[90, 91]])], 1)
    a = pruned_forward(model, ids, span=(1, 40), pruner=FastV(layer=2, keep=0.5), tail=3)
    b = pruned_forward(model, other, span=(1, 40), pruner=FastV(layer=2, keep=0.5), tail=3)
    torch.testing.assert_close(a.logits[0, 0], b.logits[0, 0], atol=1e-4, rtol=0)
    wide = pruned_forward(model, ids, span=(1, 40), pruner=FastV(layer=2, keep=0.5), tail=3, window=4)
    assert wide.tokens_per_layer == a.tokens_per_layer
    with pytest.raises(ShapeError, match="window"):
        pruned_forward(model, ids, span=(1, 40), pruner=FastV(layer=2, keep=0.5), tail=3, window=ids.shape[1])


def test_g_search_keeps_the_fewest_tokens_that_hold_the_answer(smollm2):
    from attnkit.hf import GSearch, g_search
    from attnkit.hf.prune import answer_logprob

    model, tok = smollm2
    prompt = tok(
        "Some filler words here. " * 8 + "The pass key is 4821. What is the pass key? It is", return_tensors="pt"
    )
    answer = tok(" 4821", add_special_tokens=False).input_ids
    ids = torch.cat([prompt.input_ids, torch.tensor([answer[:-1]])], 1)
    items = [(ids, (1, 49), answer)]
    found = g_search(model, items, layers=(4, 16), fractions=(0.25, 0.5), tolerance=0.5)
    assert isinstance(found, GSearch) and set(found.keeps) <= {4, 16}
    assert answer_logprob(model, items, found) >= answer_logprob(model, items, None) - 0.5
    assert found.alive(30)[0] == 1.0 and found.alive(30)[-1] <= 1.0
    strict = g_search(model, items, layers=(4,), fractions=(0.25,), tolerance=0.0)
    assert answer_logprob(model, items, strict) >= answer_logprob(model, items, None) - 1e-6
    with pytest.raises(ShapeError, match="items"):
        g_search(model, [])
