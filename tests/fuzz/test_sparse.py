"""Dynamic selectors and hand-made Selections through ``sparse_attention`` / ``attention(pattern=...)``: the
output is the reference's attention over the selection the call ran (``return_selection``); bad factory
options, bad Selections and non-finite inputs raise named errors."""

from __future__ import annotations

import math

import torch
from hypothesis import given
from hypothesis import strategies as st

import attnkit as ak
from attnkit import reference, registry
from attnkit.sparse import Selection
from tests.fuzz import _check as C
from tests.fuzz.conftest import fuzz_settings
from tests.fuzz.strategies import EDGE_INTS, NOT_INTS, cases, poison_one

SELECTORS = [r for r in registry.records(kind="selector")]
GRID = {r.name for r in SELECTORS if "grid" in r.supports}
BACKENDS = ("auto", "tiled", "gather", "reference", "sdpa")


def selected_ref(q, k, v, sel, causal, kpm):
    """float64 ``(out, lse)`` over ``sel``'s pairs (and the causal cut), the oracle's own mask and key bias."""
    Hq, Nq, Nk = q.shape[1], q.shape[2], k.shape[2]
    mask = sel.dense_mask(Hq)
    if causal:
        mask = mask & torch.ones(Nq, Nk, dtype=torch.bool).tril(Nk - Nq)
    score = None
    if sel.key_bias is not None:
        bias = sel.key_bias.detach().double()

        class _Bias:
            def score_mod(self, s, b, h, qi, kj):
                return s + bias[:, :, None, :]

        score = _Bias()
    q, k, v = (t.detach().double() for t in (q, k, v))
    return reference.attention(q, k, v, mask=mask, key_padding_mask=kpm, score=score, return_lse=True)


@st.composite
def selector_calls(draw):
    rec = draw(st.sampled_from(SELECTORS))
    Hq, Hkv = draw(st.sampled_from([(4, 2), (2, 1), (2, 2), (1, 1), (3, 1)]))
    grid = rec.name in GRID
    n = 64 if grid else None
    causal = False if grid else draw(st.booleans())
    cross = "cross" in rec.supports and not causal
    c = draw(
        cases(
            heads=(Hq, Hkv), n=n, cross=cross or causal, dv=False, dtypes=(torch.float32, torch.float64, torch.bfloat16)
        )
    )
    if causal and c.q_offset != c.k.shape[2] - c.q.shape[2]:  # causal selections: the queries are the last Nq
        c = c.with_tensors(q_offset=c.k.shape[2] - c.q.shape[2])
    budget = draw(st.sampled_from([0.05, 0.125, 0.5, 1.0, 1, 2, 3, 2**31, 2**63 - 1]))
    block = draw(st.sampled_from([16, 16, 32, 64, 1, 2, 5, 8]))
    return rec, c, causal, budget, block


@given(selector_calls(), st.sampled_from(BACKENDS), st.booleans())
@fuzz_settings(300)
@C.counted
def test_selectors_match_the_reference_over_their_selection(call, backend, return_lse):
    rec, c, causal, budget, block = call
    B, Hq, Hkv, Nq, Nk, D, Dv = c.dims
    label = f"{rec.name}(budget={budget}, block={block}) causal={causal} backend={backend!r} on {c.label()}"
    sel, e = C.attempt(lambda: rec.make(Nk, budget=budget, heads=Hq, kv_heads=Hkv, head_dim=D, block=block))
    if e is not None:
        if not C.is_named(e):
            C.fail(C._crash_class(type(e).__name__), "make: " + label, C._desc(e), e)
        return
    res, e = C.attempt(
        lambda: ak.sparse_attention(
            c.q,
            c.k,
            c.v,
            sel,
            causal=causal,
            key_padding_mask=c.kpm,
            return_selection=True,
            return_lse=return_lse,
            backend=backend,
        )
    )
    if e is not None:
        if isinstance(e, ak.UnsupportedError) and backend != "auto":
            _, e2 = C.attempt(
                lambda: ak.sparse_attention(
                    c.q, c.k, c.v, sel, causal=causal, key_padding_mask=c.kpm, backend="reference"
                )
            )
            if e2 is not None:
                C.fail(C.ValidRefused, label, f"{C._desc(e)}; on reference: {C._desc(e2)}", e2)
        elif C.is_named(e):
            pass  # a selector's own limit on these sizes (grid, block vs length): named, allowed
        else:
            C.fail(C._crash_class(type(e).__name__), label, C._desc(e), e)
        return
    out, *rest = res
    selection = rest[-1]
    want = selected_ref(c.q, c.k, c.v, selection, causal, c.kpm)
    C.expect_valid(
        label,
        lambda: tuple(rest[:-1]) and (out, rest[0]) or out,
        want[0],
        lse_ref=want[1] if return_lse else None,
        dtype=c.dtype,
        shape=(B, Hq, Nq, Dv),
    )


@given(
    selector_calls(),
    st.sampled_from(["q", "k", "v", "k_padded", "v_padded"]),
    st.sampled_from([math.nan, math.inf, -math.inf]),
    st.data(),
)
@fuzz_settings(150)
@C.counted
def test_selectors_with_nonfinite_inputs(call, where, value, data):
    rec, c, causal, budget, block = call
    B, Hq, Hkv, Nq, Nk, D, Dv = c.dims
    sel, e = C.attempt(lambda: rec.make(Nk, budget=budget, heads=Hq, kv_heads=Hkv, head_dim=D, block=block))
    if e is not None:
        return
    _, e = C.attempt(lambda: ak.sparse_attention(c.q, c.k, c.v, sel, causal=causal, key_padding_mask=c.kpm))
    if e is not None:
        return  # invalid for another reason (the finite call is refused): the valid-call test covers it
    t, where, name, real = poison_one(data, c, where, value)
    label = f"non-finite {where}: {rec.name}(budget={budget}, block={block}) causal={causal} on {c.label()}"

    def call_():
        return ak.sparse_attention(
            t["q"], t["k"], t["v"], sel, causal=causal, key_padding_mask=c.kpm, return_selection=True
        )

    if "padded" not in where:
        C.expect_nonfinite(label, call_, {name})
        return
    res, e = C.attempt(call_)
    if e is not None:
        if not C.is_named(e) or isinstance(e, ak.NonFiniteError):
            C.fail(C.ValidRefused if C.is_named(e) else C._crash_class(type(e).__name__), label, C._desc(e), e)
        return
    out, selection = res
    clean = {x: y.clone() for x, y in t.items()}
    clean[name][(~real)[:, None, :, None].expand_as(clean[name])] = 0.0
    want = selected_ref(clean["q"], clean["k"], clean["v"], selection, causal, c.kpm)
    C.expect_valid(label, lambda: out, want[0], dtype=c.dtype, shape=(B, Hq, Nq, Dv))


BAD_OPTIONS = (*EDGE_INTS, *NOT_INTS, 0.0, -0.5, 1.5, math.nan, 1e-300)


@given(
    st.sampled_from(SELECTORS),
    st.sampled_from(["budget", "block", "heads", "kv_heads", "head_dim"]),
    st.sampled_from(BAD_OPTIONS),
)
@fuzz_settings(150)
@C.counted
def test_selector_factory_options(rec, option, value):
    """``rec.make(n, option=value)`` with an extreme or ill-typed value: a named error, or a selector that runs
    (or refuses with a named error) on matching tiny tensors."""
    opts = dict(budget=0.5, heads=2, kv_heads=1, head_dim=8, block=16)
    opts[option] = value
    n = 64
    label = f"{rec.name}.make({n}, {option}={value!r})"
    sel, e = C.attempt(lambda: rec.make(n, **opts))
    if e is not None:
        if not (C.is_named(e) or isinstance(e, ak.MemoryBudgetError)):  # huge sizes may meet the budget
            C.fail(
                C.WrongErrorType if isinstance(e, ak.AttnkitError) else C._crash_class(type(e).__name__),
                label,
                C._desc(e),
                e,
            )
        return
    shapes_ok = all(type(opts[x]) is int and 1 <= opts[x] <= 8 for x in ("heads", "kv_heads", "head_dim"))
    Hq, Hkv, D = (opts[x] if shapes_ok else y for x, y in (("heads", 2), ("kv_heads", 1), ("head_dim", 8)))
    if Hq % Hkv:
        Hq, Hkv = 2, 1
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, n, D, generator=g) for h in (Hq, Hkv, Hkv))
    causal = "grid" not in rec.supports
    res, e = C.attempt(lambda: ak.sparse_attention(q, k, v, sel, causal=causal, return_selection=True))
    if e is not None:
        if not (C.is_named(e) or isinstance(e, ak.MemoryBudgetError)):
            C.fail(
                C.WrongErrorType if isinstance(e, ak.AttnkitError) else C._crash_class(type(e).__name__),
                label + " then sparse_attention",
                C._desc(e),
                e,
            )
        return
    out, selection = res
    want = selected_ref(q, k, v, selection, causal, None)
    C.expect_valid(label + " then sparse_attention", lambda: out, want[0], dtype=q.dtype)


# -- hand-made Selections -------------------------------------------------------------------------------------


@st.composite
def index_selections(draw, B, Hq, Nq, Nk):
    """Token indices ``(B, Hq, ceil(Nq / qb), K)``: valid (ids in [-1, Nk), holes anywhere) or broken."""
    qb = draw(st.sampled_from([1, 1, 2, 3, 16]))
    R = -(-Nq // qb)
    K = draw(st.integers(1, min(Nk, 8) + 1))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    idx = torch.stack([torch.randperm(Nk + 1, generator=gen)[:K] - 1 for _ in range(B * Hq * R)]).view(B, Hq, R, K)
    if Nk + 1 < K:
        idx = idx
    kind = draw(
        st.sampled_from(
            [
                "valid",
                "valid",
                "valid",
                "dup",
                "out_of_range",
                "huge",
                "neg",
                "shape",
                "float",
                "int32",
                "qb",
                "qlen",
                "none",
            ]
        )
    )
    sel = dict(indices=idx, query_block=qb, q_len=Nq, kv_len=Nk)
    if kind == "dup" and K >= 2:
        idx[..., 1] = idx[..., 0]
    elif kind == "out_of_range":
        idx[0, 0, 0, 0] = Nk + draw(st.integers(0, 3))
    elif kind == "huge":
        idx[0, 0, 0, -1] = draw(st.sampled_from([2**31, 2**63 - 1]))
    elif kind == "neg":
        idx[0, 0, 0, 0] = draw(st.sampled_from([-2, -(2**31), -(2**63)]))
    elif kind == "shape":
        sel["indices"] = draw(
            st.sampled_from([idx[0], idx[:, :, :1] if R > 1 else torch.cat([idx, idx], 2), idx[..., None]])
        )
    elif kind == "float":
        sel["indices"] = idx.float()
    elif kind == "int32":
        sel["indices"] = idx.int()
    elif kind == "qb":
        # 0, negative and non-int are invalid; a block longer than Nq (2**31) is one row for all queries, valid,
        # and is drawn by the valid kinds through their own query_block.
        sel["query_block"] = draw(st.sampled_from([0, -1, 1.5, None]))
    elif kind == "qlen":
        sel["q_len"] = Nq + 1
    elif kind == "none":
        sel["indices"] = None
    return kind, Selection(**sel)


@given(cases(dtypes=(torch.float32, torch.float64), dv=True), st.data())
@fuzz_settings(250)
@C.counted
def test_hand_made_index_selections(c, data):
    B, Hq, Hkv, Nq, Nk, D, Dv = c.dims
    kind, sel = data.draw(index_selections(B, Hq, Nq, Nk))
    causal = data.draw(st.booleans())
    backend = data.draw(st.sampled_from(["auto", "gather", "reference", "tiled"]))
    if backend == "tiled" and kind not in ("valid", "dup"):
        backend = "gather"  # tiled refuses every index selection (UnsupportedError) before looking at it
    label = (
        f"{kind} Selection(indices={_short(sel.indices)}, query_block={sel.query_block!r}) causal={causal} "
        f"backend={backend!r} on {c.label()}"
    )

    def call():
        return ak.sparse_attention(
            c.q, c.k, c.v, sel, causal=causal, key_padding_mask=c.kpm, return_lse=True, backend=backend
        )

    if kind in ("valid", "dup", "int32"):
        if kind == "dup":  # each listed key once (a key listed twice is still one key), or a named refusal
            res, e = C.attempt(call)
            if e is not None and C.is_named(e):
                return
        mask_sel = Selection(indices=sel.indices.long(), query_block=sel.query_block, q_len=Nq, kv_len=Nk)
        want = selected_ref(c.q, c.k, c.v, mask_sel, causal, c.kpm)
        C.expect_valid(
            label,
            call,
            want[0],
            lse_ref=want[1],
            dtype=c.dtype,
            shape=(B, Hq, Nq, Dv),
            fallback=lambda: ak.sparse_attention(
                c.q, c.k, c.v, sel, causal=causal, key_padding_mask=c.kpm, backend="reference"
            ),
            memory_ok=False,
        ) if kind != "int32" else _int32(label, call, want, c)
    else:
        C.expect_invalid(label, call)


def _int32(label, call, want, c):
    res, e = C.attempt(call)
    if e is not None and isinstance(e, ak.DTypeError):
        return
    B, Hq, Hkv, Nq, Nk, D, Dv = c.dims
    C.expect_valid(
        label, lambda: res if e is None else call(), want[0], lse_ref=want[1], dtype=c.dtype, shape=(B, Hq, Nq, Dv)
    )


def _short(t):
    return t.tolist() if isinstance(t, torch.Tensor) and t.numel() <= 24 else getattr(t, "shape", t)


@given(cases(dtypes=(torch.float32,)), st.sampled_from(SELECTORS), st.data())
@fuzz_settings(100)
@C.counted
def test_selector_misuse(c, rec, data):
    """A Selection for other sizes or a wrong selector type: invalid input, so a named ValueError/TypeError.
    A selector with q_offset, a score mod or a normaliser, or causal with a non-causal selector: valid
    arguments whose combination no kernel implements (every kernel that runs selections is plain softmax over
    the whole call), so UnsupportedError saying which argument, and nothing else."""
    B, Hq, Hkv, Nq, Nk, D, Dv = c.dims
    sel, e = C.attempt(lambda: rec.make(max(Nk, 1), budget=0.5, heads=Hq, kv_heads=Hkv, head_dim=D, block=16))
    if e is not None:
        return
    what = data.draw(st.sampled_from(["q_offset", "score", "normalizer", "causal", "selector_type", "other_sizes"]))
    kw = dict(pattern=sel, key_padding_mask=c.kpm)
    if what == "q_offset":
        if Nq == Nk:
            return
        kw["q_offset"] = Nk - Nq
    elif what == "score":
        kw["score"] = ak.scores.Softcap(5.0)
    elif what == "normalizer":
        kw["normalizer"] = ak.scores.Sigmoid()
    elif what == "causal":
        if sel.causal_ok:
            return
        kw["causal"] = True
    elif what == "selector_type":
        kw["pattern"] = data.draw(st.sampled_from([rec.name, type(sel), rec, [sel]]))
    else:
        sel2 = Selection(indices=torch.zeros(B, Hq, Nq + 1, 1, dtype=torch.long), q_len=Nq + 1, kv_len=Nk + 1)
        kw["pattern"] = sel2
    label = f"{what}: attention(pattern={rec.name}) on {c.label()}"
    if what in ("q_offset", "score", "normalizer", "causal"):
        _, e = C.attempt(lambda: ak.attention(c.q, c.k, c.v, **kw))
        if not (isinstance(e, ak.UnsupportedError) and str(e).startswith(what)):
            C.fail(C.WrongErrorType, label, f"expected UnsupportedError naming {what}, got {e!r}"[:300])
        return
    C.expect_invalid(label, lambda: ak.attention(c.q, c.k, c.v, **kw))
