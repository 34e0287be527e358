"""TidalDecode: the selection and the sparse layers equal their float64 reference; a budget that covers the
context is dense decoding; on SmolLM2 the sparse layers change the decode and prefill stays dense."""

import pytest
import torch

import attnkit.hf as akhf
from attnkit.errors import ShapeError, UnsupportedError
from attnkit.reference import kv_policies as ref


def _step(B=2, Hq=6, Hkv=2, K=40, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(B, Hq, 1, D, generator=g),
        torch.randn(B, Hkv, K, D, generator=g),
        torch.randn(B, Hkv, K, D, generator=g),
    ]


def test_selection_and_reuse_match_the_reference():
    pol = akhf.TidalDecode(budget=9, start=1, reselect=3)
    scale = 16**-0.5
    assert pol.attend(0, *_step(), None, 39, scale, True) is None  # dense below start
    chosen = {}
    for layer in range(1, 5):
        q, k, v = _step(seed=layer)
        out = pol.attend(layer, q, k, v, None, 39, scale, True)
        for b in range(2):
            kq, vq = k[b].repeat_interleave(3, 0), v[b].repeat_interleave(3, 0)
            if layer in (1, 3):  # selection layers attend densely and choose
                chosen[b] = ref.tidal_select(q[b, :, 0], kq, 9)
                want = ref.attention_at(q[b, :, 0], kq, vq, [list(range(40))] * 6, scale)
            else:
                want = ref.attention_at(q[b, :, 0], kq, vq, chosen[b], scale)
            torch.testing.assert_close(out[b, :, 0].double(), want, rtol=1e-5, atol=1e-6)


def test_budget_covering_the_context_is_dense_decoding(smollm2, text_ids):
    model, _ = smollm2
    ids = text_ids[:, :96]
    outs = {}
    for name, pol in (("dense", akhf.Dense()), ("all", akhf.TidalDecode(budget=200, start=2, reselect=12))):
        with akhf.applied(model, pol), torch.no_grad():
            out = model(ids, use_cache=True)
            logits = [out.logits[:, -1]]
            nxt = out.logits[:, -1:].argmax(-1)
            for _ in range(3):
                out = model(nxt, past_key_values=out.past_key_values, use_cache=True)
                logits.append(out.logits[:, -1])
                nxt = out.logits[:, -1:].argmax(-1)
        outs[name] = torch.stack(logits)
    torch.testing.assert_close(outs["all"], outs["dense"], rtol=1e-4, atol=1e-4)
    small = akhf.TidalDecode.for_model(model, budget=8)
    assert (small.start, small.reselect) == (2, 12)
    with akhf.applied(model, small), torch.no_grad():
        out = model(ids, use_cache=True)
        torch.testing.assert_close(out.logits[:, -1], outs["dense"][0], rtol=1e-4, atol=1e-4)  # prefill is dense
        out = model(out.logits[:, -1:].argmax(-1), past_key_values=out.past_key_values, use_cache=True)
    assert (out.logits[:, -1] - outs["dense"][1]).abs().max() > 1e-2


def test_errors_name_the_argument():
    with pytest.raises(ShapeError, match="reselect"):
        akhf.TidalDecode(start=4, reselect=3)
    with pytest.raises(ShapeError, match="budget"):
        akhf.TidalDecode(budget=0)
    pol = akhf.TidalDecode(budget=4, start=1)
    with pytest.raises(UnsupportedError, match="selection layer"):
        pol.attend(2, *_step(), None, 39, None, True)
