"""The length-extrapolation and classification evaluations (tiny runs on SmolLM2)."""

from attnkit.bench import classify, length


def test_length_scalings_change_nothing_inside_the_training_length(smollm2):
    model, tok = smollm2
    res = length.run(model, tok, tokens=96, train=64)
    dense, logn, linear, ssmax = res["rows"]
    assert abs(logn["ppl_inside"] - dense["ppl_inside"]) < 1e-3 * dense["ppl_inside"]
    assert abs(linear["ppl_inside"] - dense["ppl_inside"]) < 1e-3 * dense["ppl_inside"]
    assert logn["ppl_past"] != dense["ppl_past"] and ssmax["ppl_inside"] != dense["ppl_inside"]
    assert "PPL, positions 65-96" in length.markdown(res)


def test_classification_prompts_and_a_tiny_act_search(smollm2):
    model, tok = smollm2
    items = classify.prompts(tok, n=6, seed=0)
    assert [label for _, label in items] == [0, 1, 0, 1, 0, 1]
    res = classify.run(model, tok, n=4, search=2, top_layers=1)
    assert len(res["layer_gains"]) == 30 and res["rows"][0]["config"] == "dense"
    assert len(res["rows"]) == (3 if res["layers"] else 1)
    assert "| dense |" in classify.markdown(res)


def test_instruction_emphasis_prompts_and_a_tiny_run(smollm2):
    from attnkit.bench import emphasis

    model, tok = smollm2
    items = emphasis.prompts(tok, n=3, seed=0, filler=40)
    for it in items:
        a, b = it["span"]
        assert tok.decode(it["ids"][a:b]).startswith("Instruction:")
        upper, usual = it["continuations"]
        assert tok.decode(upper).strip().isupper() and not tok.decode(usual).strip().isupper()
    res = emphasis.run(model, tok, n=2, profile=1, top_layers=1)
    assert [r["config"].split(",")[0] for r in res["rows"]] == [
        "dense",
        "PASTA on the instruction",
        "PASTA on the instruction",
    ]
    assert len(res["layer_gains"]) == 30 and "| dense |" in emphasis.markdown(res)
