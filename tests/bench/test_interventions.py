"""The counterfactual-context QA task and its evaluation (a tiny run)."""

from attnkit.bench import interventions as iv


def test_prompts_mark_the_passage_and_both_answers(smollm2):
    _, tok = smollm2
    prompts = iv.counterfactual_prompts(tok, n=6, seed=0)
    assert len(prompts) == 6
    for p in prompts:
        a, b = p.span
        passage = tok.decode(p.ids[0, a:b])
        assert "capital city is" in passage and tok.decode([p.context]).strip() in passage
        assert p.context != p.common and tok.decode([p.common]).strip() not in passage


def test_tiny_run_reports_every_configuration(smollm2):
    model, tok = smollm2
    res = iv.run(model, tok, n=2, profile=1, top_heads=4, top_layers=1)
    names = [r["config"].split(",")[0].split(":")[0] for r in res["rows"]]
    assert names == ["dense", "PASTA", "PASTA", "VAR", "span amplification", "VHR", "CARVE", "CausalMM-style contrast"]
    assert len(res["vhd_heads"]) == 4
    assert len(res["layer_gains"]) == 30 and all(0 <= r["follow"] <= 1 for r in res["rows"])
    assert "| dense |" in iv.markdown(res)
