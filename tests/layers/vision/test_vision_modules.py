"""Family I, the vision modules over (B, H, W, C): each against its float64 reference (the 2x-naive rule, on a
non-square image), gradcheck, bad input, and the property its paper states. The generic layer tests
(tests/layers/test_layer_records.py) also run every record on the flat (B, N, C) form."""

from __future__ import annotations

import pytest
import torch

import attnkit as ak
from attnkit.layers import vision
from tests.helpers import check_layer_against_oracle, err

VISION = ak.registry.records(family="I")
NAMES = [r.name for r in VISION]


def _img(b=2, h=3, w=5, c=32, seed=0, dtype=torch.float32):
    return torch.randn(b, h, w, c, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def test_every_family_i_record_is_a_spatial_layer():
    assert len(VISION) >= 9
    for rec in VISION:
        assert rec.kind == "layer" and {"spatial", "backward", "trainable"} <= rec.supports, rec.name
        layer = rec.make(64, dim=32, heads=4)
        assert isinstance(layer, vision.VisionMixer) and layer.grid == (8, 8), rec.name


@pytest.mark.parametrize("name", NAMES)
def test_matches_its_float64_reference_on_an_image(name):
    torch.manual_seed(0)
    layer = ak.registry.get(name).make(15, dim=32, heads=4)
    x = _img()
    y = check_layer_against_oracle(layer, x, label=name)
    assert y.shape == x.shape


@pytest.mark.parametrize("name", NAMES)
def test_gradcheck_in_float64(name):
    torch.manual_seed(1)
    layer = ak.registry.get(name).make(6, dim=8, heads=2).double()
    x = _img(1, 2, 3, 8, seed=1, dtype=torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(layer, (x,), eps=1e-6, atol=1e-6)
    layer(x).sum().backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in layer.parameters()), name


@pytest.mark.parametrize("name", NAMES)
def test_bad_input_is_named(name):
    layer = ak.registry.get(name).make(16, dim=32, heads=4)
    with pytest.raises(ak.ShapeError, match=r"x.*\(B, H, W, C\) with C = 32"):
        layer(torch.randn(1, 4, 4, 16))
    with pytest.raises(ak.ShapeError, match=r"\(B, 16, C\)"):
        layer(torch.randn(1, 15, 32))
    with pytest.raises(ak.DTypeError, match="floating-point"):
        layer(torch.ones(1, 4, 4, 32, dtype=torch.int64))
    with pytest.raises(ak.DTypeError, match="module's parameters"):
        layer(torch.randn(1, 4, 4, 32, dtype=torch.float64))
    assert layer.double()(torch.randn(1, 4, 4, 32, dtype=torch.float64)).dtype == torch.float64


def test_grid_for_and_the_constructors_name_their_arguments():
    assert vision.grid_for(24) == (4, 6) and vision.grid_for(256) == (16, 16) and vision.grid_for(7) == (1, 7)
    with pytest.raises(ak.ShapeError, match="n"):
        vision.grid_for(0)
    for make, arg in [
        (lambda: vision.EfficientLocalAttention(32, kernel=4), "kernel"),
        (lambda: vision.EfficientLocalAttention(32, groups=5), "groups"),
        (lambda: vision.ULSAM(32, groups=3), "groups"),
        (lambda: vision.ChannelGroupAttention(32, 5), "heads"),
        (lambda: vision.FocalModulation(32, focal_level=0), "focal_level"),
        (lambda: vision.AggregatedAttention(32, 4, pool=0), "pool"),
        (lambda: vision.CausalClassTokenAttention(32, 4, mix=1.5), "mix"),
        (lambda: vision.TAPAttention(32, 4, kernels=(2,)), "kernels"),
        (lambda: vision.PartialAttention(32, 4, n_div=1), "n_div"),
        (lambda: vision.PartialAttention(32, 4, kernel=2), "kernel"),
        (lambda: vision.PartialAttention(32, 5), "heads"),
        (lambda: vision.PolylineMaskedAttention(32, 5), "heads"),
    ]:
        with pytest.raises(ak.ShapeError, match=arg):
            make()


def test_reversed_attention_normalises_columns():
    torch.manual_seed(2)
    layer = vision.ReversedAttention(32, 4, keep_attention=True)
    layer(_img())
    a = layer.last_attention
    assert err(a.sum(-2), torch.ones_like(a.sum(-2))) < 1e-5
    assert err(a.sum(-1), torch.ones_like(a.sum(-1))) > 1e-2  # rows are not normalised


def test_illama_is_causal_in_raster_order_and_its_class_token_sees_everything():
    torch.manual_seed(3)
    layer = vision.CausalClassTokenAttention(32, 4)
    x = _img()
    y, c = layer(x), layer.pool(x)
    y_ref, c_ref = layer.reference_tokens(x.double())
    assert c.shape == (2, 32) and err(c, c_ref) < 1e-5 and err(y, y_ref) < 1e-5
    x2 = x.clone()
    x2[:, -1, -1] += 1.0  # the last image token
    y2 = layer(x2)
    assert err(y2.reshape(2, 15, 32)[:, :-1], y.reshape(2, 15, 32)[:, :-1]) < 1e-6
    assert err(layer.pool(x2), c) > 1e-4
    soft = vision.CausalClassTokenAttention(32, 4, mix=0.3)
    soft.load_state_dict(layer.state_dict())
    check_layer_against_oracle(soft, x, label="illama soft mask")


def test_tap_aux_loss_is_the_attention_diversity_loss():
    torch.manual_seed(4)
    layer = vision.TAPAttention(32, 4)
    with pytest.raises(ak.ShapeError, match="forward"):
        layer.aux_loss()
    x = _img(1, 3, 4)
    layer(x)
    loss = layer.aux_loss()
    _, a_ref = layer.reference_attention(x.double())
    want = ak.reference.vision.attention_diversity_loss(a_ref)
    assert abs(loss.item() - want.item()) < 1e-5
    loss.backward()
    assert layer.qkv.weight.grad is not None and layer.qkv.weight.grad.abs().sum() > 0
    same = torch.full((1, 1, 4, 4), 0.25)
    assert abs(vision.attention_diversity_loss(same).item() - 1.0) < 1e-6
    with pytest.raises(ak.ShapeError, match="a"):
        vision.attention_diversity_loss(torch.rand(2, 3, 4))


def test_aggregated_attention_sees_the_whole_image_through_the_pool():
    torch.manual_seed(5)
    layer = vision.AggregatedAttention(32, 4, kernel=3, pool=2)
    x = _img(1, 6, 6)
    y = layer(x)
    x2 = x.clone()
    x2[:, -1, -1] += 1.0  # far outside the 3x3 window of (0, 0), inside a pooled cell
    assert err(layer(x2)[:, 0, 0], y[:, 0, 0]) > 1e-6


def test_partial_attention_convolves_one_slice_and_attends_over_the_rest():
    torch.manual_seed(6)
    layer = vision.PartialAttention(32, 4)  # 8 convolved channels, 24 attended
    assert layer.cp == 8
    x = _img(1, 5, 6)
    y = layer(x)
    x2 = x.clone()
    x2[..., 8:] += torch.randn_like(x2[..., 8:])  # the attended channels only
    y2 = layer(x2)
    assert err(y2[..., :8], y[..., :8]) < 1e-7 and err(y2[..., 8:], y[..., 8:]) > 1e-3
    x3 = x.clone()
    x3[:, -1, -1, :8] += 1.0  # a convolved channel, far outside the 3x3 window of (0, 0)
    y3 = layer(x3)
    assert err(y3[..., 8:], y[..., 8:]) < 1e-7
    assert err(y3[:, 0, 0, :8], y[:, 0, 0, :8]) < 1e-7 and err(y3[:, -1, -1, :8], y[:, -1, -1, :8]) > 1e-4
    x4 = x.clone()
    x4[:, -1, -1, 8:] += 1.0  # attention reaches (0, 0) from the far corner
    assert err(layer(x4)[:, 0, 0, 8:], y[:, 0, 0, 8:]) > 1e-6


def test_polyline_mask_multiplies_the_decays_along_the_row_then_the_column():
    torch.manual_seed(7)
    a, b = -torch.rand(2, 3, 4, dtype=torch.float64), -torch.rand(2, 3, 4, dtype=torch.float64)
    m = vision.polyline_log_mask(a, b)
    assert m.shape == (2, 12, 12) and (m.diagonal(dim1=-2, dim2=-1) == 0).all() and (m <= 0).all()
    # query (0, 0) to key (2, 3): row 0 over columns 1..3, then column 3 over rows 1..2
    assert err(m[:, 0, 11], a[:, 0, 1:].sum(-1) + b[:, 1:, 3].sum(-1)) < 1e-12
    # and back from (2, 3) to (0, 0): row 2 over columns 1..3, then column 0 over rows 1..2
    assert err(m[:, 11, 0], a[:, 2, 1:].sum(-1) + b[:, 1:, 0].sum(-1)) < 1e-12
    # a zero-decay mask is plain multi-head attention, bit for bit in the logits
    layer = vision.PolylineMaskedAttention(32, 4).double()
    x = torch.randn(2, 3, 4, 32, dtype=torch.float64)
    with torch.no_grad():
        layer.A_log.fill_(-1e4)  # e^A = 0: every decay is exp(0) = 1
        y = layer(x)
        q, k, v = layer.qkv(x.reshape(2, 12, 32)).reshape(2, 12, 3, 4, 8).permute(2, 0, 3, 1, 4)
        plain = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        plain = layer.proj(plain.transpose(1, 2).reshape(2, 12, 32)).reshape(2, 3, 4, 32)
    assert err(y, plain) < 1e-12

    # strong decays make far cells matter less: the corner's influence on (0, 0) falls as A grows
    def reach(A):
        with torch.no_grad():
            layer.A_log.fill_(A)
            layer.dt_bias.fill_(1.0)
        x2 = x.clone().requires_grad_(True)
        layer(x2)[:, 0, 0].sum().backward()
        return x2.grad[:, -1, -1].abs().sum().item()

    assert reach(2.0) < 0.1 * reach(-3.0)
