"""HeadwiseCache accounting, RoPE positions after eviction, and the explicit attention path."""

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import attnkit.hf as akhf
from attnkit import reference
from attnkit.hf._rope import rerotate
from attnkit.patterns import AShape, Causal, PerHead, SlidingWindow

D = 64


def _run(model, ids, policy, decode=3):
    with akhf.applied(model, policy) as h, torch.no_grad():
        cache = h.new_cache()
        model(ids, past_key_values=cache, use_cache=True)
        nxt = ids[:, -1:]
        for _ in range(decode):
            model(nxt, past_key_values=cache, use_cache=True)
    return cache


def test_streaming_cache_holds_its_budget_and_frees_the_rest(smollm2, text_ids):
    model, _ = smollm2
    ids = text_ids[:, :100]
    cache = _run(model, ids, akhf.StreamingLLM(budget=32, sinks=4))
    assert cache.get_seq_length() == 103
    assert cache.lengths() == [[32] * 3] * 30
    assert cache.memory()["kv"] == 30 * 3 * 32 * D * 2 * 4
    layer = cache.layers[5]
    assert layer.pos[0][0].tolist() == [0, 1, 2, 3] + list(range(103 - 28, 103))


def test_duo_heads_keep_full_or_streaming_lengths(smollm2, text_ids):
    model, _ = smollm2
    gates = torch.rand(30, 3).tolist()
    pol = akhf.DuoAttention(gates=gates, retrieval=0.3, sinks=4, recent=20)
    cache = _run(model, text_ids[:, :80], pol, decode=2)
    full = pol.retrieval_heads
    assert int(full.sum()) == 27
    for l, lens in enumerate(cache.lengths()):
        assert lens == [82 if full[l, h] else 24 for h in range(3)]


def test_head_aware_budgets_differ_but_keep_the_layer_total(smollm2, text_ids):
    model, _ = smollm2
    pol = akhf.KVCompress(akhf.SnapKV(window=8), budget=24, allocator=akhf.HeadAware(), phase="prefill")
    cache = _run(model, text_ids[:, :120], pol, decode=0)
    lens = cache.lengths()
    assert all(sum(x) == 72 for x in lens)
    assert any(len(set(x)) > 1 for x in lens)
    assert all(min(x) >= 6 for x in lens)
    assert cache.memory()["kv"] == sum(map(sum, lens)) * D * 2 * 4


def test_h2o_keeps_recent_half_and_heavy_hitters(smollm2, text_ids):
    model, _ = smollm2
    cache = _run(model, text_ids[:, :90], akhf.KVCompress(akhf.H2O(), budget=20), decode=2)
    pos = cache.layers[10].pos[1][0]
    assert pos.numel() == 20
    assert pos[-10:].tolist() == list(range(82, 92))
    assert 0 in pos.tolist()  # the sink is the heaviest hitter in a middle layer


def _layer0_keys(model, ids, positions):
    """Layer-0 keys computed by the model's own modules, rotated at the given positions."""
    attn = model.model.layers[0].self_attn
    with torch.no_grad():
        h = model.model.layers[0].input_layernorm(model.model.embed_tokens(ids))
        k = attn.k_proj(h).view(1, ids.shape[1], -1, D).transpose(1, 2)
        cos, sin = model.model.rotary_emb(k, positions[None])
        _, k = apply_rotary_pos_emb(k, k, cos, sin)
    return k


@pytest.mark.parametrize("rerotate_keys", [True, False])
def test_positions_after_eviction(smollm2, text_ids, rerotate_keys):
    model, _ = smollm2
    ids = text_ids[:, :60]
    cache = _run(model, ids, akhf.StreamingLLM(budget=16, sinks=4, rerotate=rerotate_keys), decode=0)
    lay = cache.layers[0]
    kept = lay.pos[0][0].long()
    for h in range(3):
        rope = lay.rope[h][0].long()
        if rerotate_keys:  # at their slots plus one shift per head, the entries evicted so far from the middle
            assert rope.tolist() == list(range(60 - 16, 60))
        else:
            assert torch.equal(rope, kept)
        want = _layer0_keys(model, ids[:, kept], rope)
        assert torch.allclose(lay.k[h][0], want[0, h], atol=1e-4)


def test_rerotate_composes_like_rope(smollm2):
    model, _ = smollm2
    x = torch.randn(1, 3, 10, D)
    p = torch.arange(10)
    cos, sin = model.model.rotary_emb(x, p[None])
    _, at_p = apply_rotary_pos_emb(x, x, cos, sin)
    cos2, sin2 = model.model.rotary_emb(x, (p + 37)[None])
    _, at_p37 = apply_rotary_pos_emb(x, x, cos2, sin2)
    inv = model.model.rotary_emb.inv_freq
    assert torch.allclose(rerotate(at_p, torch.full((10,), 37), inv), at_p37, atol=1e-4)
    assert torch.equal(rerotate(at_p, torch.zeros(10, dtype=torch.long), inv), at_p)


def test_masked_attention_matches_the_float64_oracle():
    torch.manual_seed(0)
    B, G, Q, T = 2, 3, 5, 23
    q, k, v = torch.randn(B, G, Q, D), torch.randn(B, T, D), torch.randn(B, T, D)
    kpos = torch.stack([torch.randperm(40)[:T].sort().values for _ in range(B)])
    qpos = kpos[:, -Q:]
    valid = torch.rand(B, T) > 0.2
    valid[1, : T - Q + 1] = False  # the first query of row 1 sees nothing: its output must be 0
    pat = AShape(2, 9)
    out, mass = akhf.masked_attention(q, k, v, qpos, kpos, valid, None, True, pat, torch.arange(G), observe=Q)
    allowed = valid[:, None, None, :] & (kpos[:, None, None, :] <= qpos[:, None, :, None])
    allowed = allowed & pat.mask_mod(0, 0, qpos[:, None, :, None], kpos[:, None, None, :])
    ref = reference.attention(q, k[:, None], v[:, None], mask=allowed)
    naive = reference.attention(q, k[:, None], v[:, None], mask=allowed, dtype=torch.float32).double()
    assert (out.double() - ref).abs().max() <= 2 * (naive - ref).abs().max() + 1e-6
    empty = ~allowed.any(-1)  # (B, 1, Q)
    assert empty.any() and torch.all(out[empty.expand(B, G, Q)] == 0)
    assert torch.allclose(mass.sum(-1), G * (~empty).sum((1, 2)).float(), atol=1e-4)


def test_bad_policy_arguments_name_them():
    with pytest.raises(ValueError, match="budget"):
        akhf.StreamingLLM(budget=3, sinks=4)
    with pytest.raises(ValueError, match="phase"):
        akhf.KVCompress(akhf.H2O(), phase="always")
    with pytest.raises(ValueError, match="budget"):
        akhf.KVCompress(akhf.H2O(), budget=1.5)
    with pytest.raises(TypeError, match="budget"):
        akhf.KVCompress(akhf.H2O(), budget="half")
    with pytest.raises(ValueError, match="kernel"):
        akhf.SnapKV(kernel=4)
    with pytest.raises(ValueError, match="retrieval"):
        akhf.DuoAttention(gates=[[1.0]], retrieval=2.0)
    with pytest.raises(ValueError, match="spans"):
        akhf.MoA(spans=[[0.0]])


def test_per_layer_policy_compresses_only_its_layers(smollm2, text_ids):
    model, _ = smollm2
    pol = akhf.PerLayer(
        {0: akhf.KVCompress(akhf.H2O(), budget=16), 29: akhf.KVCompress(akhf.SnapKV(window=4), 12)},
        default=akhf.Dense(),
    )
    cache = _run(model, text_ids[:, :50], pol, decode=1)
    lens = cache.lengths()
    assert lens[0] == [16] * 3 and lens[29] == [12] * 3
    assert all(x == [51] * 3 for x in lens[1:29])
    with pytest.raises(ValueError, match="rerotate"):
        akhf.PerLayer({0: akhf.StreamingLLM(budget=8)}, default=akhf.StreamingLLM(budget=8, rerotate=False))


def test_heads_folded_equals_one_pass_per_head():
    """All KV heads in one call (folded into the batch) against one call per head: outputs, observed mass, the
    queries re-rotated per head, a pattern per query head, and heads of unequal lengths padded to the longest
    (whatever lies past a head's own entries must not count)."""
    from attnkit.hf._integration import _heads_folded, _per_head

    g = torch.Generator().manual_seed(1)
    B, Hk, G, Q, T = 2, 3, 2, 4, 19
    q = torch.randn(B, Hk * G, Q, D, generator=g)
    k, v = torch.randn(B, Hk, T, D, generator=g), torch.randn(B, Hk, T, D, generator=g)
    kpos = torch.stack([torch.randperm(30, generator=g)[:T].sort().values for _ in range(B * Hk)]).view(B, Hk, T)
    valid = torch.rand(B, Hk, T, generator=g) > 0.3
    qpos = torch.full((B, Q), 29) - torch.arange(Q).flip(0)
    delta = [torch.randint(-5, 5, (B, Q), generator=g) for _ in range(Hk)]
    inv = 1.0 / (10_000 ** (torch.arange(0, D, 2).float() / D))
    per_head = PerHead([AShape(2, 6), AShape(1, 9), SlidingWindow(left=4, right=0), AShape(2, 6), Causal(), Causal()])
    lengths = [T, 11, 7]
    held = torch.arange(T) < torch.tensor(lengths)[:, None]  # (Hk, T)
    for pat in (None, AShape(2, 6), per_head):
        for padded in (False, True):
            mine = held if padded else torch.ones_like(held)
            ok, n = valid & mine, (lengths if padded else [T] * Hk)
            # garbage past each head's own entries: huge keys and values would show in any output they reach
            kk, vv = (torch.where(mine[..., None], x, 1e4) for x in (k, v))
            own = [[x[:, h, : n[h]] for h in range(Hk)] for x in (kk, vv, kpos, ok)]
            args = (0.2, True, pat, Q, delta, inv)
            want, wmass = _per_head(q, own[0], own[1], qpos, own[2], own[3], *args)
            got, gmass = _heads_folded(q, kk, vv, qpos, kpos, ok, *args)
            torch.testing.assert_close(got, want)
            for h in range(Hk):
                torch.testing.assert_close(gmass[:, h, : n[h]], wmass[h])


def test_decode_writes_in_place_and_eviction_frees_the_buffer(smollm2, text_ids):
    """A dense cache's decode step writes into the layer's buffer (no copy of the cache per step, a new buffer
    once every SPARE steps); after an eviction the buffer holds at most SPARE entries per head beyond the kept."""
    from attnkit.hf.cache import SPARE

    model, _ = smollm2
    ids = text_ids[:, :40]
    with akhf.applied(model, akhf.Dense()) as h, torch.no_grad():
        cache = h.new_cache()
        model(ids, past_key_values=cache, use_cache=True)
        lay = cache.layers[4]
        ptr, allocs = lay._kb.data_ptr(), []
        for step in range(2 * SPARE):
            model(ids[:, -1:], past_key_values=cache, use_cache=True)
            if lay._kb.data_ptr() != ptr:
                allocs.append(step)
            ptr = lay._kb.data_ptr()
        assert allocs == [SPARE]  # the prefill left SPARE free entries; the next buffer has SPARE more
        assert lay.stacked()[0].data_ptr() == lay._kb.data_ptr()
        torch.testing.assert_close(lay.stacked()[0][:, 1], lay.k[1])
    cache = _run(model, text_ids[:, :100], akhf.StreamingLLM(budget=32, sinks=4))
    mem = cache.memory()
    assert mem["kv"] < mem["kv_reserved"] <= mem["kv"] + 30 * 3 * SPARE * D * 2 * 4
    assert mem["total"] == mem["kv_reserved"] + mem["meta"]


def test_rerotate_from_a_table_of_shifts_equals_the_direct_rotation():
    """Integer shifts with few distinct values take cos and sin from a table; the result is the direct one."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 200, D, generator=g)
    inv = 1.0 / (10_000 ** (torch.arange(0, D, 2).float() / D))
    for delta in (torch.full((2, 3, 200), -1), torch.randint(-4, 3, (2, 3, 200), generator=g)):
        torch.testing.assert_close(rerotate(x, delta, inv), rerotate(x, delta.float(), inv), rtol=0, atol=0)
    assert rerotate(x, torch.zeros(2, 3, 200, dtype=torch.long), inv) is x


@pytest.mark.parametrize("rerotate_keys", [True, False])
def test_evicting_the_middle_by_a_copy_equals_the_gather(smollm2, text_ids, monkeypatch, rerotate_keys):
    """StreamingLLM keeps each head's first and last entries: the cache moves the tail down in place instead of
    gathering. Re-rotating, the copy leaves the tail's rotations and rotates the first keys on, so keys and
    rotations are the gather's up to one shift per head; values, metadata and logits are the gather's."""
    from attnkit.hf import cache as cache_mod

    model, _ = smollm2
    ids = text_ids[:, :70]
    pol = akhf.StreamingLLM(budget=24, sinks=4, rerotate=rerotate_keys)
    moves = []
    middle = cache_mod._HeadwiseLayer._evict_middle
    monkeypatch.setattr(cache_mod._HeadwiseLayer, "_evict_middle", lambda *a: moves.append(1) or middle(*a))

    def run():
        with akhf.applied(model, pol) as h, torch.no_grad():
            cache = h.new_cache()
            logits = [model(ids[:, s : s + 30], past_key_values=cache, use_cache=True).logits for s in (0, 30, 60)]
            logits += [model(ids[:, -1:], past_key_values=cache, use_cache=True).logits for _ in range(3)]
        return torch.cat(logits, 1), cache.layers[7]

    fast, lay = run()
    assert moves
    monkeypatch.setattr(cache_mod, "_prefix_and_suffix", lambda idx, T: None)
    moves.clear()
    slow, ref = run()
    assert not moves
    # rotations differ by one shift per head: the same logits up to float32 rounding of the rotated products
    # (7.5e-5 of logits up to 36 measured; a rotation off by one position changes them by more than 0.1)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=3e-4)
    for name in ("v", "pos", "valid"):
        for a, b in zip(getattr(lay, name), getattr(ref, name), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    shifts = set()
    for k, k_ref, rope, rope_ref in zip(lay.k, ref.k, lay.rope, ref.rope, strict=True):
        d = (rope - rope_ref).long()
        assert (d == d[:, :1]).all()  # one shift for the whole head
        shifts.add(int(d[0, 0]))
        torch.testing.assert_close(rerotate(k, -d, lay._owner.inv_freq), k_ref, rtol=1e-5, atol=1e-5)
    assert shifts == ({70 + 3 - 24} if rerotate_keys else {0})  # every entry evicted so far, from the middle
    assert ref.rope[0][0].tolist() == (list(range(24)) if rerotate_keys else [0, 1, 2, 3] + list(range(53, 73)))


_SINKS_AND_WINDOW = {
    "streaming, re-rotated": lambda: akhf.StreamingLLM(budget=24, sinks=4),
    "streaming, positions kept": lambda: akhf.StreamingLLM(budget=24, sinks=4, rerotate=False),
    "moa": lambda: akhf.MoA(spans=[[0.2, 0.4, 1.0]] * 30, sinks=4),
    "duo": lambda: akhf.DuoAttention(gates=torch.rand(30, 3).tolist(), retrieval=0.5, sinks=4, recent=20),
}


@pytest.mark.parametrize("name", list(_SINKS_AND_WINDOW))
def test_sinks_and_window_by_index_equals_the_explicit_path(smollm2, text_ids, monkeypatch, name):
    """Over a sinks-and-window cache (sinks, then one run of positions) its own pattern runs on the buffer by
    index through the kernels (prefill chunks; decode steps stay explicit): the same logits as the explicit
    path by position; a cache with a gap in its positions (H2O's) is not taken for one."""
    from attnkit.hf import _integration

    model, _ = smollm2
    ids = text_ids[:, :70]
    taken = []
    by_index = _integration._index_patterns
    monkeypatch.setattr(
        _integration, "_index_patterns", lambda *a: taken.append(by_index(*a) is not None) or by_index(*a)
    )
    torch.manual_seed(0)
    pol = _SINKS_AND_WINDOW[name]()

    def run():
        with akhf.applied(model, pol) as h, torch.no_grad():
            cache = h.new_cache()
            logits = [model(ids[:, s : s + 30], past_key_values=cache, use_cache=True).logits for s in (0, 30, 60)]
            logits += [model(ids[:, -1:], past_key_values=cache, use_cache=True).logits for _ in range(3)]
        return torch.cat(logits, 1)

    fast = run()
    assert taken and all(taken)
    monkeypatch.setattr(_integration, "_index_patterns", lambda *a: None)
    slow = run()
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-4)


def test_index_patterns_need_sinks_then_one_run():
    from attnkit.hf._integration import _index_patterns

    lay = type("Layer", (), {})()
    lay.kv_heads, lay.all_valid, lay.q_pos = 2, (lambda: True), torch.tensor([[12]])
    lay.pos = [torch.tensor([[0, 1, 2, 3, 10, 11, 12]]), torch.tensor([[0, 1, 2, 3, 9, 11, 12]])]
    assert _index_patterns(lay, AShape(4, 8), 1) is None  # the second head has a gap
    assert _index_patterns(lay, PerHead([AShape(4, 8), Causal()]), 1) == [AShape(4, 8), Causal()]
    lay.pos[1] = lay.pos[0]
    assert _index_patterns(lay, AShape(4, 8), 1) == [AShape(4, 8)] * 2
    assert _index_patterns(lay, SlidingWindow(8), 1) is None and _index_patterns(lay, AShape(5, 8), 1) is None
    assert _index_patterns(lay, PerHead([AShape(4, 8), AShape(4, 6)] * 2), 2) is None  # a group's heads differ
    lay.q_pos = torch.tensor([[13]])
    assert _index_patterns(lay, AShape(4, 8), 1) is None  # the step's keys are not last
