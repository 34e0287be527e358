"""SeerAttention's parts against independent computations: the gate's block distribution, the budget spent per
row, head or layer, the threshold, the distillation targets and the exact top-k they rest on."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnkit.sparse import SeerAttention, SeerGate, block_attention_target, fit_gate
from attnkit.sparse._core import _SAMPLE, _largest, block_visibility
from attnkit.sparse.block_topk import select_blocks
from tests.helpers import rand_qkv


def _naive_gate_probs(q, k, bq, bk, sub, causal):
    """The gate's distribution in float64, one sub-block at a time: mean-pooled query of each ``sub`` queries
    against mean-pooled key blocks, softmax over the key blocks any of its queries sees, averaged over the
    query block's sub-blocks weighted by their numbers of queries."""
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    kx = k.double().repeat_interleave(H // k.shape[1], 1)
    nqb, nkb = -(-Nq // bq), -(-Nk // bk)
    kb = torch.stack([kx[:, :, j * bk : (j + 1) * bk].mean(2) for j in range(nkb)], 2)
    out = torch.zeros(B, H, nqb, nkb, dtype=torch.float64)
    for i in range(nqb):
        total = 0
        for s0 in range(i * bq, min(Nq, (i + 1) * bq), sub):
            s1 = min(Nq, s0 + sub, (i + 1) * bq)
            qs = q[:, :, s0:s1].double().mean(2)
            logits = torch.einsum("bhd,bhjd->bhj", qs, kb) / math.sqrt(D)
            if causal:
                last = Nk - Nq + s1 - 1
                logits[..., torch.arange(nkb) * bk > last] = float("-inf")
            out[:, :, i] += (s1 - s0) * logits.softmax(-1)
            total += s1 - s0
        out[:, :, i] /= total
    return out


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("Nq,Nk", [(256, 256), (200, 200), (96, 160)])
def test_training_free_gate_is_the_pooled_block_distribution(causal, Nq, Nk):
    q, k, _ = rand_qkv(2, 4, 2, Nq, Nk, 16, seed=Nq)
    sel = SeerAttention(None, block_size=(32, 8), query_pool=8)
    p = sel.scores(q, k, causal=causal)
    want = _naive_gate_probs(q, k, 32, 8, 8, causal)
    assert (p.double() - want).abs().max() < 1e-5
    seen = block_visibility(p.shape[2], p.shape[3], (32, 8), Nq, Nk, causal)
    assert torch.allclose(p.sum(-1), torch.ones(()), atol=1e-5) and not p[..., ~seen].any()
    # An untrained gate (identity projections, [0; 0; I] on the key features) is the same distribution.
    gate = SeerGate(4, 16, query_pool=8)
    with torch.no_grad():
        g = gate.probs(q, k, (32, 8), causal=causal)
    assert (g - p).abs().max() < 1e-5


def test_gate_excludes_padding_blocks():
    q, k, _ = rand_qkv(1, 4, 2, 128, 128, 16, seed=2)
    pad = torch.ones(1, 128, dtype=torch.bool)
    pad[:, 96:] = False  # the last two 16-key blocks are padding
    p = SeerAttention(None, block_size=(32, 16), query_pool=16).scores(q, k, causal=False, key_padding_mask=pad)
    assert not p[..., 6:].any() and torch.allclose(p.sum(-1), torch.ones(()), atol=1e-5)


def _case(allocate, causal, seed):
    g = torch.Generator().manual_seed(seed)
    B, H, Nq, Nk, bq, bk = 2, 3, 256, 256, 32, 8
    scores = torch.rand(B, H, Nq // bq, Nk // bk, generator=g) ** 4  # spread and peaked rows
    return scores, dict(q_len=Nq, kv_len=Nk, block=(bq, bk), causal=causal)


@pytest.mark.parametrize("allocate", ["row", "head", "layer"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("budget", [0.1, 0.3, 2])
def test_budget_is_spent_on_the_best_blocks_of_its_scope(allocate, causal, budget):
    """Against brute force: the scope (row, head or batch row) keeps ceil(budget x visible) blocks (an int budget:
    that many per query block), forced ones included, and every chosen block outranks every other visible one."""
    scores, kw = _case(allocate, causal, seed=7)
    B, H, nqb, nkb = scores.shape
    sel = select_blocks(scores, kw["q_len"], kw["kv_len"], kw["block"], budget, causal, None, 1, 2, allocate)
    chosen = torch.zeros(B * H, nqb, nkb + 1, dtype=torch.bool)
    ids = sel.layout.kv_ids
    chosen.scatter_(2, torch.where(ids >= 0, ids, nkb), True)
    chosen = chosen[..., :nkb].view(B, H, nqb, nkb)
    seen = block_visibility(nqb, nkb, kw["block"], kw["q_len"], kw["kv_len"], causal).expand(B, H, nqb, nkb)
    k0 = torch.arange(nkb) * 8
    first = torch.arange(nqb) * 32
    forced = (k0 < 8)[None, :] | ((k0[None, :] + 8 > first[:, None] - 16) & (k0[None, :] <= first[:, None] + 31))
    if not causal:  # bidirectional: the sink and the key blocks within keep_local of the query block's positions
        forced = (k0 < 8)[None, :] | ((k0[None, :] + 8 > first[:, None] - 16) & (k0[None, :] <= first[:, None] + 47))
    forced = forced.expand(B, H, nqb, nkb) & seen
    assert not (chosen & ~seen).any(), "a block no query of the row can see was chosen"
    assert (chosen | ~forced).all(), "a forced block was dropped"
    dims = {"row": (3,), "head": (2, 3), "layer": (1, 2, 3)}[allocate]
    vis = seen.sum(dims, keepdim=True)
    rows = {"row": 1, "head": nqb, "layer": H * nqb}[allocate]
    want = (
        torch.ceil(vis.double() * budget).long() if isinstance(budget, float) else torch.full_like(vis, budget * rows)
    )
    want = torch.maximum(torch.minimum(want, vis), forced.sum(dims, keepdim=True))
    assert torch.equal(chosen.sum(dims, keepdim=True), want)
    free = seen & ~forced
    low = torch.where(chosen & free, scores, float("inf")).amin(dims, keepdim=True)
    high = torch.where(~chosen & free, scores, float("-inf")).amax(dims, keepdim=True)
    assert (low >= high).all(), "an unchosen block outranks a chosen one in its scope"


def test_threshold_keeps_every_block_the_gate_rates_at_least_that():
    q, k, v = rand_qkv(1, 4, 2, 256, 256, 16, seed=4)
    sel = SeerAttention(None, block_size=(32, 8), threshold=0.05, query_pool=8)
    p = sel.scores(q, k, causal=True)
    s = sel.select(q, k, v, causal=True)
    blocks = torch.zeros(4, 8, 33, dtype=torch.bool)
    blocks.scatter_(2, torch.where(s.layout.kv_ids >= 0, s.layout.kv_ids, 32), True)
    assert (blocks[..., :32] | ~(p[0] >= 0.05)).all()
    extra = blocks[..., :32] & ~(p[0] >= 0.05)
    first = torch.arange(8) * 32
    k0 = torch.arange(32) * 8
    own = (k0[None, :] + 8 > first[:, None]) & (k0[None, :] <= first[:, None] + 31)
    assert (own | ~extra).all(), "only the forced diagonal may be kept below the threshold"


def test_layer_budget_matches_the_density():
    """A layer-wide 1/4 budget computes a quarter of the causal pairs (up to tile rounding and forced blocks)."""
    q, k, v = rand_qkv(1, 4, 2, 2048, 2048, 16, seed=6)
    sel = SeerAttention(None, block_size=(64, 16), budget=0.25, allocate="layer", query_pool=16).select(q, k, v)
    assert abs(sel.density(True) - 0.25) < 0.03


@pytest.mark.parametrize("how", ["max", "mass"])
def test_distillation_targets_are_the_dense_block_maps(how):
    q, k, _ = rand_qkv(1, 4, 2, 96, 160, 16, seed=9)
    t = block_attention_target(q, k, (32, 16), causal=True, how=how)
    s = q.double() @ k.double().repeat_interleave(2, 1).transpose(-1, -2) / 4
    s = s.masked_fill(torch.arange(160)[None, :] > 64 + torch.arange(96)[:, None], float("-inf"))
    p = s.softmax(-1).view(1, 4, 3, 32, 10, 16)
    want = p.amax((3, 5)) if how == "max" else p.sum((3, 5)) / 32
    if how == "max":
        want = want / want.sum(-1, keepdim=True)
    assert (t.double() - want).abs().max() < 1e-5
    assert torch.allclose(t.sum(-1), torch.ones(()), atol=1e-5)


@pytest.mark.parametrize("target", ["max", "mass"])
def test_fit_gate_lowers_the_distillation_loss(target):
    g = torch.Generator().manual_seed(3)
    # Queries that prefer one fixed key direction per head: a map the gate can learn.
    q = torch.randn(1, 4, 256, 16, generator=g) + 2.0
    k = torch.randn(1, 2, 256, 16, generator=g)
    gate = SeerGate(4, 16, query_pool=8)
    losses = fit_gate(gate, [(q, k)], block_size=(32, 8), steps=40, lr=1e-2, target=target)
    assert losses[-1] < 0.7 * losses[0] and all(math.isfinite(x) for x in losses)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.floats(allow_nan=False, width=32),
            st.sampled_from([float("nan"), 0.0, -0.0, 0.5, 1e-30]),
        ),
        min_size=1,
        max_size=200,
    ),
    st.integers(min_value=0, max_value=220),
)
def test_largest_is_exact(values, k):
    """The exact top-k: the k largest valid entries (+inf first, -inf last, NaN never), ties broken freely."""
    _check_largest(torch.tensor(values, dtype=torch.float32), k)


def _check_largest(x, k):
    m = _largest(x.clone(), k)
    valid = ~torch.isnan(x)
    assert int(m.sum()) == min(k, int(valid.sum()))
    assert not (m & ~valid).any()
    if m.any() and (valid & ~m).any():
        assert x[m].min() >= x[valid & ~m].max()


@pytest.mark.parametrize("k", [1, 1000, 150_000, 299_000])
def test_largest_on_long_inputs_brackets_from_a_sample(k):
    """Long inputs take the sampled bracket (and its histogram fallback): ties, NaN and infinities included."""
    g = torch.Generator().manual_seed(k)
    n = 40 * _SAMPLE
    x = (torch.rand(n, generator=g) * 50).round().div(50).log()  # 51 distinct values: heavy ties, some -inf
    x[torch.rand(n, generator=g) < 0.4] = float("nan")
    x[torch.randperm(n, generator=g)[:300]] = float("inf")
    _check_largest(x, k)
    # A sample unlike the whole (the sampled positions hold the largest values): the bracket misses.
    y = torch.rand(n, generator=g)
    y[:: n // _SAMPLE] += 10.0
    _check_largest(y, k)
