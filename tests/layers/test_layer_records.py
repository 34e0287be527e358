"""Every registered layer (kind ``layer``: family D, later family I), tested from its record alone: the float64
oracle, cached decode where it claims decode, gradients, key padding, and the spatial forms."""

from __future__ import annotations

import pytest
import torch

import attnkit as ak
from attnkit.layers import Attention2d, Attention3d
from attnkit.patterns import Neighborhood
from tests.helpers import check_decode, check_layer_against_oracle, err

LAYERS = ak.registry.records(kind="layer")


def _x(n=24, dim=32, seed=0):
    return torch.randn(2, n, dim, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("rec", LAYERS, ids=lambda r: r.name)
def test_record_layer_matches_its_oracle(rec):
    torch.manual_seed(0)
    layer = rec.make(24, dim=32, heads=4).eval()
    assert hasattr(layer, "reference"), f"{rec.name}: a registered layer has a float64 reference"
    check_layer_against_oracle(layer, _x(), grads="backward" in rec.supports, label=rec.name)


@pytest.mark.parametrize("rec", [r for r in LAYERS if "decode" in r.supports], ids=lambda r: r.name)
def test_record_layer_decodes_as_it_forwards(rec):
    torch.manual_seed(1)
    layer = rec.make(24, dim=32, heads=4).eval()
    check_decode(layer, _x(seed=1), prefill=7)


@pytest.mark.parametrize("rec", [r for r in LAYERS if "padding" in r.supports], ids=lambda r: r.name)
def test_record_layer_ignores_padded_keys(rec):
    torch.manual_seed(2)
    layer = rec.make(24, dim=32, heads=4).eval()
    x = _x(seed=2)
    mask = torch.ones(2, 24, dtype=torch.bool)
    mask[1, :5] = False
    y = layer(x, key_padding_mask=mask)
    x2 = x.clone()
    x2[1, :5] = 50.0
    y2 = layer(x2, key_padding_mask=mask)
    if y.shape == x.shape:  # a sequence layer: the real tokens' outputs; a probe: the whole output
        y, y2 = y[:, 5:], y2[:, 5:]
    assert err(y, y2) <= 1e-5 * y.abs().max().item(), rec.name


def test_attention2d_over_an_image_matches_the_flat_layer():
    torch.manual_seed(3)
    pat = Neighborhood((6, 8), kernel_size=3)
    layer = Attention2d(32, 4, mechanism=pat, rope=None)
    x = torch.randn(2, 6, 8, 32)
    y = layer(x)
    assert y.shape == x.shape
    flat = layer.reference(x.reshape(2, 48, 32).double()).reshape(x.shape)
    assert err(y, flat) <= 1e-5 * flat.abs().max().item()
    with pytest.raises(ak.ShapeError, match="grid"):
        layer(torch.randn(2, 8, 6, 32))
    with pytest.raises(ak.ShapeError, match=r"\(B, H, W, C\)"):
        layer(torch.randn(2, 48, 32))


def test_attention3d_with_a_causal_in_time_neighbourhood():
    rec = ak.registry.get("neighborhood_3d_causal")
    pat = rec.make(64)
    layer = Attention3d(16, 2, mechanism=pat, causal=False)
    x = torch.randn(1, *pat.shape, 16)
    y = layer(x)
    # Causal in time: frame t does not depend on later frames.
    x2 = x.clone()
    x2[:, -1] += 1.0
    assert err(layer(x2)[:, :-1], y[:, :-1]) < 1e-6


def test_the_2d_selector_runs_on_an_image():
    layer = Attention2d(32, 4, mechanism="bilevel_routing_2d", max_seq_len=64)
    grid = tuple(layer.mechanism.grid)  # the record's image grid for about 64 tokens
    y = layer(torch.randn(1, *grid, 32))
    assert y.shape == (1, *grid, 32) and y.isfinite().all()
