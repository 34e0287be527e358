"""The native (C++) forward of the tiled kernel: built here, matched to the oracle where the C++ has its own code
paths (tile widths that are not a multiple of the 8-wide vector loop, Dv != D, folded GQA heads, key padding,
rows with no key, chunks of several widths), and the policy when it cannot be built."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch

from attnkit import reference
from attnkit.backends import native
from attnkit.backends.tiled import _native
from attnkit.backends.tiled import forward as tiled_forward
from attnkit.backends.tiled import tiled_attention
from attnkit.errors import ShapeError, UnsupportedError
from attnkit.layout import BlockLayout
from tests.helpers import check_against_oracle, err, rand_qkv


def _blocks(batch, heads, nqb, nkb, density, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, heads, nqb, nkb, generator=g) < density


@pytest.mark.parametrize("bq,bk,D,Dv", [(12, 12, 24, 40), (16, 5, 8, 8), (7, 24, 16, 16)])
@pytest.mark.parametrize("layout_heads", [1, 2, 6])  # shared, per KV head (G = 3 folded), per query head
def test_native_matches_the_oracle(bq, bk, D, Dv, layout_heads, native_forward):
    q, k, v = rand_qkv(2, 6, 2, 100, 130, D, Dv=Dv, seed=bq * bk)
    blocks = _blocks(2 if layout_heads > 1 else 1, layout_heads, -(-100 // bq), -(-130 // bk), 0.4, seed=D)
    layout = BlockLayout.from_blocks(blocks, 100, 130, (bq, bk), causal=True, q_offset=30)
    pad = torch.ones(2, 130, dtype=torch.bool)
    pad[0, 10:45] = False
    pad[1, 120:] = False
    mask = layout.dense_mask()
    G = 6 // layout_heads
    mask = mask.expand(2, 6, 100, 130) if layout_heads == 1 else mask.repeat_interleave(G, 1)
    run = lambda q, k, v: tiled_attention(q, k, v, layout, key_padding_mask=pad, q_offset=30)[0]  # noqa: E731
    check_against_oracle(run, q, k, v, mask=mask, key_padding_mask=pad, label=f"{bq}x{bk} heads={layout_heads}")
    _, lse = tiled_attention(q, k, v, layout, key_padding_mask=pad, q_offset=30)
    _, ref_lse = reference.attention(q, k, v, mask=mask, key_padding_mask=pad, return_lse=True)
    fin = torch.isfinite(ref_lse)
    assert not fin.all(), "no query without a key: the test misses that case"
    assert torch.equal(fin, torch.isfinite(lse)) and (lse.double() - ref_lse)[fin].abs().max() < 1e-4
    assert native_forward, "the native forward did not run"


def test_native_chunks_merge_across_a_long_row(native_forward, monkeypatch):
    """Rows of more keys than one chunk (the online-softmax rescale between chunks), bf16 in and out."""
    monkeypatch.setattr(_native, "KEYS", 32)
    q, k, v = rand_qkv(1, 2, 1, 256, 256, 16, dtype=torch.bfloat16, seed=4)
    blocks = torch.ones(1, 1, 16, 16, dtype=torch.bool)
    layout = BlockLayout.from_blocks(blocks, 256, 256, 16, causal=True)
    run = lambda q, k, v: tiled_attention(q, k, v, layout)[0]  # noqa: E731
    out = check_against_oracle(run, q, k, v, mask=layout.dense_mask())
    assert out.dtype == torch.bfloat16 and native_forward == [("forward", 32), ("backward", 32)]


PLAIN = _native._elementwise(None, None, 0)  # the kernel's trailing arguments for plain softmax


def test_native_rejects_a_layout_that_points_outside(monkeypatch):
    monkeypatch.setenv("ATTNKIT_TILED_KERNEL", "native")
    ext = native.module()
    q, k, v = rand_qkv(1, 1, 1, 32, 32, 8, seed=1)
    layout = BlockLayout.from_blocks(torch.ones(1, 1, 2, 2, dtype=torch.bool), 32, 32, 16, causal=False)
    ids = layout.kv_ids.clone()
    ids[0, 1, 1] = 2  # a third key block of a 2-block sequence
    units = torch.tensor([[0, 0, 0, 0]])
    with pytest.raises(ValueError, match="points outside"):
        ext.forward(
            q, k, v, ids, layout.mask_ids, layout.tile_masks, None, units, 1, 16, 16, 0.3, 256, [], 0, 32, *PLAIN
        )
    with pytest.raises(ValueError, match="whole query blocks"):
        ext.forward(
            q, k, v, ids[:, :1], layout.mask_ids[:, :1], layout.tile_masks, None, units, 1, 16, 16, 0.3, 256, [], 0, 32,
            *PLAIN,
        )


def test_the_native_check_raises_the_python_checks_class(native_forward):
    """Behind BlockLayout.check, the C++ bounds check is a second line with the same error class."""
    q, k, v = rand_qkv(1, 1, 1, 32, 32, 8, seed=1)
    layout = BlockLayout.from_blocks(torch.ones(1, 1, 2, 2, dtype=torch.bool), 32, 32, 16, causal=False)
    layout.kv_ids[0, 1, 1] = 2  # after construction: only the kernel's own check sees it
    with pytest.raises(ShapeError, match=r"^layout.kv_ids"):
        layout.check(32, 32)
    with pytest.raises(ShapeError, match=r"^layout \(the native kernel's check\): .*points outside"):
        tiled_forward(q, k, v, layout, 0.3)


@pytest.mark.parametrize("terms", ["rows", "cols+diags", "labels", "labels+positions"])
def test_native_applies_each_token_grain_term(terms, native_forward):
    """Every TokenSelect term (per-token block gates, key stripes, slash diagonals, cluster labels with and
    without causal positions) against the oracle over the layout's own mask (``dense_mask`` applies them)."""
    from attnkit.layout import TokenSelect

    g = torch.Generator().manual_seed(len(terms))
    Hq, Nq, Nk, bq, bk, off = 4, 80, 112, 16, 8, 32
    groups = 2 * 2  # per batch row and KV head: G = 2 query heads folded
    kw = {}
    if "rows" in terms:
        kw["rows"] = torch.rand(groups, Nq, Nk // bk, generator=g) < 0.5
    if "cols" in terms:
        kw["cols"] = torch.rand(groups, Nq // bq, Nk, generator=g) < 0.3
        kw["diags"] = torch.rand(groups, 2 * Nk, generator=g) < 0.3
    if "labels" in terms:
        kw["labels"] = (torch.randint(0, 3, (groups, Nq), generator=g), torch.randint(0, 3, (groups, Nk), generator=g))
    if "positions" in terms:
        kw["positions"] = (
            torch.randperm(Nq, generator=g)[None].expand(groups, Nq) + off,
            torch.arange(Nk)[None].expand(groups, Nk),
        )
    blocks = torch.rand(2, 2, Nq // bq, Nk // bk, generator=g) < 0.6
    layout = BlockLayout.from_blocks(blocks, Nq, Nk, (bq, bk), causal=True, q_offset=off, select=TokenSelect(**kw))
    q, k, v = rand_qkv(2, Hq, 2, Nq, Nk, 16, seed=9)
    mask = layout.dense_mask().repeat_interleave(2, 1)
    run = lambda q, k, v: tiled_attention(q, k, v, layout, q_offset=off)[0]  # noqa: E731
    check_against_oracle(run, q, k, v, mask=mask, label=terms)
    assert native_forward


def test_a_failed_build_warns_once_in_auto_and_raises_in_native(monkeypatch):
    def broken():
        raise OSError("no compiler")

    monkeypatch.setattr(native, "_build", broken)
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setenv("ATTNKIT_TILED_KERNEL", "auto")
    q, k, v = rand_qkv(1, 2, 1, 64, 64, 8, seed=2)
    layout = BlockLayout.from_blocks(torch.ones(1, 1, 4, 4, dtype=torch.bool), 64, 64, 16, causal=True)
    with pytest.warns(RuntimeWarning, match="no compiler"):
        out = tiled_attention(q, k, v, layout)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tiled_attention(q, k, v, layout)  # once per process
    assert native.kernel_name() == "torch"
    assert err(out, reference.attention(q, k, v, mask=layout.dense_mask())) < 1e-5
    monkeypatch.setenv("ATTNKIT_TILED_KERNEL", "native")
    with pytest.raises(UnsupportedError, match="ATTNKIT_TILED_KERNEL.*no compiler"):
        tiled_attention(q, k, v, layout)


def test_an_unknown_kernel_name_is_an_error(monkeypatch):
    monkeypatch.setenv("ATTNKIT_TILED_KERNEL", "fast")
    with pytest.raises(UnsupportedError, match="ATTNKIT_TILED_KERNEL.*auto or native or torch.*fast"):
        native.mode()


def test_the_build_is_reused(monkeypatch):
    """A second process-level load finds the cached build (keyed by source, torch and CPU capability)."""
    monkeypatch.setenv("ATTNKIT_TILED_KERNEL", "native")
    native.module()
    assert any(native.build_dir().glob("*.so"))
    assert native.kernel_name() == "native"


_BUILD = """
import sys, time
from attnkit.backends import native
print(native.kernel_name(), native.build_dir(), flush=True)
"""


def test_processes_that_build_at_once_build_once(tmp_path):
    """Two processes start on an empty cache that also holds a stale torch lock file (from a killed build):
    both get the native forward, one compiles, and neither waits forever."""
    import subprocess
    import sys

    env = {**os.environ, "ATTNKIT_CACHE": str(tmp_path), "ATTNKIT_TILED_KERNEL": "native"}
    where = subprocess.run(
        [sys.executable, "-c", "from attnkit.backends import native; print(native.build_dir())"],
        env=env, capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    (Path(where)).mkdir(parents=True)
    (Path(where) / "lock").write_text("")  # what torch's FileBaton leaves when its process is killed
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _BUILD], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, errs) in zip(procs, outs, strict=True):
        assert p.returncode == 0, errs
        assert out.split()[0] == "native"
    assert len(list(Path(where).glob("*.so"))) == 1
