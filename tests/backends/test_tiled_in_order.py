"""The ``tiled`` backend runs a 2-D or 3-D pattern in the pattern's own token order when that computes fewer
pairs (:func:`attnkit.backends.tiled._backend.tiling`): same answer and gradients as the oracle, in its order."""

from __future__ import annotations

import pytest
import torch

import attnkit
from attnkit.backends.tiled import _backend
from attnkit.patterns.base import InOrder
from attnkit.patterns.maxvit import GridAxis
from attnkit.patterns.neighborhood import Neighborhood
from attnkit.shapes import validate
from tests.helpers import check_against_oracle, rand_qkv

NA = Neighborhood((32, 48), kernel_size=(5, 9))  # 48 is not a power of two: ragged tiles at one edge


def _run(pattern, **kw):
    return lambda q, k, v: attnkit.attention(q, k, v, pattern=pattern, backend="tiled", **kw)


def _renumbered(pat, q, k, training):
    run, _ = _backend.tiling(pat, validate(q, k, k), training=training, reorder=True)
    return isinstance(run, InOrder) and run.base == pat


def test_small_kernels_on_narrow_grids_keep_the_given_order():
    # 32 tokens a row and a 3 x 3 kernel: a tile of 32 raster tokens is already two compact rows
    pat = Neighborhood((32, 32), kernel_size=3)
    q, _, _ = rand_qkv(1, 2, 2, 1024, 1024, 16)
    assert not _renumbered(pat, q, q, False)
    assert _backend.tiling(pat, validate(q, q, q), training=False, reorder=False)[0] is pat


@pytest.mark.parametrize("kernel", ["native", "torch"])
@pytest.mark.parametrize(
    "pat,hq,hkv",
    [
        (NA, 4, 2),  # GQA: k and v are gathered per KV head
        (Neighborhood((8, 8, 16), kernel_size=3, is_causal=True), 2, 2),
        (GridAxis((32, 32), grid=4), 2, 1),
    ],
)
def test_renumbered_run_matches_the_oracle_with_gradients(pat, hq, hkv, kernel, monkeypatch):
    monkeypatch.setenv("ATTNKIT_TILED_KERNEL", kernel)
    n = pat.fixed_length
    q, k, v = rand_qkv(1, hq, hkv, n, n, 16, seed=5)
    assert _renumbered(pat, q, k, False) and _renumbered(pat, q, k, True)
    check_against_oracle(_run(pat), q, k, v, pattern=pat, label=f"{pat} {kernel}")
    with torch.no_grad():  # the scratch-buffer path (no autograd), twice: the buffers are reused
        ref = attnkit.attention(q, k, v, pattern=pat, backend="reference")
        for _ in range(2):
            out, lse = attnkit.attention(q, k, v, pattern=pat, backend="tiled", return_lse=True)
            torch.testing.assert_close(out, ref.float(), atol=2e-6, rtol=1e-5)
        _, lse_ref = attnkit.attention(q, k, v, pattern=pat, backend="reference", return_lse=True)
        torch.testing.assert_close(lse, lse_ref.float(), atol=2e-5, rtol=1e-5)


def test_renumbered_run_in_bf16_and_with_key_padding():
    n = NA.fixed_length
    q, k, v = rand_qkv(2, 2, 2, n, n, 16, dtype=torch.bfloat16, seed=7)
    kpm = torch.ones(2, n, dtype=torch.bool)
    kpm[1, 700:] = False
    check_against_oracle(_run(NA, key_padding_mask=kpm), q, k, v, pattern=NA, key_padding_mask=kpm, label="bf16")


def test_a_score_mod_keeps_the_given_order():
    q, _, _ = rand_qkv(1, 2, 2, NA.fixed_length, NA.fixed_length, 16)
    from attnkit.api import _request

    req, _ = _request(
        q, q, q, pattern=NA, score=attnkit.scores.ALiBi(2), scale=None, key_padding_mask=None, q_offset=0,
        return_lse=False, normalizer=None, backend="tiled", causal=None,
    )  # fmt: skip
    assert not _backend.reorders(req)
