"""The dynamic-sparse bench suite runs every family-B record (and the peers) on the real fixture."""

from __future__ import annotations

import math

from attnkit import registry
from attnkit.bench.dynamic import DynamicConfig, markdown, pareto_plots, run_dynamic


def test_every_selector_is_benchmarked(tmp_path):
    res = run_dynamic(DynamicConfig(sizes=(1024,), budgets=(0.25,)))
    names = {r["selector"] for r in res["rows"]}
    assert names == {r.name for r in registry.records("B")}
    for r in res["rows"]:
        assert 0 < r["density"] <= 1 and 0 <= r["recall"] <= 1 + 1e-6, r
        assert math.isfinite(r["rel_error"]) and r["select_ms"] > 0 and r["attend_ms"] > 0, r
        assert r["causal"] == ("causal" in registry.get(r["selector"]).supports)
    for name in ("seer_attention_trained", "sparsifiner"):
        trained = [r for r in res["rows"] if r["selector"] == name]
        assert trained and all(r["fit_s"] > 0 for r in trained), f"{name} must be fitted (on held-out text)"
    assert {p["peer"].split(".")[0] for p in res["peers"]} == {"routing_transformer", "native_sparse_attention_pytorch"}
    text = "\n".join(markdown(res))
    assert "| moba | 1024 | causal | 1/4 |" in text and "| vmoba | 1024 | full | 1/4 |" in text
    assert "seer_attention_trained at 1024: fitted on held-out text" in text
    assert "sparsifiner at 1024: fitted on held-out text" in text
    assert [p.name for p in pareto_plots(res, tmp_path)] == ["dynamic_pareto_1024.png"]
