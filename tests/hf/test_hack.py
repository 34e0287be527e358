"""HACK: the band share equals its float64 reference; heads are classified and budgeted per class on SmolLM2
(a local-only attention is diagonal, a sink-only one vertical), and the layer's total stays at the budget."""

import pytest
import torch

import attnkit.hf as akhf
from attnkit.errors import ShapeError
from attnkit.hf.hack import local_share
from attnkit.reference import kv_policies as ref


def test_local_share_matches_the_reference():
    g = torch.Generator().manual_seed(2)
    Q, T = 8, 50
    p = torch.softmax(torch.randn(Q, T, generator=g) * 2, -1)
    mass = p.sum(0, keepdim=True)
    pos = torch.arange(T)[None]
    got = local_share(mass, pos, torch.tensor([T]), torch.ones(1, T, dtype=torch.bool), reach=12)
    assert got == pytest.approx(ref.band_share(p, list(range(T - Q, T)), list(range(T)), 12), rel=1e-6)


def test_classes_and_budgets_on_smollm2(smollm2, text_ids):
    model, _ = smollm2
    ids = text_ids[:, :256]
    pol = akhf.HACK(budget=64, window=16, band=16, threshold=0.5)
    with akhf.applied(model, pol), torch.no_grad():
        out = model(ids, use_cache=True)
        cache = out.past_key_values
        model(out.logits[:, -1:].argmax(-1), past_key_values=cache, use_cache=True)
    kinds = [k for layer in sorted(pol.classes) for k in pol.classes[layer]]
    assert set(kinds) == {"diagonal", "vertical"}  # SmolLM2 has both kinds
    for layer, classes in pol.classes.items():
        lens = [n - 1 for n in cache.layers[layer].lengths()]  # minus the decoded token
        assert sum(lens) <= 64 * len(lens)
        for n, kind in zip(lens, classes, strict=True):
            if kind == "diagonal" and "vertical" in classes:
                assert n == 32  # diagonal_share 0.5 of 64
        for h, kind in enumerate(classes):
            kept = cache.layers[layer].pos[h][0]
            if kind == "diagonal":
                assert set(range(4)) <= set(kept.tolist()) and int(kept[-2]) == 255


def test_bad_settings_are_named():
    with pytest.raises(ShapeError, match="threshold"):
        akhf.HACK(threshold=1.5)
    with pytest.raises(ShapeError, match="kernel"):
        akhf.HACK(kernel=4)
