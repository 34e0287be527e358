"""The core call: auto choice, explain, score mods, caching, and the reference backend."""

from __future__ import annotations

import pytest

import attnkit as ak
from attnkit import layout_cache
from attnkit.patterns.base import clear_cache
from tests.helpers import check_against_oracle, rand_qkv

P = ak.patterns


def test_auto_choices_and_explain_text():
    q, k, v = rand_qkv(1, 4, 2, 512, 512, 16)
    assert ak.explain(q, k, v).backend == "sdpa"
    assert ak.explain(q, k, v, pattern=P.Causal()).backend == "sdpa"
    e = ak.explain(q, k, v, pattern=P.SlidingWindow(31, 0))
    assert e.backend == "tiled"
    text = str(e)
    for word in ("tiled", "sdpa", "flex", "density", "FLOPs", "bytes", "chosen"):
        assert word in text
    assert abs(e.density - P.SlidingWindow(31, 0).density(512, 512)) < 1e-12
    assert e.flops == pytest.approx(4 * 16 * 4 * 512 * 512 * e.density)


def test_training_on_cpu_chooses_tiled_and_never_flex():
    q, k, v = rand_qkv(1, 2, 2, 256, 256, 16, grad=True)
    e = ak.explain(q, k, v, pattern=P.SlidingWindow(31, 0))
    assert e.backend == "tiled" and "backward" in e.reasons["flex"]


@pytest.mark.parametrize("backend", ["tiled", "reference"])
def test_softcap_score_mod(backend):
    q, k, v = rand_qkv(1, 2, 1, 64, 64, 16)
    q = q * 4
    sc = ak.scores.Softcap(3.0)
    check_against_oracle(
        lambda a, b, c: ak.attention(a, b, c, pattern=P.SlidingWindow(9, 2), score=sc, backend=backend),
        q,
        k,
        v,
        pattern=P.SlidingWindow(9, 2),
        score=sc,
        label="softcap",
    )


@pytest.mark.parametrize("backend", ["tiled", "sdpa"])
def test_alibi_score_mod(backend):
    q, k, v = rand_qkv(2, 4, 2, 80, 80, 16)
    al = ak.scores.ALiBi(4)
    check_against_oracle(
        lambda a, b, c: ak.attention(a, b, c, pattern=P.Causal(), score=al, backend=backend),
        q,
        k,
        v,
        pattern=P.Causal(),
        score=al,
        label="alibi",
    )


def test_second_call_hits_the_layout_cache():
    clear_cache()  # other tests may have cached this pattern at other sizes
    pat = P.Power(window=8)
    q, k, v = rand_qkv(1, 2, 2, 300, 300, 16)
    ak.attention(q, k, v, pattern=pat, backend="tiled")
    layouts = [v for k, v in layout_cache.entries("layout") if k.pattern == pat]
    assert len(layouts) == 1
    plans = dict(layouts[0]._plans)
    ak.attention(q, k, v, pattern=pat, backend="tiled")
    again = [v for k, v in layout_cache.entries("layout") if k.pattern == pat]
    assert again == layouts and again[0]._plans.keys() == plans.keys()


def test_composition_per_head_and_full_pattern():
    pat = P.PerHead([P.SlidingWindow(4, 0), P.Causal(), P.Sinks(3) & P.Causal(), P.Dilated(4, 3)])
    q, k, v = rand_qkv(2, 4, 2, 70, 70, 8)
    check_against_oracle(
        lambda a, b, c: ak.attention(a, b, c, pattern=pat, backend="tiled"), q, k, v, pattern=pat, label="perhead"
    )
    assert pat.causal and not (P.Sinks(2) | P.Causal()).causal


def test_dense_without_pattern_matches_oracle_all_backends():
    q, k, v = rand_qkv(2, 4, 4, 40, 56, 16)
    for name in ("sdpa", "tiled"):
        check_against_oracle(lambda a, b, c, name=name: ak.attention(a, b, c, backend=name), q, k, v, label=name)


def test_block_layout_picture_and_summary():
    lay = P.SlidingWindow(31, 0).block_layout(128, 128, 32)
    assert str(lay).splitlines()[:2] == ["+...", "++.."]
    s = lay.summary()
    assert s["tiles_partial"] == 7 and s["tiles_full"] == 0


@pytest.mark.parametrize("pattern", [None, P.Causal()])
def test_sdpa_fast_paths_return_the_oracle_lse(pattern):
    q, k, v = rand_qkv(2, 4, 2, 1500, 1500, 16)
    out, lse = ak.attention(q, k, v, pattern=pattern, return_lse=True, backend="sdpa")
    ref, ref_lse = ak.reference.attention(q, k, v, pattern=pattern, return_lse=True)
    assert (out.double() - ref).abs().max() < 1e-5 and (lse.double() - ref_lse).abs().max() < 1e-4
