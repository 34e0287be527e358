"""Encoder token pruning and merging on all-MiniLM-L6-v2 (family F): tokens really leave, keep=1 is dense,
the fast selection agrees with the float64 reference, bad input is named, padding works, and [CLS]-ranked
pruning beats random pruning."""

import pytest
import torch

from attnkit.errors import ShapeError, UnsupportedError
from attnkit.hf import encoder_prune as ep
from attnkit.reference import encoder_prune as ref

METHODS = (ep.VTCCLS, ep.HiRED, ep.FlowCut, ep.VMTC, ep.MustDrop, ep.VFlowOpt, ep.RandomKeep)


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


@pytest.fixture(scope="module")
def batch(minilm):
    from attnkit.models import english_text

    torch.set_num_threads(2)
    _, tok = minilm
    ids = tok(english_text()[:30000], add_special_tokens=False).input_ids
    rows = [[101] + ids[i * 126 : (i + 1) * 126] + [102] for i in range(4)]
    return {"input_ids": torch.tensor(rows), "attention_mask": torch.ones(4, 128, dtype=torch.long)}


def _dense(model, enc):
    from attnkit.models.minilm import embed

    with torch.no_grad():
        return embed(model, enc)


def _states(model, enc):
    with torch.no_grad():
        return model(**enc, output_hidden_states=True).hidden_states


def _weights(layer):
    a = layer.attention.self
    return a.query.weight, a.query.bias, a.key.weight, a.key.bias, a.num_attention_heads


@pytest.mark.parametrize("cls", METHODS)
def test_keep_one_is_dense(minilm, batch, cls):
    model, _ = minilm
    out = ep.pruned_encode(model, batch, pruner=cls(keep=1.0))
    with torch.no_grad():
        dense = model(**batch).last_hidden_state
    assert out.tokens_per_layer == [128] * 6
    assert torch.equal(out.hidden, dense)
    assert torch.allclose(out.embedding, _dense(model, batch), atol=1e-6)


@pytest.mark.parametrize("cls", METHODS)
def test_tokens_leave(minilm, batch, cls):
    model, _ = minilm
    out = ep.pruned_encode(model, batch, pruner=cls(keep=0.5))
    assert out.tokens_per_layer[0] == 128
    assert out.tokens_per_layer[-1] == 2 + 63  # [CLS] + [SEP] + round(0.5 * 126)
    assert out.hidden.shape[1] == 65 and bool(out.mask.all())
    assert (out.positions[:, 0] == 0).all() and (out.positions == 127).any(1).all()  # [CLS], [SEP] stay
    if cls in (ep.VMTC, ep.VFlowOpt):
        assert float(out.sizes.sum(1).min()) > 65  # merged tokens carry their members
    elif cls is ep.MustDrop:  # windows this similar merge after layer 0: layer 1 already computes fewer
        low = ep.pruned_encode(model, batch, pruner=ep.MustDrop(keep=0.5, threshold=0.2))
        assert low.tokens_per_layer[1] < 128 and low.tokens_per_layer[-1] == 65
    else:
        assert torch.equal(out.sizes, torch.ones_like(out.sizes))


def test_cls_attention_matches_reference(minilm, batch):
    model, _ = minilm
    hs = _states(model, batch)
    for layer_idx in (0, 3):
        layer = model.encoder.layer[layer_idx]
        h = hs[layer_idx]
        real = torch.ones(h.shape[:2], dtype=torch.bool)
        size = torch.rand(h.shape[:2]) * 3 + 1
        fast = ep.cls_attention(layer, h, real, size, size_bias=True)
        slow = ref.cls_attention(*_weights(layer), h, real, size.log())
        assert torch.allclose(fast.double(), slow, atol=1e-6)


def test_vtc_cls_and_hired_choose_the_reference_sets(minilm, batch):
    model, _ = minilm
    hs = _states(model, batch)
    L = 3
    layer = model.encoder.layer[L]
    cand = list(range(1, 127))
    score = ref.cls_attention(*_weights(layer), hs[L])
    alloc = ref.cls_attention(*_weights(model.encoder.layer[0]), hs[0])
    summed = sum(ref.cls_attention(*_weights(model.encoder.layer[i]), hs[i]) for i in (1, 2, 3))
    out = ep.pruned_encode(model, batch, pruner=ep.VTCCLS(layer=L, keep=0.25))
    ens = ep.pruned_encode(model, batch, pruner=ep.VTCCLS(layer=L, start=1, keep=0.25))
    hi = ep.pruned_encode(model, batch, pruner=ep.HiRED(layer=L, keep=0.25, parts=3))
    for b in range(4):
        assert out.positions[b, 1:-1].tolist() == ref.topk_positions(score[b], cand, 32)
        assert ens.positions[b, 1:-1].tolist() == ref.topk_positions(summed[b], cand, 32)
        assert hi.positions[b, 1:-1].tolist() == ref.hired_positions(alloc[b], score[b], cand, 3, 32)


def test_vmtc_merged_states_match_reference(minilm, batch):
    model, _ = minilm
    hs = _states(model, batch)
    L = 5  # the last layer: the merged states are the output
    layer = model.encoder.layer[L]
    out = ep.pruned_encode(model, batch, pruner=ep.VMTC(layer=L, keep=0.25))
    score = ref.cls_attention(*_weights(layer), hs[L])
    a = layer.attention.self
    keys = hs[L].double() @ a.key.weight.double().T + a.key.bias.double()
    for b in range(2):
        want = ref.vmtc_merge(hs[L + 1][b], keys[b], score[b], list(range(1, 127)), 32)
        for j, p in enumerate(out.positions[b, 1:-1].tolist()):
            assert torch.allclose(out.hidden[b, 1 + j].double(), want[p], atol=1e-5)
        assert sorted(want) == out.positions[b, 1:-1].tolist()


def test_flowcut_and_mustdrop_scores_match_reference(minilm, batch):
    model, _ = minilm
    hs = _states(model, batch)
    layer = model.encoder.layer[2]
    a = layer.attention.self
    h = hs[2]
    real = torch.ones(h.shape[:2], dtype=torch.bool)
    cand = real.clone()
    cand[:, 0] = cand[:, -1] = False
    v = ep._heads(a.value, h, a.num_attention_heads)
    m = torch.softmax((v[:, :, :1] @ v.transpose(-1, -2))[:, :, 0], -1).mean(1)
    att = ep.cls_attention(layer, h, real)
    fast = ep.flowcut_score(att, m, v.mean(1).abs().sum(-1), cand)
    vd = v.double()
    md = torch.softmax((vd[:, :, :1] @ vd.transpose(-1, -2))[:, :, 0], -1).mean(1)
    slow = ref.flowcut_score(ref.cls_attention(*_weights(layer), h)[0], md[0], vd.mean(1)[0], list(range(1, 127)))
    assert torch.allclose(fast[0, 1:127].double(), slow, rtol=1e-5)
    sims = ref.window_similarity(hs[1][0], list(range(1, 127)), 3)
    dst = ep.mustdrop_windows(hs[1], cand, torch.tensor([0] * 4), window=3, threshold=float(sims.median()))
    merged = sorted({int(dst[0, j]) for j in range(1, 127) if int(dst[0, j]) != j})
    want = [1 + 3 * w + 2 for w in range(len(sims)) if sims[w] >= float(sims.median())]
    assert merged == want


def test_padding_rows_keep_their_own_counts(minilm, batch):
    model, _ = minilm
    enc = {k: v.clone() for k, v in batch.items()}
    enc["input_ids"][1, 64:] = 0
    enc["input_ids"][1, 63] = 102
    enc["attention_mask"][1, 64:] = 0
    for cls in (ep.VTCCLS, ep.VMTC, ep.FlowCut):
        out = ep.pruned_encode(model, enc, pruner=cls(keep=0.5))
        assert out.kept.tolist() == [65, 2 + 31, 65, 65]
        alone = ep.pruned_encode(
            model, {k: v[1:2, :64] for k, v in enc.items()}, pruner=cls(keep=0.5)
        )  # the padded row, unpadded
        assert torch.allclose(out.embedding[1], alone.embedding[0], atol=1e-5)
    dense = ep.pruned_encode(model, enc)
    assert torch.allclose(dense.embedding, _dense(model, enc), atol=1e-5)


def test_cls_ranking_beats_random(minilm, batch):
    model, _ = minilm
    dense = _dense(model, batch)
    cos = {}
    for name, p in (("vtc", ep.VTCCLS(layer=3, keep=0.5)), ("rand", ep.RandomKeep(layer=3, keep=0.5))):
        cos[name] = float((ep.pruned_encode(model, batch, pruner=p).embedding * dense).sum(-1).mean())
    assert cos["vtc"] > cos["rand"] + 0.01


def test_bad_input(minilm, batch):
    model, _ = minilm
    with pytest.raises(ShapeError, match="keep"):
        ep.pruned_encode(model, batch, pruner=ep.VTCCLS(keep=1.5))
    with pytest.raises(ShapeError, match="layer"):
        ep.pruned_encode(model, batch, pruner=ep.VTCCLS(layer=6))
    with pytest.raises(ShapeError, match="merge_layer"):
        ep.pruned_encode(model, batch, pruner=ep.MustDrop(layer=1, merge_layer=1))
    with pytest.raises(ShapeError, match="input_ids"):
        ep.pruned_encode(model, {"input_ids": torch.zeros(5, dtype=torch.long)})
    with pytest.raises(ShapeError, match="left padding"):
        m = batch["attention_mask"].clone()
        m[0, 0] = 0
        ep.pruned_encode(model, {"input_ids": batch["input_ids"], "attention_mask": m})
    with pytest.raises(UnsupportedError, match="BertModel"):
        ep.pruned_encode(torch.nn.Linear(2, 2), batch)
    with pytest.raises(ShapeError, match="parts"):
        ep.pruned_encode(model, batch, pruner=ep.HiRED(parts=0))


def test_registered():
    from attnkit.records import Record  # noqa: F401
    from attnkit.registry import get

    for name, cls in (
        ("vtc_cls", ep.VTCCLS),
        ("hired", ep.HiRED),
        ("flowcut", ep.FlowCut),
        ("vmtc", ep.VMTC),
        ("mustdrop", ep.MustDrop),
        ("vflowopt", ep.VFlowOpt),
    ):
        rec = get(name)
        assert rec.family == "F" and rec.kind == "pruner" and rec.paper.endswith("[text tokens, MiniLM [CLS]]")
        made = rec.make(256, budget=0.25)
        assert isinstance(made, cls) and made.keep == 0.25


def test_vflowopt_importance_and_recycling_match_reference(minilm, batch):
    model, _ = minilm
    hs = _states(model, batch)
    layer = model.encoder.layer[1]
    h = hs[1]
    real = torch.ones(h.shape[:2], dtype=torch.bool)
    cand = real.clone()
    cand[:, 0] = cand[:, -1] = False
    info = ep._self_information(batch["input_ids"], real)
    A = ep.head_mean_attention(layer, h, real)
    imp = ep.vflowopt_importance(A, real, cand, info, t=1.0, alpha=0.5)
    full = ref.attention_map(*_weights(layer), h)
    want = ref.vflowopt_importance(full[0], list(range(1, 127)), info[0], 1.0, 0.5)
    assert torch.allclose(imp[0, 1:127].double(), torch.tensor(want, dtype=torch.float64), atol=1e-6)
    pos = torch.arange(128)[None].repeat(4, 1)
    dst = ep.vflowopt_recycle(imp, cand, pos, torch.tensor([80] * 4), cell=4)
    groups = {}
    for j in range(1, 127):
        if int(dst[0, j]) != j or (dst[0] == j).sum() > 1:
            groups.setdefault(int(dst[0, j]), []).append(j)
    want = ref.vflowopt_recycle(imp[0], list(range(1, 127)), pos[0], 80, 4)
    assert {k: sorted(v) for k, v in groups.items() if len(v) > 1} == {k: v for k, v in want.items() if len(v) > 1}
    assert 126 - sum(len(v) - 1 for v in want.values()) == 80
