"""attnkit attention inside SmolLM2 through transformers' AttentionInterface."""

import pytest
import torch
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

import attnkit.hf as akhf
from attnkit.errors import UnsupportedError
from attnkit.hf._integration import NAME, _attnkit_attention

N = 192


def _logits(model, ids, **kw):
    with torch.no_grad():
        return model(ids, **kw).logits


def test_dense_policy_equals_eager(smollm2, text_ids):
    model, _ = smollm2
    ids = text_ids[:, :N]
    prev = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        eager = _logits(model, ids)
    finally:
        model.set_attn_implementation(prev)
    with akhf.applied(model, akhf.Dense()):
        assert model.config._attn_implementation == NAME
        ours = _logits(model, ids)
    assert (ours - eager).abs().max().item() < 1e-4


def test_causal_mask_is_never_dropped(smollm2, text_ids):
    model, _ = smollm2
    ids = text_ids[:, :64]
    changed = ids.clone()
    changed[0, -1] = (changed[0, -1] + 7) % model.config.vocab_size
    with akhf.applied(model, akhf.Dense()):
        assert ALL_MASK_ATTENTION_FUNCTIONS[NAME] is not None
        a, b = _logits(model, ids), _logits(model, changed)
    assert torch.equal(a[:, :-1], b[:, :-1])
    assert not torch.equal(a[:, -1], b[:, -1])


def test_attention_function_is_causal_with_a_none_mask(smollm2):
    """The trap: transformers hands ``attention_mask=None`` when no mask function is registered."""
    model, _ = smollm2
    module = model.model.layers[0].self_attn
    q, k, v = torch.randn(1, 9, 16, 64), torch.randn(1, 3, 16, 64), torch.randn(1, 3, 16, 64)
    with akhf.applied(model, akhf.Dense()):
        out, _ = _attnkit_attention(module, q, k, v, None, scaling=0.125)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.125, enable_gqa=True)
    assert torch.allclose(out.transpose(1, 2), ref, atol=1e-5)


def test_remove_restores_the_model_exactly(smollm2, text_ids):
    model, _ = smollm2
    ids = text_ids[:, :64]
    before = _logits(model, ids)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    impl = model.config._attn_implementation
    handle = akhf.apply(model, akhf.StreamingLLM(budget=16, sinks=4))
    _logits(model, ids)
    handle.remove()
    assert model.config._attn_implementation == impl
    assert all(not hasattr(m, "_attnkit_binding") for m in model.modules())
    assert all(not m._forward_pre_hooks for m in model.modules())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert torch.equal(_logits(model, ids), before)
    handle.remove()  # idempotent


def test_apply_twice_and_bad_policy_raise(smollm2):
    model, _ = smollm2
    with pytest.raises(TypeError, match="policy"):
        akhf.apply(model, "dense")
    with akhf.applied(model):
        with pytest.raises(UnsupportedError, match="already applied"):
            akhf.apply(model, akhf.Dense())


def test_unsupported_models_raise():
    from transformers import MistralConfig, MistralForCausalLM

    with pytest.raises(UnsupportedError, match="AttentionInterface"):
        akhf.apply(torch.nn.Linear(2, 2), akhf.Dense())
    cfg = MistralConfig(
        vocab_size=32,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=8,
    )
    with pytest.raises(UnsupportedError, match="sliding"):
        akhf.apply(MistralForCausalLM(cfg), akhf.Dense())


def test_attn_implementation_set_by_hand_raises(smollm2):
    model, _ = smollm2
    module = model.model.layers[0].self_attn
    with pytest.raises(UnsupportedError, match="apply"):
        _attnkit_attention(module, torch.randn(1, 9, 4, 64), torch.randn(1, 3, 4, 64), torch.randn(1, 3, 4, 64), None)


def test_stale_cache_raises(smollm2, text_ids):
    model, _ = smollm2
    with akhf.applied(model, akhf.StreamingLLM(budget=16)) as h:
        cache = h.new_cache()
    with akhf.applied(model, akhf.StreamingLLM(budget=16)):
        with pytest.raises(UnsupportedError, match="stale"):
            _logits(model, text_ids[:, :8], past_key_values=cache)


@pytest.mark.parametrize(
    "policy",
    [
        akhf.StreamingLLM(budget=10_000, sinks=4),
        akhf.KVCompress(akhf.H2O(), budget=10_000),
        akhf.KVCompress(akhf.SnapKV(), budget=10_000, allocator=akhf.HeadAware()),
        akhf.DuoAttention(gates=[[1.0] * 3] * 30, retrieval=1.0),
    ],
    ids=["streaming", "h2o", "snapkv_head_aware", "duo_all_retrieval"],
)
def test_policy_with_room_for_everything_equals_dense(smollm2, text_ids, policy):
    """Prefill in two chunks, then decode: the per-head cache path against dense attention."""
    model, _ = smollm2
    ids = text_ids[:, :N]
    dense = _logits(model, ids)
    with akhf.applied(model, policy) as h:
        cache = h.new_cache()
        outs = []
        for s, e in ((0, 100), (100, N - 2), (N - 2, N - 1), (N - 1, N)):
            outs.append(_logits(model, ids[:, s:e], past_key_values=cache, use_cache=True))
    assert (torch.cat(outs, 1) - dense).abs().max().item() < 1e-4


def test_batch_with_left_padding_equals_rows_alone(smollm2):
    model, tok = smollm2
    texts = [
        "The capital of France is Paris. The capital of Italy is",
        "Once upon a time, a fox and a crow met. The fox",
    ]
    policy = akhf.StreamingLLM(budget=12, sinks=4)
    with akhf.applied(model, policy):
        enc = tok(texts, return_tensors="pt", padding=True)
        assert (enc.attention_mask == 0).any()
        with torch.no_grad():
            batch = model.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
            alone = [model.generate(**tok([t], return_tensors="pt"), max_new_tokens=6, do_sample=False) for t in texts]
    for row, single in zip(batch, alone, strict=True):
        assert tok.decode(row[-6:]) == tok.decode(single[0, -6:])


def test_generate_with_h2o_and_dense_dropping_nothing(smollm2):
    model, tok = smollm2
    enc = tok(["The capital of France is"], return_tensors="pt")
    with torch.no_grad():
        ref = model.generate(**enc, max_new_tokens=5, do_sample=False)
        with akhf.applied(model, akhf.KVCompress(akhf.H2O(), budget=1000)):
            got = model.generate(**enc, max_new_tokens=5, do_sample=False)
    assert torch.equal(ref, got)


def test_sparse_prefill_changes_only_the_prefill(smollm2, text_ids):
    from attnkit.patterns import AShape

    model, _ = smollm2
    ids = text_ids[:, :N]
    dense = _logits(model, ids)
    with akhf.applied(model, akhf.SparsePrefill(AShape(4, 32))):
        sparse = _logits(model, ids)
        # a single-query step is dense: the same logits as dense attention over the same cache
        from transformers import DynamicCache

        cache = DynamicCache(config=model.config)
        _logits(model, ids[:, : N - 1], past_key_values=cache)
        last = _logits(model, ids[:, N - 1 :], past_key_values=cache)
    assert torch.allclose(sparse[:, :32], dense[:, :32], atol=1e-4)
    assert (sparse[:, 64:] - dense[:, 64:]).abs().max() > 1e-2
    assert last.shape == (1, 1, model.config.vocab_size)


def test_sparse_prefill_with_a_dynamic_selector(smollm2, text_ids):
    from attnkit.sparse import VerticalSlash

    model, _ = smollm2
    ids = text_ids[:, :N]
    dense = _logits(model, ids)
    with akhf.applied(model, akhf.SparsePrefill(VerticalSlash(budget=1.0, last_q=64, local=64))):
        full = _logits(model, ids)
    with akhf.applied(model, akhf.SparsePrefill(VerticalSlash(budget=0.125, last_q=64, local=64))):
        sparse = _logits(model, ids)
        from transformers import DynamicCache

        cache = DynamicCache(config=model.config)
        _logits(model, ids[:, :64], past_key_values=cache)
        with pytest.raises(UnsupportedError, match="whole prompt"):
            _logits(model, ids[:, 64:96], past_key_values=cache)
    assert (full - dense).abs().max() < 1e-3
    assert (sparse - dense).abs().max() > 1e-3


@pytest.mark.parametrize("causal", [True, False])
def test_observed_mass_equals_the_explicit_paths_mass(causal):
    """The mass H2O and SnapKV read, from logits alone, equals the explicit per-head path's (index positions,
    invalid keys, a pattern per query head, queries that are the last of the keys)."""
    from attnkit.hf._integration import masked_attention, observed_mass
    from attnkit.patterns import PerHead, SlidingWindow

    g = torch.Generator().manual_seed(0)
    B, G, Qo, T, D = 2, 3, 7, 40, 8
    q, k, v = torch.randn(B, G, Qo, D, generator=g), torch.randn(B, T, D, generator=g), torch.randn(B, T, D)
    valid = torch.rand(B, T, generator=g) > 0.2
    pat = PerHead([SlidingWindow(5 + h, 0) for h in range(2 * G)])
    pos = torch.arange(T)[None].expand(B, T)
    for p in (None, pat):
        got = observed_mass(q, k, valid, 0.3, T - Qo, causal=causal, pat=p, group=1)
        heads = torch.arange(G, 2 * G)
        _, want = masked_attention(q, k, v, pos[:, T - Qo :], pos, valid, 0.3, causal, p, heads, observe=Qo)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scorer", [akhf.H2O(), akhf.SnapKV(window=8)], ids=["h2o", "snapkv"])
def test_chunked_prefill_equals_one_prefill_and_snapkv_never_takes_the_explicit_path(
    smollm2, text_ids, scorer, monkeypatch
):
    """Three chunks with room for everything against one prefill: the logits agree, and H2O's accumulated
    scores too. SnapKV observes 8 of each chunk's 32 queries, so every chunk runs the fast kernels (per KV head
    after the first, the cache's keys in index order) with a logits-only pass for the mass: the explicit
    per-head path is never called. H2O observes every query and keeps the explicit path (one pass for both)."""
    from attnkit.hf import _integration

    model, _ = smollm2
    ids = text_ids[:, :96]
    pol = akhf.KVCompress(scorer, budget=10_000, phase="both")
    with akhf.applied(model, pol) as h:
        cache = h.new_cache()
        whole = model(ids, past_key_values=cache, use_cache=True).logits
        whole_scores = [x.clone() for x in cache.layers[3].score]
    calls = []
    explicit = _integration.masked_attention
    monkeypatch.setattr(_integration, "masked_attention", lambda *a, **k: calls.append(1) or explicit(*a, **k))
    with akhf.applied(model, pol) as h:
        cache = h.new_cache()
        chunks = [model(ids[:, s : s + 32], past_key_values=cache, use_cache=True).logits for s in range(0, 96, 32)]
        scores = cache.layers[3].score
    torch.testing.assert_close(torch.cat(chunks, 1), whole, atol=2e-4, rtol=1e-4)
    if isinstance(scorer, akhf.H2O):
        assert calls
        for a, b in zip(scores, whole_scores, strict=True):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    else:
        assert not calls
