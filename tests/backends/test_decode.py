"""The ``decode`` backend: a few queries over a cache, every static pattern, GQA, padding, score mods, bf16,
per-head gathers, the log-sum-exp and the non-finite rule, against the float64 oracle (the 2x-naive rule)."""

import functools
import re
from dataclasses import dataclass

import pytest
import torch

import attnkit as ak
from attnkit import patterns as P
from attnkit import registry
from attnkit.backends import decode
from attnkit.patterns import Pattern

from ..helpers import check_against_oracle, rand_qkv

N = 300
DECODE_PATTERNS = [r.name for r in registry.records("A") if "decode" in r.supports]


@pytest.mark.parametrize("name", DECODE_PATTERNS)
@pytest.mark.parametrize("nq", [1, 5, 16])
def test_every_static_pattern_matches_the_oracle_at_the_end_of_a_cache(name, nq):
    pat = registry.get(name).make(N)
    hq = pat.num_heads or 4
    q, k, v = rand_qkv(2, hq, 2 if hq % 2 == 0 else 1, nq, N, 16, seed=nq)
    off = N - nq
    assert ak.explain(q, k, v, pattern=pat, q_offset=off).backend == "decode"
    check_against_oracle(
        lambda a, b, c: ak.attention(a, b, c, pattern=pat, q_offset=off, backend="decode"),
        q,
        k,
        v,
        grads=False,
        label=name,
        pattern=pat,
        q_offset=off,
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_bf16_and_float64_follow_the_two_x_naive_rule(dtype):
    q, k, v = rand_qkv(1, 4, 2, 3, N, 32, dtype=dtype)
    for pat in (None, P.SlidingWindow(40, 0), registry.get("dilated").make(N)):
        kw = {"pattern": pat, "q_offset": N - 3}
        run = functools.partial(ak.attention, backend="decode", **kw)
        check_against_oracle(run, q, k, v, grads=False, **kw)


def test_padding_score_mods_and_the_log_sum_exp():
    q, k, v = rand_qkv(2, 4, 4, 2, N, 16)
    kpm = torch.ones(2, N, dtype=torch.bool)
    kpm[0, -30:] = False
    kpm[1, 100:140] = False
    pat, score = P.SlidingWindow(64, 0), ak.scores.ALiBi(4)
    kw = {"pattern": pat, "q_offset": N - 2, "key_padding_mask": kpm, "score": score}
    out, lse = ak.attention(q, k, v, backend="decode", return_lse=True, **kw)
    ref, ref_lse = ak.attention(q, k, v, backend="reference", return_lse=True, **kw)
    torch.testing.assert_close(out, ref.float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse.float(), atol=1e-5, rtol=1e-5)


def test_a_query_with_no_key_gives_zero_and_minus_inf():
    q, k, v = rand_qkv(1, 2, 2, 1, 64, 8)
    kpm = torch.ones(1, 64, dtype=torch.bool)
    kpm[:, 40:] = False
    out, lse = ak.attention(
        q, k, v, pattern=P.SlidingWindow(8, 0), q_offset=63, key_padding_mask=kpm, backend="decode", return_lse=True
    )
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()


@dataclass(frozen=True)
class _OwnStride(Pattern):
    """Head h reads the causal keys j with j % 256 == 16 h: a sixteenth of the union each."""

    def __post_init__(self):
        object.__setattr__(self, "num_heads", 16)
        object.__setattr__(self, "causal", True)

    def mask_mod(self, b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (kv_idx % 256 == h * 16)


def test_a_window_reads_a_view_and_heads_with_few_keys_of_their_own_gather_them():
    visible = P.SlidingWindow(16, 0).dense_mask(1, 4096, 4095)
    assert decode._read(visible, 4096) == (slice(4096 - 17, 4096), True)  # keys i - 16 .. i
    shards = registry.get("strided_shards").make(4096)
    vis = shards.dense_mask(1, 4096, 4095, shards.num_heads)
    assert decode._read(vis, 4096) == (slice(0, 4096), True)  # together the heads read every key
    assert decode._per_head(vis, 4096) is None  # a quarter each: the union with a mask is cheaper
    pat = _OwnStride()
    vis = pat.dense_mask(2, 4096, 4094, 16)
    union, exact = decode._read(vis, 4096)
    assert exact and not isinstance(union, slice)  # 256 of 4096 keys: gathered
    idx, valid = decode._per_head(vis, len(union))
    assert idx.shape == (16, 16)
    for h in range(16):  # each head's own keys, in order, and nothing else
        assert torch.equal(idx[h][valid[h]], vis[h].any(0).nonzero().flatten())
    q, k, v = rand_qkv(2, 16, 4, 2, 4096, 8)
    kw = {"pattern": pat, "q_offset": 4094}
    check_against_oracle(lambda a, b, c: ak.attention(a, b, c, backend="decode", **kw), q, k, v, grads=False, **kw)


@pytest.mark.parametrize("where", ["q", "k", "v"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_a_bad_value_a_query_reads_is_named(where, value):
    q, k, v = rand_qkv(1, 2, 1, 1, 64, 8)
    t = {"q": q, "k": k, "v": v}[where]
    t[0, 0, 0 if where == "q" else 60, 3] = value
    at = "(0, 0, 0, 3)" if where == "q" else "(0, 0, 60, 3)"
    with pytest.raises(ak.NonFiniteError, match=rf"^{where}: .*at index {re.escape(at)}"):
        ak.attention(q, k, v, pattern=P.SlidingWindow(8, 0), q_offset=63, backend="decode")


def test_a_bad_key_no_query_reads_never_matters_and_padded_ones_are_dropped():
    q, k, v = rand_qkv(1, 2, 1, 1, 64, 8)
    kw = {"pattern": P.SlidingWindow(8, 0), "q_offset": 63}
    clean = ak.attention(q, k, v, backend="reference", **kw)
    k[0, 0, 3], v[0, 0, 5] = float("nan"), float("inf")  # outside the window
    torch.testing.assert_close(ak.attention(q, k, v, backend="decode", **kw), clean.float())
    q, k, v = rand_qkv(1, 2, 1, 1, 64, 8)
    kpm = torch.ones(1, 64, dtype=torch.bool)
    kpm[:, 60] = False
    k[0, 0, 60] = float("nan")  # inside the window, but padding
    ref = ak.attention(q, k.nan_to_num(0.0), v, backend="reference", key_padding_mask=kpm, **kw)
    got = ak.attention(q, k, v, backend="decode", key_padding_mask=kpm, **kw)
    torch.testing.assert_close(got, ref.float())


def test_it_refuses_what_it_cannot_run_by_name():
    q, k, v = rand_qkv(1, 2, 2, 17, 64, 8)
    with pytest.raises(ak.UnsupportedError, match="at most 16 queries"):
        ak.attention(q, k, v, backend="decode")
    q, k, v = rand_qkv(1, 2, 2, 1, 64, 8, grad=True)
    with pytest.raises(ak.UnsupportedError, match="inference only"):
        ak.attention(q, k, v, backend="decode", q_offset=63)
    assert ak.explain(q.detach(), k.detach(), v.detach(), q_offset=63).backend == "decode"
    assert ak.explain(q, k, v, q_offset=63).backend != "decode"  # a step under autograd goes elsewhere


@pytest.mark.parametrize("hq,hk,nq", [(4, 4, 1), (8, 2, 3), (8, 8, 16), (4, 1, 2)])
def test_strided_shards_read_their_shards_as_views(hq, hk, nq):
    """Below the window each head reads its shard through a strided view of the cache (no gather, no mask): runs
    of heads whose shards lie a fixed distance apart share a view; GQA, several queries, padding, ALiBi and the
    log-sum-exp all follow the oracle."""
    n = 700
    pat = P.StridedShards(heads=hq, shards=4, local=50)
    q, k, v = rand_qkv(2, hq, hk, nq, n, 16, seed=hq + nq)
    req = ak.api._request(
        q,
        k,
        v,
        pattern=pat,
        score=None,
        scale=None,
        key_padding_mask=None,
        q_offset=n - nq,
        return_lse=False,
        normalizer=None,
        backend="decode",
        causal=None,
    )[0]
    sk, chunks = decode._strided(req)
    assert sk.stop == (n - nq - 50 + 1) // 4 * 4 and chunks[0][0] == 0 and chunks[-1][1] == hq
    assert decode.describe(req)["keys_read"] == sk.stop // 4 + n - sk.stop  # a quarter, then the window
    kpm = torch.ones(2, n, dtype=torch.bool)
    kpm[0, 100:300], kpm[1, -20:] = False, False
    for extra in ({}, {"key_padding_mask": kpm, "score": ak.scores.ALiBi(hq)}):
        kw = {"pattern": pat, "q_offset": n - nq, **extra}
        run = functools.partial(ak.attention, backend="decode", **kw)
        check_against_oracle(run, q, k, v, grads=False, **kw)
        out, lse = ak.attention(q, k, v, backend="decode", return_lse=True, **kw)
        ref, ref_lse = ak.attention(q, k, v, backend="reference", return_lse=True, **kw)
        torch.testing.assert_close(lse, ref_lse.float(), atol=1e-5, rtol=1e-5)


def test_strided_views_follow_the_cache_layout_and_bad_keys_are_named():
    n, pat = 400, P.StridedShards(heads=4, shards=4, local=32)
    q, k, v = rand_qkv(1, 4, 4, 1, n, 8)
    kw = {"pattern": pat, "q_offset": n - 1}
    kt, vt = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (k, v))  # a (B, N, H, D) cache, viewed
    got = ak.attention(q, kt, vt, backend="decode", **kw)
    torch.testing.assert_close(got, ak.attention(q, k, v, backend="reference", **kw).float())
    q2, k2, v2 = rand_qkv(1, 4, 4, 1, n, 8, Dv=16)  # k and v strides differ: the masked union runs instead
    check_against_oracle(lambda a, b, c: ak.attention(a, b, c, backend="decode", **kw), q2, k2, v2, grads=False, **kw)
    k[0, 2, 6, 1] = float("nan")  # key 6 is in head 2's shard, far below the window
    with pytest.raises(ak.NonFiniteError, match=r"^k: .*at index \(0, 2, 6, 1\)"):
        ak.attention(q, k, v, backend="decode", **kw)
