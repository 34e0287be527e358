"""The pruning evaluation's task and report (a tiny run)."""

from attnkit.bench import pruning


def test_tiny_run_reports_every_pruner(smollm2):
    model, tok = smollm2
    res = pruning.run(model, tok, tokens=64, prompts=1, search=1)
    names = [r["config"] for r in res["rows"]]
    assert names[:-1] == list(pruning.configs()) and names[-1].startswith("G-Search schedule")
    dense = res["rows"][0]
    assert dense["kv_share"] == 1.0 and dense["accuracy"] in (0.0, 1.0)
    assert all(r["kv_share"] < 1.0 for r in res["rows"][1:-1])  # every fixed pruner removes span tokens
    assert res["rows"][-1]["kv_share"] <= 1.0 and res["search_s"] > 0
    assert "| dense |" in pruning.markdown(res) and "G-Search fit took" in pruning.markdown(res)
