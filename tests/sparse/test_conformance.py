"""Registry-driven conformance of every dynamic selector (family B).

Each selection is checked three ways: the kernel computes exactly the selected pairs (2x-naive rule against the
float64 oracle over the selection's mask, gradients included), the selection never holds a future pair under
``causal``, and a budget that covers every key gives dense attention.
"""

from __future__ import annotations

import pytest
import torch

from attnkit import registry, sparse_attention
from attnkit.reference import selected_attention
from tests.helpers import check_against_oracle, err, rand_qkv

RECORDS = registry.records("B")
NAMES = [r.name for r in RECORDS]
B, HQ, HKV, N, D, BLOCK = 2, 4, 2, 256, 16, 16


def _make(rec, budget, n=N):
    return rec.make(n, budget=budget, heads=HQ, kv_heads=HKV, head_dim=D, block=BLOCK)


def _cases(rec):
    causal = "causal" in rec.supports
    out = [dict(causal=causal, M=N)]
    if "padding" in rec.supports:
        out.append(dict(causal=causal, M=N, pad=True))
    if "cross" in rec.supports:
        out.append(dict(causal=causal, M=N + 48))
    return out


def _kw(sel, causal, Nq, Nk, pm):
    mask = sel.dense_mask(HQ)
    if causal:
        mask = mask & torch.ones(Nq, Nk, dtype=torch.bool).tril(Nk - Nq)
    kw = dict(mask=mask, key_padding_mask=pm)
    if sel.key_bias is not None:
        bias = sel.key_bias.double()

        class _Bias:
            def score_mod(self, s, b, h, qi, kj):
                return s + bias.to(s.dtype)[:, :, None, :]

        kw["score"] = _Bias()
    return kw


@pytest.mark.parametrize(
    "dtype,forward", [(torch.float32, "native"), (torch.float32, "torch"), (torch.bfloat16, "native")]
)
@pytest.mark.parametrize("name", NAMES)
def test_kernel_computes_the_selection(name, dtype, forward, monkeypatch):
    """On the tiled kernel's native forward and its torch-op forward (token-grain selections included)."""
    monkeypatch.setenv("ATTNKIT_TILED_KERNEL", forward)
    rec = registry.get(name)
    for i, case in enumerate(_cases(rec)):
        M, causal = case["M"], case["causal"]
        q, k, v = rand_qkv(B, HQ, HKV, N, M, D, dtype=dtype, seed=i)
        pm = None
        if case.get("pad"):
            pm = torch.ones(B, M, dtype=torch.bool)
            pm[0, -37:] = False
        sel_obj = _make(rec, 0.25, M)
        with torch.no_grad():
            sel = sel_obj.select(q, k, v, causal=causal, key_padding_mask=pm)
        kw = _kw(sel, causal, N, M, pm)
        check_against_oracle(
            lambda a, b, c: sparse_attention(a, b, c, sel, causal=causal, key_padding_mask=pm),  # noqa: B023
            q,
            k,
            v,
            grads=dtype == torch.float32,
            label=f"{name} {case} {forward}",
            **kw,
        )


@pytest.mark.parametrize("name", NAMES)
def test_selection_is_causal_and_deterministic(name):
    rec = registry.get(name)
    if "causal" not in rec.supports:
        pytest.skip("bidirectional selector")
    q, k, v = rand_qkv(1, HQ, HKV, N, N, D, seed=3)
    a = _make(rec, 0.25).select(q, k, v, causal=True).dense_mask(HQ)
    b = _make(rec, 0.25).select(q, k, v, causal=True).dense_mask(HQ)
    assert torch.equal(a, b), "same inputs and seed must give the same selection"
    future = ~torch.ones(N, N, dtype=torch.bool).tril()
    assert not (a & future).any(), "a future key was selected"
    if name != "routing_kmeans":  # documented: a query whose cluster has no earlier key reads nothing
        assert a.any(-1).all(), "a query was left with no key"


@pytest.mark.parametrize("name", NAMES)
def test_full_budget_is_dense_attention(name):
    rec = registry.get(name)
    causal = "causal" in rec.supports
    q, k, v = rand_qkv(B, HQ, HKV, N, N, D, seed=5)
    sel_obj = _make(rec, 1.0)
    out, sel = sparse_attention(q, k, v, sel_obj, causal=causal, return_selection=True)
    mask = torch.ones(N, N, dtype=torch.bool).tril() if causal else None
    if sel.key_bias is None:
        ref = selected_attention(q, k, v, sel, causal=causal)
        dense = torch.nn.functional.scaled_dot_product_attention(
            q.double(), k.double().repeat_interleave(2, 1), v.double().repeat_interleave(2, 1), attn_mask=mask
        )
        assert err(ref, dense) < 1e-12, "a full budget must select every visible pair"
        assert err(out, dense) < 1e-5
    else:  # Dynamic Mask Attention: dense attention plus its learned key bias
        assert bool(sel.dense_mask(HQ)[..., mask if mask is not None else slice(None)].all())


def test_padding_keys_are_never_read():
    rec = registry.get("moba")
    q, k, v = rand_qkv(B, HQ, HKV, N, N, D, seed=7)
    pm = torch.ones(B, N, dtype=torch.bool)
    pm[:, 200:] = False
    out = sparse_attention(q, k, v, _make(rec, 0.25), causal=False, key_padding_mask=pm)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 200:] = 1e3
    v2[:, :, 200:] = -1e3
    out2 = sparse_attention(q, k2, v2, _make(rec, 0.25), causal=False, key_padding_mask=pm)
    assert err(out, out2) < 1e-5


def test_dynamic_mask_parameters_are_trained_through_the_bias():
    from attnkit.sparse import DynamicMask

    dma = DynamicMask(HKV, D, budget=0.25, query_block=BLOCK)
    q, k, v = rand_qkv(B, HQ, HKV, N, N, D, seed=11, grad=True)
    out = sparse_attention(q, k, v, dma, causal=True)
    out.square().sum().backward()
    for name in ("w", "b", "a"):
        g = getattr(dma, name).grad
        assert g is not None and bool(g.abs().sum() > 0), name
    # The bias's own path into v: v's gradient differs from the one with the bias held fixed.
    sel = dma.select(q.detach(), k.detach(), v.detach(), causal=True)
    v2 = v.detach().clone().requires_grad_(True)
    sparse_attention(q.detach(), k.detach(), v2, sel, causal=True).square().sum().backward()
    assert not torch.allclose(v.grad, v2.grad)
