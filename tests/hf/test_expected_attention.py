"""Expected Attention: the scorer equals its float64 formula; on SmolLM2 it evicts to the budget, keeps the
sinks, and observes no attention mass (the prefill stays on the fast kernels)."""

import pytest
import torch

import attnkit.hf as akhf
from attnkit.errors import ShapeError
from attnkit.hf._rope import rerotate
from attnkit.reference import expected_attention as ref

D = 16
INV = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))


@pytest.mark.parametrize("covariance,value_norm", [(True, True), (False, True), (True, False)])
def test_scores_match_the_float64_formula(covariance, value_norm):
    g = torch.Generator().manual_seed(0)
    B, G, Q, T = 2, 3, 20, 26
    q = torch.randn(B, G, Q, D, generator=g) * 2
    k, v = torch.randn(B, T, D, generator=g) * 2, torch.randn(B, T, D, generator=g)
    qpos = torch.arange(T - Q, T)[None].expand(B, Q)
    q, k = rerotate(q, qpos[:, None], INV), rerotate(k, torch.arange(T)[None], INV)
    kpos = torch.arange(T)[None].expand(B, T)
    scorer = akhf.ExpectedAttention(future=48, covariance=covariance, value_norm=value_norm)
    got = scorer.score_keys(q, qpos, k, v, kpos, torch.ones(B, T, dtype=torch.bool), INV)
    for b in range(B):
        want = ref.scores(
            q[b], qpos[b], k[b], v[b], kpos[b], INV, future=48, covariance=covariance, value_norm=value_norm
        )
        torch.testing.assert_close(got[b].double(), want, rtol=1e-5, atol=1e-7)


def test_evicts_to_the_budget_and_keeps_the_sinks(smollm2, text_ids):
    model, _ = smollm2
    ids = text_ids[:, :200]
    pol = akhf.KVCompress(akhf.ExpectedAttention(), budget=48, phase="prefill")
    assert pol.observes(200) == 0
    with akhf.applied(model, pol), torch.no_grad():
        out = model(ids, use_cache=True)
        cache = out.past_key_values
        model(out.logits[:, -1:].argmax(-1), past_key_values=cache, use_cache=True)
    lay = cache.layers[5]
    assert all(n == 48 + 1 for n in lay.lengths())  # the budget after prefill, plus the decoded token
    for h in range(lay.kv_heads):
        assert set(range(4)) <= set(lay.pos[h][0].tolist())


def test_bad_settings_are_named():
    with pytest.raises(ShapeError, match="future"):
        akhf.ExpectedAttention(future=0)
    with pytest.raises(ShapeError, match="sinks"):
        akhf.ExpectedAttention(sinks=-1)
