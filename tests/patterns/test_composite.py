"""EE-MLLM's composite attention (``CompositeAttention``): its independent rule for the conformance suite,
and the properties the paper's mechanism states."""

from __future__ import annotations

import pytest
import torch

import attnkit as ak
from attnkit.errors import PatternError
from tests.helpers import rand_qkv
from tests.patterns.naive_masks import naive_rule


@naive_rule("CompositeAttention")
def _rule(p, i, j, h):
    image = any(a <= i < b for a, b in p.spans)
    return j == i if image else j <= i


def test_no_image_token_attends_to_another_image_token():
    pat = ak.patterns.CompositeAttention(12, ((2, 7), (9, 11)))
    m = pat.dense_mask(12, 12)[0]
    image = torch.zeros(12, dtype=torch.bool)
    image[2:7] = image[9:11] = True
    off_diagonal = ~torch.eye(12, dtype=torch.bool)
    assert not (m & image[:, None] & image[None, :] & off_diagonal).any()
    assert m[image][:, ~image].sum() == 0  # image tokens see no text either: only themselves
    assert torch.equal(m[~image], torch.ones(12, 12, dtype=torch.bool).tril()[~image])  # text stays causal over all


def test_image_token_output_is_its_own_value():
    pat = ak.patterns.CompositeAttention(64, ((8, 40),))
    q, k, v = rand_qkv(1, 2, 2, 64, 64, 16, seed=3)
    out = ak.attention(q, k, v, pattern=pat, backend="tiled")
    torch.testing.assert_close(out[:, :, 8:40], v[:, :, 8:40])


def test_saves_the_image_block():
    n, img = 1024, 512
    pat = ak.patterns.CompositeAttention(n, ((128, 128 + img),))
    causal_pairs = n * (n + 1) / 2
    saved = img * (img + 1) / 2 - img + 128 * img  # the image's causal block and its view of the text before it
    assert pat.density(n, n) * n * n == pytest.approx(causal_pairs - saved)


def test_bad_spans():
    with pytest.raises(PatternError, match="spans"):
        ak.patterns.CompositeAttention(16, ((4, 20),))
