"""Detectors on SmolLM2: each score against its definition computed from the eager maps, and the findings."""

import torch

from attnkit import registry
from attnkit.analysis import (
    HiddenSinks,
    InductionHeads,
    RetrievalHeads,
    SinkHeads,
    SpanHeads,
    eager_maps,
    massive_activations,
    repeated_tokens,
)


def test_every_family_h_record_is_registered():
    names = set(registry.names(family="H"))
    assert {"sink_heads", "induction_heads", "retrieval_heads", "attention_flow", "activation_patching"} <= names
    for name in names:
        rec = registry.get(name)
        assert rec.kind == "analysis" and rec.paper and rec.make(64) is not None


def test_sink_heads_equal_the_definition(smollm2):
    model, tok = smollm2
    ids = torch.randint(300, 8000, (1, 64), generator=torch.Generator().manual_seed(0))
    ids[0, 0] = tok.bos_token_id if tok.bos_token_id is not None else ids[0, 0]
    s = SinkHeads().run(model, tok, ids=ids)
    maps = eager_maps(model, ids)
    want = torch.stack([m[0, :, :, 0].double().mean(-1) for m in maps])
    assert (s.values - want).abs().max().item() < 2e-6
    assert (
        s.extra["sink_rate"] == float((want > 0.3).double().mean().item())
        or abs(s.extra["sink_rate"] - float((want > 0.3).double().mean())) < 1e-4
    )
    # sinks are real in SmolLM2 (about 0.65-0.79 mean first-token attention from layer 3 on)
    assert s.extra["sink_rate"] > 0.3


def test_induction_heads_find_copying_heads(smollm2):
    model, tok = smollm2
    s = InductionHeads(length=24, batch=2).run(model, tok)
    ids, start = repeated_tokens(tok, length=24, batch=2, seed=0)
    maps = eager_maps(model, ids)
    q = torch.arange(start, ids.shape[1])
    want = torch.stack([m[:, :, q, q - 23].double().mean(dim=(0, 2)) for m in maps])
    assert (s.values - want).abs().max().item() < 2e-6
    assert s.top(1)[0][2] > 0.3  # a real model has induction heads


def test_span_heads_and_hidden_sinks_run(smollm2):
    model, tok = smollm2
    ids = torch.randint(300, 8000, (1, 48), generator=torch.Generator().manual_seed(6))
    span = SpanHeads(span=(10, 20)).run(model, tok, ids=ids)
    maps = eager_maps(model, ids)
    want = torch.stack([m[0, :, 20:, 10:20].double().sum(-1).mean(-1) for m in maps])
    assert (span.values - want).abs().max().item() < 2e-6
    hs = HiddenSinks(alpha=5.0).run(model, tok, ids=ids)
    cols = torch.stack([m[0].double().mean(1) for m in maps])  # (L, H, N)
    cols[..., 0] = 0
    assert torch.equal(hs.values, (cols > 5.0 / 48).sum(-1).double())


def test_massive_activations_at_the_first_token(smollm2):
    model, tok = smollm2
    from attnkit.analysis.heads import _text_ids

    m = massive_activations(model, _text_ids(tok, 64))
    assert m.hits and 0 in {h[2] for h in m.hits}  # the first token carries them (dim 507 in SmolLM2)
    assert m.top3[10:, 0].min() > 100


def test_retrieval_heads_score_copying_from_the_needle(smollm2):
    model, tok = smollm2
    s = RetrievalHeads(tokens=96, depths=(0.5,)).run(model, tok)
    assert s.shape == (30, 9)
    assert float(s.values.max()) > 0 and float(s.values.min()) >= 0
    assert float(s.values.max()) <= 1 + 1e-9
