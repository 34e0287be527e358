"""Shared test helpers: the 2x-naive-error rule against the float64 oracle."""

from __future__ import annotations

import torch

from attnkit import reference

FLOOR = {torch.float32: 2e-6, torch.bfloat16: 2e-3, torch.float64: 1e-12}


def rand_qkv(B, Hq, Hkv, Nq, Nk, D, dtype=torch.float32, Dv=None, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    Dv = Dv or D
    q = torch.randn(B, Hq, Nq, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, Nk, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, Nk, Dv, generator=g).to(dtype)
    if grad:
        for t in (q, k, v):
            t.requires_grad_(True)
    return q, k, v


def err(a, b) -> float:
    return (a.double() - b.double()).abs().max().item()


def check_against_oracle(run, q, k, v, *, grads=True, label="", **kw):
    """``run(q, k, v)`` must be within 2x the naive same-dtype error of the float64 oracle (+ a floor)."""
    dtype = q.dtype
    qs, ks, vs = (t.detach().clone().requires_grad_(grads) for t in (q, k, v))
    out = run(qs, ks, vs)
    q64, k64, v64 = (t.detach().double().requires_grad_(grads) for t in (q, k, v))
    ref = reference.attention(q64, k64, v64, **kw)
    qn, kn, vn = (t.detach().clone().requires_grad_(grads) for t in (q, k, v))
    naive = reference.attention(qn, kn, vn, dtype=dtype, **kw)
    floor = FLOOR[dtype]
    e, en = err(out, ref), err(naive, ref)
    assert torch.isfinite(out).all(), f"{label}: non-finite output"
    assert e <= 2 * en + floor, f"{label}: output error {e:.3e} > 2 x naive {en:.3e} + {floor:.0e}"
    if not grads:
        return out
    go = torch.randn_like(ref)
    g_out = torch.autograd.grad(out, (qs, ks, vs), go.to(dtype))
    g_ref = torch.autograd.grad(ref, (q64, k64, v64), go)
    g_nv = torch.autograd.grad(naive, (qn, kn, vn), go.to(dtype))
    for name, a, r, n in zip("qkv", g_out, g_ref, g_nv, strict=False):
        e, en = err(a, r), err(n, r)
        scale = max(r.abs().max().item(), 1.0)
        assert e <= 2 * en + floor * scale, f"{label}: d{name} error {e:.3e} > 2 x naive {en:.3e}"
    return out
