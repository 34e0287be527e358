"""Selectors judged on real q, k, v captured from SmolLM2-135M (cached on disk after the first capture)."""

from __future__ import annotations

import pytest
import torch

from attnkit import registry, sparse_attention
from attnkit.bench.dynamic import dense_reference, quality
from attnkit.sparse import (
    KMeansRouting,
    SeerAttention,
    SeerGate,
    Sparsifiner,
    fit_gate,
    fit_sparsifiner,
)

N = 1024


@pytest.fixture(scope="module")
def qkv():
    from attnkit.models import capture_qkv

    q, k, v = capture_qkv(N)[12]
    return q, k, v


@pytest.fixture(scope="module")
def dense(qkv):
    return dense_reference(*qkv)


def test_fixture_is_real_attention(qkv, dense):
    q, k, v = qkv
    assert q.shape == (1, 9, N, 64) and k.shape == (1, 3, N, 64)
    # A real model concentrates attention: the first key (sink) takes a large share, unlike random inputs.
    kx = k.repeat_interleave(3, 1)
    s = (q @ kx.transpose(-1, -2) / 8).masked_fill(~torch.ones(N, N, dtype=torch.bool).tril(), float("-inf"))
    assert float(s.softmax(-1)[..., 64:, 0].mean()) > 0.05


@pytest.mark.parametrize("name", [r.name for r in registry.records("B") if "causal" in r.supports])
def test_error_falls_as_the_budget_grows(name, qkv, dense):
    q, k, v = qkv
    rec = registry.get(name)
    errs, recalls = [], []
    for budget in (1 / 8, 1 / 4, 1 / 2):
        sel = rec.make(N, budget=budget, heads=9, kv_heads=3, head_dim=64, block=64)
        out, lse = sparse_attention(q, k, v, sel, causal=True, return_lse=True)
        qual = quality(out, lse, *dense)
        errs.append(qual["rel_error"])
        recalls.append(qual["recall"])
    # Non-increasing, up to a little noise for selectors whose choices are not nested across budgets.
    assert errs[1] <= errs[0] * 1.05 + 1e-3 and errs[2] <= errs[1] * 1.05 + 1e-3, (name, errs)
    assert recalls[2] >= recalls[0] - 1e-3, (name, recalls)


def test_fit_gate_learns_the_block_map(qkv):
    q, k, _ = qkv
    gate = SeerGate(9, 64)
    before = SeerAttention(gate, block_size=64, budget=0.125)
    losses = fit_gate(gate, [(q[:, :, :512], k[:, :, :512])], block_size=64, steps=60, lr=3e-3)
    assert losses[-1] < 0.7 * losses[0]
    _, lse0 = sparse_attention(q, k, qkv[2], SeerAttention(None, block_size=64, budget=0.125), return_lse=True)
    _, lse1 = sparse_attention(q, k, qkv[2], before, return_lse=True)
    ref_lse = dense_reference(*qkv)[1]
    rec0 = float((lse0 - ref_lse).clamp(max=0).exp().mean())
    rec1 = float((lse1 - ref_lse).clamp(max=0).exp().mean())
    assert rec1 > rec0, (rec0, rec1)  # trained on the first half, better on the whole sequence


def test_fit_sparsifiner_lowers_the_distillation_loss(qkv, dense):
    q, k, v = qkv
    model = Sparsifiner(9, 64, rank=16, budget=0.125)
    losses = fit_sparsifiner(model, [(q[:, :, :256], k[:, :, :256])], steps=40, lr=1e-2)
    assert losses[-1] < 0.8 * losses[0]
    # The registry record takes the fitted weights (at its own budget); fitted on the first quarter, it keeps
    # more of the dense mass on the whole sequence than the untrained predictor.
    rec = registry.get("sparsifiner")
    fitted = rec.make(N, budget=0.125, heads=9, kv_heads=3, head_dim=64, predictor=model)
    assert torch.equal(fitted.wq, model.wq) and fitted is not model
    recalls = []
    for sel in (rec.make(N, budget=0.125, heads=9, kv_heads=3, head_dim=64), fitted):
        out, lse = sparse_attention(q, k, v, sel, causal=True, return_lse=True)
        recalls.append(quality(out, lse, *dense)["recall"])
    assert recalls[1] > recalls[0] + 0.1, recalls


def test_kmeans_centroids_update_in_training_only(qkv):
    q, k, v = qkv
    r = KMeansRouting(9, 64, 4)
    c0 = r.centroids.clone()
    r.eval()
    sparse_attention(q, k, v, r)
    assert torch.equal(r.centroids, c0)
    r.train()
    sparse_attention(q, k, v, r)
    assert not torch.equal(r.centroids, c0)
    assert torch.allclose(r.centroids.norm(dim=-1), torch.ones(9, 4), atol=1e-5)
