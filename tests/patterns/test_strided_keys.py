"""``Pattern.strided_keys``: what a pattern claims about its strided keys holds, key by key, against its own rule."""

import pytest
import torch

import attnkit as ak
from attnkit import patterns as P


@pytest.mark.parametrize("heads,shards,local", [(4, 4, 16), (8, 4, 5), (3, 2, 1), (6, 3, 40)])
@pytest.mark.parametrize("q_offset", [0, 7, 63, 130, 199])
def test_strided_shards_claim_matches_its_mask(heads, shards, local, q_offset):
    pat, kv_len, nq = P.StridedShards(heads=heads, shards=shards, local=local), 200, 1 + q_offset % 5
    nq = min(nq, kv_len - q_offset)
    sk = pat.strided_keys(q_offset, kv_len)
    if sk is None:  # only when every key below the first query's window is none at all
        assert q_offset - local + 1 < shards
        return
    assert sk.stride == shards and sk.stop % shards == 0 and 0 < sk.stop <= q_offset + 1
    vis = pat.dense_mask(nq, kv_len, q_offset, heads)[:, :, : sk.stop]
    j = torch.arange(sk.stop)
    for h in range(heads):
        want = (j % sk.stride == sk.offsets[h]).expand(nq, -1)
        assert torch.equal(vis[h], want), f"head {h}"


def test_a_pattern_that_does_not_say_has_none_and_dense_mask_starts_where_asked():
    assert P.SlidingWindow(8, 0).strided_keys(100, 200) is None
    pat = P.StridedShards(heads=2, shards=2, local=3)
    full = pat.dense_mask(2, 50, 40, 2)
    assert torch.equal(pat.dense_mask(2, 50, 40, 2, kv_start=30), full[..., 30:])
    assert pat.dense_mask(2, 50, 40, 2, kv_start=50).shape == (2, 2, 0)
    for bad in (-1, 51, 2.0, True):
        with pytest.raises(ak.PatternError, match="kv_start"):
            pat.dense_mask(2, 50, 40, 2, kv_start=bad)
