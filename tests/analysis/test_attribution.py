"""Gradient x input, gradient-weighted rollout and their agreement with attention, on SmolLM2 and MiniLM."""

import pytest
import torch

from attnkit.analysis import attribution_agreement, gradient_weighted_rollout, gradient_x_input
from attnkit.errors import ShapeError


def test_gradient_x_input_equals_autograd_through_sdpa(smollm2):
    """The eager path the tool uses against the model's own SDPA path: the same gradient."""
    model, _ = smollm2
    ids = torch.randint(300, 8000, (1, 12), generator=torch.Generator().manual_seed(7))
    target = 1234
    ours = gradient_x_input(model, ids, target=target)
    emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    with torch.enable_grad():
        y = model(inputs_embeds=emb).logits[0, -1, target]
        (g,) = torch.autograd.grad(y, emb)
    want = (g * emb).sum(-1)[0].double()
    assert (ours - want).abs().max().item() < 1e-3 * want.abs().max().item() + 1e-5


def test_gradient_weighted_rollout_is_a_nonnegative_accumulation(smollm2):
    model, _ = smollm2
    ids = torch.randint(300, 8000, (1, 10), generator=torch.Generator().manual_seed(8))
    r = gradient_weighted_rollout(model, ids, target=42)
    assert r.shape == (10,) and bool((r >= 0).all()) and r[-1].item() >= 1.0


@pytest.mark.parametrize("which", ["smollm2", "minilm"])
def test_agreement_is_a_rank_correlation(which, request):
    model, tok = request.getfixturevalue(which)
    ids = tok("The capital of France is Paris, and the capital of Italy is", return_tensors="pt").input_ids
    target = 1000 if which == "smollm2" else -1
    res = attribution_agreement(model, ids, target=target)
    assert res["tokens"] == ids.shape[1] - 2
    for key in ("last_layer_attention", "rollout", "gradient_weighted_rollout"):
        assert -1.0 <= res[key] <= 1.0


def test_bad_ids_are_named(smollm2):
    model, _ = smollm2
    with pytest.raises(ShapeError, match="ids"):
        gradient_x_input(model, torch.ones(2, 4, dtype=torch.long), target=1)
