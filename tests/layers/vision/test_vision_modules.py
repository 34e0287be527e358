"""Family I, the vision modules over (B, H, W, C): each against its float64 reference (the 2x-naive rule, on a
non-square image), gradcheck, bad input, and the property its paper states. The generic layer tests
(tests/layers/test_layer_records.py) also run every record on the flat (B, N, C) form."""

from __future__ import annotations

import math

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
    aux_only = set(getattr(layer, "aux_only", ()))  # trained by the layer's aux_loss() alone (TCPA's prompt keys)
    for pname, p in layer.named_parameters():
        if pname not in aux_only:
            assert p.grad is not None and p.grad.isfinite().all(), (name, pname)
    if aux_only:
        layer.zero_grad()
        layer(x)
        layer.aux_loss().backward()
        assert all(getattr(layer, a).grad.abs().sum() > 0 for a in aux_only), name


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
        (lambda: vision.DualBranchAttention(32, 5), "heads"),
        (lambda: vision.DualBranchAttention(32, 4, window=0), "window"),
        (lambda: vision.DualBranchAttention(32, 4, compress=0), "compress"),
        (lambda: vision.DualBranchAttention(32, 4, window=4, shift=4), "shift"),
        (lambda: vision.GlobalLocalCrossAttention(32, 5), "heads"),
        (lambda: vision.GlobalLocalCrossAttention(32, 4, ratio=0.0), "ratio"),
        (lambda: vision.GlobalLocalCrossAttention(32, 4, ratio=1.5), "ratio"),
        (lambda: vision.RelationGeometryAttention(32, 5), "heads"),
        (lambda: vision.RelationGeometryAttention(32, 4, embed_dim=7), "embed_dim"),
        (lambda: vision.TokenCoordinatedPromptAttention(32, 5), "heads"),
        (lambda: vision.TokenCoordinatedPromptAttention(32, 4, cls_prompts=0), "cls_prompts"),
        (lambda: vision.TokenCoordinatedPromptAttention(32, 4, cls_prompts=2, cls_topk=3), "cls_topk"),
        (lambda: vision.TokenCoordinatedPromptAttention(32, 4, image_topk=0), "image_topk"),
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


def _plain_attention(layer, x, heads):
    """``proj(softmax(Q K^T / sqrt d) V)`` with ``layer``'s ``qkv`` and ``proj``: plain multi-head attention."""
    B, H, W, C = x.shape
    q, k, v = layer.qkv(x.reshape(B, H * W, C)).reshape(B, H * W, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    return layer.proj(out.transpose(1, 2).reshape(B, H * W, C)).reshape(B, H, W, C)


def test_ultragen_local_branch_stays_in_its_window_and_the_global_branch_sees_the_image():
    torch.manual_seed(8)
    layer = vision.DualBranchAttention(32, 4, window=2, compress=2).double()
    x = torch.randn(1, 4, 6, 32, dtype=torch.float64)
    x2 = x.clone()
    x2[:, -1, -1] += 1.0  # outside the 2 x 2 window of (0, 0) and outside its 2 x 2 pooling bin
    with torch.no_grad():
        layer.mix.fill_(-1e4)  # alpha = 0: the local branch alone
        assert err(layer(x2)[:, 0, 0], layer(x)[:, 0, 0]) < 1e-12
        assert err(layer(x2)[:, -1, -2], layer(x)[:, -1, -2]) > 1e-6  # same window
        layer.mix.fill_(0.0)  # alpha = 1/2: the pooled tokens carry the corner to (0, 0)
        assert err(layer(x2)[:, 0, 0], layer(x)[:, 0, 0]) > 1e-6
        # one window over the whole image and alpha = 0 is plain multi-head attention
        whole = vision.DualBranchAttention(32, 4, window=6).double()
        whole.load_state_dict(layer.state_dict())
        whole.mix.fill_(-1e4)
        assert err(whole(x), _plain_attention(whole, x, 4)) < 1e-12
    # a shifted window grid moves the boundaries, and matches its oracle on a ragged image
    shifted = vision.DualBranchAttention(32, 4, window=3, compress=2, shift=1)
    shifted.load_state_dict(layer.float().state_dict())
    check_layer_against_oracle(shifted, _img(2, 5, 7, seed=9), label="ultragen shift=1")


def test_dcal_adds_cross_attention_at_the_most_attended_tokens_only():
    torch.manual_seed(9)
    layer = vision.GlobalLocalCrossAttention(32, 4, ratio=0.2).double()
    x = torch.randn(2, 3, 5, 32, dtype=torch.float64)
    with torch.no_grad():
        y = layer(x)
        sel = layer.last_selected
        assert sel.shape == (2, 3) and layer.top(15) == 3
        plain = _plain_attention(layer, x, 4).reshape(2, 15, 32)
        picked = torch.zeros(2, 15, dtype=torch.bool)
        picked[torch.arange(2)[:, None], sel] = True
        y = y.reshape(2, 15, 32)
        assert err(y[~picked], plain[~picked]) < 1e-12 and err(y[picked], plain[picked]) > 1e-3
        # the selected tokens are those receiving the most attention, averaged over the queries and heads
        q, k, _ = layer.qkv(x.reshape(2, 15, 32)).reshape(2, 15, 3, 4, 8).permute(2, 0, 3, 1, 4)
        received = (q @ k.transpose(-1, -2) / 8**0.5).softmax(-1).mean((1, 2))
        assert (received.topk(3, -1).indices.sort(-1).values == sel.sort(-1).values).all()


def test_dcal_pair_wise_attention_is_a_training_regulariser():
    torch.manual_seed(10)
    layer = vision.GlobalLocalCrossAttention(32, 4, pair=True)
    x = _img(3, 3, 4, seed=10)
    layer.train()
    check_layer_against_oracle(layer, x, label="dcal pwca")
    y = layer(x)
    x2 = x.clone()
    x2[1] += torch.randn_like(x2[1])  # image 1 is image 0's distractor
    assert err(layer(x2)[0], y[0]) > 1e-4
    layer.eval()  # removed at inference: each image alone
    assert err(layer(x2)[0], layer(x)[0]) < 1e-7
    plain = vision.GlobalLocalCrossAttention(32, 4)
    plain.load_state_dict(layer.state_dict())
    assert err(plain.train()(x), layer(x)) < 1e-7


def test_relation_bias_is_the_log_scaled_cell_geometry_and_a_score_mod():
    torch.manual_seed(11)
    boxes = vision.cell_boxes(2, 3, dtype=torch.float64)
    assert err(boxes, ak.reference.vision.grid_boxes(2, 3)) < 1e-15
    e = vision.box_relations(boxes, boxes)
    # from cell (0, 0) to cell (1, 2): two cells right, one down, same size
    want = torch.tensor([math.log(2 + 1), math.log(1 + 1), 0.0, 0.0], dtype=torch.float64)
    assert err(e[0, 5], want) < 1e-4
    layer = vision.RelationGeometryAttention(32, 4).double()
    b = layer.bias(4, 5)
    assert b.shape == (4, 20, 20) and (b >= 0).all()
    # on a uniform grid the bias depends on the offset only: (0, 0) -> (1, 1) equals (2, 3) -> (3, 4)
    assert err(b[:, 0, 6], b[:, 13, 19]) < 1e-12 and err(b[:, 6, 0], b[:, 0, 6]) < 1e-12
    x = torch.randn(2, 4, 5, 32, dtype=torch.float64)
    with torch.no_grad():
        t = x.reshape(2, 20, 32)
        q, k, v = layer.qkv(t).reshape(2, 20, 3, 4, 8).permute(2, 0, 3, 1, 4)
        manual = torch.softmax(q @ k.transpose(-1, -2) / 8**0.5 + b, -1) @ v
        via_mod = ak.attention(q, k, v, score=ak.scores.TensorBias(b), backend="sdpa")
        assert err(via_mod, manual) < 1e-12
        y = layer.proj(manual.transpose(1, 2).reshape(2, 4, 5, 32))
        assert err(layer(x), y) < 1e-12
    # boxes of a detector instead of the grid, checked against the oracle
    rnd = torch.rand(15, 4) * 0.5 + 0.05
    layer32 = vision.RelationGeometryAttention(32, 4)
    check_layer_against_oracle(layer32, _img(), label="relation boxes", boxes=rnd)
    with pytest.raises(ak.ShapeError, match="boxes"):
        layer32(_img(), boxes=torch.rand(14, 4))
    with pytest.raises(ak.ShapeError, match="boxes"):
        layer32(_img(), boxes=torch.zeros(15, 4))
    with pytest.raises(ak.ShapeError, match="bias"):
        ak.scores.TensorBias(torch.zeros(3, 4))


def test_tcpa_cls_prompts_reach_the_class_token_only_and_the_matching_loss():
    torch.manual_seed(12)
    layer = vision.TokenCoordinatedPromptAttention(32, 4)
    with pytest.raises(ak.ShapeError, match="forward"):
        layer.aux_loss()
    x = _img(2, 3, 4, seed=12)
    y, c = layer(x), layer.pool(x)
    y_ref, c_ref, loss_ref = layer.reference_tokens(x.double())
    assert c.shape == (2, 32) and err(c, c_ref) < 1e-5 and err(y, y_ref) < 1e-5
    assert abs(layer.aux_loss().item() - loss_ref.item()) < 1e-5
    with torch.no_grad():
        layer.prompts_c.add_(torch.randn_like(layer.prompts_c))  # CLS prompts: the class token's output only
    assert err(layer(x), y) < 1e-7 and err(layer.pool(x), c) > 1e-4
    with torch.no_grad():
        layer.prompts_i.add_(torch.randn_like(layer.prompts_i))  # image prompts: the image tokens' outputs
    assert err(layer(x), y) > 1e-4
    # a prompt no token chose changes nothing
    layer(x)
    sim = (
        torch.nn.functional.normalize(x.reshape(2, 12, 32), dim=-1)
        @ torch.nn.functional.normalize(layer.keys_i, dim=-1).t()
    )
    unused = set(range(8)) - set(sim.topk(2, -1).indices.flatten().tolist())
    if unused:
        before = layer(x)
        with torch.no_grad():
            layer.prompts_i[sorted(unused)] += 5.0
        assert err(layer(x), before) < 1e-7
