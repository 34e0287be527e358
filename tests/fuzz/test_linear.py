"""``attnkit.linear.linear_attention``: every form, feature map, normaliser, decay and chunk size (to 2**63 - 1)
matches the float64 reference; bad arguments raise named errors; NaN/inf at real keys or in q raise
NonFiniteError, at padded keys they do not matter."""

from __future__ import annotations

import math

import torch
from hypothesis import given
from hypothesis import strategies as st

import attnkit as ak
from attnkit import reference
from attnkit.linear import linear_attention, retnet_decay
from tests.fuzz import _check as C
from tests.fuzz.conftest import fuzz_settings
from tests.fuzz.strategies import EDGE_INTS, NOT_INTS, cases, poison_one

CHUNKS = (1, 2, 3, 16, 64, 2**31 - 1, 2**31, 2**62, 2**63 - 1)


@st.composite
def linear_calls(draw):
    causal = draw(st.booleans())
    c = draw(cases(cross=not causal, max_n=40))
    B, Hq, Hkv, Nq, Nk, D, Dv = c.dims
    if not causal and draw(st.booleans()):  # non-causal allows more queries than keys
        extra = draw(st.integers(1, 5))
        c = c.with_tensors(q=torch.randn(B, Hq, Nq + extra, D).to(c.dtype))
    fmap = draw(st.sampled_from(["elu+1", "elu+1", "relu", "identity"]))
    normalize = draw(st.sampled_from([True, False, "rms", "inline", "mala"]))
    if fmap == "identity" and normalize is True:
        normalize = "rms"
    decay = None
    if causal:
        decay = draw(st.sampled_from([None, None, 1.0, 0.9, 0.5, 1e-3, "retnet", "tensor"]))
        if decay == "retnet":
            decay = retnet_decay(Hq)
        elif decay == "tensor":
            decay = torch.linspace(0.3, 1.0, Hq)
    kw = dict(
        feature_map=fmap,
        decay=decay,
        normalize=normalize,
        causal=causal,
        mode=draw(st.sampled_from(["auto", "parallel", "chunk", "recurrent"])),
        chunk_size=draw(st.sampled_from(CHUNKS)),
        key_padding_mask=c.kpm,
        scale=draw(st.sampled_from([None, None, 0.25, 2.0])),
    )
    return c, kw


def ref_linear(c, kw, tensors=None, dtype=torch.float64):
    q, k, v = tensors if tensors is not None else c.f64()
    rk = {x: kw[x] for x in ("feature_map", "decay", "normalize", "causal", "key_padding_mask", "scale")}
    return reference.linear_attention(q, k, v, dtype=dtype, **rk)


def well_conditioned(ref, dtype) -> bool:
    """Values are compared unless the exact answer is huge: a sum normaliser dividing by a near-zero sum
    (identity or relu features) has no meaningful low-precision answer; NaN is still checked."""
    return bool(torch.isfinite(ref).all()) and ref.abs().max().item() < 1e4


def _label(c, kw):
    shown = {x: y for x, y in kw.items() if x != "key_padding_mask"}
    if isinstance(shown.get("decay"), torch.Tensor):
        shown["decay"] = shown["decay"].tolist()
    return f"linear_attention({shown}) on {c.label()} Nq={c.q.shape[2]}"


@given(linear_calls())
@fuzz_settings(300)
@C.counted
def test_linear_attention_matches_the_reference(call):
    c, kw = call
    B, Hq, Hkv, Nq, Nk, D, Dv = c.dims
    want = ref_linear(c, kw)
    C.expect_valid(
        _label(c, kw),
        lambda: linear_attention(c.q, c.k, c.v, **kw),
        want,
        compare=well_conditioned(want, c.dtype),
        dtype=c.dtype,
        naive=lambda: ref_linear(c, kw, tensors=(c.q, c.k, c.v), dtype=torch.float32),
        shape=(B, Hq, c.q.shape[2], Dv),
        memory_ok=kw["mode"] == "parallel",
    )


@given(
    linear_calls(),
    st.sampled_from(["q", "k", "v", "k_padded", "v_padded"]),
    st.sampled_from([math.nan, math.inf, -math.inf]),
    st.data(),
)
@fuzz_settings(200)
@C.counted
def test_linear_attention_nonfinite(call, where, value, data):
    c, kw = call
    B, Hq, Hkv, Nq, Nk, D, Dv = c.dims
    Nq = c.q.shape[2]
    t, where, name, real = poison_one(data, c, where, value)
    label = f"non-finite {where}: " + _label(c, kw)
    call_ = lambda: linear_attention(t["q"], t["k"], t["v"], **kw)  # noqa: E731
    if "padded" not in where:
        C.expect_nonfinite(label, call_, {name})
        return
    clean = {x: y.detach().double().clone() for x, y in t.items()}
    clean[name][(~real)[:, None, :, None].expand_as(clean[name])] = 0.0
    want = ref_linear(c, kw, tensors=(clean["q"], clean["k"], clean["v"]))
    C.expect_valid(
        label,
        call_,
        want,
        compare=well_conditioned(want, c.dtype),
        dtype=c.dtype,
        shape=(B, Hq, Nq, Dv),
        memory_ok=kw["mode"] == "parallel",
        naive=lambda: ref_linear(c, kw, tensors=tuple(clean[x].to(c.dtype) for x in "qkv"), dtype=torch.float32),
    )


@given(linear_calls(), st.data())
@fuzz_settings(250)
@C.counted
def test_linear_attention_bad_arguments(call, data):
    c, kw = call
    B, Hq, Hkv, Nq, Nk, D, Dv = c.dims
    what = data.draw(
        st.sampled_from(
            [
                "chunk_size",
                "mode",
                "normalize",
                "feature_map",
                "decay",
                "decay_noncausal",
                "causal_lengths",
                "kpm",
                "initial_state",
                "scale",
                "tensor",
            ]
        )
    )
    q, k, v = c.q, c.k, c.v
    if what == "chunk_size":
        kw["chunk_size"] = data.draw(
            st.sampled_from([x for x in (*EDGE_INTS, *NOT_INTS) if not (type(x) is int and x >= 1)])
        )
    elif what == "mode":
        kw["mode"] = data.draw(st.sampled_from(["fast", "", None, 1, "Chunk"]))
    elif what == "normalize":
        kw["normalize"] = data.draw(st.sampled_from(["l2", 1, 0, None, "sum", 1.0]))
    elif what == "feature_map":
        kw["feature_map"] = data.draw(st.sampled_from(["softmax", None, 3, torch.relu, ak.linear.ReLU]))
    elif what == "decay":
        kw["causal"] = True
        if Nq != Nk or c.q.shape[2] != Nk:
            q = torch.randn(B, Hq, Nk, D).to(c.dtype)
        kw["decay"] = data.draw(
            st.sampled_from(
                [
                    0.0,
                    1.5,
                    -0.1,
                    math.nan,
                    math.inf,
                    "x",
                    torch.ones(Hq + 1),
                    torch.zeros(Hq),
                    [0.5] * (Hq + 1),
                    torch.ones(Hq, 1) * 0.5,
                ]
            )
        )
    elif what == "decay_noncausal":
        kw["causal"] = False
        kw["decay"] = 0.5
    elif what == "causal_lengths":
        kw["causal"] = True
        kw["decay"] = None
        q = torch.randn(B, Hq, Nk + data.draw(st.sampled_from([1, -1] if Nk > 1 else [1])), D).to(c.dtype)
    elif what == "kpm":
        kw["key_padding_mask"] = data.draw(
            st.sampled_from(
                [torch.ones(B, Nk), torch.ones(B, Nk + 1, dtype=torch.bool), torch.ones(Nk, dtype=torch.bool), "x"]
            )
        )
    elif what == "initial_state":
        kw["initial_state"] = data.draw(st.sampled_from(["state", 3, torch.zeros(B, Hq, 4, Dv + 1)]))
        if kw["causal"] is False:
            kw["causal"] = True
            kw["decay"] = None
            q, k, v = (torch.randn(B, h, Nk, d).to(c.dtype) for h, d in ((Hq, D), (Hkv, D), (Hkv, Dv)))
    elif what == "scale":
        kw["scale"] = data.draw(st.sampled_from([0.0, -1.0, math.nan, math.inf, "1", True]))
    else:
        slot = data.draw(st.sampled_from(["q", "k", "v"]))
        bad = data.draw(
            st.sampled_from(
                [
                    None,
                    [1.0],
                    "t",
                    torch.ones(2, 2),
                    torch.ones(B, Hq, Nk, D, dtype=torch.int32),
                    torch.ones(B, Hq, 0, D),
                ]
            )
        )
        q, k, v = (bad if s == slot else x for s, x in zip("qkv", (q, k, v), strict=True))
    C.expect_invalid(f"{what}: " + _label(c, kw), lambda: linear_attention(q, k, v, **kw))
