"""Every family-E registry record on SmolLM2, the encoder path on MiniLM, and the quick `attnkit eval`."""

import pytest
import torch

import attnkit.hf as akhf
from attnkit import registry
from attnkit.bench import models as evals

RECORDS = registry.records("E")


def test_family_e_is_registered():
    assert {r.name for r in RECORDS} >= {
        "streaming_llm",
        "duo_attention",
        "moa",
        "h2o",
        "snapkv",
        "head_aware_kv",
        "sparse_prefill",
    }
    assert all(r.kind == "policy" and not r.exact for r in RECORDS)


@pytest.mark.parametrize("name", [r.name for r in RECORDS])
def test_record_runs_prefill_and_decode_within_its_cache(smollm2, text_ids, name):
    model, _ = smollm2
    n = 128
    pol = registry.get(name).make(n, model=model)
    assert isinstance(pol, akhf.Policy)
    ids = text_ids[:, :n]
    with akhf.applied(model, pol), torch.no_grad():
        out = model(ids, use_cache=True)
        cache = out.past_key_values
        for _ in range(2):
            out = model(out.logits[:, -1:].argmax(-1), past_key_values=cache, use_cache=True)
    assert torch.isfinite(out.logits).all()
    if pol.compresses:
        assert isinstance(cache, akhf.HeadwiseCache)
        assert cache.get_seq_length() == n + 2
        stored = sum(map(sum, cache.lengths()))
        assert stored < 30 * 3 * (n + 2)


def test_minilm_dense_policy_equals_the_model_and_a_window_does_not(smollm2):
    from attnkit.models import load_minilm
    from attnkit.models.minilm import embed
    from attnkit.patterns import Sinks, SlidingWindow

    model, tok = load_minilm()
    enc = tok(
        ["A short sentence.", "A much longer sentence about attention sinks and windows in encoders."],
        return_tensors="pt",
        padding=True,
    )
    with torch.no_grad():
        ref = embed(model, enc)
        with akhf.applied(model, akhf.Dense()):
            same = embed(model, enc)
        with akhf.applied(model, akhf.SparsePrefill(SlidingWindow(left=2, right=2) | Sinks(1))):
            local = embed(model, enc)
    assert torch.allclose(same, ref, atol=1e-5)
    assert (local - ref).abs().max() > 1e-3


def test_quick_eval_writes_the_report(tmp_path):
    res = evals.run_eval(evals.QUICK)
    paths = evals.write(res, tmp_path)
    md = paths["markdown"].read_text()
    for name in evals.POLICIES:
        assert name in md
    assert {p.name for p in paths["plots"]} == {"eval_ppl.png", "eval_passkey.png"}
    dense = [r for r in res["ppl"] if r["policy"] == "dense"][0]
    streaming = [r for r in res["ppl"] if r["policy"] == "streaming_llm"][0]
    assert streaming["peak_kv"] < dense["peak_kv"] and streaming["kl"] > 0
    assert any(r["ok"] for r in res["passkey"] if r["policy"] == "dense")
    assert len(res["minilm"]) == 1 and 0.5 < res["minilm"][0]["cos_mean"] <= 1.0 + 1e-6
