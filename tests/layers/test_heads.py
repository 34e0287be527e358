"""Family-D head variants: MoH, SQA, BAM, the Minimal Transformer and RCMHA against their float64 oracles,
cached decode against the uncached forward, and each mechanism's own property."""

from __future__ import annotations

import copy

import pytest
import torch

import attnkit as ak
from attnkit.errors import ShapeError
from attnkit.layers.bam import BAMAttention
from attnkit.layers.minimal import MinimalAttention
from attnkit.layers.moh import MoHAttention
from attnkit.layers.rcmha import RCMHA
from attnkit.layers.sqa import SparseQueryAttention, variant_heads
from attnkit.records import all_records
from tests.helpers import check_decode, check_layer_against_oracle

DIM, HEADS = 32, 4


def _x(B=2, N=10, dim=DIM, seed=0):
    return torch.randn(B, N, dim, generator=torch.Generator().manual_seed(seed))


def _padding(B=2, N=10):
    m = torch.ones(B, N, dtype=torch.bool)
    m[0, :3] = False  # left padding in the first row
    m[1, -2:] = False  # right padding in the second
    return m


def _randomise(layer, seed=1):
    """Fresh non-default values for parameters that start at zero or near it (biases, u/v)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name in ("u", "v") or name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return layer


def _layers():
    torch.manual_seed(0)
    return {
        "moh": MoHAttention(DIM, HEADS, shared=1, top_k=2),
        "moh_gqa": MoHAttention(DIM, HEADS, shared=2, top_k=1, kv_heads=2),
        "moh_all_shared": MoHAttention(DIM, HEADS, shared=HEADS),
        "sqa": SparseQueryAttention(DIM, 8, variant="standard"),
        "sqa_symmetric": SparseQueryAttention.symmetric(DIM, 8),
        "sqa_extreme": SparseQueryAttention.extreme(DIM, 8),
        "sqa_extreme_mqa": SparseQueryAttention(DIM, 8, variant="extreme_mqa"),
        "bam": BAMAttention(DIM, HEADS, experts=3),
        "bam_shared_kv": BAMAttention(DIM, HEADS, experts=3, shared_kv=True),
        "minimal_collapsed": MinimalAttention(DIM, HEADS, mode="collapsed"),
        "minimal_shared": MinimalAttention(DIM, HEADS, mode="shared"),
        "minimal_symmetric": MinimalAttention(DIM, HEADS, mode="symmetric"),
        "minimal_symmetric_vo": MinimalAttention(DIM, HEADS, mode="symmetric", vo=True),
        "rcmha": _randomise(RCMHA(DIM, HEADS)),
        "rcmha_k4": _randomise(RCMHA(DIM, HEADS, kernel_size=4, rel_dim=6)),
    }


LAYERS = _layers()


@pytest.mark.parametrize("name", sorted(LAYERS))
@pytest.mark.parametrize("padded", [False, True])
def test_against_oracle(name, padded):
    """The 2x-naive rule in fp32 for the output and the input gradient, with and without key padding."""
    layer = LAYERS[name]
    kw = {"key_padding_mask": _padding()} if padded else {}
    check_layer_against_oracle(layer, _x(), label=name, **kw)


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_non_causal_against_oracle(name):
    layer = LAYERS[name]
    layer.causal = False
    try:
        check_layer_against_oracle(layer, _x(N=7), label=name)
    finally:
        layer.causal = True


@pytest.mark.parametrize("name", sorted(LAYERS))
@pytest.mark.parametrize("prefill", [1, 5])
def test_decode(name, prefill):
    """Prefill then token by token equals the uncached forward (relative 1e-6 in fp32)."""
    check_decode(LAYERS[name], _x(N=11, seed=3), prefill=prefill)


def test_decode_with_padding():
    layer = LAYERS["rcmha"]
    x, m = _x(N=9, seed=4), _padding(N=9)
    m[1] = True
    with torch.no_grad():
        full = layer(x, key_padding_mask=m)
        cache = layer.make_cache(2, 9)
        parts = [layer(x[:, :4], key_padding_mask=m[:, :4], cache=cache)]
        parts += [layer(x[:, i : i + 1], key_padding_mask=m[:, i : i + 1], cache=cache) for i in range(4, 9)]
    got = torch.cat(parts, 1)
    assert (got - full)[m].abs().max() <= 1e-6 * full.abs().max()


@pytest.mark.parametrize("name", ["moh", "bam", "minimal_shared", "rcmha", "sqa"])
def test_causal_prefix(name):
    """The output at position i does not change when the sequence is cut after i."""
    layer, x = LAYERS[name], _x(N=10, seed=5)
    with torch.no_grad():
        full, cut = layer(x), layer(x[:, :6])
    assert torch.allclose(full[:, :6], cut, atol=1e-6, rtol=0)


# -- MoH --------------------------------------------------------------------------------------------------------


def test_moh_routes_exactly_top_k():
    layer = MoHAttention(DIM, 8, shared=2, top_k=3)
    layer(_x(B=3, N=12))
    sel = layer.last_selected
    assert sel.shape == (3, 12, 8)
    assert sel[..., :2].all()  # shared heads always on
    assert (sel[..., 2:].sum(-1) == 3).all()  # exactly k routed heads per token
    assert layer.active_heads == 5
    g, _, _ = layer.gates(_x(B=3, N=12))
    assert ((g[..., 2:] > 0).sum(-1) == 3).all()


def test_moh_gates_two_stage():
    """Shared gates sum to alpha_1, routed (before top-k) to alpha_2, alpha_1 + alpha_2 = 1."""
    layer = MoHAttention(DIM, 8, shared=2, top_k=6)  # all routed heads kept: the gates then sum to 1
    g, pr, _ = layer.gates(_x())
    assert torch.allclose(g.sum(-1), torch.ones(g.shape[:2]), atol=1e-6)
    assert torch.allclose(pr.sum(-1), torch.ones(g.shape[:2]), atol=1e-6)


def test_moh_aux_loss_positive_and_minimal_when_balanced():
    layer = MoHAttention(DIM, 4, shared=0, top_k=2)  # 4 routed heads, k = 2
    R, k = 4, 2
    layer(_x(B=4, N=16))
    assert layer.aux_loss.item() > 0 and layer.aux_loss.requires_grad
    # Balanced: a zero router gives uniform probabilities; perfectly balanced selections give f_i = k / R.
    from attnkit.reference.heads import moh_balance_loss

    T = 8
    uniform = torch.full((T, R), 1 / R)
    balanced = torch.zeros(T, R, dtype=torch.bool)
    for t in range(T):
        balanced[t, [(2 * t) % R, (2 * t + 1) % R]] = True
    low = moh_balance_loss(uniform, balanced).item()
    assert low == pytest.approx(k / R)
    # Collapsed routing (every token the same k heads, confidently) costs more.
    collapsed_p = torch.tensor([[0.7, 0.25, 0.03, 0.02]]).expand(T, R)
    collapsed_s = torch.tensor([[True, True, False, False]]).expand(T, R)
    assert moh_balance_loss(collapsed_p, collapsed_s).item() > low
    # A router that sends every token the same distribution p pays sum of its top-k probabilities >= k / R,
    # with equality only for the uniform p (L_b is not a bound for every router: tokens can disagree).
    for seed in range(20):
        p = torch.softmax(3 * torch.randn(1, R, generator=torch.Generator().manual_seed(seed)), -1).expand(T, R)
        s = torch.zeros_like(p, dtype=torch.bool).scatter(-1, p.topk(k, -1).indices, True)
        assert moh_balance_loss(p, s).item() > low


def test_moh_aux_loss_ignores_padding():
    layer = MoHAttention(DIM, 8, shared=1, top_k=2)
    x, m = _x(), _padding()
    layer(x, key_padding_mask=m)
    a = layer.aux_loss
    layer(x + 100 * (~m)[..., None], key_padding_mask=m)  # padded tokens' content changes
    assert torch.allclose(a, layer.aux_loss)


def test_moh_short_training_balances():
    """A few steps of the aux loss alone lower it (the router learns to balance)."""
    torch.manual_seed(0)
    layer = MoHAttention(16, 8, shared=1, top_k=2)
    with torch.no_grad():
        layer.router_routed.weight.mul_(20)  # start imbalanced
    opt = torch.optim.Adam(layer.parameters(), lr=0.05)
    x = _x(B=4, N=16, dim=16)
    layer(x)
    first = layer.aux_loss.item()
    for _ in range(30):
        opt.zero_grad()
        layer(x)
        layer.aux_loss.backward()
        opt.step()
    assert layer.aux_loss.item() < first


# -- SQA --------------------------------------------------------------------------------------------------------


def test_sqa_flops_proportional_to_query_heads():
    n, H = 64, 16
    flops = {}
    for hq in (16, 8, 4, 2):
        layer = SparseQueryAttention(64, H, q_heads=hq, kv_heads=2)
        flops[hq] = layer.attention_flops(n)
        q = torch.randn(1, hq, n, 4)
        k = torch.randn(1, 2, n, 4)
        assert flops[hq] == ak.explain(q, k, k, causal=True).flops
    for hq in (8, 4, 2):
        assert flops[hq] / flops[16] == pytest.approx(hq / 16)
    # the analytic count, dense non-causal: 4 * B * Hq * N^2 * d
    dense = SparseQueryAttention(64, H, q_heads=4, kv_heads=2, causal=False)
    assert dense.attention_flops(n) == pytest.approx(4 * 4 * n * n * 4)


def test_sqa_variants():
    assert variant_heads("standard", 16) == (8, 4)
    assert variant_heads("symmetric", 16) == (8, 8)
    assert variant_heads("extreme", 16) == (4, 4)
    assert variant_heads("extreme_mqa", 16) == (4, 1)
    layer = SparseQueryAttention.symmetric(64, 8)
    assert (layer.heads, layer.kv_heads, layer.head_dim, layer.total_heads) == (4, 4, 8, 8)
    assert layer.o_proj.in_features == 32  # the output projection shrinks with H_q


# -- BAM --------------------------------------------------------------------------------------------------------


def test_bam_is_router_weighted_sum_of_experts():
    """With one expert BAM is that expert's MHA; upcycled from dense layers, each expert equals its seed layer."""
    from attnkit.layers import Attention

    torch.manual_seed(0)
    seeds = [Attention(DIM, HEADS, causal=True) for _ in range(3)]
    bam = BAMAttention.from_dense(seeds)
    x = _x()
    with torch.no_grad():
        bam.router.weight.zero_()  # uniform router
        want = sum(s(x) for s in seeds) / 3
        assert torch.allclose(bam(x), want, atol=1e-5)
        one = BAMAttention.from_dense(seeds[:1])
        assert torch.allclose(one(x), seeds[0](x), atol=1e-5)
    shared = BAMAttention.from_dense(seeds, shared_kv=True)
    assert torch.allclose(shared.k_proj.weight, torch.stack([s.k_proj.weight for s in seeds]).mean(0))


def test_bam_shared_kv_cache_is_one_attention():
    a, b = BAMAttention(DIM, HEADS, experts=4), BAMAttention(DIM, HEADS, experts=4, shared_kv=True)
    assert a.make_cache(1, 8).bytes_per_token == 4 * b.make_cache(1, 8).bytes_per_token


# -- Minimal ----------------------------------------------------------------------------------------------------


def test_minimal_parameter_counts():
    d, H = 32, 4
    dh = d // H
    assert sum(p.numel() for p in MinimalAttention(d, H, mode="collapsed").parameters()) == d * d
    assert sum(p.numel() for p in MinimalAttention(d, H, mode="symmetric").parameters()) == H * dh * (dh + 1) // 2
    assert sum(p.numel() for p in MinimalAttention(d, H, mode="collapsed", vo=True).parameters()) == 3 * d * d


def test_minimal_similarities_are_symmetric():
    """Shared QK and symmetric S give s_ij = s_ji (a token is as similar to j as j is to it)."""
    x = _x(B=1, N=6)
    for mode in ("shared", "symmetric"):
        layer = MinimalAttention(DIM, HEADS, mode=mode)
        q, k, _ = layer.project(x)
        s = q @ k.transpose(-1, -2)
        assert torch.allclose(s, s.transpose(-1, -2), atol=1e-5), mode
    q, k, _ = MinimalAttention(DIM, HEADS, mode="collapsed").project(x)
    s = q @ k.transpose(-1, -2)
    assert not torch.allclose(s, s.transpose(-1, -2), atol=1e-3)


# -- RCMHA ------------------------------------------------------------------------------------------------------


def test_rcmha_relative_shift_invariance():
    """Only distances matter: shifting every position leaves the output unchanged."""
    layer, x = LAYERS["rcmha"], _x(N=8, seed=6)
    with torch.no_grad():
        a = layer(x)
        b = layer(x, positions=torch.arange(100, 108))
    assert torch.allclose(a, b, atol=1e-4)
    ref = layer.reference(x.double(), positions=torch.arange(100, 108))
    assert torch.allclose(b.double(), ref, atol=1e-4)


def test_rcmha_conv_is_causal_depthwise():
    from attnkit.reference.heads import causal_depthwise_conv

    y = torch.randn(2, 7, 5, dtype=torch.float64)
    w = torch.randn(5, 3, dtype=torch.float64)
    z = causal_depthwise_conv(y, w)
    assert torch.allclose(z[:, 0], w[:, 2] * y[:, 0])
    assert torch.allclose(z[:, 4], w[:, 0] * y[:, 2] + w[:, 1] * y[:, 3] + w[:, 2] * y[:, 4])


# -- bf16 smoke, registry, bad arguments ----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["moh", "sqa", "bam", "minimal_collapsed", "rcmha"])
def test_bf16_runs(name):
    layer = copy.deepcopy(LAYERS[name]).to(torch.bfloat16)
    out = layer(_x().bfloat16())
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


HEAD_RECORDS = [
    "moh",
    "sqa",
    "sqa_symmetric",
    "sqa_extreme",
    "bam",
    "bam_shared_kv",
    "minimal_collapsed",
    "minimal_shared_qk",
    "minimal_symmetric",
    "rcmha",
]


@pytest.mark.parametrize("name", HEAD_RECORDS)
def test_records(name):
    rec = all_records()[name]
    assert rec.family == "D" and rec.kind == "layer" and rec.exact
    layer = rec.make(16, dim=32, heads=4)
    x = _x(B=1, N=6)
    check_layer_against_oracle(layer, x, label=name)
    if "decode" in rec.supports:
        check_decode(layer, x, prefill=2)


@pytest.mark.parametrize(
    "make, arg",
    [
        (lambda: MoHAttention(DIM, HEADS, shared=5), "shared"),
        (lambda: MoHAttention(DIM, HEADS, shared=1, top_k=4), "top_k"),
        (lambda: MoHAttention(DIM, HEADS, shared=-1), "shared"),
        (lambda: MoHAttention(DIM, HEADS, shared=HEADS, top_k=2), "top_k"),
        (lambda: SparseQueryAttention(DIM, 4, q_heads=5), "q_heads"),
        (lambda: SparseQueryAttention(DIM, 8, q_heads=4, kv_heads=3), "kv_heads"),
        (lambda: SparseQueryAttention(DIM, 8, variant="huge"), "variant"),
        (lambda: SparseQueryAttention(DIM, 6, variant="extreme"), "heads"),
        (lambda: SparseQueryAttention(DIM, 8, variant="extreme", q_heads=2), "variant"),
        (lambda: BAMAttention(DIM, HEADS, experts=0), "experts"),
        (lambda: BAMAttention(DIM, 5), "head_dim"),
        (lambda: BAMAttention(DIM, HEADS, shared_kv=1), "shared_kv"),
        (lambda: BAMAttention.from_dense([]), "layers"),
        (lambda: MinimalAttention(DIM, HEADS, mode="diagonal"), "mode"),
        (lambda: MinimalAttention(DIM, 5), "heads"),
        (lambda: RCMHA(DIM, HEADS, kernel_size=0), "kernel_size"),
        (lambda: RCMHA(DIM, HEADS, rel_dim=5), "rel_dim"),
        (lambda: RCMHA(DIM, HEADS, dropout=1.5), "dropout"),
    ],
)
def test_bad_arguments(make, arg):
    with pytest.raises(ShapeError, match=rf"^{arg}:"):
        make()


@pytest.mark.parametrize("name", ["moh", "sqa", "bam", "minimal_collapsed", "rcmha"])
def test_bad_inputs(name):
    layer = LAYERS[name]
    with pytest.raises(ShapeError, match="^x:"):
        layer(torch.randn(2, 5, DIM + 1))
    if name != "sqa":
        with pytest.raises(ShapeError, match="^key_padding_mask:"):
            layer(_x(), key_padding_mask=torch.ones(2, 3, dtype=torch.bool))


def test_rcmha_bad_positions_and_cache():
    layer = LAYERS["rcmha"]
    with pytest.raises(ShapeError, match="^positions:"):
        layer(_x(), positions=torch.arange(3))
    with pytest.raises(ShapeError, match="^cache:"):
        layer(_x(), cache=LAYERS["bam"].make_cache(2, 10))


def test_sqa_with_rope_qk_norm_and_a_window_meets_the_oracle():
    from attnkit.layers import SparseQueryAttention
    from attnkit.patterns import SlidingWindow
    from tests.helpers import check_decode

    torch.manual_seed(31)
    layer = SparseQueryAttention(
        32, 8, variant="symmetric", rope=True, qk_norm=True, mechanism=SlidingWindow(left=5, right=0)
    )
    x = torch.randn(2, 20, 32)
    check_layer_against_oracle(layer, x, label="sqa + rope + window")
    check_decode(layer, x, prefill=6)
