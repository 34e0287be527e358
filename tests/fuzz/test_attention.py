"""``attnkit.attention`` (and ``explain``) on every backend: valid calls match the float64 reference, non-finite
inputs raise NonFiniteError naming the tensor, invalid calls raise a named error."""

from __future__ import annotations

import math

import numpy as np
import torch
from hypothesis import given
from hypothesis import strategies as st

import attnkit as ak
from attnkit import reference
from tests.fuzz import _check as C
from tests.fuzz._masks import pattern_mask
from tests.fuzz.conftest import fuzz_settings
from tests.fuzz.strategies import EDGE_INTS, NOT_INTS, P, cases, seq_patterns

BACKENDS = ("auto", "sdpa", "tiled", "gather", "reference")


def effective(pattern, causal):
    if causal:
        return P.Causal() if pattern is None else pattern & P.Causal()
    return pattern


def ref_attention(c, pattern, *, score=None, scale=None, normalizer=None, dtype=torch.float64, tensors=None):
    """The oracle on ``c`` (float64, or ``dtype`` for the naive same-dtype run) with an independent mask."""
    q, k, v = tensors if tensors is not None else (c.q, c.k, c.v)
    mask = None
    if pattern is not None:
        Hq = c.q.shape[1]
        mask = pattern_mask(pattern, c.q.shape[2], c.k.shape[2], c.q_offset, Hq)[None]
    return reference.attention(
        q,
        k,
        v,
        mask=mask,
        score=score,
        scale=scale,
        key_padding_mask=c.kpm,
        q_offset=c.q_offset,
        return_lse=True,
        normalizer=normalizer,
        dtype=dtype,
    )


@st.composite
def calls(draw, dtypes=None):
    """A valid attention call: a case, a pattern, a score mod or normaliser, scale, causal, lse, backend."""
    c = draw(cases(dtypes=dtypes) if dtypes else cases())
    Hq = c.q.shape[1]
    pattern = draw(st.one_of(st.none(), seq_patterns(Hq)))
    extra = draw(st.sampled_from(["none", "none", "none", "softcap", "alibi", "sigmoid", "softplus"]))
    score = {"softcap": ak.scores.Softcap(draw(st.sampled_from([0.5, 5.0, 50.0]))), "alibi": ak.scores.ALiBi(Hq)}
    score = score.get(extra)
    normalizer = {"sigmoid": ak.scores.Sigmoid(), "softplus": ak.scores.Softplus(draw(st.booleans()))}.get(extra)
    scale = draw(st.sampled_from([None, None, 0.05, 1.0, 3.0]))
    causal = draw(st.sampled_from([None, False, True]))
    if causal and c.q.shape[2] + c.q_offset > c.k.shape[2]:
        causal = None
    kw = dict(
        pattern=pattern,
        score=score,
        scale=scale,
        key_padding_mask=c.kpm,
        q_offset=c.q_offset,
        return_lse=draw(st.booleans()),
        normalizer=normalizer,
        causal=causal,
    )
    return c, kw, draw(st.sampled_from(BACKENDS))


def check_valid_call(c, kw, backend, *, tensors=None, ref_tensors=None, label=""):
    q, k, v = tensors if tensors is not None else (c.q, c.k, c.v)
    pat = effective(kw["pattern"], kw["causal"])
    B, Hq, Hkv, Nq, Nk, D, Dv = c.dims
    r64 = ref_tensors if ref_tensors is not None else c.f64()
    ref = ref_attention(c, pat, score=kw["score"], scale=kw["scale"], normalizer=kw["normalizer"], tensors=r64)
    naive_t = tuple(t.to(c.dtype) for t in r64)
    C.expect_valid(
        f"{label}attention(backend={backend!r}, {kw_label(kw)}) on {c.label()}",
        lambda: ak.attention(q, k, v, backend=backend, **kw),
        ref[0],
        lse_ref=ref[1] if kw["return_lse"] else None,
        dtype=c.dtype,
        fallback=lambda: ak.attention(q, k, v, backend="reference", **kw),
        naive=lambda: ref_attention(
            c, pat, score=kw["score"], scale=kw["scale"], normalizer=kw["normalizer"], dtype=c.dtype, tensors=naive_t
        )[0],
        shape=(B, Hq, Nq, Dv),
    )


def kw_label(kw) -> str:
    def shown(k, v):
        return k != "key_padding_mask" and not (v is None or v is False or (type(v) is int and v == 0))

    return ", ".join(f"{k}={v!r}"[:120] for k, v in kw.items() if shown(k, v))


@given(calls())
@fuzz_settings(500)
@C.counted
def test_valid_calls_match_the_reference(call):
    c, kw, backend = call
    check_valid_call(c, kw, backend)


# -- NaN / inf ------------------------------------------------------------------------------------------------


@st.composite
def poisoned(draw, tensor_names=("q", "k", "v")):
    """A valid call and where its NaN/inf goes: q anywhere, k/v at a real key, or k/v at padded keys only."""
    c, kw, backend = draw(calls())
    value = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
    where = draw(st.sampled_from(["q", "k_real", "v_real", "kv_real", "k_padded", "v_padded", "kv_padded", "qkv"]))
    if "padded" in where and (c.kpm is None or bool(c.kpm.all())):
        where = where.replace("padded", "real")
    B, Hq, Hkv, Nq, Nk, D, Dv = c.dims
    q, k, v = (t.clone() for t in (c.q, c.k, c.v))
    q64, k64, v64 = c.f64()
    names = set()
    many = draw(st.booleans())
    if where in ("q", "qkv"):
        b, h, i = draw(st.integers(0, B - 1)), draw(st.integers(0, Hq - 1)), draw(st.integers(0, Nq - 1))
        q[b, h, i, draw(st.integers(0, D - 1))] = value
        if many:
            q[b, h, i] = value
        names.add("q")
    if where != "q":
        real = torch.ones(B, Nk, dtype=torch.bool) if c.kpm is None else c.kpm
        pick = real if "real" in where or where == "qkv" else ~real
        spots = pick.nonzero().tolist()
        if not spots:  # every key padded: poison the queries instead
            q[0, 0, 0, 0] = value
            return c, kw, backend, (q, k, v), (q64, k64, v64), {"q"}
        b, j = spots[draw(st.integers(0, len(spots) - 1))]
        h = draw(st.integers(0, Hkv - 1))
        for name, t, t64 in (("k", k, k64), ("v", v, v64)):
            if name in where or where == "qkv":
                if many:
                    t[b, :, j] = value
                else:
                    t[b, h, j, draw(st.integers(0, t.shape[-1] - 1))] = value
                if "padded" in where:
                    t64[b, :, j] = 0.0  # the reference's answer: padded keys' contents never matter
                else:
                    names.add(name)
        if "padded" in where:  # the other padded keys may hold anything too
            for t in (k, v):
                t[(~real)[:, None, :, None].expand_as(t)] = value
            k64[(~real)[:, None, :, None].expand_as(k64)] = 0.0
            v64[(~real)[:, None, :, None].expand_as(v64)] = 0.0
    return c, kw, backend, (q, k, v), (q64, k64, v64), names


def reaching(c, kw, q, k, v) -> set:
    """The tensors whose NaN/inf can reach the output: q at a row that sees a key, k/v at a key some query
    (of its group's heads) sees under the pattern and the padding."""
    B, Hq, Hkv, Nq, Nk, D, Dv = c.dims
    pat = effective(kw.get("pattern"), kw.get("causal"))
    vis = torch.ones(1, Hq, Nq, Nk, dtype=torch.bool)
    if pat is not None:
        vis = pattern_mask(pat, Nq, Nk, c.q_offset, Hq)[None].expand(1, Hq, Nq, Nk)
    if c.kpm is not None:
        vis = vis & c.kpm[:, None, None, :]
    vis = vis.expand(B, Hq, Nq, Nk)
    out = set()
    if bool((~torch.isfinite(q)).any(-1).logical_and(vis.any(-1)).any()):
        out.add("q")
    seen = vis.view(B, Hkv, Hq // Hkv, Nq, Nk).any(2).any(2)  # (B, Hkv, Nk): a key some query sees
    for name, t in (("k", k), ("v", v)):
        if bool((~torch.isfinite(t)).any(-1).logical_and(seen).any()):
            out.add(name)
    return out


@given(poisoned())
@fuzz_settings(400)
@C.counted
def test_nonfinite_inputs(case):
    c, kw, backend, (q, k, v), r64, names = case
    if not names:  # NaN/inf at padded keys only: a valid call, the reference with those entries zeroed
        check_valid_call(c, kw, backend, tensors=(q, k, v), ref_tensors=r64, label="non-finite at padded keys only: ")
        return
    reached = reaching(c, kw, q, k, v)
    if not reached:
        # The rule is about values that can reach the output: one no query sees may be refused (a kernel that
        # reads every key, like SDPA's) or ignored (one that skips the tile), never turned into a wrong answer.
        out, e = C.attempt(lambda: ak.attention(q, k, v, backend=backend, **kw))
        if isinstance(e, ak.NonFiniteError):
            return
        zeroed = tuple(torch.nan_to_num(t, 0.0, 0.0, 0.0) for t in (q, k, v))
        check_valid_call(c, kw, backend, tensors=zeroed, ref_tensors=tuple(t.double() for t in zeroed),
                         label="non-finite where no query reaches: ")  # fmt: skip
        return
    C.expect_nonfinite(
        f"attention(backend={backend!r}, {kw_label(kw)}) with non-finite {sorted(names)} on {c.label()}",
        lambda: ak.attention(q, k, v, backend=backend, **kw),
        names,
        finite_fn=lambda: ak.attention(c.q, c.k, c.v, backend=backend, **kw),
    )


# -- invalid calls -------------------------------------------------------------------------------------------

BAD_TENSORS = (None, "q", 3, 2.5, [[1.0]], np.zeros((1, 1, 2, 2), dtype=np.float32))
BAD_DTYPES = (torch.int32, torch.int64, torch.bool, torch.uint8, torch.complex64, torch.float8_e4m3fn)


def _invalid_offsets(Nq, Nk):
    ok = lambda x: isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= Nk - Nq  # noqa: E731
    return st.sampled_from([x for x in (*EDGE_INTS, *NOT_INTS, Nk - Nq + 1, Nk) if not ok(x)])


@st.composite
def invalid_calls(draw):
    """A valid call with one thing made invalid; the label says which."""
    c = draw(cases(dtypes=(torch.float32, torch.bfloat16)))
    B, Hq, Hkv, Nq, Nk, D, Dv = c.dims
    q, k, v = c.q, c.k, c.v
    kw = dict(key_padding_mask=c.kpm, q_offset=c.q_offset)
    what = draw(
        st.sampled_from(
            [
                "tensor_type",
                "rank",
                "zero_size",
                "dtype",
                "dtype_mismatch",
                "device",
                "heads",
                "kv_heads",
                "kv_len",
                "head_dim",
                "batch",
                "q_len",
                "q_offset",
                "scale",
                "kpm",
                "pattern_type",
                "pattern_size",
                "score",
                "normalizer",
                "backend",
                "causal",
            ]
        )
    )
    slot = draw(st.sampled_from(["q", "k", "v"]))
    t = {"q": q, "k": k, "v": v}
    if what == "tensor_type":
        t[slot] = draw(st.sampled_from(BAD_TENSORS))
    elif what == "rank":
        x = t[slot]
        t[slot] = draw(st.sampled_from([x[0], x[None], x.reshape(-1), x.sum()]))
    elif what == "zero_size":
        x = t[slot]
        dim = draw(st.integers(0, 3))
        t[slot] = x.narrow(dim, 0, 0)
    elif what == "dtype":
        dt = draw(st.sampled_from(BAD_DTYPES))
        if draw(st.booleans()):
            t = {n: x.to(dt) for n, x in t.items()}
        else:
            t[slot] = t[slot].to(dt)
    elif what == "dtype_mismatch":
        slot = draw(st.sampled_from(["k", "v"]))
        t[slot] = t[slot].to(torch.float64 if c.dtype != torch.float64 else torch.float32)
    elif what == "device":
        slot = draw(st.sampled_from(["k", "v"]))
        t[slot] = t[slot].to("meta")
    elif what == "heads":  # Hq % Hkv != 0
        t["k"] = torch.randn(B, Hq + 1, Nk, D).to(c.dtype)
        t["v"] = torch.randn(B, Hq + 1, Nk, Dv).to(c.dtype)
    elif what == "kv_heads":
        t["v"] = torch.randn(B, Hkv + 1, Nk, Dv).to(c.dtype)
    elif what == "kv_len":
        t["v"] = torch.randn(B, Hkv, Nk + draw(st.sampled_from([1, -1 if Nk > 1 else 2])), Dv).to(c.dtype)
    elif what == "head_dim":
        t["k"] = torch.randn(B, Hkv, Nk, D + 1).to(c.dtype)
    elif what == "batch":
        t[slot] = torch.cat([t[slot], t[slot]], 0)
    elif what == "q_len":  # more queries than keys
        t["q"] = torch.randn(B, Hq, Nk + draw(st.integers(1, 5)), D).to(c.dtype)
        kw["q_offset"] = draw(st.sampled_from([0, c.q_offset]))
    elif what == "q_offset":
        kw["q_offset"] = draw(_invalid_offsets(Nq, Nk))
    elif what == "scale":
        bad = [0, 0.0, -1.0, math.nan, math.inf, -math.inf, "1", True, 1j, torch.tensor(1.0), 1e400, -0.0]
        kw["scale"] = draw(st.sampled_from(bad))
    elif what == "kpm":
        m = torch.ones(B, Nk, dtype=torch.bool)
        kw["key_padding_mask"] = draw(
            st.sampled_from(
                [
                    m.float(),
                    m.long(),
                    m[:, :-1] if Nk > 1 else m[:, :0],
                    torch.ones(B, Nk + 1, dtype=torch.bool),
                    m[0],
                    m[:, None],
                    torch.ones(B + 1, Nk, dtype=torch.bool),
                    m.tolist(),
                    m.to("meta"),
                    m.numpy(),
                    "all",
                ]
            )
        )
    elif what == "pattern_type":
        kw["pattern"] = draw(
            st.sampled_from(["causal", 3, P.SlidingWindow, [P.Causal()], torch.ones(Nq, Nk, dtype=torch.bool), {}])
        )
    elif what == "pattern_size":  # a pattern made for another length or number of heads
        kw["pattern"] = draw(
            st.sampled_from(
                [
                    P.Neighborhood((Nk + 1,), kernel_size=2),
                    P.StridedShards(heads=Hq + 1, shards=2, local=4),
                    P.BlockAxis((Nk + 2,), window=1),
                    P.PerHead(tuple(P.Causal() for _ in range(Hq + 1))),
                    P.BlockCausalSpans(Nk + 1, ((0, 1),)),
                ]
            )
        )
    elif what == "score":
        kw["score"] = draw(st.sampled_from(["softcap", 3, lambda s, b, h, i, j: s, ak.scores.ALiBi(Hq + 1)]))
    elif what == "normalizer":
        kw["normalizer"] = draw(st.sampled_from(["sigmoid", torch.sigmoid, 1, ak.scores.Sigmoid]))
    elif what == "backend":
        kw["backend"] = draw(st.sampled_from(["cuda", "", None, 0, "TILED", "flex ", "dense", ["sdpa"]]))
    elif what == "causal":
        kw["causal"] = draw(st.sampled_from(["yes", 2, 0.5, "False", [True]]))
    kw.setdefault("backend", draw(st.sampled_from(BACKENDS + ("flex",))))
    return c, what, (t["q"], t["k"], t["v"]), kw


@given(invalid_calls())
@fuzz_settings(400)
@C.counted
def test_invalid_calls_raise_named_errors(call):
    c, what, (q, k, v), kw = call
    label = f"{what}: attention({_shape(q)}, {_shape(k)}, {_shape(v)}, {kw_label(kw)}) from {c.label()}"
    C.expect_invalid(label, lambda: ak.attention(q, k, v, **kw))
    if what not in ("backend",):
        kw2 = {x: y for x, y in kw.items() if x != "return_lse"}
        C.expect_invalid("explain: " + label, lambda: ak.explain(q, k, v, **kw2))


def _shape(t):
    return f"{tuple(t.shape)} {t.dtype} {t.device}" if isinstance(t, torch.Tensor) else repr(t)[:40]


@given(cases(dtypes=(torch.float32,)), st.sampled_from(BACKENDS), st.one_of(st.none(), st.just(P.Causal())))
@fuzz_settings(60)
@C.counted
def test_meta_tensors(c, backend, pattern):
    """Every tensor on the meta device: a named error, or an output of the right shape (there are no values)."""
    q, k, v = (t.to("meta") for t in (c.q, c.k, c.v))
    kpm = None if c.kpm is None else c.kpm.to("meta")
    B, Hq, Hkv, Nq, Nk, D, Dv = c.dims
    res, e = C.attempt(
        lambda: ak.attention(q, k, v, pattern=pattern, key_padding_mask=kpm, q_offset=c.q_offset, backend=backend)
    )
    label = f"meta tensors, backend={backend!r}, pattern={pattern!r} on {c.label()}"
    if e is not None:
        if not isinstance(e, ak.AttnkitError):
            C.fail(C._crash_class(type(e).__name__), label, C._desc(e), e)
    elif tuple(res.shape) != (B, Hq, Nq, Dv) or res.dtype != c.dtype:
        C.fail(C.BadOutputForm, label, f"{tuple(res.shape)} {res.dtype}")
