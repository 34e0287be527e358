"""One entry point: a dynamic selector goes through attnkit.attention and attnkit.explain like a pattern."""

from __future__ import annotations

import pytest
import torch

import attnkit as ak
from attnkit import registry
from attnkit.errors import UnsupportedError
from tests.helpers import rand_qkv


@pytest.mark.parametrize("name", ["moba", "sparsifiner", "routing_kmeans"])
def test_attention_runs_a_selector_as_sparse_attention_does(name):
    q, k, v = rand_qkv(1, 4, 2, 256, 256, 16, seed=1)
    sel = registry.get(name).make(256, budget=0.25, heads=4, kv_heads=2, head_dim=16, block=64)
    torch.manual_seed(0)
    out = ak.attention(q, k, v, pattern=sel)
    torch.manual_seed(0)
    ref, selection = ak.sparse_attention(q, k, v, sel, causal=True, return_selection=True)
    torch.testing.assert_close(out, ref)
    again = ak.attention(q, k, v, pattern=selection)  # a Selection made once runs as made (causal)
    torch.testing.assert_close(again, ref)


def test_explain_describes_the_selection():
    q, k, v = rand_qkv(1, 4, 2, 256, 256, 16, seed=2)
    text = str(ak.explain(q, k, v, pattern=registry.get("sparsifiner").make(256, heads=4, head_dim=16)))
    assert "backend: gather" in text and "selection: Sparsifiner chose token indices" in text
    e = ak.explain(q, k, v, pattern=registry.get("moba").make(256))
    assert e.backend == "tiled" and e.selection["form"].startswith("blocks") and 0 < e.density < 0.6


def test_named_backends_that_cannot_run_a_selection_say_why():
    q, k, v = rand_qkv(1, 4, 2, 128, 128, 16, seed=3)
    sel = registry.get("moba").make(128, block=32)
    for backend, why in (("sdpa", "'tiled'"), ("flex", "BlockMask"), ("gather", "token-index")):
        with pytest.raises(UnsupportedError, match=why):
            ak.attention(q, k, v, pattern=sel, backend=backend)
    with pytest.raises(UnsupportedError, match="q_offset"):
        ak.attention(q[:, :, :64], k, v, pattern=sel, q_offset=3)


def test_causal_flag_on_a_static_pattern_is_sdpa_is_causal():
    q, k, v = rand_qkv(1, 2, 2, 64, 64, 16, seed=4)
    window = ak.patterns.SlidingWindow(8, 8)
    causal_window = ak.patterns.SlidingWindow(8, 0)
    torch.testing.assert_close(
        ak.attention(q, k, v, pattern=window, causal=True), ak.attention(q, k, v, pattern=causal_window)
    )
    torch.testing.assert_close(
        ak.attention(q, k, v, causal=True),
        torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True),
    )


def test_a_selection_runs_plain_softmax_only():
    q, k, v = rand_qkv(1, 4, 2, 128, 128, 16, seed=5)
    sel = registry.get("moba").make(128, block=32)
    for backend in ("auto", "tiled", "reference"):
        with pytest.raises(UnsupportedError, match="plain softmax"):
            ak.attention(q, k, v, pattern=sel, score=ak.scores.Softcap(20.0), backend=backend)
        with pytest.raises(UnsupportedError, match="plain softmax"):
            ak.attention(q, k, v, pattern=sel, normalizer=ak.scores.Softplus(), backend=backend)
