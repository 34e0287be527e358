"""TOVA: each KV head keeps the keys the current query attends most; with ``average_heads`` (kvpress's rule)
every head keeps the same positions, those of the head-averaged scores."""

import torch

import attnkit.hf as akhf


def _run(model, ids, scorer):
    pol = akhf.KVCompress(scorer, budget=24, phase="both")
    with akhf.applied(model, pol), torch.no_grad():
        out = model(ids, use_cache=True)
        cache = out.past_key_values
        model(out.logits[:, -1:].argmax(-1), past_key_values=cache, use_cache=True)
    return cache


def test_per_head_and_head_averaged(smollm2, text_ids):
    model, _ = smollm2
    ids = text_ids[:, :80]
    own = _run(model, ids, akhf.TOVA())
    shared = _run(model, ids, akhf.TOVA(average_heads=True))
    differ = 0
    for lay_own, lay_shared in zip(own.layers, shared.layers, strict=True):
        assert lay_own.lengths() == lay_shared.lengths() == [24] * lay_own.kv_heads
        assert all(bool((p == lay_shared.pos[0]).all()) for p in lay_shared.pos)
        differ += any(bool((p != lay_own.pos[0]).any()) for p in lay_own.pos)
    assert differ > 0  # per head, heads keep different positions somewhere
