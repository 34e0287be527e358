"""Differential attention (Diff Transformer): the 2x-naive rule against its float64 oracle, decode, lambda and
its schedule, the lambda = 0 identity, a sliding window on both maps, and named errors."""

import math

import pytest
import torch

from attnkit import registry
from attnkit.errors import ShapeError
from attnkit.layers.differential import DifferentialAttention, lambda_init_fn
from attnkit.patterns import SlidingWindow
from attnkit.reference.differential import differential_attention
from tests.helpers import check_decode, check_layer_against_oracle


def _x(B=2, N=13, dim=64, seed=0, dtype=torch.float32):
    return torch.randn(B, N, dim, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _padding(B, N, seed=0):
    g = torch.Generator().manual_seed(seed)
    kpm = torch.rand(B, N, generator=g) > 0.25
    kpm[:, 0] = True
    return kpm


CASES = {
    "dense": {},
    "gqa_rope": {"kv_heads": 2, "rope": True},
    "mqa_bias_depth3": {"kv_heads": 1, "bias": True, "layer_idx": 3},
    "window_rope": {"mechanism": SlidingWindow(left=4, right=0), "rope": True},
    "no_norm": {"norm": False},
    "bidirectional": {"causal": False},
}


@pytest.mark.parametrize("name", CASES)
def test_fp32_with_grads_is_within_twice_the_naive_error(name):
    torch.manual_seed(1)
    layer = DifferentialAttention(64, 4, **CASES[name])
    x = _x(seed=2)
    check_layer_against_oracle(layer, x, label=name)
    check_layer_against_oracle(layer, x, label=f"{name}+padding", key_padding_mask=_padding(2, 13))


@pytest.mark.parametrize("name", ["dense", "gqa_rope", "window_rope"])
def test_bf16_is_within_twice_the_naive_error(name):
    torch.manual_seed(3)
    layer = DifferentialAttention(64, 4, **CASES[name]).to(torch.bfloat16)
    check_layer_against_oracle(layer, _x(seed=4, dtype=torch.bfloat16), label=name, grads=True)


@pytest.mark.parametrize("name", ["dense", "gqa_rope", "window_rope", "mqa_bias_depth3"])
def test_cached_decode_equals_the_uncached_forward(name):
    torch.manual_seed(5)
    layer = DifferentialAttention(64, 4, **CASES[name])
    cache = check_decode(layer, _x(B=2, N=17, seed=6), prefill=6, rtol=1e-6)
    # keys and values stored once: [K1, K2] (2d) and V (2d) per kv head and token
    kv = layer.kv_heads
    assert cache.bytes_per_token == kv * (2 * layer.head_dim + 2 * layer.head_dim) * 4
    assert cache.length == 17


def test_decode_with_padded_prompt_equals_the_padded_forward():
    torch.manual_seed(7)
    layer = DifferentialAttention(64, 4, kv_heads=2, rope=True)
    x = _x(B=2, N=10, seed=8)
    kpm = torch.ones(2, 10, dtype=torch.bool)
    kpm[1, :3] = False  # left padding
    with torch.no_grad():
        full = layer(x, key_padding_mask=kpm)
        cache = layer.make_cache(2, 10)
        outs = [layer(x[:, :4], key_padding_mask=kpm[:, :4], cache=cache)]
        outs += [layer(x[:, i : i + 1], key_padding_mask=kpm[:, i : i + 1], cache=cache) for i in range(4, 10)]
    got = torch.cat(outs, 1)
    assert (got - full)[kpm].abs().max() <= 1e-6 * full.abs().max()


def test_lambda_equals_its_formula_and_the_schedule_is_zero_based():
    torch.manual_seed(9)
    for idx in (0, 1, 5, 11):
        layer = DifferentialAttention(32, 2, layer_idx=idx)
        init = 0.8 - 0.6 * math.exp(-0.3 * idx)
        assert layer.lambda_init == pytest.approx(init, abs=1e-15) == lambda_init_fn(idx)
        p = {n: getattr(layer, f"lambda_{n}").detach().double() for n in ("q1", "k1", "q2", "k2")}
        want = math.exp((p["q1"] * p["k1"]).sum()) - math.exp((p["q2"] * p["k2"]).sum()) + init
        assert layer.lambda_full(torch.float64).item() == pytest.approx(want, rel=1e-12)
    assert lambda_init_fn(0) == pytest.approx(0.2)  # the paper's l = 1
    assert DifferentialAttention(32, 2, lambda_init=0.5).lambda_init == 0.5


def test_lambda_zero_without_norm_is_plain_attention_of_the_first_half():
    torch.manual_seed(10)
    layer = DifferentialAttention(64, 4, kv_heads=2, lambda_init=0.0, norm=False)
    with torch.no_grad():
        for p in (layer.lambda_q1, layer.lambda_k1, layer.lambda_q2, layer.lambda_k2):
            p.zero_()
    assert layer.lambda_full().item() == 0.0
    x = _x(seed=11)
    B, N, _ = x.shape
    d = layer.head_dim
    # independent: the first half's query/key channels through SDPA, values of 2d channels
    q = (x @ layer.q_proj.weight.T).view(B, N, 4, 2, d)[..., 0, :].transpose(1, 2)
    k = (x @ layer.k_proj.weight.T).view(B, N, 2, 2, d)[..., 0, :].transpose(1, 2).repeat_interleave(2, 1)
    v = (x @ layer.v_proj.weight.T).view(B, N, 2, 2 * d).transpose(1, 2).repeat_interleave(2, 1)
    o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    want = o.transpose(1, 2).reshape(B, N, -1) @ layer.o_proj.weight.T
    with torch.no_grad():
        got = layer(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_sliding_window_on_both_maps_equals_the_oracle_with_the_mask():
    torch.manual_seed(12)
    win = SlidingWindow(left=3, right=0)
    layer = DifferentialAttention(64, 4, mechanism=win, rope=True)
    x = _x(N=20, seed=13)
    N = x.shape[1]
    i, j = torch.arange(N)[:, None], torch.arange(N)[None, :]
    mask = (j <= i) & (j >= i - 3)  # built here, not by the pattern
    r = layer.rotary.angles(torch.arange(N), torch.float64)
    kw = {n: getattr(layer, f"lambda_{n}") for n in ("q1", "k1", "q2", "k2")}
    ref = differential_attention(
        x,
        wq=layer.q_proj.weight,
        wk=layer.k_proj.weight,
        wv=layer.v_proj.weight,
        wo=layer.o_proj.weight,
        heads=4,
        kv_heads=4,
        head_dim=layer.head_dim,
        **{f"lambda_{n}": t for n, t in kw.items()},
        lambda_init=layer.lambda_init,
        norm_weight=layer.norm.weight,
        rope=r,
        mask=mask,
    )
    with torch.no_grad():
        got = layer(x)
    assert (got.double() - ref).abs().max() <= 1e-5 * ref.abs().max()
    dense = DifferentialAttention(64, 4, rope=True)
    dense.load_state_dict(layer.state_dict())
    with torch.no_grad():
        assert (dense(x) - got).abs().max() > 1e-3  # the window changed something
    # the registry name works too
    named = DifferentialAttention(64, 4, mechanism="sliding_window", max_seq_len=64)
    assert isinstance(named.mechanism, SlidingWindow)


def test_record_is_registered_and_its_factory_makes_a_working_layer():
    rec = registry.get("differential")
    assert rec.family == "D" and rec.kind == "layer" and rec.exact
    assert rec.supports >= {"causal", "decode", "backward", "bf16", "gqa", "padding"}
    layer = rec.make(32, dim=32, heads=2)
    assert isinstance(layer, DifferentialAttention)
    assert layer(_x(B=1, N=8, dim=32)).shape == (1, 8, 32)
    assert rec.make(64, window=8).mechanism is not None


@pytest.mark.parametrize(
    "kwargs, arg",
    [
        ({"dim": 0, "heads": 2}, "dim"),
        ({"dim": 64, "heads": 4, "kv_heads": 3}, "kv_heads"),
        ({"dim": 30, "heads": 4}, "head_dim"),
        ({"dim": 64, "heads": 4, "layer_idx": -1}, "layer_idx"),
        ({"dim": 64, "heads": 4, "lambda_init": float("nan")}, "lambda_init"),
        ({"dim": 64, "heads": 4, "rope": "yes"}, "rope"),
        ({"dim": 64, "heads": 4, "mechanism": "not_a_pattern"}, "mechanism"),
        ({"dim": 64, "heads": 4, "mechanism": 3}, "mechanism"),
    ],
)
def test_bad_constructor_args_raise_shape_errors_naming_them(kwargs, arg):
    dim, heads = kwargs.pop("dim"), kwargs.pop("heads")
    with pytest.raises(ShapeError, match=arg):
        DifferentialAttention(dim, heads, **kwargs)


def test_bad_forward_args_raise_shape_errors_naming_them():
    layer = DifferentialAttention(64, 4)
    with pytest.raises(ShapeError, match="x"):
        layer(torch.randn(2, 5, 32))
    with pytest.raises(ShapeError, match="key_padding_mask"):
        layer(_x(N=5), key_padding_mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ShapeError, match="positions"):
        layer(_x(N=5), positions=torch.arange(5.0))
    with pytest.raises(ShapeError, match="cache"):
        layer(_x(N=5), cache=object())
    cache = layer.make_cache(2, 4)
    with pytest.raises(ShapeError, match="x"):
        layer(_x(N=5), cache=cache)  # more tokens than the cache holds
