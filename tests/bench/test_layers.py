"""The layers suite on tiny shapes: every row measured, peers checked against attnkit before timing, targets
judged, the report renders."""

from __future__ import annotations

from attnkit.bench.layers import LayersConfig, markdown, run_layers


def test_layers_suite_runs_on_small_shapes():
    cfg = LayersConfig(sizes=(128, 256), dim=64, heads=4, decode_steps=2, backward_sizes=(128,))
    section = run_layers(cfg)
    rows = section["rows"]
    names = {r["layer"] for r in rows}
    assert {"attnkit dense", "attnkit window 256", "x-transformers Attention", "torch nn.MultiheadAttention"} <= names
    assert {"moh", "sqa", "rcmha", "efficient_probe", "attentive_probe"} <= names  # family D, from the registry
    for c in section["checks"]:
        assert c["max_rel_err_vs_attnkit"] < 1e-4, c
    dense = next(r for r in rows if r["layer"] == "attnkit dense" and r["N"] == 128)
    assert dense["fwd_ms"] > 0 and dense["fwd_bwd_ms"] > 0 and dense["decode_ms"] > 0
    assert dense["cache_bytes_per_token"] == 2 * 64 * 4  # K and V, 4 heads x 16 channels, fp32
    assert len(section["targets"]) >= 2
    h2h = section["head_to_head"]
    assert h2h["N"] == 128 and all(v > 0 for v in h2h["median_ms"].values())
    assert "alternating rounds" in section["targets"][0]["value"]
    text = "\n".join(markdown(section))
    assert "| attnkit dense | 128 |" in text and "## Targets" in text
