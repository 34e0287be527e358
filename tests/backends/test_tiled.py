"""The tiled kernel's softmax paths on hand-built block layouts.

Plain softmax runs through the native C++ forward (``ATTNKIT_TILED_KERNEL=native``) or the torch-op forward,
the fused CPU flash op with the causal diagonal tiles batched per unit (``torch``); a score mod sends the same
layout down the unfused ``bmm``/``exp`` path. Every path must match the float64 oracle over the layout's mask,
including rows left with no key (out 0, lse -inf) and folded GQA heads; the backward is the same for all.
"""

from __future__ import annotations

import pytest
import torch

from attnkit import reference
from attnkit.backends.tiled import tiled_attention
from attnkit.backends.tiled._plan import _fused_plan
from attnkit.layout import BlockLayout
from tests.helpers import check_against_oracle, err, rand_qkv

BLOCK = 16
PATHS = ["native", "torch", "unfused"]


class _Identity:
    """A score mod that changes nothing, so the kernel takes its unfused path."""

    def score_mod(self, s, b, h, qi, kj):
        return s

    def grad(self, s, h, qi, kj):
        return torch.ones_like(s)


def _path(path: str, monkeypatch):
    """Select a forward: the score mod for the unfused path, else None with the plain-softmax forward set."""
    monkeypatch.setenv("ATTNKIT_TILED_KERNEL", "torch" if path == "unfused" else path)
    return _Identity() if path == "unfused" else None


@pytest.fixture(params=["native", "torch"])
def softmax_forward(request, monkeypatch):
    """Run the test once on each plain-softmax forward."""
    monkeypatch.setenv("ATTNKIT_TILED_KERNEL", request.param)
    return request.param


def _layout(heads, n, causal, seed):
    g = torch.Generator().manual_seed(seed)
    nb = n // BLOCK
    blocks = torch.rand(1, heads, nb, nb, generator=g) < 0.3
    eye = torch.eye(nb, dtype=torch.bool)
    blocks |= eye | eye.roll(-1, 1) if causal else eye
    return BlockLayout.from_blocks(blocks, n, n, BLOCK, causal=causal)


@pytest.mark.parametrize("layout_heads", [2, 4])  # per KV head (folded GQA) and per query head
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("path", PATHS)
def test_every_path_matches_the_oracle(layout_heads, causal, path, monkeypatch):
    q, k, v = rand_qkv(1, 4, 2, 128, 128, 16, seed=3)
    layout = _layout(layout_heads, 128, causal, seed=layout_heads)
    mask = layout.dense_mask()
    if layout_heads == 2:
        mask = mask.repeat_interleave(2, 1)
    score = _path(path, monkeypatch)
    run = lambda q, k, v: tiled_attention(q, k, v, layout, score=score)[0]  # noqa: E731
    check_against_oracle(run, q, k, v, mask=mask, label=path)


def test_rows_without_keys_give_zero_and_minus_infinity(monkeypatch):
    """A query block whose only tile is padding: out 0, lse -inf on every path, and no NaN gradient."""
    q, k, v = rand_qkv(1, 2, 2, 64, 64, 16, seed=5)
    blocks = torch.eye(4, dtype=torch.bool)[None, None].expand(1, 2, 4, 4).clone()
    layout = BlockLayout.from_blocks(blocks, 64, 64, BLOCK, causal=False)
    pad = torch.ones(1, 64, dtype=torch.bool)
    pad[:, 48:] = False  # the last block is all padding: its queries see nothing
    outs = []
    for path in PATHS:
        score = _path(path, monkeypatch)
        qs = q.clone().requires_grad_()
        out, lse = tiled_attention(qs, k, v, layout, key_padding_mask=pad, score=score)
        out.sum().backward()
        assert torch.all(out[:, :, 48:] == 0) and torch.all(lse[:, :, 48:] == float("-inf"))
        assert torch.isfinite(lse[:, :, :48]).all() and torch.isfinite(qs.grad).all()
        outs.append(out.detach())
    ref = reference.attention(q, k, v, mask=layout.dense_mask(), key_padding_mask=pad)
    assert all(err(o, ref) < 1e-5 for o in outs)


def test_causal_lse_and_padding_with_an_offset(softmax_forward):
    """Queries that are the last 96 of 128 keys (q_offset), padded keys, lse against the oracle's."""
    q, k, v = rand_qkv(1, 4, 2, 96, 128, 16, seed=7)
    nqb, nkb = 6, 8
    blocks = torch.rand(1, 2, nqb, nkb, generator=torch.Generator().manual_seed(1)) < 0.4
    blocks |= (torch.arange(nkb)[None, :] == torch.arange(nqb)[:, None] + 2)[None, None]
    layout = BlockLayout.from_blocks(blocks, 96, 128, BLOCK, causal=True, q_offset=32)
    pad = torch.ones(1, 128, dtype=torch.bool)
    pad[:, 5:9] = False
    out, lse = tiled_attention(q, k, v, layout, key_padding_mask=pad, q_offset=32)
    mask = layout.dense_mask().repeat_interleave(2, 1)
    ref, ref_lse = reference.attention(q, k, v, mask=mask, key_padding_mask=pad, return_lse=True)
    assert err(out, ref) < 1e-5
    assert (lse.double() - ref_lse).abs().max() < 1e-4


def _irregular(batch, heads, nq, nk, bq, bk, causal, seed, q_offset=0):
    """A block choice whose rows have very different widths (a dynamic selection's layouts)."""
    g = torch.Generator().manual_seed(seed)
    nqb, nkb = -(-nq // bq), -(-nk // bk)
    keep = torch.rand(batch, heads, nqb, 1, generator=g) ** 2  # per-row densities from ~0 to ~1
    blocks = torch.rand(batch, heads, nqb, nkb, generator=g) < keep
    if causal:  # every query block keeps the key blocks of its own positions (no row left without keys)
        first = q_offset + torch.arange(nqb) * bq
        last = (first + bq - 1).clamp(max=q_offset + nq - 1)
        k0 = torch.arange(nkb) * bk
        blocks |= ((k0[None, :] + bk > first[:, None]) & (k0[None, :] <= last[:, None]))[None, None]
    return BlockLayout.from_blocks(blocks, nq, nk, (bq, bk), causal=causal, q_offset=q_offset)


@pytest.mark.parametrize("bq,bk", [(32, 8), (16, 16), (8, 32)])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("path", PATHS)
def test_rectangular_tiles_and_irregular_rows(bq, bk, causal, path, monkeypatch):
    """Tiles of block_q x block_k, rows of every width (packed and left-padded on the fused path), per batch
    row and per query head; forward and all three gradients against the oracle."""
    q, k, v = rand_qkv(2, 4, 2, 500, 500, 16, seed=11)
    layout = _irregular(2, 4, 500, 500, bq, bk, causal, seed=bq + bk)
    assert (layout.block_q, layout.block_k) == (bq, bk)
    runs = [r for g in range(layout.groups) for r in _fused_plan(layout, g)]
    assert any(r.real is not None for r in runs), "no left-padded run: the test misses the packing"
    assert not causal or any(r.merge and r.bias is not None for r in runs), "no batched causal tail"
    score = _path(path, monkeypatch)
    run = lambda q, k, v: tiled_attention(q, k, v, layout, score=score)[0]  # noqa: E731
    check_against_oracle(run, q, k, v, mask=layout.dense_mask(), label=f"{bq}x{bk} causal={causal} {path}")


def test_rectangular_mask_is_the_block_choice():
    """``from_blocks`` with (block_q, block_k): the pairs are those of the chosen tiles, cut causally."""
    g = torch.Generator().manual_seed(2)
    nq, nk, bq, bk, off = 90, 130, 32, 8, 40
    blocks = torch.rand(1, 3, 3, 17, generator=g) < 0.5
    layout = BlockLayout.from_blocks(blocks, nq, nk, (bq, bk), causal=True, q_offset=off)
    want = blocks.repeat_interleave(bq, 2).repeat_interleave(bk, 3)[:, :, :nq, :nk]
    want &= torch.arange(nk)[None, :] <= off + torch.arange(nq)[:, None]
    assert torch.equal(layout.dense_mask(), want)
    assert layout.pairs == int(want.sum())


def test_packed_rows_with_key_padding_and_an_offset(softmax_forward):
    """The fused path's left-padded runs and batched tails under key padding and q_offset (decode-like)."""
    q, k, v = rand_qkv(2, 4, 2, 96, 160, 16, seed=13)
    layout = _irregular(2, 2, 96, 160, 16, 8, True, seed=4, q_offset=64)
    pad = torch.ones(2, 160, dtype=torch.bool)
    pad[0, 3:40] = False
    pad[1, 150:] = False
    out, lse = tiled_attention(q, k, v, layout, key_padding_mask=pad, q_offset=64)
    mask = layout.dense_mask().repeat_interleave(2, 1)
    ref, ref_lse = reference.attention(q, k, v, mask=mask, key_padding_mask=pad, return_lse=True)
    assert err(out, ref) < 1e-5
    fin = torch.isfinite(ref_lse)
    assert torch.equal(fin, torch.isfinite(lse)) and (lse.double() - ref_lse)[fin].abs().max() < 1e-4


@pytest.mark.parametrize("heads", [1, 2])  # one layout per query head, and one per KV head (G = 2 folded)
def test_causal_tails_whose_first_queries_see_only_padding(heads, softmax_forward):
    """The causal diagonal runs through the op's own mask: a query whose keys in it (``c <= r``) are all padding
    must get nothing from that tile (lse -inf before the merge), not the op's lse 0."""
    q, k, v = rand_qkv(1, 2, 1, 64, 64, 8, seed=17)
    nb = 64 // BLOCK
    blocks = torch.ones(1, heads, nb, nb, dtype=torch.bool)
    layout = BlockLayout.from_blocks(blocks, 64, 64, BLOCK, causal=True)
    assert any(r.causal for g in range(layout.groups) for r in _fused_plan(layout, g)), "no causal tail run"
    pad = torch.ones(1, 64, dtype=torch.bool)
    pad[:, [16, 17, 18, 32, 50]] = False  # queries 16-18 and 32 see only padding in their own block
    pad[:, 48] = False
    mask = layout.dense_mask()
    mask = mask.expand(1, 2, 64, 64) if heads == 1 else mask.repeat_interleave(2 // heads, 1)
    run = lambda q, k, v: tiled_attention(q, k, v, layout, key_padding_mask=pad)[0]  # noqa: E731
    check_against_oracle(run, q, k, v, mask=mask, key_padding_mask=pad, label=f"heads={heads}")
    _, lse = tiled_attention(q, k, v, layout, key_padding_mask=pad)
    _, ref_lse = reference.attention(q, k, v, mask=mask, key_padding_mask=pad, return_lse=True)
    assert (lse.double() - ref_lse).abs().max() < 1e-4
