"""The native kernel's score mods (Softcap, ALiBi) and normalisers (Sigmoid, Softplus), forward and backward:
the 2x-naive rule against the float64 oracle on a layout with partial tiles, folded GQA heads, key padding, a
cache offset and rows with no key; the chunks of a long row adding up; what stays on the torch-op paths."""

from __future__ import annotations

import math

import pytest
import torch

from attnkit import reference
from attnkit.backends.tiled import _native, tiled_attention
from attnkit.errors import ShapeError
from attnkit.layout import BlockLayout
from attnkit.scores import ALiBi, Sigmoid, Softcap, Softplus, TensorBias
from tests.helpers import check_against_oracle, err, rand_qkv

SCORES = {"none": None, "softcap": Softcap(3.0), "alibi": ALiBi(6)}
NORMS = {"softmax": None, "sigmoid": Sigmoid(-2.0), "softplus": Softplus(), "softplus_plain": Softplus(False)}
CASES = [
    (s, n)
    for s in SCORES
    for n in NORMS
    # ALiBi's far keys times log n push every weight of some rows below float32's range: the naive float32 run
    # (and so any float32 kernel) loses those rows, and the rule has nothing to compare against.
    if (s, n) != ("none", "softmax") and (s, n) != ("alibi", "softplus")
]


def _problem(dtype):
    q, k, v = rand_qkv(2, 6, 2, 100, 130, 24, Dv=40, seed=3, dtype=dtype)
    g = torch.Generator().manual_seed(0)
    blocks = torch.rand(1, 2, 9, 11, generator=g) < 0.5  # per KV head: 3 query heads folded into each product
    blocks[0, 0, 2] = False  # a query block that sees no key
    layout = BlockLayout.from_blocks(blocks, 100, 130, (12, 12), causal=True, q_offset=30)
    pad = torch.ones(2, 130, dtype=torch.bool)
    pad[0, 10:45] = False
    pad[1, 120:] = False
    return (q, k, v), layout, pad, layout.dense_mask().repeat_interleave(3, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("score,norm", CASES)
def test_native_score_mods_and_normalisers_match_the_oracle(score, norm, dtype, native_forward):
    (q, k, v), layout, pad, mask = _problem(dtype)
    sc, nm = SCORES[score], NORMS[norm]
    kw = {"key_padding_mask": pad, "q_offset": 30, "score": sc, "normalizer": nm}

    def run(q, k, v):
        return tiled_attention(q, k, v, layout, **kw)[0]

    check_against_oracle(run, q, k, v, mask=mask, label=f"{score} {norm} {dtype}", **kw)
    _, lse = tiled_attention(q, k, v, layout, **kw)
    _, ref_lse = reference.attention(q.double(), k.double(), v.double(), mask=mask, return_lse=True, **kw)
    fin = torch.isfinite(ref_lse)
    assert not fin.all(), "no query without a key: the test misses that case"
    assert torch.equal(fin, torch.isfinite(lse))
    assert (lse.double() - ref_lse)[fin].abs().max() < (1e-4 if dtype == torch.float32 else 0.1)
    assert [c[0] for c in native_forward] == ["forward", "backward", "forward"], "the native kernel did not run"


@pytest.mark.parametrize("score,norm", [("softcap", "softmax"), ("alibi", "sigmoid"), ("softcap", "softplus")])
def test_chunks_of_a_long_row_add_up(score, norm, native_forward, monkeypatch):
    """Rows of more keys than one chunk: weights summed across chunks (no rescale) and the softcap's derivative
    taken per chunk; the same numbers as the torch-op path."""
    monkeypatch.setattr(_native, "KEYS", 32)
    q, k, v = rand_qkv(1, 4, 2, 256, 256, 16, seed=5)
    layout = BlockLayout.from_blocks(torch.ones(1, 1, 16, 16, dtype=torch.bool), 256, 256, 16, causal=True)
    kw = {"score": ALiBi(4) if score == "alibi" else SCORES[score], "normalizer": NORMS[norm]}
    run = lambda q, k, v: tiled_attention(q, k, v, layout, **kw)[0]  # noqa: E731
    out = check_against_oracle(run, q, k, v, mask=layout.dense_mask(), **kw)
    assert ("forward", 32) in native_forward
    monkeypatch.setenv("ATTNKIT_TILED_KERNEL", "torch")
    monkeypatch.setattr("attnkit.backends.native.module", lambda: None)
    assert err(out, tiled_attention(q, k, v, layout, **kw)[0]) < 1e-5  # two float32 orders of summation


def test_what_the_kernel_does_not_compute_runs_the_torch_paths(native_forward):
    """A subclass may change score_mod or weights, and a tensor bias is Python data: both run the torch ops."""

    class Doubled(Softcap):
        def score_mod(self, score, b, h, q_idx, kv_idx):
            return 2 * super().score_mod(score, b, h, q_idx, kv_idx)

        def grad(self, score, h, q_idx, kv_idx):
            return 2 * super().grad(score, h, q_idx, kv_idx)

    q, k, v = rand_qkv(1, 2, 2, 64, 64, 16, seed=6)
    layout = BlockLayout.from_blocks(torch.ones(1, 1, 4, 4, dtype=torch.bool), 64, 64, 16, causal=True)
    bias = TensorBias(torch.randn(2, 64, 64, generator=torch.Generator().manual_seed(0)))
    for score in (Doubled(5.0), bias):
        run = lambda q, k, v, s=score: tiled_attention(q, k, v, layout, score=s)[0]  # noqa: E731
        check_against_oracle(run, q, k, v, mask=layout.dense_mask(), score=score)
    assert native_forward == [], "a score mod the kernel does not know reached it"
    assert _native._elementwise(Doubled(5.0), None, 0) is None and _native._elementwise(None, Sigmoid(0.0), 7)


def test_the_kernel_checks_its_elementwise_arguments(native_forward):
    q, k, v = rand_qkv(1, 6, 2, 64, 64, 16, seed=7)
    layout = BlockLayout.from_blocks(torch.ones(1, 1, 4, 4, dtype=torch.bool), 64, 64, 16, causal=True)
    wrong = ALiBi(4)  # slopes for 4 heads, 6 given: past attnkit.attention's own check, the kernel's
    want = r"^score \(the native kernel's check\): slopes: expected one per query head \(6\), got 4"
    with pytest.raises(ShapeError, match=want):
        _native.forward(_native.native.module(), q, k, v, layout, 0.25, None, score=wrong)


def test_sigmoid_is_not_normalised_and_softplus_is():
    """The two normalisers' outputs differ in kind: Sigmoid's weights keep their scale (a row of n equal keys
    sums to n sigmoid(s + b) v), Softplus's sum to one."""
    q = torch.zeros(1, 1, 1, 8)
    k = torch.zeros(1, 1, 32, 8)
    v = torch.ones(1, 1, 32, 4)
    layout = BlockLayout.from_blocks(torch.ones(1, 1, 1, 2, dtype=torch.bool), 1, 32, (1, 16), causal=False)
    b = -math.log(32)
    out, lse = tiled_attention(q, k, v, layout, normalizer=Sigmoid(b))
    assert torch.allclose(out, torch.full_like(out, 32 / (1 + 32)), rtol=1e-6)
    assert torch.allclose(lse, torch.full_like(lse, math.log(32 / 33)), atol=1e-6)
    out, _ = tiled_attention(q, k, v, layout, normalizer=Softplus())
    assert torch.allclose(out, torch.ones_like(out), rtol=1e-6)
