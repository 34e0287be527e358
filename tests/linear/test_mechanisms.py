"""Mechanism-specific properties of family C beyond the registry conformance: the limits each paper states,
the learnable parts, and the layers."""

from __future__ import annotations

import pytest
import torch

import attnkit as ak
from attnkit import linear as L
from attnkit import reference as R
from attnkit import registry
from attnkit.scores import Sigmoid, Softplus
from tests.helpers import err, rand_qkv


def test_gaussian_adaptive_matches_reference_with_gradients():
    m = registry.get("gaussian_adaptive").make(64).double()
    with torch.no_grad():
        m.mean_offset.normal_()
        m.log_scale.normal_(0, 0.3)
    x = torch.randn(2, 40, 32, dtype=torch.float64, requires_grad=True)
    out = m(x)
    ref = R.gaussian_adaptive(x, 4, m.mean_offset, m.log_scale)
    assert err(out, ref) < 1e-12
    g = torch.randn_like(out)
    ga = torch.autograd.grad(out, (x, m.mean_offset, m.log_scale), g)
    gr = torch.autograd.grad(ref, (x, m.mean_offset, m.log_scale), g)
    assert all(err(a, b) < 1e-10 for a, b in zip(ga, gr, strict=True))
    assert ga[1].abs().sum() > 0 and ga[2].abs().sum() > 0  # the Gaussian's parameters learn
    xb = x.detach().float().bfloat16()
    assert err(m.float()(xb.float()), m(xb.float())) == 0 and torch.isfinite(m.bfloat16()(xb)).all()


def test_rat_with_unit_chunks_and_no_forgetting_is_softmax_attention():
    q, k, v = rand_qkv(1, 4, 2, 50, 50, 8, torch.float64, seed=3)
    f = torch.zeros(1, 2, 50, 1, dtype=torch.float64)
    out = L.rat_attention(q, k, v, f, chunk_size=1)
    assert err(out, R.attention(q, k, v, pattern=ak.patterns.Causal())) < 1e-12


def test_local_linear_tends_to_softmax_as_the_ridge_grows():
    q, k, v = rand_qkv(1, 2, 2, 40, 40, 8, torch.float64, seed=4)
    soft = R.attention(q, k, v, pattern=ak.patterns.Causal())
    errs = [err(L.local_linear_attention(q, k, v, ridge=r), soft) for r in (0.1, 10.0, 1e4, 1e8)]
    assert errs == sorted(errs, reverse=True) and errs[-1] < 1e-6 and errs[0] > 1e-2


def test_local_linear_reproduces_a_locally_linear_map():
    """With values an exact linear function of the keys, the local-linear fit returns it at the query (softmax
    attention, a local-constant estimator, does not)."""
    q, k, _ = rand_qkv(1, 1, 1, 60, 60, 4, torch.float64, seed=6)
    w = torch.randn(4, 3, dtype=torch.float64)
    v, target = k @ w + 1.0, q @ w + 1.0
    out = L.local_linear_attention(q, k, v, causal=False, ridge=1e-9)
    soft = R.attention(q, k, v)
    assert err(out, target) < 1e-6 < err(soft, target)


def test_fit_hedgehog_lowers_the_distillation_loss():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(1, 2, 96, 16, generator=g)
    q, k = base * 2 + 0.3 * torch.randn(1, 2, 96, 16, generator=g), base * 2  # spiky attention, as in trained models
    before = L.hedgehog_loss(q, k, L.Hedgehog(2, 16))
    fmap = L.fit_hedgehog(q, k, steps=60, lr=2e-2)
    after = L.hedgehog_loss(q, k, fmap)
    assert after < 0.8 * before
    v = torch.randn(1, 2, 96, 8, generator=g)
    soft = R.attention(q, k, v, pattern=ak.patterns.Causal())
    assert err(L.linear_attention(q, k, v, feature_map=fmap), soft) < err(L.linear_attention(q, k, v), soft)


def test_favor_approximates_softmax_better_with_more_features():
    q, k, v = rand_qkv(1, 2, 2, 64, 64, 16, torch.float64, seed=7)
    q, k = q * 0.5, k * 0.5
    soft = R.attention(q, k, v, pattern=ak.patterns.Causal())
    errs = [
        sum(err(L.linear_attention(q, k, v, feature_map=L.FAVOR(16, m, seed=s)), soft) for s in range(4))
        for m in (8, 64, 1024)
    ]
    assert errs[2] < errs[1] < errs[0]


@pytest.mark.parametrize("spatial", [None, (6, 8)])
def test_agent_attention_layer(spatial):
    torch.manual_seed(0)
    layer = L.AgentAttention(32, 4, 4 if spatial else 6, spatial=spatial)
    x = torch.randn(2, 48, 32, requires_grad=True)
    out = layer(x)
    assert out.shape == x.shape
    out.square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in layer.parameters())
    # without the convolution and biases the layer is proj(agent_attention(...)), checked against the oracle
    plain = L.AgentAttention(32, 4, 6, kernel_size=0)
    q, k, v = plain.qkv(x).view(2, 48, 3, 4, 8).permute(2, 0, 3, 1, 4)
    ref = R.agent_attention(q, k, v, L.pool_agents(q, 6)).float().transpose(1, 2).reshape(2, 48, 32)
    assert err(plain(x), plain.proj(ref)) < 1e-5


def test_agent_attention_with_every_token_an_agent_is_two_softmax_passes():
    q, k, v = rand_qkv(1, 2, 2, 30, 30, 8, torch.float64, seed=2)
    once = R.attention(k, k, v)
    assert err(L.agent_attention(q, k, v, k), R.attention(q, k, once)) < 1e-12


def test_flow_competition_conserves_the_source_count():
    """Non-causal competition is m * softmax: values scaled by it sum (over sources) to m times their mean."""
    q, k, _ = rand_qkv(1, 1, 1, 20, 30, 8, torch.float64, seed=1)
    v = torch.ones(1, 1, 30, 1, dtype=torch.float64)
    out = L.flow_attention(q, k, v)
    assert torch.isfinite(out).all() and (out > 0).all() and (out < 30).all()


def test_normalisers_on_the_api():
    q, k, v = rand_qkv(1, 4, 2, 70, 70, 16, seed=5)
    for norm in (Sigmoid(), Softplus()):
        assert ak.explain(q, k, v, normalizer=norm).backend == "tiled"
        for name in ("sdpa", "flex"):
            with pytest.raises(ak.UnsupportedError, match="normalizer"):
                ak.attention(q, k, v, normalizer=norm, backend=name)
    # softplus weights are l1-normalised: a constant value passes through; sigmoid's are not
    c = torch.full_like(v, 3.0)
    three = torch.full_like(q, 3.0)
    assert err(ak.attention(q, k, c, pattern=ak.patterns.Causal(), normalizer=Softplus()), three) < 1e-5
    assert err(ak.attention(q, k, c, normalizer=Sigmoid()), three) > 0.1
    assert Sigmoid().bind(100).bias == pytest.approx(-4.60517, rel=1e-5)
    out, lse = ak.attention(q, k, v, normalizer=Softplus(), return_lse=True)
    assert torch.isfinite(lse).all()


def test_a_fully_masked_row_gives_zero_under_every_normaliser():
    q, k, v = rand_qkv(1, 2, 2, 8, 8, 8, seed=1)
    kpm = torch.zeros(1, 8, dtype=torch.bool)
    for norm in (Sigmoid(), Softplus()):
        out, lse = ak.attention(q, k, v, key_padding_mask=kpm, normalizer=norm, backend="tiled", return_lse=True)
        assert (out == 0).all() and torch.isneginf(lse).all()
