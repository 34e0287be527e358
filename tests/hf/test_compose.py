"""Steered: a Steer's interventions on top of an evicting KV policy (SmolLM2, batch 2 with left padding)."""

import pytest
import torch

import attnkit.hf as akhf
from attnkit.errors import DTypeError, UnsupportedError
from attnkit.hf.compose import Steered

SPAN = (10, 30)
HEADS = {(layer, h) for layer in (4, 9, 14) for h in (0, 3, 7)}


def _batch(tok, text_ids):
    a, b = text_ids[0, :60].tolist(), text_ids[0, 100:150].tolist()
    pad = tok.pad_token_id
    ids = torch.tensor([a, [pad] * 10 + b])
    mask = torch.tensor([[1] * 60, [0] * 10 + [1] * 50])
    return ids, mask


def _steers():
    return {
        "pasta": akhf.Steer((akhf.PASTA(span=SPAN, heads=HEADS, alpha=0.05),)),
        "var+perturb": akhf.Steer(
            (akhf.VAR(span=SPAN, heads=HEADS, rho=0.5), akhf.HeadPerturbation(heads={(6, 1)}, alpha=0.3))
        ),
        "temperature": akhf.Steer((akhf.Temperature({(3, 2): 0.7, (8, 5): 1.3}),)),
    }


def _run(model, policy, ids, mask, steps=3):
    with akhf.applied(model, policy), torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, use_cache=True)
        logits, cache = [out.logits[:, -1]], out.past_key_values
        for _ in range(steps):
            nxt = out.logits[:, -1:].argmax(-1)
            mask = torch.cat([mask, torch.ones_like(nxt)], 1)
            out = model(input_ids=nxt, attention_mask=mask, past_key_values=cache, use_cache=True)
            logits.append(out.logits[:, -1])
    return torch.stack(logits, 1).float(), cache


@pytest.mark.parametrize("which", list(_steers()))
def test_with_nothing_evicted_it_equals_the_steer_alone(smollm2, text_ids, which):
    """A budget above the prompt keeps every entry: the index mapping (padding included) is then exact."""
    model, tok = smollm2
    ids, mask = _batch(tok, text_ids)
    steer = _steers()[which]
    want, _ = _run(model, steer, ids, mask)
    got, cache = _run(model, Steered(akhf.KVCompress(akhf.H2O(), budget=1000), steer), ids, mask)
    assert isinstance(cache, akhf.HeadwiseCache)
    torch.testing.assert_close(got, want, atol=2e-3, rtol=0)


def test_an_empty_steer_equals_the_kv_policy_and_eviction_still_happens(smollm2, text_ids):
    model, tok = smollm2
    ids, mask = _batch(tok, text_ids)
    kv = akhf.KVCompress(akhf.SnapKV(window=8), budget=24)
    want, c1 = _run(model, kv, ids, mask)
    got, c2 = _run(model, Steered(kv, akhf.Steer(())), ids, mask)
    torch.testing.assert_close(got, want, atol=2e-3, rtol=0)
    assert c1.lengths() == c2.lengths()
    assert max(max(row) for row in c2.lengths()) <= 60


def test_steering_an_evicting_policy_changes_the_output_within_the_budget(smollm2, text_ids):
    model, tok = smollm2
    ids, mask = _batch(tok, text_ids)
    kv = akhf.KVCompress(akhf.H2O(), budget=24)
    plain, _ = _run(model, kv, ids, mask)
    steered, cache = _run(model, Steered(kv, _steers()["pasta"]), ids, mask)
    assert torch.isfinite(steered).all()
    assert (steered - plain).abs().max() > 1e-2
    stored = sum(map(sum, cache.lengths()))
    assert stored < 30 * 3 * 2 * 40


def test_bad_compositions_are_named(smollm2):
    model, _ = smollm2
    with pytest.raises(DTypeError, match="policy"):
        Steered(akhf.Steer(()), akhf.Steer(()))
    with pytest.raises(DTypeError, match="steer"):
        Steered(akhf.Dense(), akhf.Dense())
    with pytest.raises(UnsupportedError, match="prefill pattern"):
        with akhf.applied(model, Steered(akhf.StreamingLLM(budget=16, sinks=2), _steers()["pasta"])), torch.no_grad():
            model(torch.arange(40)[None] + 200, use_cache=False)
