"""attnkit.layers.Attention for every registered mechanism: the float64 oracle, cached decode, GQA caching,
cross attention, padding and bad input."""

from __future__ import annotations

import math

import pytest
import torch

import attnkit as ak
from attnkit.errors import ShapeError, UnsupportedError
from attnkit.layers import Attention, HeadKVCache, KVCache, StateCache
from attnkit.layers.attention import resolve
from tests.helpers import _floor, check_decode, check_layer_against_oracle, err

MECHANISMS = [r for r in ak.registry.records() if r.kind in ("pattern", "selector", "function")]
# A pattern that decodes but is not causal itself (a symmetric window, global tokens) decodes in a causal layer,
# which intersects it with the causal mask.
DECODE = [r for r in MECHANISMS if "decode" in r.supports]


def _layer(rec, n=64, causal=None, **kw):
    """An Attention layer for ``rec`` and a sequence length it accepts (a spatial pattern's grid size)."""
    causal = "causal" in rec.supports if causal is None else causal
    torch.manual_seed(0)
    layer = Attention(32, 4, kv_heads=2, mechanism=rec.name, rope=True, max_seq_len=n, causal=causal, **kw)
    shape = getattr(layer.mechanism, "shape", None) or getattr(layer.mechanism, "grid", None)
    if isinstance(shape, tuple) and rec.kind == "pattern":
        n = math.prod(shape)
    return layer, n


@pytest.mark.parametrize("rec", MECHANISMS, ids=lambda r: r.name)
def test_layer_matches_the_oracle(rec):
    layer, n = _layer(rec, qk_norm=True)
    layer.eval()  # k-means routing updates its centroids on every call in training mode
    x = torch.randn(2, n, 32, generator=torch.Generator().manual_seed(1))
    check_layer_against_oracle(layer, x, label=rec.name)


@pytest.mark.parametrize("rec", DECODE, ids=lambda r: r.name)
def test_cached_decode_equals_the_uncached_forward(rec):
    layer, n = _layer(rec, n=48, causal=True)
    x = torch.randn(2, n, 32, generator=torch.Generator().manual_seed(2))
    cache = check_decode(layer, x, prefill=17)
    assert isinstance(cache, StateCache if rec.kind == "function" else KVCache)
    assert layer.decodes_exactly


@pytest.mark.parametrize("rec", DECODE, ids=lambda r: r.name)
def test_cached_decode_in_bf16_by_the_2x_naive_rule(rec):
    layer, n = _layer(rec, n=40, causal=True)
    x = torch.randn(1, n, 32, generator=torch.Generator().manual_seed(3))
    ref = layer.reference(x.double())
    naive = layer.reference(x.bfloat16(), dtype=torch.bfloat16)
    layer = layer.bfloat16()
    xb = x.bfloat16()
    with torch.no_grad():
        cache = layer.make_cache(1, n)
        outs = [layer(xb[:, :9], cache=cache)]
        outs += [layer(xb[:, i : i + 1], cache=cache) for i in range(9, n)]
        got = torch.cat(outs, 1)
    assert cache.length == n
    e, en = err(got, ref), err(naive, ref)
    # The layer's projections run in bf16 too; the naive run rounds the same products, so the rule holds.
    assert e <= 2 * en + _floor(torch.bfloat16, ref), f"{rec.name}: {e:.3e} > 2 x {en:.3e}"


@pytest.mark.parametrize("name", [r.name for r in MECHANISMS if r.kind == "selector" and "causal" in r.supports])
def test_a_selector_decodes_over_its_cache(name):
    """A selector chooses per call, so its decode is not the uncached forward; each step must be exactly the
    api's answer for the cached keys."""
    layer = Attention(32, 4, kv_heads=2, mechanism=name, rope=True, max_seq_len=256)
    assert not layer.decodes_exactly
    x = torch.randn(1, 200, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        cache = layer.make_cache(1, 200)
        layer(x[:, :199], cache=cache)
        step = layer(x[:, 199:], cache=cache)
        q, _, _ = layer.project(x[:, 199:], positions=torch.tensor([199]))
        k, v = cache.k[:, :, :200], cache.v[:, :, :200]
        o = ak.attention(q, k, v, pattern=layer.mechanism, causal=True)
        want = layer.o_proj(o.transpose(1, 2).reshape(1, 1, -1))
    assert err(step, want) <= 1e-6 * want.abs().max().item()


def test_gqa_cache_holds_kv_heads_only():
    layer = Attention(64, 8, kv_heads=2)
    cache = layer.make_cache(3, 100)
    assert cache.k.shape == (3, 2, 100, 8) and cache.v.shape == (3, 2, 100, 8)
    assert cache.bytes_per_token == 2 * 2 * 8 * 4  # k and v, 2 heads x 8 channels, fp32
    assert cache.nbytes == 3 * 100 * cache.bytes_per_token
    mha = Attention(64, 8).make_cache(3, 100)
    assert mha.bytes_per_token == 4 * cache.bytes_per_token
    assert isinstance(Attention(64, 8, mechanism="retnet").make_cache(1, 10), StateCache)


def test_decode_with_padding_and_a_batch():
    """Left-padded prompts: padded keys are remembered by the cache and never attended to."""
    torch.manual_seed(5)
    layer = Attention(32, 4, kv_heads=2, rope=True)
    x = torch.randn(2, 30, 32)
    mask = torch.ones(2, 30, dtype=torch.bool)
    mask[1, :6] = False  # row 1 starts with 6 pad tokens
    full = layer(x, key_padding_mask=mask)
    cache = layer.make_cache(2, 30)
    with torch.no_grad():
        outs = [layer(x[:, :10], key_padding_mask=mask[:, :10], cache=cache)]
        outs += [layer(x[:, i : i + 1], cache=cache) for i in range(10, 30)]
    got = torch.cat(outs, 1)
    assert err(got[:, 6:], full[:, 6:]) <= 1e-6 * full.abs().max().item()
    # Padding is really ignored: the padded row's real tokens equal an unpadded run on those tokens alone,
    # with positions shifted as a left-padded decoder passes them.
    alone = layer(x[1:, 6:], positions=torch.arange(6, 30))
    assert err(full[1:, 6:], alone) <= 1e-6 * alone.abs().max().item()


def test_cross_attention_and_its_oracle():
    torch.manual_seed(6)
    layer = Attention(32, 4, kv_heads=2, causal=False, context_dim=24, rope=True)
    x, ctx = torch.randn(2, 20, 32), torch.randn(2, 33, 24)
    mask = torch.rand(2, 33) > 0.3
    mask[:, 0] = True
    out = layer(x, context=ctx, key_padding_mask=mask)
    ref = layer.reference(x.double(), context=ctx.double(), key_padding_mask=mask)
    assert err(out, ref) <= 1e-5 * ref.abs().max().item()
    with pytest.raises(UnsupportedError, match="cache"):
        layer(x, context=ctx, cache=KVCache(2, 2, 10, 8))


def test_per_head_cache_after_eviction_matches_the_oracle_over_kept_keys():
    torch.manual_seed(7)
    layer = Attention(32, 4, kv_heads=2, rope=True)
    x = torch.randn(1, 25, 32)
    cache = layer.make_cache(1, 30, per_head=True)
    assert isinstance(cache, HeadKVCache)
    with torch.no_grad():
        layer(x[:, :24], cache=cache)
        keep = torch.rand(1, 2, 24, generator=torch.Generator().manual_seed(8)) > 0.5
        keep[..., 0] = True
        cache.evict(keep)
        assert cache.lengths.tolist() == [keep.sum(-1)[0].tolist()]
        out = layer(x[:, 24:], cache=cache)
        # The oracle: the new query against each head's kept keys plus its own.
        q, k, v = layer.project(x, positions=torch.arange(25))
        vis = torch.cat([keep, torch.ones(1, 2, 1, dtype=torch.bool)], -1)  # (1, Hkv, 25)
        mask = vis.repeat_interleave(2, 1)[:, :, None, :]  # per query head
        o = ak.reference.attention(q[:, :, 24:].double(), k.double(), v.double(), mask=mask)
        want = layer.o_proj(o.float().transpose(1, 2).reshape(1, 1, -1))
    assert err(out, want) <= 1e-5 * want.abs().max().item()
    with pytest.raises(UnsupportedError, match="one token at a time"):
        layer(x[:, :2], cache=cache)


def test_a_cache_that_is_full_says_so():
    layer = Attention(16, 2)
    cache = layer.make_cache(1, 4)
    layer(torch.randn(1, 3, 16), cache=cache)
    with pytest.raises(ShapeError, match="max_len=4"):
        layer(torch.randn(1, 2, 16), cache=cache)


def test_a_mechanism_without_decode_refuses_a_cache():
    layer = Attention(32, 4, mechanism="flowformer_causal")
    with pytest.raises(UnsupportedError, match="decode cache"):
        layer.make_cache(1, 8)
    with pytest.raises(UnsupportedError, match="decode cache"):
        Attention(32, 4, causal=False).make_cache(1, 8)


def test_a_learnable_feature_map_is_a_parameter_of_the_layer():
    layer = Attention(32, 4, mechanism="hedgehog")
    names = [n for n, _ in layer.named_parameters()]
    assert any(n.startswith("mechanism_parts.feature_map") for n in names)
    layer(torch.randn(1, 8, 32)).sum().backward()
    assert layer.mechanism_parts["feature_map"].weight.grad is not None


@pytest.mark.parametrize(
    ("kwargs", "arg"),
    [
        ({"heads": 3, "kv_heads": 2}, "kv_heads"),
        ({"heads": 3}, "head_dim"),
        ({"heads": 4, "mechanism": "no_such_thing"}, "mechanism"),
        ({"heads": 4, "mechanism": 3}, "mechanism"),
        ({"heads": 4, "mechanism": "linear_elu_bidirectional"}, "causal"),
        ({"heads": 4, "dropout": 1.5}, "dropout"),
        ({"heads": 4, "rope": "yes"}, "rope"),
        ({"heads": 0}, "heads"),
        ({"heads": 4, "mechanism": "retnet", "score": ak.scores.Softcap(20.0)}, "score"),
    ],
)
def test_bad_arguments_name_themselves(kwargs, arg):
    heads = kwargs.pop("heads")
    with pytest.raises((ShapeError, ValueError), match=arg):
        Attention(32, heads, **kwargs)


def test_bad_input_names_itself():
    layer = Attention(32, 4)
    with pytest.raises(ShapeError, match="x"):
        layer(torch.randn(2, 5, 31))
    with pytest.raises(ShapeError, match="positions"):
        Attention(32, 4, rope=True)(torch.randn(1, 5, 32), positions=torch.arange(4))
    with pytest.raises(ak.NonFiniteError):
        layer(torch.full((1, 4, 32), float("nan")))


def test_resolve_makes_a_selector_with_the_layer_head_sizes():
    sel = resolve("moba", heads=6, kv_heads=2, head_dim=16, n=512)
    assert isinstance(sel, ak.sparse.Selector)
    assert resolve(None, heads=1, kv_heads=1, head_dim=1) is None


@pytest.mark.parametrize("score", [ak.scores.Softcap(5.0), ak.scores.Sigmoid(-3.0)], ids=["softcap", "sigmoid"])
def test_a_score_or_normaliser_on_the_layer_matches_the_oracle_and_decodes(score):
    torch.manual_seed(9)
    layer = Attention(32, 4, kv_heads=2, score=score, rope=True)
    x = torch.randn(2, 24, 32)
    check_layer_against_oracle(layer, x, label=repr(score))
    check_decode(layer, x, prefill=5)
