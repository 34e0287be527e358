"""Rollout and exact attention flow against the float64 Edmonds-Karp / product references."""

import pytest
import torch

from attnkit.analysis import attention_flow, attention_maps, rollout
from attnkit.errors import ShapeError
from attnkit.reference import analysis as ref


def _maps(L, B, H, N, causal, seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(L):
        s = torch.randn(B, H, N, N, generator=g, dtype=torch.float64) * 2
        if causal:
            s = s.masked_fill(~torch.ones(N, N, dtype=torch.bool).tril(), float("-inf"))
        out.append(s.softmax(-1))
    return out


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("residual", [True, False])
def test_flow_and_rollout_equal_the_reference(causal, residual):
    maps = _maps(3, 2, 2, 6, causal, seed=int(causal) + 2 * int(residual))
    flow = attention_flow(maps, residual=residual)
    assert flow.abs().max() > 0.1
    assert (flow - ref.attention_flow(maps, residual=residual)).abs().max().item() < 1e-12
    assert (rollout(maps, residual=residual) - ref.rollout(maps, residual=residual)).abs().max().item() < 1e-12
    if causal:  # no output draws from a later input
        assert flow[:, torch.ones(6, 6, dtype=torch.bool).triu(1)].abs().max().item() == 0


def test_flow_is_bounded_by_the_cuts_at_its_ends():
    """A max-flow never exceeds the capacity out of its source (a column sum of the first layer's mixing) or
    into its sink (a row sum of the last layer's: 1)."""
    maps = _maps(4, 1, 3, 7, True, seed=9)
    flow = attention_flow(maps)[0]
    mix = [0.5 * m[0].mean(0) + 0.5 * torch.eye(7, dtype=torch.float64) for m in maps]
    out_of_source = mix[0].sum(0)  # (j,)
    assert bool((flow <= 1 + 1e-12).all())
    assert bool((flow <= out_of_source[None, :] + 1e-12).all())
    assert bool((flow.diagonal() > 0).all())


def test_real_minilm_maps(minilm):
    model, tok = minilm
    ids = tok(["the cat sat on the mat"], return_tensors="pt").input_ids
    maps = attention_maps(model, ids)
    assert len(maps) == 6 and maps[0].shape == (1, 12, ids.shape[1], ids.shape[1])
    assert torch.allclose(maps[0].sum(-1), torch.ones(1, 12, ids.shape[1]), atol=1e-5)
    flow = attention_flow(maps)
    assert (flow - ref.attention_flow(maps)).abs().max().item() < 1e-10
    R = rollout(maps)
    assert torch.allclose(R.sum(-1), torch.ones(1, ids.shape[1], dtype=torch.float64))


def test_bad_maps_are_named():
    with pytest.raises(ShapeError, match="maps"):
        rollout([])
    with pytest.raises(ShapeError, match=r"maps\[0\]"):
        rollout([torch.rand(2, 3, 4)])
