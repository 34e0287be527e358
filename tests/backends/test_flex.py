"""Compiled FlexAttention (a real ``torch.compile`` on CPU): every registered pattern, forward only.

Compiles are slow on CPU (~3-8 s each): one small shape per pattern, and the inductor cache is shared by
the whole test run.
"""

from __future__ import annotations

import pytest
import torch

import attnkit as ak
from attnkit import layout_cache, registry
from tests.helpers import check_against_oracle, rand_qkv

pytestmark = pytest.mark.compiled
RECORDS = registry.records("A")


@pytest.mark.parametrize("rec", RECORDS, ids=[r.name for r in RECORDS])
def test_flex_forward_against_oracle(rec):
    pat = rec.make(64)
    N = pat.fixed_length or 64
    H = pat.num_heads or 4
    q, k, v = rand_qkv(2, H, H // 2, N, N, 16, seed=23)
    kpm = torch.ones(2, N, dtype=torch.bool)
    kpm[1, : N // 2] = False
    check_against_oracle(
        lambda a, b, c: ak.attention(a, b, c, pattern=pat, key_padding_mask=kpm, backend="flex"),
        q,
        k,
        v,
        grads=False,
        pattern=pat,
        key_padding_mask=kpm,
        label=f"{rec.name}/flex",
    )


def test_flex_second_call_reuses_block_mask_and_compile():
    pat = ak.patterns.SlidingWindow(15, 0)
    q, k, v = rand_qkv(1, 2, 2, 128, 128, 16, seed=29)
    ak.attention(q, k, v, pattern=pat, backend="flex")
    masks = [v for key, v in layout_cache.entries("flex-block-mask") if key.pattern == pat]
    assert len(masks) == 1
    ak.attention(q, k, v, pattern=pat, backend="flex")
    again = [v for key, v in layout_cache.entries("flex-block-mask") if key.pattern == pat]
    assert again == masks


def test_flex_bf16_and_decode_offset():
    pat = ak.patterns.AShape(sinks=2, window=16)
    q, k, v = rand_qkv(1, 4, 2, 8, 96, 16, dtype=torch.bfloat16, seed=31)
    check_against_oracle(
        lambda a, b, c: ak.attention(a, b, c, pattern=pat, q_offset=88, backend="flex"),
        q,
        k,
        v,
        grads=False,
        pattern=pat,
        q_offset=88,
        label="flex/bf16/decode",
    )


def test_flex_cpu_backward_and_lse_are_refused_with_a_pointer_to_tiled():
    pat = ak.patterns.Causal()
    q, k, v = rand_qkv(1, 2, 2, 32, 32, 16, grad=True)
    with pytest.raises(ak.UnsupportedError, match="tiled"):
        ak.attention(q, k, v, pattern=pat, backend="flex")
    with torch.no_grad(), pytest.raises(ak.UnsupportedError, match="lse"):
        ak.attention(q, k, v, pattern=pat, backend="flex", return_lse=True)
