"""Registry-driven conformance of the family-C functions: every record of kind "function" is run against its
float64 oracle by the 2x-naive rule (forward and gradients), with GQA, cross lengths, key padding, causality and
bf16 wherever the record claims them."""

from __future__ import annotations

import pytest
import torch

from attnkit import linear as L
from attnkit import registry
from tests.helpers import _floor, err, rand_qkv

RECORDS = registry.records("C", kind="function")
IDS = [r.name for r in RECORDS]


def check_mechanism(m, q, k, v, *, grads=True, label="", run_kw=None, **kw):
    """The 2x-naive rule of tests.helpers for a registry Mechanism: ``m`` (with ``run_kw``, e.g. the mode)
    against ``m.reference``; ``kw`` go to both."""
    dtype = q.dtype
    qs, ks, vs = (t.detach().clone().requires_grad_(grads) for t in (q, k, v))
    out = m(qs, ks, vs, **kw, **(run_kw or {}))
    q64, k64, v64 = (t.detach().double().requires_grad_(grads) for t in (q, k, v))
    ref = m.reference(q64, k64, v64, **kw)
    qn, kn, vn = (t.detach().clone().requires_grad_(grads) for t in (q, k, v))
    naive = m.reference(qn, kn, vn, dtype=dtype, **kw)
    assert out.dtype == dtype and out.shape == ref.shape, label
    assert torch.isfinite(out).all(), f"{label}: non-finite output"
    e, en = err(out, ref), err(naive, ref)
    assert ref.abs().max() > 0, f"{label}: the reference is identically zero (a test that cannot fail)"
    assert e <= 2 * en + _floor(dtype, ref), f"{label}: output error {e:.3e} > 2 x naive {en:.3e}"
    if not grads:
        return out
    go = torch.randn(ref.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    g_out = torch.autograd.grad(out, (qs, ks, vs), go.to(dtype))
    g_ref = torch.autograd.grad(ref, (q64, k64, v64), go)
    g_nv = torch.autograd.grad(naive.to(dtype), (qn, kn, vn), go.to(dtype))
    for name, a, r, n in zip("qkv", g_out, g_ref, g_nv, strict=True):
        e, en = err(a, r), err(n, r)
        assert e <= 2 * en + _floor(dtype, r), f"{label}: d{name} error {e:.3e} > 2 x naive {en:.3e}"
    return out


def _shape(rec):
    causal = "causal" in rec.supports
    nk = 80
    nq = nk if causal or "cross" not in rec.supports else 56
    return nq, nk


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("rec", RECORDS, ids=IDS)
def test_oracle_forward_and_gradients(rec, dtype):
    if dtype == torch.bfloat16 and "bf16" not in rec.supports:
        pytest.skip("no bf16 claim")
    m = rec.make(80)
    nq, nk = _shape(rec)
    hkv = 2 if "gqa" in rec.supports else 4
    q, k, v = rand_qkv(2, 4, hkv, nq, nk, 16, dtype, Dv=16, seed=len(rec.name))
    check_mechanism(m, q, k, v, grads="backward" in rec.supports, label=f"{rec.name} {dtype}")


@pytest.mark.parametrize("rec", [r for r in RECORDS if "padding" in r.supports], ids=lambda r: r.name)
def test_key_padding(rec):
    m = rec.make(64)
    nq, nk = _shape(rec)
    q, k, v = rand_qkv(2, 4, 2, nq, nk, 16, seed=3)
    kpm = torch.rand(2, nk, generator=torch.Generator().manual_seed(5)) > 0.3
    kpm[:, 0] = True
    out = check_mechanism(m, q, k, v, key_padding_mask=kpm, label=rec.name)
    # padded keys are truly ignored: changing them changes nothing
    k2, v2 = k.clone(), v.clone()
    k2[~kpm[:, None, :].expand(-1, 2, -1)] = 50.0
    v2[~kpm[:, None, :].expand(-1, 2, -1)] = -50.0
    assert err(m(q, k2, v2, key_padding_mask=kpm), out) < 1e-4


@pytest.mark.parametrize("rec", [r for r in RECORDS if "causal" in r.supports], ids=lambda r: r.name)
def test_causality_cut(rec):
    """Output at position i is unchanged when the sequence is cut after i."""
    m = rec.make(96)
    q, k, v = rand_qkv(1, 4, 2, 96, 96, 16, seed=11)
    full = m(q, k, v)
    for cut in (1, 37, 64):
        part = m(q[:, :, :cut], k[:, :, :cut], v[:, :, :cut])
        assert err(part, full[:, :, :cut]) <= 1e-6 * full.abs().max().item() + 1e-6, f"{rec.name}: cut at {cut}"


ENGINE = [r for r in RECORDS if r.make(8).fn is L.linear_attention]


@pytest.mark.parametrize("rec", ENGINE, ids=lambda r: r.name)
def test_three_forms_agree(rec, monkeypatch):
    """parallel == chunk == recurrent: fp32 tight; bf16 by the 2x-naive rule. A small slab makes the chunked
    form cross slab boundaries, and a length that is not a multiple of the chunk pads the last one."""
    from attnkit.linear import engine

    monkeypatch.setattr(engine, "_SLAB", 32)
    m = rec.make(100)
    causal = m.kwargs["causal"]
    q, k, v = rand_qkv(2, 4, 2, 100, 100, 16, seed=2)
    forms = {mode: m(q, k, v, mode=mode, chunk_size=16) for mode in ("parallel", "chunk", "recurrent")}
    scale = forms["parallel"].abs().max().item()
    for mode, o in forms.items():
        assert err(o, forms["parallel"]) <= 1e-5 * scale + 1e-6, f"{rec.name} {mode} (causal={causal})"
    qb, kb, vb = (t.bfloat16() for t in (q, k, v))
    for mode in ("chunk", "recurrent"):
        run_kw = {"mode": mode, "chunk_size": 16}
        check_mechanism(m, qb, kb, vb, grads=False, run_kw=run_kw, label=f"{rec.name} bf16 {mode}")


@pytest.mark.parametrize("rec", [r for r in ENGINE if "decode" in r.supports], ids=lambda r: r.name)
def test_piecewise_and_decode_equal_one_call(rec, monkeypatch):
    from attnkit.linear import engine

    monkeypatch.setattr(engine, "_SLAB", 32)
    m = rec.make(90)
    q, k, v = rand_qkv(1, 4, 2, 90, 90, 16, seed=4)
    full = m(q, k, v, mode="chunk", chunk_size=16)
    outs, state = [], None
    for a, b in ((0, 7), (7, 50), (50, 90)):
        o, state = m(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], initial_state=state, return_state=True)
        outs.append(o)
    assert state.position == 90 and state.kv.dtype == torch.float32
    assert err(torch.cat(outs, 2), full) <= 1e-5 * full.abs().max().item() + 1e-6
    outs, state = [], None
    for t in range(90):  # decode: one token at a time with the state (the KV-cache equivalent)
        o, state = m(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], initial_state=state, return_state=True)
        outs.append(o)
    assert err(torch.cat(outs, 2), full) <= 1e-5 * full.abs().max().item() + 1e-6


def test_bf16_state_stays_finite_over_16k_tokens():
    q, k, v = rand_qkv(1, 2, 2, 16384, 16384, 32, torch.bfloat16, seed=9)
    out, state = L.linear_attention(q, k, v, return_state=True)
    assert state.kv.dtype == torch.float32 and torch.isfinite(state.kv).all() and torch.isfinite(out).all()
    ref32 = L.linear_attention(q.float(), k.float(), v.float())
    assert err(out, ref32) < 2e-2  # one bf16 rounding of an O(1) output
    for dec in (0.999, 1.0):
        o, s = L.linear_attention(q, k, v, feature_map="identity", normalize="rms", decay=dec, return_state=True)
        assert torch.isfinite(s.kv).all() and torch.isfinite(o).all()


def test_mala_is_magnitude_aware_and_plain_linear_is_not():
    """MALA's point: scaling phi(q) sharpens its weights like softmax; plain linear attention ignores it."""
    q, k, v = rand_qkv(1, 1, 1, 64, 64, 8, torch.float64, seed=1)
    qa = torch.nn.functional.elu(q) + 1
    for norm, changes in ((True, False), ("mala", True)):
        a = L.linear_attention(qa, k, v, feature_map=_Given(), normalize=norm)
        b = L.linear_attention(3 * qa, k, v, feature_map=_Given(), normalize=norm)
        assert (err(a, b) > 1e-3) is changes, norm


class _Given(L.FeatureMap):
    def forward(self, x, is_query):
        return x if is_query else torch.nn.functional.elu(x) + 1


def test_inline_and_mala_weights_sum_to_one():
    """Both normalisers give weights that sum to 1 per query: a constant value passes through unchanged."""
    q, k, _ = rand_qkv(2, 2, 2, 50, 50, 8, torch.float64, seed=8)
    v = torch.full((2, 2, 50, 3), 2.5, dtype=torch.float64)
    for norm in ("inline", "mala", True):
        out = L.linear_attention(q, k, v, normalize=norm)
        assert err(out, v) < 1e-9, norm
