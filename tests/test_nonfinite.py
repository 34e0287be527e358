"""The one non-finite rule (issue 16): NaN or inf in q, or in k or v at a key that is not padding, raises
NonFiniteError naming the tensor and the first bad index, on every entry point and backend; a padded key's
contents never matter."""

import pytest
import torch

import attnkit as ak
from attnkit import patterns as P
from attnkit.linear import linear_attention
from attnkit.sparse import BlockTopK

from .helpers import rand_qkv

BACKENDS = ["auto", "sdpa", "tiled", "reference"]
PADDED_FROM = 40  # keys 40.. are padding


def _inputs(where, value):
    q, k, v = rand_qkv(1, 2, 1, 48, 48, 8)
    kpm = torch.ones(1, 48, dtype=torch.bool)
    kpm[:, PADDED_FROM:] = False
    t = {"q": q, "k": k, "v": v}[where]
    t[0, 0, 13, 5] = value
    return q, k, v, kpm


def _attention_calls():
    yield (
        "attention",
        lambda q, k, v, kpm, b: ak.attention(q, k, v, pattern=P.SlidingWindow(7, 0), key_padding_mask=kpm, backend=b),
    )
    yield "dense", lambda q, k, v, kpm, b: ak.attention(q, k, v, key_padding_mask=kpm, backend=b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["q", "k", "v"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_attention_names_tensor_and_index(backend, where, value):
    q, k, v, kpm = _inputs(where, value)
    for _, call in _attention_calls():
        with pytest.raises(ak.NonFiniteError, match=rf"^{where}: expected finite values.*at index \(0, 0, 13, 5\)"):
            call(q, k, v, kpm, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["k", "v"])
def test_padded_keys_never_matter(backend, where):
    q, k, v, kpm = _inputs(where, 0.0)
    clean = ak.attention(q, k, v, pattern=P.SlidingWindow(60, 0), key_padding_mask=kpm, backend="reference")
    t = k if where == "k" else v
    t[0, 0, PADDED_FROM + 2, :] = float("nan")
    t[0, 0, -1, 0] = float("inf")
    out = ak.attention(q, k, v, pattern=P.SlidingWindow(60, 0), key_padding_mask=kpm, backend=backend)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, clean.float(), atol=1e-5, rtol=1e-5)


def test_flex_backend_follows_the_rule():
    pytest.importorskip("torch.nn.attention.flex_attention")
    q, k, v, kpm = _inputs("q", float("nan"))
    with pytest.raises(ak.NonFiniteError, match=r"^q: "):
        ak.attention(q, k, v, pattern=P.SlidingWindow(7, 0), backend="flex")


def test_sparse_attention_and_tiled_attention():
    q, k, v, kpm = _inputs("k", float("nan"))
    with pytest.raises(ak.NonFiniteError, match=r"^k: .*at index \(0, 0, 13, 5\)"):
        ak.sparse_attention(q, k, v, BlockTopK(block_size=16, budget=2))
    layout = P.SlidingWindow(7, 0).block_layout(48, 48, 16, 16, 0, 2)
    with pytest.raises(ak.NonFiniteError, match=r"^k: "):
        ak.tiled_attention(q, k, v, layout)


@pytest.mark.parametrize("mode", ["parallel", "chunk", "recurrent"])
def test_linear_attention(mode):
    q, k, v, kpm = _inputs("v", float("nan"))
    with pytest.raises(ak.NonFiniteError, match=r"^v: .*at index \(0, 0, 13, 5\)"):
        linear_attention(q, k, v, mode=mode)
    # the same NaN moved to a padded key: no error, the padded-free result
    v[0, 0, 13, 5] = 0.0
    want = linear_attention(q, k, v, mode=mode, key_padding_mask=kpm)
    v[0, 0, PADDED_FROM + 1] = float("nan")
    torch.testing.assert_close(linear_attention(q, k, v, mode=mode, key_padding_mask=kpm), want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_nan_found_and_large_finite_values_pass(dtype):
    q, k, v = rand_qkv(1, 2, 2, 32, 32, 8, dtype=dtype)
    # values whose sum overflows fp16 but which are finite: the exact check lets them through
    v.fill_(60000.0 if dtype == torch.float16 else 1e38)
    out = ak.attention(q, k, v, pattern=P.SlidingWindow(7, 0), backend="reference")
    assert torch.isfinite(out).all()
    q[0, 1, 2, 3] = float("nan")
    with pytest.raises(ak.NonFiniteError, match=r"^q: .*\(0, 1, 2, 3\)"):
        ak.attention(q, k, v, pattern=P.SlidingWindow(7, 0), backend="tiled")


def test_overflow_from_finite_inputs_is_named():
    q, k, v = rand_qkv(1, 1, 1, 16, 16, 8)
    q.mul_(1e20), k.mul_(1e20)  # finite inputs, logits beyond float32
    with pytest.raises(ak.NonFiniteError, match=r"^q, k, v: .*overflow"):
        ak.attention(q, k, v, backend="sdpa")


def test_non_finite_error_is_a_value_error():
    assert issubclass(ak.NonFiniteError, ValueError)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_a_minus_inf_key_is_not_read_as_masked(dtype):
    """k = -inf with positive q gives a logit of -inf, which a kernel would read as a masked pair (found by the
    deep fuzz run on the native forward)."""
    q = torch.rand(1, 2, 12, 1) + 0.1
    k, v = torch.rand(1, 1, 17, 1), torch.randn(1, 1, 17, 5)
    k[0, 0, 7, 0] = float("-inf")
    with pytest.raises(ak.NonFiniteError, match=r"^k: .*\(0, 0, 7, 0\)"):
        ak.attention(q.to(dtype), k.to(dtype), v.to(dtype), pattern=P.SlidingWindow(10, 0), backend="tiled")


def test_a_value_no_query_reaches_never_changes_the_answer():
    q, k, v = rand_qkv(1, 1, 1, 32, 64, 8)
    clean = ak.attention(q, k, v, pattern=P.SlidingWindow(4, 0), q_offset=32, backend="reference")
    k[0, 0, 3] = float("nan")  # key 3: outside every window of queries 32..63
    for backend in BACKENDS:
        try:
            out = ak.attention(q, k, v, pattern=P.SlidingWindow(4, 0), q_offset=32, backend=backend)
        except ak.NonFiniteError as e:  # kernels that read every key may refuse it, by name
            assert str(e).startswith("k: ")
        else:
            torch.testing.assert_close(out, clean.float(), atol=1e-5, rtol=1e-5)
