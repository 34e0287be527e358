"""Static patterns built with parameters from 0 to 2**64 (and of the wrong types): a named error, or a pattern
whose every backend, density and layout agree with an independent Python-int rule."""

from __future__ import annotations

import math

import torch
from hypothesis import given
from hypothesis import strategies as st

import attnkit as ak
from attnkit import reference, registry
from tests.fuzz import _check as C
from tests.fuzz._masks import pattern_mask
from tests.fuzz.conftest import fuzz_settings
from tests.fuzz.strategies import P, anything_int, cases

BACKENDS = ("auto", "sdpa", "tiled", "reference")


#: Lengths of the span patterns (and of the registry's factories, which make some): never 2**27 .. 2**40, which a
#: span pattern would allocate (a long per token at construction: BlockCausalSpans(2**31, ...) takes 16 GB and
#: was OOM-killed here); beyond that the allocation fails at once.
SPAN_LENGTHS = (0, -1, -(2**63), 2**62, 2**63 - 1, 2**64, True, 2.5, None, "8", [8])


def _valid_int(x, lo):
    # Past 2**62 a size reaches no further on int64 positions: a PatternError, not a wrapped comparison.
    return type(x) is int and lo <= x <= 2**62


def _grid(draw):
    """A grid shape: mostly small and valid (<= 70 tokens), sometimes extreme or malformed."""
    if draw(st.integers(0, 4)) == 0:
        return draw(st.sampled_from([(), (0,), (-3,), (2**31,), (2**63 - 1, 1), (4, 4, 4, 4), (2.0, 2), "8x8", None]))
    dims = draw(st.integers(1, 3))
    sizes = [draw(st.integers(1, 8)) for _ in range(dims)]
    while math.prod(sizes) > 70:
        sizes[sizes.index(max(sizes))] //= 2
    return tuple(sizes) if dims > 1 or draw(st.booleans()) else sizes[0]


@st.composite
def built_patterns(draw):
    """``(what, thunk)``: a constructor call with drawn (maybe invalid) parameters, and whether every parameter
    is valid by the documented rule (None: validity depends on relations the test does not model)."""
    kind = draw(
        st.sampled_from(
            [
                "SlidingWindow",
                "AShape",
                "Dilated",
                "Power",
                "Sinks",
                "GlobalTokens",
                "StridedShards",
                "Neighborhood",
                "HaloBlocks",
                "BlockAxis",
                "GridAxis",
                "Radial",
                "BlockCausalSpans",
                "ModalityMutual",
                "CompositeAttention",
                "PerHead",
                "registry",
            ]
        )
    )
    a = lambda lo=1: draw(anything_int(lo))  # noqa: E731
    if kind == "SlidingWindow":
        left, right = a(0), a(0)
        return kind, lambda: P.SlidingWindow(left, right), _valid_int(left, 0) and _valid_int(right, 0)
    if kind == "AShape":
        s, w = a(), a()
        return kind, lambda: P.AShape(sinks=s, window=w), _valid_int(s, 1) and _valid_int(w, 1)
    if kind == "Dilated":
        w, d, c = a(), a(), draw(st.sampled_from([True, False, 1, "yes"]))
        return kind, lambda: P.Dilated(w, d, is_causal=c), (_valid_int(w, 1) and _valid_int(d, 1)) or None
    if kind in ("Power", "Sinks", "GlobalTokens"):
        n = a()
        return kind, lambda: getattr(P, kind)(n), _valid_int(n, 1)
    if kind == "StridedShards":
        h, s, lo = draw(st.one_of(st.integers(1, 4), anything_int())), a(), a()
        return kind, lambda: P.StridedShards(heads=h, shards=s, local=lo), all(_valid_int(x, 1) for x in (h, s, lo))
    if kind == "Neighborhood":
        shape = _grid(draw)
        ks, dil, st_ = (draw(st.one_of(st.integers(1, 5), anything_int())) for _ in range(3))
        causal = draw(st.sampled_from([False, True, (True, False), "no"]))
        return kind, lambda: P.Neighborhood(shape, kernel_size=ks, dilation=dil, stride=st_, is_causal=causal), None
    if kind == "HaloBlocks":
        shape = _grid(draw)
        b, h = draw(st.one_of(st.integers(1, 4), anything_int())), draw(st.one_of(st.integers(0, 3), anything_int(0)))
        return kind, lambda: P.HaloBlocks(shape, block=b, halo=h), None
    if kind in ("BlockAxis", "GridAxis"):
        shape = _grid(draw)
        w = draw(st.one_of(st.integers(1, 4), anything_int()))
        return kind, lambda: getattr(P, kind)(shape, w), None
    if kind == "Radial":
        ft, nf, w = (draw(st.one_of(st.integers(1, 8), anything_int(0))) for _ in range(3))
        return kind, lambda: P.Radial(ft, nf, w), None
    if kind in ("BlockCausalSpans", "ModalityMutual", "CompositeAttention"):
        n = draw(st.one_of(st.integers(1, 70), st.sampled_from(SPAN_LENGTHS)))
        spans = draw(
            st.one_of(
                st.lists(st.tuples(st.integers(-2, 72), st.integers(-2, 72)), max_size=3),
                st.sampled_from([None, "ab", ((0,),), ((0, 2**63),), ((2**64, 2**64 + 1),), ((1.5, 3),)]),
            )
        )
        return kind, lambda: getattr(P, kind)(n, spans), None
    if kind == "PerHead":
        parts = draw(st.sampled_from([(), (P.Causal(),), (P.Causal(), P.SlidingWindow(2, 0)), ("causal",), None]))
        return kind, lambda: P.PerHead(parts), None
    rec = draw(st.sampled_from(registry.records(kind="pattern")))
    n = draw(st.one_of(st.integers(1, 70), st.sampled_from(SPAN_LENGTHS)))
    return f"registry {rec.name}", lambda: rec.make(n), None


@given(built_patterns(), st.data())
@fuzz_settings(450)
@C.counted
def test_patterns_with_extreme_parameters(built, data):
    what, make, valid = built
    pat, e = C.attempt(make)
    label = f"{what}"
    if e is not None:
        if valid:
            C.fail(C.ValidRefused, label, "valid parameters refused: " + C._desc(e), e)
        elif not (C.is_named(e) or isinstance(e, ak.MemoryBudgetError)):  # a span of 2**63 tokens meets the budget
            C.fail(
                C.WrongErrorType if isinstance(e, ak.AttnkitError) else C._crash_class(type(e).__name__),
                label,
                C._desc(e),
                e,
            )
        return
    if valid is False:
        C.fail(C.ErrorNotRaised, label, f"invalid parameters accepted: {pat!r}")
        return
    n = pat.fixed_length
    if n is not None and n > 70:
        return  # a valid pattern for a longer sequence: no tiny call applies
    heads = pat.num_heads
    if heads is not None and heads > 6:  # a per-head pattern for more heads than tiny tensors have
        c = data.draw(cases(heads=(2, 1), n=n, dtypes=(torch.float32,)))
        for backend in BACKENDS:
            C.expect_invalid(
                f"{backend}: {pat!r} on 2 heads",
                lambda b=backend: ak.attention(c.q, c.k, c.v, pattern=pat, q_offset=c.q_offset, backend=b),
            )
        return
    hk = 1 if heads is None else heads
    c = data.draw(
        cases(
            heads=(hk if heads else data.draw(st.sampled_from([1, 2])), 1), n=n, dtypes=(torch.float32, torch.float64)
        )
    )
    B, Hq, Hkv, Nq, Nk, D, Dv = c.dims
    label = f"{pat!r} on {c.label()}"
    mask, me = C.attempt(lambda: pattern_mask(pat, Nq, Nk, c.q_offset, Hq))
    if me is not None:
        if n is None or (Nq + c.q_offset <= n and Nk == n):
            raise me  # the oracle itself failed on a valid pattern: a test bug
        mask = None
    if n is not None and (Nk != n or Nq + c.q_offset > n):  # spatial pattern on the wrong length
        for backend in BACKENDS:
            C.expect_invalid(
                f"{backend}: {label}",
                lambda b=backend: ak.attention(c.q, c.k, c.v, pattern=pat, q_offset=c.q_offset, backend=b),
            )
        return
    d, de = C.attempt(lambda: pat.density(Nq, Nk, c.q_offset, Hq))
    if de is not None:
        C.fail(
            C._crash_class(type(de).__name__) if not C.is_named(de) else C.ValidRefused,
            "density: " + label,
            C._desc(de),
            de,
        )
    elif not math.isclose(d, float(mask.double().mean()), rel_tol=1e-9, abs_tol=1e-12):
        C.fail(C.WrongResult, "density: " + label, f"{d} != {float(mask.double().mean())}")
    want = reference.attention(*c.f64(), mask=mask[None], key_padding_mask=c.kpm, q_offset=c.q_offset, return_lse=True)
    backend = data.draw(st.sampled_from(BACKENDS))
    C.expect_valid(
        f"{backend}: {label}",
        lambda: ak.attention(
            c.q, c.k, c.v, pattern=pat, key_padding_mask=c.kpm, q_offset=c.q_offset, return_lse=True, backend=backend
        ),
        want[0],
        lse_ref=want[1],
        dtype=c.dtype,
        shape=(B, Hq, Nq, Dv),
    )


@given(
    st.sampled_from([P.Causal(), P.SlidingWindow(5, 2), P.Neighborhood((8, 8), kernel_size=3)]),
    st.one_of(st.integers(-32, 160), st.sampled_from([2**31, 2**63 - 1, 2**64, True, 16.0, "16", None])),
    st.one_of(st.integers(-32, 160), st.sampled_from([2**31, 2**63 - 1, True, 16.0, None])),
)
@fuzz_settings(80)
@C.counted
def test_block_layout_sizes(pat, bq, bk):
    """``pattern.block_layout`` takes positive multiples of 16 (a named error otherwise)."""
    valid = all(type(b) is int and b > 0 and b % 16 == 0 for b in (bq, bk if bk is not None else bq))
    label = f"{pat!r}.block_layout(64, 64, {bq!r}, {bk!r})"
    if valid and bq <= 2**20 and (bk is None or bk <= 2**20):
        lay, e = C.attempt(lambda: pat.block_layout(64, 64, bq, bk))
        if e is not None:
            C.fail(C.ValidRefused if C.is_named(e) else C._crash_class(type(e).__name__), label, C._desc(e), e)
    elif not valid:
        C.expect_invalid(label, lambda: pat.block_layout(64, 64, bq, bk))
