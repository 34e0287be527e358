"""Compiled FlexAttention (``backend="flex"``) on fuzzed valid calls. Each new shape compiles (seconds on CPU), so
this test runs in the deep profile only (``ATTNKIT_FUZZ=deep``), on few examples."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tests.fuzz import _check as C
from tests.fuzz.conftest import DEEP, fuzz_settings
from tests.fuzz.strategies import cases, seq_patterns
from tests.fuzz.test_attention import check_valid_call

pytestmark = [
    pytest.mark.compiled,
    pytest.mark.skipif(not DEEP, reason="compiles per shape (seconds each): deep profile only (ATTNKIT_FUZZ=deep)"),
]


@st.composite
def flex_calls(draw):
    c = draw(cases(dtypes=(torch.float32, torch.bfloat16), max_n=48))
    pattern = draw(st.one_of(st.none(), seq_patterns(c.q.shape[1])))
    kw = dict(
        pattern=pattern,
        score=None,
        scale=draw(st.sampled_from([None, 0.5])),
        key_padding_mask=c.kpm,
        q_offset=c.q_offset,
        return_lse=False,
        normalizer=None,
        causal=None,
    )
    return c, kw


@given(flex_calls())
@fuzz_settings(1, deep_examples=12)
@C.counted
def test_flex_matches_the_reference(call):
    c, kw = call
    with torch.no_grad():
        check_valid_call(c, kw, "flex")
