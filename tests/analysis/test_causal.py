"""Head interventions, patching, attribution and knockout on SmolLM2 (real weights)."""

import pytest
import torch

from attnkit.analysis import (
    direct_logit_attribution,
    finercut,
    head_outputs,
    intervene,
    ioi,
    knockout,
    patch_heads,
)
from attnkit.errors import ShapeError


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module")
def ids():
    return torch.randint(300, 8000, (2, 24), generator=torch.Generator().manual_seed(3))


def test_identity_settings_are_bit_identical(smollm2, ids):
    model, _ = smollm2
    base = _logits(model, ids)
    with intervene(model):
        assert torch.equal(_logits(model, ids), base)
    with intervene(model, scale={(3, 1): 1.0, (10, 4): 1}):
        assert torch.equal(_logits(model, ids), base)
    with intervene(model, scale={(3, 1): 0.5}):
        assert not torch.equal(_logits(model, ids), base)
    assert torch.equal(_logits(model, ids), base)  # removed on exit


@pytest.mark.parametrize("layer, head, how", [(7, 4, "zero"), (12, 2, 1.7)])
def test_edits_equal_editing_the_projection_slice(smollm2, ids, layer, head, how):
    """An independent path: the head's columns of o_proj zeroed or scaled."""
    model, _ = smollm2
    D = 64
    edit = {"ablate": {(layer, head): how}} if how == "zero" else {"scale": {(layer, head): how}}
    with intervene(model, **edit):
        ours = _logits(model, ids)
    proj = model.model.layers[layer].self_attn.o_proj
    saved = proj.weight.data.clone()
    try:
        proj.weight.data[:, head * D : (head + 1) * D] *= 0.0 if how == "zero" else how
        want = _logits(model, ids)
    finally:
        proj.weight.data.copy_(saved)
    assert (ours - want).abs().max().item() < 1e-4


def test_mean_and_resample_ablation(smollm2, ids):
    model, _ = smollm2
    other = torch.randint(300, 8000, ids.shape, generator=torch.Generator().manual_seed(4))
    src = head_outputs(model, other)
    assert src[0].shape == (2, 24, 9, 64)
    means = [o.mean(dim=(0, 1)) for o in src]
    with intervene(model, ablate={(5, 0): "mean"}, means=means):
        a = _logits(model, ids)
    with intervene(model, ablate={(5, 0): "resample"}, source=src):
        b = _logits(model, ids)
    base = _logits(model, ids)
    assert not torch.equal(a, base) and not torch.equal(b, base)
    # resampling every head of every layer from `other` replays `other`'s attention outputs exactly
    every = {(layer, h): "resample" for layer in range(30) for h in range(9)}
    with intervene(model, ablate=every, source=src):
        replay = head_outputs(model, ids)
    assert all((r - s).abs().max().item() < 1e-4 for r, s in zip(replay[:1], src[:1], strict=True))


def test_bad_heads_are_named(smollm2):
    model, _ = smollm2
    with pytest.raises(ShapeError, match="layer"):
        with intervene(model, ablate={(30, 0): "zero"}):
            pass
    with pytest.raises(ShapeError, match="means"):
        with intervene(model, ablate={(0, 0): "mean"}):
            pass
    with pytest.raises(ShapeError, match="one of"):
        with intervene(model, ablate={(0, 0): "drop"}):
            pass


def test_ioi_patching_and_attribution(smollm2):
    model, tok = smollm2
    data = ioi(tok, batch=4, seed=0)
    assert data.clean.shape == data.corrupt.shape and len(data.answer) >= 2
    heads = [(29, h) for h in range(9)] + [(0, 0)]
    patch = patch_heads(model, data.clean, data.corrupt, data.answer, data.wrong, heads=heads)
    assert torch.isfinite(patch.values[29]).all() and torch.isnan(patch.values[5]).all()
    dla = direct_logit_attribution(model, data.clean, data.answer, data.wrong)
    assert dla.shape == (30, 9)
    # The final residual is embeddings + every attention and MLP sublayer's output, and with the final norm's
    # scale fixed the logit difference is linear in it: the heads' attributions, summed per layer, must equal
    # the attention sublayer's own output (captured by a hook, not split by head) on the same direction, and
    # all components together the model's logit difference.
    parts = {}
    hooks = [model.model.embed_tokens.register_forward_hook(lambda m, a, o: parts.__setitem__("embed", o[:, -1]))]
    for i, block in enumerate(model.model.layers):
        hooks.append(
            block.self_attn.register_forward_hook(lambda m, a, o, i=i: parts.__setitem__(("attn", i), o[0][:, -1]))
        )
        hooks.append(block.mlp.register_forward_hook(lambda m, a, o, i=i: parts.__setitem__(("mlp", i), o[:, -1])))
    hooks.append(model.model.norm.register_forward_pre_hook(lambda m, a: parts.__setitem__("final", a[0][:, -1])))
    try:
        logits = _logits(model, data.clean)[:, -1]
    finally:
        for h in hooks:
            h.remove()
    norm, head = model.model.norm, model.lm_head
    sigma = parts["final"].pow(2).mean(-1, keepdim=True).add(norm.variance_epsilon).sqrt()
    direction = (head.weight[data.answer] - head.weight[data.wrong]) * norm.weight / sigma
    on = lambda x: (x * direction).sum(-1).mean().item()  # noqa: E731
    for layer in (0, 14, 29):
        assert abs(dla.values[layer].sum().item() - on(parts[("attn", layer)])) < 1e-3
    total = on(parts["embed"]) + sum(on(parts[(k, i)]) for k in ("attn", "mlp") for i in range(30))
    r = torch.arange(len(data.answer))
    assert abs(total - (logits[r, data.answer] - logits[r, data.wrong]).mean().item()) < 1e-2


def test_knockout_changes_only_the_blocked_queries(smollm2, ids):
    model, _ = smollm2
    src = torch.zeros(24, dtype=torch.bool)
    src[2:10] = True
    dst = torch.zeros(24, dtype=torch.bool)
    dst[20:] = True
    base = _logits(model, ids)
    with knockout(model, src=src, dst=dst, layers=range(0, 30)):
        ko = _logits(model, ids)
    assert (ko[:, :20] - base[:, :20]).abs().max().item() < 1e-4
    assert (ko[:, 20:] - base[:, 20:]).abs().max().item() > 1e-2
    with knockout(model, src=torch.zeros(24, dtype=torch.bool), dst=dst, layers=range(30)):
        assert (_logits(model, ids) - base).abs().max().item() < 1e-4


def test_finercut_removes_the_least_harmful_sublayer_first(smollm2):
    model, _ = smollm2
    ids = torch.randint(300, 8000, (1, 16), generator=torch.Generator().manual_seed(5))
    steps = finercut(model, ids, steps=2)
    assert len(steps) == 2 and steps[0]["removed"] != steps[1]["removed"]
    assert 0 <= steps[0]["kl"] <= steps[1]["kl"] + 1e-6


def test_context_divergence_and_attention_influence(smollm2):
    from attnkit.analysis import attention_influence, context_divergence

    model, tok = smollm2
    question = tok(" Question: what colour is the sky?", return_tensors="pt").input_ids
    context = tok("The sky on this planet is green.", return_tensors="pt").input_ids
    same = context_divergence(model, question, question)
    assert same.values.abs().max().item() < 1e-6
    div = context_divergence(model, torch.cat([context, question], 1), question)
    assert div.shape == (30, 9) and div.values.min().item() > 0
    docs = torch.randint(300, 8000, (2, 16), generator=torch.Generator().manual_seed(9))
    none = attention_influence(model, docs, heads=[])
    assert torch.equal(none.influence, torch.zeros(2, dtype=torch.float64))
    some = attention_influence(model, docs, heads=[(layer, h) for layer in range(3, 8) for h in range(9)])
    assert some.influence.abs().min().item() > 0
