"""The pruning evaluation's task and report (a tiny run)."""

from attnkit.bench import pruning


def test_tiny_run_reports_every_pruner(smollm2):
    model, tok = smollm2
    res = pruning.run(model, tok, tokens=64, prompts=1)
    assert [r["config"] for r in res["rows"]] == list(pruning.configs())
    dense = res["rows"][0]
    assert dense["kv_share"] == 1.0 and dense["accuracy"] in (0.0, 1.0)
    assert all(r["kv_share"] < 1.0 for r in res["rows"][1:])  # every pruner removes span tokens
    assert "| dense |" in pruning.markdown(res)
