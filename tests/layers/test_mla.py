"""MultiheadLatentAttention (DeepSeek-V2 MLA): the 2x-naive rule, naive == absorb, cached decode, cache bytes."""

import pytest
import torch

from attnkit.errors import ShapeError
from attnkit.layers.mla import LatentCache, MultiheadLatentAttention
from attnkit.records import all_records
from tests.helpers import check_decode, check_layer_against_oracle, err

KW = dict(kv_lora_rank=24, qk_nope_dim=8, qk_rope_dim=6, v_dim=10)


def make(mode="naive", seed=0, dtype=torch.float32, **kw):
    torch.manual_seed(seed)
    opts = {**KW, **kw}
    return MultiheadLatentAttention(48, 4, mode=mode, **opts).to(dtype)


def randx(B=2, N=13, seed=1, dtype=torch.float32):
    return torch.randn(B, N, 48, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("mode", ["naive", "absorb"])
@pytest.mark.parametrize("q_lora_rank", [None, 12])
def test_against_oracle_fp32(mode, q_lora_rank):
    layer = make(mode, q_lora_rank=q_lora_rank)
    check_layer_against_oracle(layer, randx(), label=f"mla {mode} q_lora={q_lora_rank}")


@pytest.mark.parametrize("mode", ["naive", "absorb"])
def test_against_oracle_padding_and_positions(mode):
    layer = make(mode, seed=3)
    x = randx(seed=4)
    kpm = torch.ones(2, 13, dtype=torch.bool)
    kpm[0, :3] = False  # left padding: the first queries of row 0 see no key and give 0
    pos = torch.stack([torch.arange(13) - 3, torch.arange(13)]).clamp(min=0)
    out = check_layer_against_oracle(layer, x, key_padding_mask=kpm, positions=pos, label=f"mla {mode} padding")
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("mode", ["naive", "absorb"])
def test_against_oracle_bf16(mode):
    layer = make(mode, seed=5, dtype=torch.bfloat16)
    check_layer_against_oracle(layer, randx(seed=6, dtype=torch.bfloat16), label=f"mla {mode} bf16")


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("q_lora_rank", [None, 12])
def test_naive_equals_absorb_fp64(causal, q_lora_rank):
    layer = make("naive", seed=7, dtype=torch.float64, q_lora_rank=q_lora_rank, causal=causal)
    x = randx(seed=8, dtype=torch.float64)
    kpm = torch.rand(2, 13, generator=torch.Generator().manual_seed(9)) > 0.3
    for kw in ({}, {"key_padding_mask": kpm}):
        layer.mode = "naive"
        a = layer(x, **kw)
        layer.mode = "absorb"
        b = layer(x, **kw)
        assert err(a, b) <= 1e-10 * max(a.abs().max().item(), 1.0)


def test_absorb_backward_matches_naive():
    layer = make("naive", seed=10, dtype=torch.float64)
    x = randx(seed=11, dtype=torch.float64)
    grads = []
    for mode in ("naive", "absorb"):
        layer.mode = mode
        layer.zero_grad()
        xs = x.clone().requires_grad_(True)
        layer(xs).square().sum().backward()
        grads.append((xs.grad.clone(), layer.kv_b_proj.weight.grad.clone()))
    for a, b in zip(grads[0], grads[1], strict=True):
        assert err(a, b) <= 1e-10 * max(a.abs().max().item(), 1.0)


@pytest.mark.parametrize("mode", ["naive", "absorb"])
@pytest.mark.parametrize("kv_norm", [True, False])
def test_decode_equals_forward(mode, kv_norm):
    layer = make(mode, seed=12, kv_norm=kv_norm, q_lora_rank=12)
    check_decode(layer, randx(B=2, N=17, seed=13), prefill=5, rtol=1e-6)
    check_decode(layer, randx(B=2, N=9, seed=16), prefill=1, rtol=1e-6)  # fewer cached keys than heads at first


def test_decode_with_padding_equals_forward():
    layer = make("absorb", seed=14)
    x = randx(B=2, N=11, seed=15)
    kpm = torch.ones(2, 11, dtype=torch.bool)
    kpm[1, :4] = False
    with torch.no_grad():
        full = layer(x, key_padding_mask=kpm)
        cache = layer.make_cache(2, 11)
        outs = [layer(x[:, :6], cache=cache, key_padding_mask=kpm[:, :6])]
        outs += [layer(x[:, i : i + 1], cache=cache, key_padding_mask=kpm[:, i : i + 1]) for i in range(6, 11)]
    got = torch.cat(outs, 1)
    assert err(got[kpm], full[kpm]) <= 1e-6 * full.abs().max().item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cache_holds_exactly_latent_plus_rope_per_token(dtype):
    layer = make("absorb", dtype=dtype)
    B, L = 3, 40
    cache = layer.make_cache(B, L)
    assert isinstance(cache, LatentCache)
    es = torch.empty((), dtype=dtype).element_size()
    per_token = (KW["kv_lora_rank"] + KW["qk_rope_dim"]) * es
    assert cache.bytes_per_token == per_token
    counted = sum(t.numel() * t.element_size() for t in cache.tensors())
    assert counted == cache.nbytes == B * L * per_token
    with torch.no_grad():
        layer(randx(B=B, N=7, dtype=dtype), cache=cache)
    assert cache.length == 7 and cache.nbytes == B * L * per_token  # preallocated: no growth


def test_cache_overflow_and_reset():
    layer = make()
    cache = layer.make_cache(1, 4)
    with torch.no_grad():
        layer(randx(B=1, N=3), cache=cache)
        with pytest.raises(ShapeError, match="x"):
            layer(randx(B=1, N=2), cache=cache)
    cache.reset()
    assert cache.length == 0


@pytest.mark.parametrize(
    "kw, name",
    [
        ({"kv_lora_rank": 0}, "kv_lora_rank"),
        ({"qk_rope_dim": 5}, "qk_rope_dim"),
        ({"qk_nope_dim": -1}, "qk_nope_dim"),
        ({"v_dim": 0}, "v_dim"),
        ({"q_lora_rank": 0}, "q_lora_rank"),
        ({"mode": "fast"}, "mode"),
        ({"rope_base": 0.5}, "rope_base"),
        ({"qk_nope_dim": 0, "qk_rope_dim": 0}, "qk_nope_dim"),
    ],
)
def test_bad_arguments_name_the_argument(kw, name):
    with pytest.raises(ShapeError, match=name):
        MultiheadLatentAttention(48, 4, **{**KW, **kw})


def test_bad_inputs_name_the_argument():
    layer = make()
    with pytest.raises(ShapeError, match="x"):
        layer(torch.randn(2, 5, 47))
    with pytest.raises(ShapeError, match="key_padding_mask"):
        layer(randx(N=5), key_padding_mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ShapeError, match="positions"):
        layer(randx(N=5), positions=torch.arange(4))
    with pytest.raises(ShapeError, match="cache"):
        layer(randx(N=5), cache=make(kv_lora_rank=8).make_cache(2, 8))


def test_records_make_working_layers():
    recs = all_records()
    for name, mode in (("mla", "naive"), ("mla_absorb", "absorb")):
        rec = recs[name]
        assert rec.family == "D" and rec.kind == "layer" and rec.exact
        layer = rec.make(32, dim=32, heads=2)
        assert layer.mode == mode
        x = torch.randn(1, 32, 32)
        assert layer(x).shape == x.shape
        check_decode(layer, x, prefill=20)


# -- TPLA (single-device simulation) ----------------------------------------------------------------------------

from attnkit.layers.tpla import TensorParallelLatentAttention, hadamard  # noqa: E402


def _mla_with_gain(seed, dtype=torch.float64, r=16):
    layer = make("naive", seed=seed, dtype=dtype, kv_lora_rank=r)
    with torch.no_grad():
        layer.kv_a_layernorm.weight.uniform_(0.5, 1.5)
    return layer


def test_hadamard_is_orthogonal():
    h = hadamard(16)
    assert err(h @ h.T, torch.eye(16, dtype=h.dtype)) <= 1e-12
    with pytest.raises(ShapeError, match="kv_lora_rank"):
        hadamard(12)


@pytest.mark.parametrize("transform", ["hadamard", "none"])
def test_tpla_one_shard_is_mla(transform):
    mla = _mla_with_gain(20)
    tpla = TensorParallelLatentAttention.from_mla(mla, shards=1, transform=transform)
    x = randx(seed=21, dtype=torch.float64)
    a, b = mla(x), tpla(x)
    assert err(a, b) <= 1e-10 * a.abs().max().item()


def test_tpla_transform_alone_changes_nothing():
    # the folded Hadamard rotation is an exact reparametrisation of MLA: run the rotated weights as plain MLA
    mla = _mla_with_gain(22)
    tpla = TensorParallelLatentAttention.from_mla(mla, shards=4)
    plain = make("naive", seed=0, dtype=torch.float64, kv_lora_rank=16)
    plain.load_state_dict(tpla.state_dict())
    x = randx(seed=23, dtype=torch.float64)
    assert err(plain(x), mla(x)) <= 1e-10 * mla(x).abs().max().item()


@pytest.mark.parametrize("shards", [2, 4])
def test_tpla_against_oracle_and_decode(shards):
    tpla = TensorParallelLatentAttention.from_mla(_mla_with_gain(24, torch.float32), shards=shards)
    x = randx(seed=25)
    kpm = torch.ones(2, 13, dtype=torch.bool)
    kpm[1, :2] = False
    check_layer_against_oracle(tpla, x, label=f"tpla S={shards}")
    check_layer_against_oracle(tpla, x, key_padding_mask=kpm, label=f"tpla S={shards} padding")
    check_decode(tpla, x, prefill=4)
    assert tpla.shard_bytes_per_token == (16 // shards + KW["qk_rope_dim"]) * 4


def test_tpla_hadamard_reduces_cross_shard_error_on_an_uneven_latent():
    # A latent whose energy sits in a few channels (as a trained one's does): without the rotation each shard's
    # RMS norm and partial logits are far from the global ones; the Hadamard spreads it and the error falls.
    mla = _mla_with_gain(26, r=32)
    with torch.no_grad():
        scale = torch.ones(32, dtype=torch.float64)
        scale[:4] = 8.0
        mla.kv_a_proj_with_mqa.weight[:32] *= scale[:, None]
    x = randx(seed=27, dtype=torch.float64)
    ref = mla(x)
    errs = {
        t: err(TensorParallelLatentAttention.from_mla(mla, shards=4, transform=t)(x), ref) for t in ("none", "hadamard")
    }
    assert errs["hadamard"] < errs["none"], errs


def test_tpla_bad_shards_and_record():
    with pytest.raises(ShapeError, match="shards"):
        TensorParallelLatentAttention(48, 4, shards=5, **KW)
    with pytest.raises(ShapeError, match="transform"):
        TensorParallelLatentAttention.from_mla(make(), transform="pca")
    rec = all_records()["tpla"]
    assert rec.family == "D" and not rec.exact
    layer = rec.make(16, dim=32, heads=2)
    assert layer(torch.randn(1, 16, 32)).shape == (1, 16, 32)


def test_auto_mode_absorbs_for_decode_and_expands_for_prefill():
    torch.manual_seed(21)
    layer = MultiheadLatentAttention(
        64, 4, kv_lora_rank=32, qk_nope_dim=16, qk_rope_dim=8, v_dim=16, mode="auto"
    ).double()
    assert layer.absorbs(1, 4096) and not layer.absorbs(4096, 4096)
    x = torch.randn(2, 30, 64, dtype=torch.float64)
    full = layer(x)
    layer.mode = "naive"
    assert (layer(x) - full).abs().max() < 1e-12  # prefill: the naive form
    layer.mode = "auto"
    check_decode(layer, x, prefill=10)  # decode steps take the absorbed form, equal to the forward
