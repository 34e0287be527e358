"""Shared test helpers: the 2x-naive-error rule against the float64 oracle."""

from __future__ import annotations

import torch

from attnkit import reference

# Absolute floor: an exactly-zero gradient (a query that sees only itself: p = 1) comes out of the tiled backward
# as a difference of two fp32 dot products of O(10) size, i.e. ~1e-6, where the naive form cancels exactly.
FLOOR = {torch.float32: 1e-5, torch.bfloat16: 2e-3, torch.float64: 1e-12}


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


# The tiny floor of the 2x-naive rule, in units of eps x the largest reference value. bf16: one rounding of the
# result (a result rounded once to bf16 cannot be closer, however lucky the naive implementation was on a tiny
# problem). fp32: 32 ulps (4e-6 relative), for the order of accumulation: the tiled backward sums key gradients
# tile by tile (measured over every registered pattern x 6 seeds: at most 7.1 ulps), and PyTorch's own blocked
# SDPA backward reached 28 ulps on a GQA + padding case found by hypothesis. FlexAttention's own test suite
# allows 10x the naive fp32 error for the same reason.
ULPS = {torch.bfloat16: 2, torch.float32: 32, torch.float64: 32}


def _floor(dtype, ref) -> float:
    return max(FLOOR[dtype], ULPS[dtype] * torch.finfo(dtype).eps * ref.abs().max().item())


def check_against_oracle(run, q, k, v, *, grads=True, label="", **kw):
    """``run(q, k, v)`` must be within 2x the naive same-dtype error of the float64 oracle (+ a floor)."""
    dtype = q.dtype
    qs, ks, vs = (t.detach().clone().requires_grad_(grads) for t in (q, k, v))
    out = run(qs, ks, vs)
    q64, k64, v64 = (t.detach().double().requires_grad_(grads) for t in (q, k, v))
    ref = reference.attention(q64, k64, v64, **kw)
    qn, kn, vn = (t.detach().clone().requires_grad_(grads) for t in (q, k, v))
    naive = reference.attention(qn, kn, vn, dtype=dtype, **kw)
    e, en = err(out, ref), err(naive, ref)
    floor = _floor(dtype, ref)
    assert torch.isfinite(out).all(), f"{label}: non-finite output"
    assert e <= 2 * en + floor, f"{label}: output error {e:.3e} > 2 x naive {en:.3e} + {floor:.0e}"
    if not grads:
        return out
    go = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1234), dtype=ref.dtype)
    g_out = torch.autograd.grad(out, (qs, ks, vs), go.to(dtype))
    g_ref = torch.autograd.grad(ref, (q64, k64, v64), go)
    g_nv = torch.autograd.grad(naive, (qn, kn, vn), go.to(dtype))
    for name, a, r, n in zip("qkv", g_out, g_ref, g_nv, strict=False):
        e, en = err(a, r), err(n, r)
        floor = _floor(dtype, r)
        assert e <= 2 * en + floor, f"{label}: d{name} error {e:.3e} > 2 x naive {en:.3e} + {floor:.1e}"
    return out


def check_layer_against_oracle(layer, x, *, grads=True, label="", **forward_kw):
    """The 2x-naive rule for a layer: ``layer(x)`` against ``layer.reference(x, dtype=float64)`` (the float64
    oracle on the layer's own weights), the naive run being ``layer.reference(x, dtype=x.dtype)``; with
    ``grads``, the input gradient too."""
    dtype = x.dtype
    xs = x.detach().clone().requires_grad_(grads)
    out = layer(xs, **forward_kw)
    x64 = x.detach().double().requires_grad_(grads)
    ref = layer.reference(x64, dtype=torch.float64, **forward_kw)
    xn = x.detach().clone().requires_grad_(grads)
    naive = layer.reference(xn, dtype=dtype, **forward_kw)
    e, en = err(out, ref), err(naive, ref)
    floor = _floor(dtype, ref)
    assert torch.isfinite(out).all(), f"{label}: non-finite output"
    assert e <= 2 * en + floor, f"{label}: output error {e:.3e} > 2 x naive {en:.3e} + {floor:.0e}"
    if grads:
        go = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1234), dtype=ref.dtype)
        (g,) = torch.autograd.grad(out, xs, go.to(dtype))
        (gr,) = torch.autograd.grad(ref, x64, go)
        (gn,) = torch.autograd.grad(naive, xn, go.to(dtype))
        e, en = err(g, gr), err(gn, gr)
        assert e <= 2 * en + _floor(dtype, gr), f"{label}: dx error {e:.3e} > 2 x naive {en:.3e}"
    return out


def check_decode(layer, x, *, prefill: int, rtol: float = 1e-6, **cache_kw):
    """Prefill ``prefill`` tokens, then decode the rest one at a time with ``layer.make_cache``: the
    concatenated outputs must equal the uncached ``layer(x)`` within ``rtol`` of its largest value.

    When the layer has a float64 ``reference`` and its own uncached forward is further than ``rtol`` from it
    (MALA's normaliser cancels in fp32: 1.4e-6), the decode may differ from the forward by twice that error:
    two computations each that far from the truth cannot be asked to agree more closely."""
    with torch.no_grad():
        full = layer(x)
        cache = layer.make_cache(x.shape[0], x.shape[1], **cache_kw)
        outs = [layer(x[:, :prefill], cache=cache)]
        outs += [layer(x[:, i : i + 1], cache=cache) for i in range(prefill, x.shape[1])]
        scale = max(full.abs().max().item(), 1e-30)
        if hasattr(layer, "reference") and x.dtype != torch.float64:
            rtol = max(rtol, 2 * err(full, layer.reference(x.double())) / scale)
    got = torch.cat(outs, 1)
    rel = err(got, full) / scale
    assert rel <= rtol, f"cached decode differs from the uncached forward: relative error {rel:.3e} > {rtol:.1e}"
    return cache
