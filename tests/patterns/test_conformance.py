"""Registry-driven conformance: every registered pattern on every backend that claims it.

Forward and gradients against the float64 oracle (2x-naive rule), equality with an independently built
mask, causality, GQA, cross lengths, key padding, decode with ``q_offset``, fully masked rows, fp32/bf16.
"""

from __future__ import annotations

import zlib

import pytest
import torch

import attnkit as ak
from attnkit import registry
from tests.helpers import check_against_oracle, err, rand_qkv
from tests.patterns.naive_masks import naive_mask

RECORDS = registry.records("A")
IDS = [r.name for r in RECORDS]
BACKENDS = ["tiled", "sdpa"]


def _setup(rec, n=96):
    pat = rec.make(n)
    N = pat.fixed_length or n
    H = pat.num_heads or 4
    return pat, N, H


@pytest.mark.parametrize("rec", RECORDS, ids=IDS)
def test_dense_mask_equals_independent_rule(rec):
    pat, N, H = _setup(rec, 64)
    dense = pat.dense_mask(N, N, heads=H)
    for h in range(dense.shape[0]):
        assert torch.equal(dense[h], naive_mask(pat, N, N, head=h)), f"{rec.name} head {h}"


@pytest.mark.parametrize("rec", RECORDS, ids=IDS)
def test_layout_covers_exactly_the_mask(rec):
    """The block layout, expanded back to pairs, is the dense mask: nothing lost, nothing extra."""
    pat, N, H = _setup(rec, 100)
    dense = pat.dense_mask(N, N, heads=H)
    lay = pat.block_layout(N, N, 32, heads=H)
    bq, bk = lay.block_q, lay.block_k
    rebuilt = torch.zeros(lay.heads, lay.num_q_blocks * bq, lay.num_kv_blocks * bk, dtype=torch.bool)
    for g in range(lay.heads):
        for i in range(lay.num_q_blocks):
            for s in range(lay.kv_ids.shape[2]):
                j, mid = int(lay.kv_ids[g, i, s]), int(lay.mask_ids[g, i, s])
                if j < 0:
                    continue
                tile = torch.ones(bq, bk, dtype=torch.bool) if mid == -1 else lay.tile_masks[mid]
                rebuilt[g, i * bq : (i + 1) * bq, j * bk : (j + 1) * bk] = tile
    assert torch.equal(rebuilt[:, :N, :N], dense)
    assert lay.pairs == int(dense.sum())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rec", RECORDS, ids=IDS)
def test_forward_and_grads_against_oracle_fp32(rec, backend):
    pat, N, H = _setup(rec)
    q, k, v = rand_qkv(2, H, H // 2 if H % 2 == 0 else H, N, N, 16, seed=zlib.crc32(rec.name.encode()) % 1000)
    check_against_oracle(
        lambda a, b, c: ak.attention(a, b, c, pattern=pat, backend=backend),
        q,
        k,
        v,
        pattern=pat,
        label=f"{rec.name}/{backend}",
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rec", [r for r in RECORDS if "bf16" in r.supports], ids=lambda r: r.name)
def test_bf16(rec, backend):
    pat, N, H = _setup(rec, 64)
    q, k, v = rand_qkv(1, H, H, N, N, 16, dtype=torch.bfloat16, seed=3)
    out = check_against_oracle(
        lambda a, b, c: ak.attention(a, b, c, pattern=pat, backend=backend),
        q,
        k,
        v,
        pattern=pat,
        label=f"{rec.name}/{backend}/bf16",
        grads=backend == "tiled",
    )
    assert out.dtype == torch.bfloat16


@pytest.mark.parametrize(
    # A fixed-length pattern (a grid, marked spans) is not defined on a prefix; its causality is checked on the
    # dense mask by test_causal_flag_and_registry_claims_are_true.
    "rec",
    [r for r in RECORDS if "causal" in r.supports and r.make(96).fixed_length is None],
    ids=lambda r: r.name,
)
def test_causality_cut_after_i(rec):
    pat, N, H = _setup(rec, 96)
    q, k, v = rand_qkv(1, H, H, N, N, 16, seed=5)
    full = ak.attention(q, k, v, pattern=pat, backend="tiled")
    for cut in (1, 17, 50):
        part = ak.attention(q[:, :, :cut], k[:, :, :cut], v[:, :, :cut], pattern=pat, backend="tiled")
        assert err(part, full[:, :, :cut]) < 1e-5, f"{rec.name}: output before {cut} depends on the future"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rec", [r for r in RECORDS if "decode" in r.supports], ids=lambda r: r.name)
def test_decode_with_q_offset_equals_full_forward(rec, backend):
    pat, N, H = _setup(rec, 80)
    q, k, v = rand_qkv(2, H, H, N, N, 16, seed=7)
    full = ak.attention(q, k, v, pattern=pat, backend=backend)
    for t in (N - 1, N - 5, 40):
        step = ak.attention(
            q[:, :, t : t + 1], k[:, :, : t + 1], v[:, :, : t + 1], pattern=pat, q_offset=t, backend=backend
        )
        if pat.causal:
            assert err(step, full[:, :, t : t + 1]) < 1e-5
    # Several queries at once against the full cache (chunked prefill / speculative decode).
    tail = ak.attention(q[:, :, N - 7 :], k, v, pattern=pat, q_offset=N - 7, backend=backend)
    assert err(tail, full[:, :, N - 7 :]) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rec", [r for r in RECORDS if "cross" in r.supports], ids=lambda r: r.name)
def test_cross_lengths(rec, backend):
    pat = rec.make(64)
    q, k, v = rand_qkv(1, 4, 2, 48, 112, 16, seed=11)
    check_against_oracle(
        lambda a, b, c: ak.attention(a, b, c, pattern=pat, backend=backend),
        q,
        k,
        v,
        pattern=pat,
        label=f"{rec.name}/{backend}/cross",
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rec", RECORDS, ids=IDS)
def test_key_padding_and_gqa(rec, backend):
    pat, N, H = _setup(rec, 72)
    Hkv = 1 if pat.num_heads is None else H // 2
    q, k, v = rand_qkv(3, H, Hkv, N, N, 8, seed=13)
    kpm = torch.ones(3, N, dtype=torch.bool)
    kpm[1, N // 2 :] = False
    kpm[2, : N // 3] = False
    kpm[2, -3:] = False
    out = check_against_oracle(
        lambda a, b, c: ak.attention(a, b, c, pattern=pat, key_padding_mask=kpm, backend=backend),
        q,
        k,
        v,
        pattern=pat,
        key_padding_mask=kpm,
        label=f"{rec.name}/{backend}/padding",
    )
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
def test_fully_masked_rows_give_zero_and_minus_inf(backend):
    pat = ak.patterns.SlidingWindow(3, 0)
    q, k, v = rand_qkv(2, 2, 2, 40, 40, 8, seed=17)
    kpm = torch.ones(2, 40, dtype=torch.bool)
    kpm[0, :20] = False  # queries 0..19 of batch 0 see only padding
    out, lse = ak.attention(q, k, v, pattern=pat, key_padding_mask=kpm, return_lse=True, backend=backend)
    assert torch.isfinite(out).all()
    assert (out[0, :, :16] == 0).all()
    assert torch.isneginf(lse[0, :, :16]).all()
    assert torch.isfinite(lse[1]).all()
    ref, ref_lse = ak.reference.attention(q, k, v, pattern=pat, key_padding_mask=kpm, return_lse=True)
    assert err(out, ref) < 1e-5
    live = torch.isfinite(ref_lse)
    assert err(lse[live], ref_lse[live]) < 1e-4


def test_lse_matches_oracle_tiled_with_segments():
    """Rows longer than one segment go through the online-softmax merge; lse must still be exact."""
    from attnkit.backends import tiled

    q, k, v = rand_qkv(1, 2, 2, 64, 5000, 8, seed=19, dtype=torch.float64)
    pat = ak.patterns.GlobalTokens(2) | ak.patterns.SlidingWindow(8, 8)
    lay = pat.block_layout(64, 5000, 32)
    out, lse = tiled.tiled_attention(q, k, v, lay)
    ref, ref_lse = ak.reference.attention(q, k, v, pattern=pat, return_lse=True)
    assert err(out, ref) < 1e-12 and err(lse, ref_lse) < 1e-12


@pytest.mark.parametrize("rec", RECORDS, ids=IDS)
def test_causal_flag_and_registry_claims_are_true(rec):
    """A pattern that says it is causal never lets a query see a later key; 'causal' in supports agrees."""
    pat, N, H = _setup(rec, 64)
    dense = pat.dense_mask(N, N, heads=H)
    is_causal = not bool((dense & ~torch.ones(N, N, dtype=torch.bool).tril()).any())
    assert pat.causal == is_causal, rec.name
    assert ("causal" in rec.supports) == pat.causal, rec.name
    assert ("per_head" in rec.supports) == (pat.num_heads is not None), rec.name
    assert "spatial" not in rec.supports or pat.fixed_length is not None, rec.name
