"""GQA-to-MLA conversion of the real SmolLM2-135M (attnkit.hf.mla): one converted layer, checked against the
original layer."""

import pytest
import torch

from attnkit.errors import ShapeError
from attnkit.hf.mla import MLASelfAttention, convert_to_mla, latent_caches, mla_layers

LAYER = 5


def _attn_io(model, ids, layer):
    """The input and output of ``layer``'s self-attention in a forward over ``ids``."""
    seen = {}

    def hook(mod, args, kwargs, out):
        seen["x"] = kwargs["hidden_states"].detach().clone()
        seen["y"] = out[0].detach().clone()

    h = model.model.layers[layer].self_attn.register_forward_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model(ids, use_cache=False)
    finally:
        h.remove()
    return seen["x"], seen["y"]


@pytest.mark.parametrize("mode", ["absorb", "naive"])
def test_full_rank_conversion_reproduces_the_layer(smollm2, text_ids, mode):
    model, _ = smollm2
    ids = text_ids[:, :96]
    x, y = _attn_io(model, ids, LAYER)
    # RoPE on every pair (qk_rope_dim = 3 KV heads x 64) and the latent at V's full rank: exact.
    conv = convert_to_mla(model, kv_lora_rank=192, qk_rope_dim=192, layers=[LAYER], method="weights", mode=mode)
    assert isinstance(conv.model.layers[LAYER].self_attn, MLASelfAttention)
    assert not isinstance(model.model.layers[LAYER].self_attn, MLASelfAttention)  # the original is untouched
    mla = conv.model.layers[LAYER].self_attn.mla
    with torch.no_grad():
        got = mla(x)
    assert (got - y).abs().max().item() <= 1e-4 * max(1.0, y.abs().max().item())
    # and its decode over the latent cache equals the uncached output
    with torch.no_grad(), latent_caches(conv, 1, ids.shape[1]) as caches:
        m = mla_layers(conv)[0]
        steps = [m(x[:, :80])[0]] + [m(x[:, i : i + 1])[0] for i in range(80, 96)]
        assert caches[0].length == 96 and caches[0].bytes_per_token == (192 + 192) * 4
    assert (torch.cat(steps, 1) - got).abs().max().item() <= 1e-5 * got.abs().max().item()


def test_compressed_conversion_error_falls_with_rank(smollm2, text_ids):
    model, _ = smollm2
    ids = text_ids[:, :128]
    x, y = _attn_io(model, ids, LAYER)
    calib = text_ids[:, 2000:2256]
    errs = []
    for r in (48, 144, 240):
        conv = convert_to_mla(model, kv_lora_rank=r, qk_rope_dim=96, layers=[LAYER], calibration_ids=calib)
        with torch.no_grad():
            errs.append((conv.model.layers[LAYER].self_attn.mla(x) - y).pow(2).mean().item())
        del conv
    assert errs[0] > errs[1] > errs[2], errs


def test_bad_arguments(smollm2):
    model, _ = smollm2
    with pytest.raises(ShapeError, match="qk_rope_dim"):
        convert_to_mla(model, kv_lora_rank=64, qk_rope_dim=10, layers=[0], method="weights")
    with pytest.raises(ShapeError, match="kv_lora_rank"):
        convert_to_mla(model, kv_lora_rank=1000, qk_rope_dim=24, layers=[0], method="weights")
    with pytest.raises(ShapeError, match="calibration_ids"):
        convert_to_mla(model, kv_lora_rank=64, qk_rope_dim=24, layers=[0])
    with pytest.raises(ShapeError, match="layers"):
        convert_to_mla(model, kv_lora_rank=64, qk_rope_dim=24, layers=[30], method="weights")


def test_distillation_lowers_the_layer_error(smollm2, text_ids):
    from attnkit.hf.mla import distill_mla, layer_error

    model, _ = smollm2
    x, y = _attn_io(model, text_ids[:, :128], LAYER)  # held out: not in the distillation text
    calib = text_ids[:, 2000:2256]
    conv = convert_to_mla(model, kv_lora_rank=48, qk_rope_dim=96, layers=[LAYER], calibration_ids=calib)
    mla = conv.model.layers[LAYER].self_attn.mla
    before = layer_error(mla, x, y)
    mlp = conv.model.layers[LAYER].mlp.down_proj.weight.detach().clone()
    res = distill_mla(conv, model, text_ids[:, 3000:3512].reshape(2, 256), steps=12, lr=1e-3)
    after = layer_error(mla, x, y)
    assert res["layers"][LAYER]["after"] < res["layers"][LAYER]["before"]  # on the distillation text
    assert after < 0.9 * before, (before, after)  # and on held-out text
    assert torch.equal(conv.model.layers[LAYER].mlp.down_proj.weight, mlp)  # only the MLA layer trains
    assert not any(p.grad is not None for p in conv.parameters())
    with pytest.raises(ShapeError, match="layers"):
        distill_mla(conv, model, text_ids[:, :64], steps=1, layers=[0])
