"""Video-XL-2's chunked prefill: a prompt and a task step equal the float64 full-mask reference; on SmolLM2 a
chunk as long as the prompt is dense, left padding changes nothing, and the sparse chunks change the output."""

import pytest
import torch

import attnkit.hf as akhf
from attnkit.errors import ShapeError, UnsupportedError
from attnkit.reference import kv_policies as ref


def test_prefill_and_task_step_match_the_reference():
    g = torch.Generator().manual_seed(3)
    Hq, Hkv, D, T, P = 4, 2, 8, 44, 40
    q, k, v = (torch.randn(1, h, T, D, generator=g) for h in (Hq, Hkv, Hkv))
    pol = akhf.ChunkedPrefill(chunk=8, keep=3, window=4, reload=2, task=4)
    pre = pol.attend(0, q[:, :, :P], k[:, :, :P], v[:, :, :P], None, 0, None, True)
    task = pol.attend(0, q[:, :, P:], k, v, None, P, None, True)
    want = ref.chunked_attention(q[0], k[0], v[0], chunk=8, keep=3, window=4, prompt=P, reload=2)
    torch.testing.assert_close(torch.cat([pre, task], 2)[0].double(), want, rtol=1e-5, atol=1e-6)


def test_on_smollm2_dense_limit_padding_and_sparsity(smollm2, text_ids):
    model, tok = smollm2
    ids = text_ids[:, :64]
    with torch.no_grad():
        dense = model(ids).logits[0, -1]
        with akhf.applied(model, akhf.ChunkedPrefill(chunk=64, keep=8)):
            whole = model(ids).logits[0, -1]
        pol = akhf.ChunkedPrefill(chunk=16, keep=4, window=8)
        with akhf.applied(model, pol):
            alone = model(ids).logits[0, -1]
            pad = torch.full((1, 5), tok.pad_token_id)
            batch = torch.cat([torch.cat([pad, ids[:, 5:]], 1), ids])
            mask = torch.cat([torch.cat([torch.zeros(1, 5), torch.ones(1, 59)], 1), torch.ones(1, 64)]).long()
            padded = model(batch, attention_mask=mask).logits[:, -1]
            short = model(ids[:, 5:]).logits[0, -1]
    torch.testing.assert_close(whole, dense, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(padded[1], alone, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(padded[0], short, rtol=1e-4, atol=1e-4)
    assert (alone - dense).abs().max() > 1e-2


def test_bad_settings_are_named():
    with pytest.raises(ShapeError, match="keep"):
        akhf.ChunkedPrefill(chunk=8, keep=9)
    with pytest.raises(ShapeError, match="chunk"):
        akhf.ChunkedPrefill(chunk=1)
    pol = akhf.ChunkedPrefill(chunk=8, keep=2)
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(UnsupportedError, match="past_key_values"):
        pol.attend(5, q, torch.randn(1, 2, 12, 8), torch.randn(1, 2, 12, 8), None, 8, None, True)
