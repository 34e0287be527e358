"""Bad input: each kind named in DESIGN.md raises the right type and the message names the argument."""

from __future__ import annotations

import pytest
import torch

import attnkit as ak
from tests.helpers import rand_qkv

P = ak.patterns


def test_wrong_rank():
    q, k, v = rand_qkv(1, 2, 2, 16, 16, 8)
    with pytest.raises(ak.ShapeError, match=r"^q: expected a 4-D tensor"):
        ak.attention(q[0], k, v)


def test_not_a_tensor():
    q, k, v = rand_qkv(1, 2, 2, 16, 16, 8)
    with pytest.raises(ak.DTypeError, match=r"^k: expected a torch.Tensor, got list"):
        ak.attention(q, [1, 2], v)


def test_mismatched_heads_for_gqa():
    q, k, v = rand_qkv(1, 3, 2, 16, 16, 8)
    with pytest.raises(ak.ShapeError, match=r"^k: expected a number of heads that divides q's 3 heads"):
        ak.attention(q, k, v)


def test_mismatched_head_dim():
    q, _, v = rand_qkv(1, 2, 2, 16, 16, 8)
    k = torch.randn(1, 2, 16, 4)
    with pytest.raises(ak.ShapeError, match=r"^k: expected head dim 8"):
        ak.attention(q, k, v)


def test_mismatched_kv_lengths_and_batch():
    q, k, v = rand_qkv(1, 2, 2, 16, 16, 8)
    with pytest.raises(ak.ShapeError, match=r"^v: expected sequence length 16"):
        ak.attention(q, k, v[:, :, :5])
    with pytest.raises(ak.ShapeError, match=r"^k, v: expected batch size 1"):
        ak.attention(q, k.expand(2, -1, -1, -1), v.expand(2, -1, -1, -1))


def test_mismatched_dtypes():
    q, k, v = rand_qkv(1, 2, 2, 16, 16, 8)
    with pytest.raises(ak.DTypeError, match=r"^k: expected the dtype of q"):
        ak.attention(q, k.double(), v)
    with pytest.raises(ak.DTypeError, match=r"^q: expected a floating dtype"):
        ak.attention(q.long(), k, v)


def test_mismatched_devices():
    q, k, v = rand_qkv(1, 2, 2, 16, 16, 8)
    with pytest.raises(ak.DeviceError, match=r"^v: expected the device of q"):
        ak.attention(q, k, v.to("meta"))


def test_zero_sizes():
    q, k, v = rand_qkv(1, 2, 2, 16, 16, 8)
    with pytest.raises(ak.ShapeError, match=r"^q: expected every size >= 1"):
        ak.attention(q[:, :, :0], k, v)


def test_negative_pattern_sizes():
    with pytest.raises(ak.PatternError, match=r"^left: expected an int >= 0, got -1"):
        P.SlidingWindow(-1, 0)
    with pytest.raises(ak.PatternError, match=r"^window: expected an int >= 1, got 0"):
        P.Dilated(0, 2)
    with pytest.raises(ak.PatternError, match=r"^kernel_size: expected an int >= 2"):
        P.Neighborhood((8, 8), kernel_size=0)


def test_kernel_larger_than_the_sequence():
    with pytest.raises(ak.PatternError, match=r"^kernel_size \* dilation: expected <= the input size 8"):
        P.Neighborhood((8, 20), kernel_size=9)
    with pytest.raises(ak.PatternError, match=r"^stride: expected <= kernel_size"):
        P.Neighborhood((16,), kernel_size=3, stride=4)


def test_spatial_pattern_on_the_wrong_length():
    q, k, v = rand_qkv(1, 2, 2, 60, 60, 8)
    with pytest.raises(ak.PatternError, match=r"expected kv_len == 64"):
        ak.attention(q, k, v, pattern=P.Neighborhood((8, 8), 3))


def test_per_head_pattern_with_the_wrong_heads():
    q, k, v = rand_qkv(1, 2, 2, 16, 16, 8)
    with pytest.raises(ak.PatternError, match=r"expected 4 query heads"):
        ak.attention(q, k, v, pattern=P.StridedShards(heads=4))


def test_key_padding_mask_shape_and_dtype():
    q, k, v = rand_qkv(2, 2, 2, 16, 16, 8)
    with pytest.raises(ak.ShapeError, match=r"^key_padding_mask: expected shape \(batch, kv_len\) = \(2, 16\)"):
        ak.attention(q, k, v, key_padding_mask=torch.ones(2, 15, dtype=torch.bool))
    with pytest.raises(ak.DTypeError, match=r"^key_padding_mask: expected a bool tensor"):
        ak.attention(q, k, v, key_padding_mask=torch.ones(2, 16))


def test_q_offset_out_of_range():
    q, k, v = rand_qkv(1, 2, 2, 4, 16, 8)
    with pytest.raises(ak.ShapeError, match=r"^q_offset: expected q_offset \+ q_len <= kv_len \(16\)"):
        ak.attention(q, k, v, q_offset=13)
    with pytest.raises(ak.ShapeError, match=r"^q_offset: expected an int >= 0"):
        ak.attention(q, k, v, q_offset=-1)


def test_unknown_backend_and_bad_scale():
    q, k, v = rand_qkv(1, 2, 2, 16, 16, 8)
    with pytest.raises(ak.ShapeError, match=r"^backend: expected 'auto' or one of"):
        ak.attention(q, k, v, backend="cuda-magic")
    for bad_scale in (-1.0, float("inf"), float("nan"), True, "0.1"):
        with pytest.raises(ak.ShapeError, match=r"^scale: expected a positive finite float"):
            ak.attention(q, k, v, scale=bad_scale)
        with pytest.raises(ak.ShapeError, match=r"^scale: expected a positive finite float"):
            ak.linear.linear_attention(q, k, v, scale=bad_scale)


def test_pattern_and_score_types():
    q, k, v = rand_qkv(1, 2, 2, 16, 16, 8)
    with pytest.raises(ak.DTypeError, match=r"^pattern: expected an attnkit.patterns.Pattern"):
        ak.attention(q, k, v, pattern=lambda b, h, i, j: i >= j)
    with pytest.raises(ak.DTypeError, match=r"^score: expected an attnkit.scores.ScoreMod"):
        ak.attention(q, k, v, score=lambda s, b, h, i, j: s)


def test_memory_budget_names_the_sparse_backend(monkeypatch):
    monkeypatch.setenv("ATTNKIT_MEMORY_BUDGET", "1000")
    q, k, v = rand_qkv(1, 2, 2, 64, 64, 8)
    with pytest.raises(ak.MemoryBudgetError, match=r"backend='tiled'"):
        ak.attention(q, k, v, pattern=P.SlidingWindow(7, 0), backend="sdpa")
    # auto goes to the sparse kernel instead of crashing
    assert ak.explain(q, k, v, pattern=P.SlidingWindow(7, 0)).backend == "tiled"


def test_named_backend_never_falls_back():
    q, k, v = rand_qkv(1, 2, 2, 16, 16, 8)
    with pytest.raises(ak.UnsupportedError, match=r"SDPA cannot apply it"):
        ak.attention(q, k, v, score=ak.scores.Softcap(5.0), backend="sdpa")


def test_tiled_is_cpu_only_and_says_so():
    q, k, v = (t.to("meta") for t in rand_qkv(1, 2, 2, 64, 64, 8))
    with pytest.raises(ak.UnsupportedError, match=r"tiled is a CPU kernel"):
        ak.attention(q, k, v, pattern=P.SlidingWindow(7, 0), backend="tiled")
    # meta tensors stand in for an accelerator here, but FlexAttention itself refuses them, and says so
    assert "not meta" in ak.explain(q, k, v, pattern=P.SlidingWindow(7, 0)).reasons["flex"]
