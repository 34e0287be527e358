"""LOOK-M: the three merges equal their float64 reference (padding neither merges nor receives); on SmolLM2
the span prior keeps the tokens outside the span, the cache holds the budget and the merge changes the decode."""

import pytest
import torch

import attnkit.hf as akhf
from attnkit.errors import ShapeError
from attnkit.hf.lookm import merge_evicted
from attnkit.reference import kv_policies as ref


@pytest.mark.parametrize("how", ["average", "pivotal", "weighted"])
def test_merge_matches_the_reference(how):
    g = torch.Generator().manual_seed(1)
    B, T, D, n = 2, 30, 8, 7
    k, v = torch.randn(B, T, D, generator=g), torch.randn(B, T, D, generator=g)
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[1, :4] = False  # left padding: kept first by keep_top, must receive nothing
    keep = torch.stack([torch.randperm(T, generator=g)[:n].sort().values, torch.tensor([0, 1, 5, 9, 17, 22, 29])])
    km, vm = merge_evicted(k, v, valid, keep, how)
    for b in range(B):
        wk, wv = ref.lookm_merge(k[b], v[b], valid[b], keep[b], how)
        torch.testing.assert_close(km[b].double(), wk, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(vm[b].double(), wv, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(km[1, :2], k[1, :2])  # padding slots unchanged


def test_span_prior_budget_and_merge_on_smollm2(smollm2, text_ids):
    model, _ = smollm2
    ids = text_ids[:, :96]
    span = (16, 80)
    logits = {}
    for merge in (None, "pivotal"):
        pol = akhf.LOOKM(budget=40, span=span, merge=merge)
        with akhf.applied(model, pol), torch.no_grad():
            out = model(ids, use_cache=True)
            cache = out.past_key_values
            out = model(out.logits[:, -1:].argmax(-1), past_key_values=cache, use_cache=True)
        logits[merge] = out.logits[0, -1]
        lay = cache.layers[7]
        assert all(n == 40 + 1 for n in lay.lengths())
        for h in range(lay.kv_heads):
            kept = set(lay.pos[h][0].tolist())
            assert set(range(16)) | set(range(80, 96)) <= kept  # outside the span: 32 tokens, all kept
    assert (logits[None] - logits["pivotal"]).abs().max() > 1e-3


def test_bad_settings_are_named():
    with pytest.raises(ShapeError, match="merge"):
        akhf.LOOKM(merge="sum")
    with pytest.raises(ShapeError, match="span"):
        akhf.LOOKM(span=(5, 2))
